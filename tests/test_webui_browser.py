"""The web chat in a real headless Chromium: type, Generate, watch the reply stream in, Stop, screenshot; and
several sessions at once (one streaming while another shows a prompt, stops, reloads, disconnects mid-stream).

Needs the Debian packages chromium and chromium-driver (apt-get install -y chromium chromium-driver) and the pip
package selenium; the screenshot goes to artifacts/webui.png (the CI artifact).
"""
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install 'ggml-backend[gradio]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not CHROMIUM or not os.path.exists(CHROMEDRIVER):
    pytest.skip(reason="chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "integrations" / "gradio"))

from selenium.webdriver.common.by import By  # noqa: E402

from ggml_backend import Llama  # noqa: E402
from ggml_backend.default_model import default_model_path  # noqa: E402
from ggml_webui import launch  # noqa: E402

SCREENSHOT = REPO / "artifacts" / "webui.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    demo = launch(Llama(default_model_path(), n_ctx=1024, verbose=False), port=port, prevent_thread_lock=True,
                  quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="webui-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def bot_texts(driver):
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chat .bot, #chat [data-testid='bot']")
            if e.text.strip()]


def test_chat_in_a_browser(app_url, browser):
    browser.get(app_url)
    box = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), 60, "the input box")[0]
    box.send_keys("Write a long story about a cat.")
    browser.find_element(By.ID, "Generate").click()
    user_shown = wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#chat .user, "
                                                                    "#chat [data-testid='user']")
                                   if "long story" in e.text], 60, "the user message")
    assert user_shown
    first = wait_for(lambda: bot_texts(browser), 120, "the first streamed words")[-1]
    longer = wait_for(lambda: [t for t in bot_texts(browser) if len(t) > len(first)], 120, "the reply to grow")[-1]
    assert longer.startswith(first[:5])
    browser.find_element(By.ID, "stop").click()

    def settled():
        before = bot_texts(browser)
        time.sleep(3)
        return before and bot_texts(browser) == before and before
    final = wait_for(settled, 60, "the reply to stop growing")[-1]
    assert final.startswith(first[:5])
    # max_new_tokens is 200: a reply that stopped growing this short was cut by Stop, and was kept on the page
    assert len(final.split()) < 120
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    data = SCREENSHOT.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def open_session(driver, url):
    """A new browser window on the page: a session of its own (its own history and Stop)."""
    driver.switch_to.new_window("window")
    driver.get(url)
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), 60, "the input box")
    return driver.current_window_handle


def send(driver, text):
    box = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), 60, "the input box")[0]
    box.send_keys(text)
    driver.find_element(By.ID, "Generate").click()


def test_sessions_at_once_in_a_browser(app_url, browser):
    """Issue 19: with the model's lock held across yield, a second session pressing Show prompt during a reply
    deadlocked the server, as did Stop and a client leaving mid-stream. Every wait here is bounded."""
    main = browser.current_window_handle
    a = open_session(browser, app_url)
    b = open_session(browser, app_url)
    try:
        browser.switch_to.window(a)
        send(browser, "Write a long story about a dog.")
        first = wait_for(lambda: bot_texts(browser), 120, "session A's first streamed words")[-1]

        # session B, while A streams: Show prompt answers, Stop (B's own) answers, a reload gives a fresh page
        browser.switch_to.window(b)
        browser.find_element(By.CSS_SELECTOR, "#show-prompt-accordion button, #show-prompt-accordion .label-wrap") \
            .click()
        box = browser.find_element(By.CSS_SELECTOR, "#chat-input textarea")
        box.send_keys("What is a prompt?")
        wait_for(lambda: browser.find_elements(By.ID, "show-prompt"), 30, "the Show prompt button")[0].click()
        shown = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#prompt-view textarea")
                         .get_attribute("value"), 60, "the prompt, while another session streams")
        assert shown.endswith("What is a prompt?<|im_end|>\n<|im_start|>assistant\n")
        browser.find_element(By.ID, "stop").click()
        browser.refresh()
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), 60, "B's page again")

        # session A went on streaming all along; its own Stop ends its reply
        browser.switch_to.window(a)
        wait_for(lambda: [t for t in bot_texts(browser) if len(t) > len(first)], 120, "A's reply to grow")
        browser.find_element(By.ID, "stop").click()

        def settled():
            before = bot_texts(browser)
            time.sleep(2)
            return before and bot_texts(browser) == before and before
        assert wait_for(settled, 60, "A's reply to stop")[-1].startswith(first[:5])

        # session B starts a reply and leaves in the middle of it (the server closes the stream from its loop)
        browser.switch_to.window(b)
        send(browser, "Write a long poem about the sea.")
        wait_for(lambda: bot_texts(browser), 120, "B's first streamed words")
        browser.get("about:blank")

        # a third session generates afterwards: the model is free, the reply arrives and ends
        open_session(browser, app_url)
        send(browser, "Say hello.")
        reply = wait_for(settled, 180, "the third session's reply")[-1]
        assert reply.strip()
    finally:
        for handle in browser.window_handles:
            if handle != main:
                browser.switch_to.window(handle)
                browser.close()
        browser.switch_to.window(main)

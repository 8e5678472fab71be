"""The web chat in a real headless Chromium: type, Generate, watch the reply stream in, Stop, screenshot; several
sessions at once (one streaming while another shows a prompt, stops, reloads, disconnects mid-stream); and issue
16's walk through one session: load a JSON card and a PNG card, chat, reload the page, load the past chat,
generate and stop in the Notebook.

Needs the Debian packages chromium and chromium-driver (apt-get install -y chromium chromium-driver) and the pip
package selenium; the screenshots go to artifacts/ (the CI artifact): webui.png, webui-character.png,
webui-past-chat.png, webui-notebook.png.
"""
import json
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
ARTIFACTS = REPO / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    return tmp_path_factory.mktemp("webui-user-data")


def _patient_url_ok(url: str) -> bool:
    """gradio's check that its own page answers before ``launch`` returns (``networking.url_ok``), with more time:
    gradio gives up at the first request that takes 3 s, which a 2-core machine under the suite's other worker
    (compiling kernels) once took, and ``launch`` then failed (a fresh clone's run, 7 December)."""
    import httpx
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.head(url, timeout=10).status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def app_url(user_data):
    from gradio import networking
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(networking, "url_ok", _patient_url_ok)
        demo = launch(Llama(default_model_path(), n_ctx=1024, verbose=False), port=port, prevent_thread_lock=True,
                      quiet=True, user_data_dir=user_data)
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


# ---- issue 16: characters, past chats, the notebook ------------------------------------------------------------------

def click_tab(driver, button_id):
    wait_for(lambda: driver.find_elements(By.ID, button_id), 30, f"the tab button {button_id}")[0].click()


def textarea_value(driver, elem_id):
    found = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea")
    return found[0].get_attribute("value") if found else None


def upload(driver, label, path):
    field = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"input[data-testid='{label}-upload-button']"),
                     30, f"the {label} upload button")[0]
    field.send_keys(str(path))


def choose(driver, elem_id, value):
    """Pick ``value`` in the dropdown ``elem_id`` (open it, click the option)."""
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} input"), 30, f"the menu {elem_id}")[0].click()
    option = wait_for(lambda: [o for o in driver.find_elements(By.CSS_SELECTOR, "li[data-testid='dropdown-option']")
                               if o.get_attribute("aria-label") == value], 30, f"{value!r} in the menu {elem_id}")[0]
    option.click()


def set_mode(driver, mode):
    for label in driver.find_elements(By.CSS_SELECTOR, "#chat-mode label"):
        if label.text.strip() == mode:
            label.click()
            return
    raise AssertionError(f"no mode {mode}")


def chat_texts(driver):
    """The chat's whole text (read in one step: the messages are re-rendered while replies stream)."""
    text = driver.execute_script("const c = document.querySelector('#chat'); return c ? c.innerText : '';")
    return [text] if text and text.strip() else []


def stop_after_growth(driver, texts, stop_id, timeout=120):
    first = wait_for(lambda: texts(), timeout, "the first streamed words")
    wait_for(lambda: texts() != first and texts(), timeout, "the text to grow")
    driver.find_element(By.ID, stop_id).click()

    def settled():
        before = texts()
        time.sleep(2)
        return before and texts() == before and before
    return wait_for(settled, 60, "the text to stop growing")


def shot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    return path


def test_characters_past_chats_and_notebook_in_a_browser(app_url, browser, user_data, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from test_webui_data import V2, png_card
    aria = dict(V2, data=dict(V2["data"], name="Aria", first_mes="Hi {{user}}, I am Aria.",
                              description="A ship's computer."))
    json_card = tmp_path / "Aria.json"
    json_card.write_text(json.dumps(aria), encoding="utf-8")
    png_path = tmp_path / "Seraphina.png"
    png_path.write_bytes(png_card(V2, size=64))

    browser.get(app_url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), 60, "the page")
    set_mode(browser, "chat")
    # a JSON card: its name and context fill the Character tab, its greeting starts a new chat
    click_tab(browser, "parameters-button")
    click_tab(browser, "character-tab-button")
    upload(browser, "📂 Load a character (YAML, JSON, PNG card)", json_card)
    wait_for(lambda: textarea_value(browser, "character-name") == "Aria", 60, "the JSON card's name")
    assert textarea_value(browser, "character-context").startswith("Aria's Persona: A ship's computer.")
    wait_for(lambda: textarea_value(browser, "character-greeting") == "Hi {{user}}, I am Aria.", 60, "the greeting")
    # a PNG card: the same, and its picture beside the character's messages; saved to characters/
    upload(browser, "📂 Load a character (YAML, JSON, PNG card)", png_path)
    wait_for(lambda: textarea_value(browser, "character-name") == "Seraphina", 60, "the PNG card's name")
    browser.find_element(By.ID, "save-character").click()
    wait_for(lambda: (user_data / "characters" / "Seraphina.yaml").is_file(), 60, "the saved character")
    assert (user_data / "characters" / "Seraphina.png").read_bytes() == png_path.read_bytes()

    click_tab(browser, "chat-tab-button")
    wait_for(lambda: any("Hello, You." in t for t in chat_texts(browser)), 60, "the greeting in the chat")
    avatars = wait_for(lambda: [img for img in browser.find_elements(By.CSS_SELECTOR, "#chat img")
                                if "/pictures/" in (img.get_attribute("src") or "") or
                                "gradio_api/file" in (img.get_attribute("src") or "")], 60, "the character's picture")
    assert avatars
    box = browser.find_element(By.CSS_SELECTOR, "#chat-input textarea")
    box.send_keys("Tell me a long story about the forest.")
    browser.find_element(By.ID, "Generate").click()
    reply = stop_after_growth(browser, lambda: bot_texts(browser)[1:], "stop")[-1]
    status = wait_for(lambda: browser.find_element(By.ID, "reply-status").text, 60, "the status line")
    assert "tokens/s" in status and "first token after" in status and "/ 1,024 tokens" in status
    shot(browser, "webui-character.png")
    (saved,) = [p for p in (user_data / "logs" / "chat" / "Seraphina").glob("*.json")
                if "forest" in p.read_text(encoding="utf-8")]

    # a reload is a new session: empty chat; choosing the character and then the past chat brings it back
    browser.refresh()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), 60, "the page again")
    assert not any("forest" in t for t in chat_texts(browser))
    set_mode(browser, "chat")
    click_tab(browser, "parameters-button")
    click_tab(browser, "character-tab-button")
    choose(browser, "character-menu", "Seraphina")
    wait_for(lambda: textarea_value(browser, "character-name") == "Seraphina", 60, "the character chosen")
    click_tab(browser, "chat-tab-button")
    choose(browser, "past-chats", saved.stem)
    wait_for(lambda: any("long story about the forest" in t for t in chat_texts(browser)), 60, "the past chat")
    shown = bot_texts(browser)
    assert shown and shown[-1].strip()[:20] == reply.strip()[:20]
    shot(browser, "webui-past-chat.png")

    # the notebook: Generate streams into the text, Stop ends it there
    click_tab(browser, "notebook-tab-button")
    notebook = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#notebook-text textarea"), 30,
                        "the notebook")[0]
    notebook.send_keys("Once upon a time, in a quiet village,")
    browser.find_element(By.ID, "notebook-generate").click()
    final = stop_after_growth(browser, lambda: [textarea_value(browser, "notebook-text")]
                              if len(textarea_value(browser, "notebook-text") or "") > 40 else [],
                              "notebook-stop")[-1]
    assert final.startswith("Once upon a time, in a quiet village,") and len(final) > 40
    wait_for(lambda: "tokens" in browser.find_element(By.ID, "notebook-status").text, 60, "the notebook's status")
    shot(browser, "webui-notebook.png")

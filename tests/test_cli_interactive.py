"""Interactive ``ggml-backend run -i`` and ``ggml-backend chat`` driven through a pseudo-terminal (pexpect), on the
tiny synthetic model: reverse prompts hand control back, Ctrl-C interrupts generation, Ctrl-D exits."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from refdata import synthetic_file

pexpect = pytest.importorskip("pexpect", reason="pexpect (a dev dependency) drives the interactive CLI through a terminal")

ANSI_USER_INPUT = "\x1b[1m\x1b[32m"     # written just before the program waits for the user (with --color)
TIMINGS = "llama_print_timings:       total time"
PROMPT = "Once upon a time"


def spawn(command: str, *args) -> "pexpect.spawn":
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    child = pexpect.spawn(sys.executable, ["-m", "ggml_backend", command, *map(str, args)], env=env,
                          encoding="utf-8", timeout=90, dimensions=(50, 200))
    return child


def finish(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus if child.exitstatus is not None else 128 + child.signalstatus


@pytest.fixture(scope="module")
def model():
    return synthetic_file("q4_0", "gguf")


@pytest.fixture(scope="module")
def first_three_tokens(model):
    """The greedy text of the first three tokens after PROMPT: a reverse prompt the model is sure to produce."""
    proc = subprocess.run([sys.executable, "-m", "ggml_backend", "run", "-m", str(model), "-p", PROMPT, "--temp", "0",
                           "-n", "3", "--no-display-prompt", "--ignore-eos", "--log-disable"],
                          capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.strip(), "no text generated"
    return text


def test_reverse_prompt_returns_control_then_ctrl_d_exits(model, first_three_tokens):
    child = spawn("run", "-m", model, "-p", PROMPT, "--temp", "0", "-i", "-r", first_three_tokens, "--color",
                  "--ignore-eos", "-n", "4")
    # the prompt, the three tokens, and the program waits for the user: nothing more was generated
    child.expect_exact(PROMPT)
    child.expect_exact(first_three_tokens + ANSI_USER_INPUT)
    child.sendline("and then")
    # -n 4 in interactive mode: four more tokens, then control comes back
    child.expect_exact(ANSI_USER_INPUT)
    child.sendeof()
    child.expect_exact(TIMINGS)
    assert finish(child) == 0


def test_reverse_prompt_without_interactive_stops_generation(model, first_three_tokens):
    proc = subprocess.run([sys.executable, "-m", "ggml_backend", "run", "-m", str(model), "-p", PROMPT, "--temp", "0",
                           "-r", first_three_tokens, "-n", "20", "--ignore-eos", "--no-display-prompt"],
                          capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == first_three_tokens


def test_ctrl_c_interrupts_generation_and_returns_to_the_prompt(model):
    child = spawn("run", "-m", model, "-p", PROMPT, "-i", "--color", "--ignore-eos", "-n", "-1", "-c", "256")
    child.expect_exact(PROMPT)
    child.expect(r"\S{8}")          # generation is under way (it would never stop by itself)
    child.sendintr()
    child.expect_exact(ANSI_USER_INPUT)
    child.sendline("Next part")
    child.expect_exact("Next part")  # the echo of the input line, then
    child.expect(r"[^\s\x1b]{8}")     # generated text again (not colour codes)
    child.sendintr()
    child.expect_exact(ANSI_USER_INPUT)
    # a second Ctrl-C at the prompt exits, with the timings, like main (status 130)
    child.sendintr()
    child.expect_exact(TIMINGS)
    assert finish(child) == 130


def test_instruct_mode_wraps_the_input(model):
    child = spawn("run", "-m", model, "-ins", "--color", "-n", "4", "--temp", "0", "--verbose-prompt",
                  "-p", "Below is an instruction.")
    child.expect_exact("Reverse prompt: '### Instruction:\n\n'".replace("\n", "\r\n"))
    child.expect_exact("\r\n> " + ANSI_USER_INPUT)     # instruct mode waits for the user first
    child.sendline("Say hello")
    child.expect_exact("\r\n> " + ANSI_USER_INPUT)     # four tokens later, back to the user
    child.sendeof()
    child.expect_exact(TIMINGS)
    assert finish(child) == 0


# --- chat -------------------------------------------------------------------------------------------------------

def test_chat_reply_reset_and_ctrl_d(model):
    child = spawn("chat", "-m", model, "--chat-template", "chatml", "--system", "You are terse.", "-n", "6",
                  "--temp", "0", "--ignore-eos")
    child.expect_exact("> ")
    child.sendline("Hello")
    child.expect(r"\r\n> ")        # a reply of at most 6 tokens, then the next prompt
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.expect_exact("> ")
    child.sendeof()
    child.expect_exact(TIMINGS)
    assert finish(child) == 0


def test_chat_ctrl_c_interrupts_a_reply(model):
    child = spawn("chat", "-m", model, "--chat-template", "chatml", "--ignore-eos", "-c", "512")
    child.expect_exact("> ")
    child.sendline("Tell me everything")
    child.expect_exact("Tell me everything")   # the terminal's echo of the input, so that the next match is
    child.expect(r"\S{8}")                     # the reply streaming: Ctrl-C then lands during generation
    child.sendintr()
    child.expect_exact("\r\n> ")
    child.sendeof()
    assert finish(child) == 0


def test_chat_history_is_trimmed_to_the_context(model):
    from ggml_backend import Llama
    from ggml_backend.cli.chat import fit_history
    llm = Llama(str(model), n_ctx=128, verbose=False)
    system = [{"role": "system", "content": "Be brief."}]
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 10},
                  {"role": "assistant", "content": f"answer {i} " + "text " * 10}]
    turns.append({"role": "user", "content": "last question"})
    kept, n_prompt = fit_history(llm, system, turns, room=32, template="chatml")
    assert kept[-1]["content"] == "last question" and kept[0]["role"] == "user"
    assert len(kept) < len(turns)
    assert n_prompt + 32 <= 128
    # one more turn would not have fitted: the trimming keeps as much history as possible
    longer = turns[len(turns) - len(kept) - 2:]
    tokens, _, _ = llm.render_chat_prompt(system + longer, template="chatml")
    assert len(tokens) + 32 > 128
    with pytest.raises(ValueError, match="does not fit"):
        fit_history(llm, system, [{"role": "user", "content": "word " * 200}], room=32, template="chatml")


def test_user_input_past_the_context_shifts_it(model):
    """Six turns of user input and replies in a 64-token context: the history is shifted (the --keep'd prompt
    stays) instead of failing, and every turn gets its reply."""
    child = spawn("run", "-m", model, "-c", "64", "-i", "--color", "-n", "30", "--ignore-eos", "-p", "Start",
                  "--keep", "-1")
    for i in range(6):
        child.expect_exact(ANSI_USER_INPUT)
        child.sendline(f"this is a fairly long line of user input number {i}")
    child.expect_exact(ANSI_USER_INPUT)
    child.sendeof()
    child.expect(r"prompt eval time = +[\d.]+ ms / +(\d+) tokens")
    assert int(child.match.group(1)) > 64        # more was evaluated than the context holds
    child.expect(r"eval time = +[\d.]+ ms / +(\d+) runs")
    assert int(child.match.group(1)) > 64
    assert finish(child) == 0

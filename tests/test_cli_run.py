"""``ggml-backend run`` (llama.cpp main's command line): greedy text against llama.cpp's, the model card's command line
on GGML v3 and GGUF files, the context shift of ``-n -1`` and clean errors.

What needs a process of its own (the installed entry point, a seed reproduced in another process, Ctrl-C, -ngl's
device probe) runs in subprocesses; the rest (flags, errors, grammars) goes through the same ``main()`` in this
process, which spares a fresh interpreter's start and kernel loading per call."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from refdata import SYNTHETIC_DIR, real_model, synthetic_file

REAL_REF = SYNTHETIC_DIR.parent / "real" / "qwen2.5-coder-0.5b.json"
# The -p of TheBloke-style model cards: the \n are a backslash and an n as typed in the shell.
SEED_CARD_PROMPT = ("<|im_start|>system\\n{system_message}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n"
                    "<|im_start|>assistant")
ANSI_PROMPT, ANSI_RESET = "\x1b[33m", "\x1b[0m"


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "ggml_backend", "run", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=env)


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """``ggml-backend run ARGS`` through the command line's ``main()`` in this process: the same parsing, loop and
    error handling as ``run_cli``, with stdout and stderr captured."""
    from ggml_backend.cli.main import main
    capsys.readouterr()
    code = main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["ggml-backend", "run", *map(str, args)], code, out, err)


def verbose_prompt_ids(stderr: str) -> list[int]:
    """The token ids of --verbose-prompt's listing ("   ID -> 'piece'")."""
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+) -> '", stderr, flags=re.M)]


def timing(stderr: str, label: str) -> int:
    """The count of one llama_print_timings line (tokens or runs)."""
    match = re.search(rf"llama_print_timings: +{label} = +[\d.]+ ms / +(\d+) ", stderr)
    assert match, f"no '{label}' timing line in:\n{stderr}"
    return int(match.group(1))


def assert_clean_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, proc.stderr
    assert needle in error_lines[0], proc.stderr


@pytest.fixture(scope="module")
def qwen_reference():
    if not REAL_REF.is_file():
        pytest.skip(reason=f"{REAL_REF} missing")
    return json.loads(REAL_REF.read_text())["greedy"][0]


# --- the real model ---------------------------------------------------------------------------------------------

def test_greedy_text_matches_llama_cpp(qwen_reference):
    model = real_model("qwen")
    prompt = qwen_reference["prompt"]
    proc = run_cli("-m", model, "-p", prompt, "--temp", "0", "--repeat-penalty", "1.0", "-n", "16", "-c", "256",
                   "-s", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt)          # the prompt is echoed as given, then the generation follows
    generated = proc.stdout[len(prompt):]
    from ggml_backend import Llama
    llm = Llama(str(model), n_ctx=16, verbose=False)
    expected = llm.detokenize(qwen_reference["greedy_tokens"][:16]).decode("utf-8")
    assert qwen_reference["greedy_text"].startswith(expected)
    assert generated == expected
    assert "main: seed  = 1" in proc.stderr
    assert timing(proc.stderr, "prompt eval time") == len(qwen_reference["prompt_tokens"])
    assert timing(proc.stderr, "sample time") == 16
    assert timing(proc.stderr, "eval time") == 15     # the 16th token is never evaluated, as in main


def test_escape_flag_gives_the_same_prompt_tokens(qwen_reference, capsys):
    """-p with real newlines and -e with typed \\n give llama.cpp's prompt tokens; without -e a typed \\n stays
    literal (main's escape was off by default). -n 0 stops before evaluating anything."""
    model = real_model("qwen")
    prompt = qwen_reference["prompt"]
    typed = prompt.replace("\n", "\\n")
    real_newlines = run_main(capsys, "-m", model, "-p", prompt, "-n", "0", "--verbose-prompt")
    escaped = run_main(capsys, "-m", model, "-e", "-p", typed, "-n", "0", "--verbose-prompt", "--no-display-prompt")
    literal = run_main(capsys, "-m", model, "-p", typed, "-n", "0", "--verbose-prompt")
    for proc in (real_newlines, escaped, literal):
        assert proc.returncode == 0, proc.stderr
    assert verbose_prompt_ids(real_newlines.stderr) == qwen_reference["prompt_tokens"]
    assert verbose_prompt_ids(escaped.stderr) == qwen_reference["prompt_tokens"]
    assert escaped.stdout == ""                     # --no-display-prompt, and nothing generated
    assert literal.stdout == typed                  # echoed with its backslashes
    assert verbose_prompt_ids(literal.stderr) != qwen_reference["prompt_tokens"]
    assert "prompt eval time" in real_newlines.stderr and timing(real_newlines.stderr, "prompt eval time") == 0
    assert re.search(r"main: seed  = \d+", real_newlines.stderr)   # no -s: main's time seed, printed


# --- the model card's command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ggml", "gguf"])
def test_model_card_command_line_runs(kind):
    model = synthetic_file("q4_0", kind)
    proc = run_cli("-t", "10", "-ngl", "32", "-m", model, "--color", "-c", "2048", "--temp", "0.7",
                   "--repeat_penalty", "1.1", "-n", "8", "-p", SEED_CARD_PROMPT,
                   "-s", "7",   # the card's line plus a seed: with a time seed the random model may end early
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    # --color: the prompt in yellow, as typed (backslashes kept), then the generation in the default color
    assert proc.stdout.startswith(ANSI_PROMPT + SEED_CARD_PROMPT + ANSI_RESET)
    assert "no CUDA GPU found: running on the CPU" in proc.stderr or "offloading" in proc.stderr   # -ngl 32
    assert "main: seed  = 7" in proc.stderr
    assert "repeat_penalty = 1.100" in proc.stderr and "temp = 0.700" in proc.stderr
    assert "n_ctx = 2048" in proc.stderr
    assert timing(proc.stderr, "sample time") == 8
    assert timing(proc.stderr, "eval time") == 7
    assert re.search(r"load time = +[\d.]+ ms", proc.stderr) and re.search(r"total time = +[\d.]+ ms", proc.stderr)


def test_same_seed_same_text():
    model = synthetic_file("q4_0", "gguf")
    common = ("-m", model, "-p", "Once upon a time", "-n", "12", "--no-display-prompt", "--ignore-eos")
    first = run_cli(*common, "-s", "1234", timeout=120)
    second = run_cli(*common, "-s", "1234", timeout=120)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout and first.stdout == second.stdout
    assert timing(first.stderr, "sample time") == 12


def test_unlimited_generation_shifts_the_context_past_n_ctx():
    """-n -1 -c 64 --ignore-eos never ends by itself: it keeps shifting the context until Ctrl-C, which (as in
    main) prints the timings and exits with status 130."""
    model = synthetic_file("q4_0", "gguf")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "ggml_backend", "run", "-m", str(model), "-n", "-1", "-c", "64",
                             "--ignore-eos", "--no-display-prompt", "-p", "The story begins"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    received = bytearray()
    stderr_chunks: list[bytes] = []

    def read_stdout():
        while chunk := os.read(proc.stdout.fileno(), 4096):
            received.extend(chunk)

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    # No piece of this 4096-token vocabulary is longer than 16 bytes, so 1200 bytes of output are at least 75
    # generated tokens: more than the 64-token context holds.
    try:
        deadline = time.monotonic() + 150
        while len(received) < 1200 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "generation stopped by itself"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join(10)
    stderr = b"".join(stderr_chunks).decode("utf-8", "replace")
    assert len(received) >= 1200, stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert timing(stderr, "eval time") > 64


# --- errors -----------------------------------------------------------------------------------------------------

def test_missing_model_file(tmp_path):
    # a subprocess: the exit status of the installed command itself
    assert_clean_error(run_cli("-m", tmp_path / "nope.gguf", "-p", "hi", "-n", "1", timeout=60), "not found")


def test_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    proc = run_main(capsys, "-m", bad, "-p", "hi", "-n", "1")
    assert_clean_error(proc, "error")
    assert proc.returncode == 1


def test_prompt_longer_than_the_context(capsys):
    model = synthetic_file("q4_0", "ggml")
    proc = run_main(capsys, "-m", model, "-c", "16", "-p", "one two three four five six seven eight nine ten eleven "
                    "twelve thirteen fourteen fifteen sixteen", "-n", "4")
    assert_clean_error(proc, "prompt is too long")


@pytest.mark.parametrize("flags, needle", [
    (("--top-p", "2"), "top_p"),
    (("--mirostat", "3"), "mirostat"),
    (("-c", "-5"), "ctx-size"),
    (("--gqa", "3"), "gqa"),
    (("--draft-max", "4"), "--draft-max needs --lookup"),
    (("--lookup", "--draft-max", "0"), "--draft-max must be between 1"),
])
def test_invalid_parameters(flags, needle, capsys):
    model = synthetic_file("q4_0", "ggml")
    assert_clean_error(run_main(capsys, "-m", model, "-p", "hi", "-n", "1", *flags), needle)


def test_lookup_prints_the_same_text_and_counts_the_drafts(capsys):
    """``run --lookup``: the text of plain decoding, and the drafted / accepted tokens in the timings."""
    model = real_model("qwen")
    prompt = "<|im_start|>user\nRepeat: one two three four five six seven eight nine ten<|im_end|>\n" \
             "<|im_start|>assistant\n"
    common = ("-m", model, "-p", prompt, "-e", "--temp", "0", "-n", "24", "-c", "256")
    plain = run_main(capsys, *common)
    drafted = run_main(capsys, *common, "--lookup", "--draft-max", "6")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout
    assert "prompt lookup =" in drafted.stderr and "prompt lookup" not in plain.stderr


def test_missing_prompt_file(tmp_path, capsys):
    model = synthetic_file("q4_0", "ggml")
    assert_clean_error(run_main(capsys, "-m", model, "-f", tmp_path / "none.txt"), "prompt file")


def test_prompt_file_drops_one_trailing_newline(tmp_path, capsys):
    model = synthetic_file("q4_0", "ggml")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hello there\n", encoding="utf-8")
    proc = run_main(capsys, "-m", model, "-f", prompt_file, "-n", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello there"


def test_escape_processing():
    from ggml_backend.cli.common import process_escapes
    assert process_escapes("a\\nb\\tc\\\\d\\'\\\"\\x41\\q") == "a\nb\tc\\d'\"A\\q"
    assert process_escapes("trailing\\") == "trailing\\"


def test_grammar_and_json_schema_flags(tmp_path, capsys):
    """main's --grammar / --grammar-file / --json-schema: the output follows them and ends with them."""
    proc = run_main(capsys, "-n", 32, "--temp", 1.0, "-s", 5, "-p", "Answer:",
                    "--grammar", 'root ::= " yes" | " no"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("Answer: yes", "Answer: no")
    grammar = tmp_path / "digits.gbnf"
    grammar.write_text('root ::= " " [0-9]{3} "."\n')
    proc = run_main(capsys, "-n", 32, "--temp", 1.0, "-s", 5, "-p", "Number:", "--grammar-file", grammar)
    assert proc.returncode == 0 and re.fullmatch(r"Number: \d{3}\.", proc.stdout.strip()), proc.stdout
    schema = '{"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"], ' \
             '"additionalProperties": false}'
    proc = run_main(capsys, "-n", 48, "--temp", 1.0, "-s", 5, "-p", "Record:", "--json-schema", schema)
    assert proc.returncode == 0
    assert set(json.loads(proc.stdout.strip()[len("Record:"):])) == {"id"}
    assert_clean_error(run_main(capsys, "-n", 4, "-p", "x", "--grammar", "root ::= missing"), "missing")
    assert_clean_error(run_main(capsys, "-n", 4, "-p", "x", "--grammar", "root ::= \"a\"", "--json-schema", "{}"),
                       "one of --grammar")

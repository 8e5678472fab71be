"""``ggml-backend`` command line: a dispatcher over subcommands.

Each subcommand is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
it is the one asked for, so ``ggml-backend info`` never pays for numba or the web UI. To add one, put a line in
``COMMANDS`` (or call ``register_command`` before ``main``).

Every error ends the command with one line on stderr (``ggml-backend COMMAND: error: ...``) and a non-zero exit
status; ``--verbose`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("ggml_backend.cli.info", "show a model file's format, hyper-parameters, vocabulary and tensor types"),
    "convert": ("ggml_backend.cli.convert", "convert a legacy GGML (ggjt v3) LLaMA file to GGUF"),
    "quantize": ("ggml_backend.cli.quantize", "quantize an f32/f16/bf16 model file (llama.cpp's llama-quantize)"),
    "bench": ("ggml_backend.cli.bench", "speed figures (open, prompt, decode, memory) beside llama.cpp's"),
    "run": ("ggml_backend.cli.run", "generate text like llama.cpp's main (same flags; -i/-ins interactive)"),
    "chat": ("ggml_backend.cli.chat", "chat interactively on the model's chat template"),
    "serve": ("ggml_backend.cli.serve", "an HTTP server with OpenAI's, KoboldCpp's and llama.cpp's server APIs"),
    "webui": ("ggml_backend.cli.webui", "a text-generation-webui-style web chat (Gradio) on a model"),
    "batch": ("ggml_backend.cli.batch", "generate over a JSONL/Parquet file of requests (resumable; --ray)"),
    "perplexity": ("ggml_backend.cli.perplexity", "perplexity of a text file, as llama.cpp's perplexity tool"),
}


def register_command(name: str, module: str, help: str) -> None:
    COMMANDS[name] = (module, help)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggml-backend",
                                     description="Pure-Python inference for GGML/GGUF Llama-family models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--verbose", action="store_true", help="print a traceback with an error message")
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def _selected_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_selected_command(argv))
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # noqa: BLE001 (the one place every error becomes a message and an exit status)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"ggml-backend {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1


def error_line(exc: BaseException) -> str:
    """One line for an error: bad files (ModelFileError is a ValueError), bad option values and OS errors speak
    for themselves; anything else is unexpected, so its type is named."""
    if isinstance(exc, (ValueError, OSError, MemoryError)):
        text = str(exc) or type(exc).__name__
        if isinstance(exc, MemoryError):
            text = f"out of memory{': ' + str(exc) if str(exc) else ''}"
    else:
        text = f"{type(exc).__name__}: {exc} (an internal error; --verbose shows where)"
    return " ".join(text.split())   # one line, whatever the message held


if __name__ == "__main__":
    sys.exit(main())

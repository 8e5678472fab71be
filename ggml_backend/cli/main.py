"""``ggml-backend`` command line: a dispatcher over subcommands.

Each subcommand is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when
it is the one asked for, so ``ggml-backend info`` never pays for numba or the web UI. To add one, put a line in
``COMMANDS`` (or call ``register_command`` before ``main``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("ggml_backend.cli.info", "show a model file's format, hyper-parameters, vocabulary and tensor types"),
    "convert": ("ggml_backend.cli.convert", "convert a legacy GGML (ggjt v3) LLaMA file to GGUF"),
    "bench": ("ggml_backend.cli.bench", "speed figures (open, prompt, decode, memory) beside llama.cpp's"),
    "run": ("ggml_backend.cli.run", "generate text like llama.cpp's main (same flags; -i/-ins interactive)"),
    "chat": ("ggml_backend.cli.chat", "chat interactively on the model's chat template"),
    "webui": ("ggml_backend.cli.webui", "a text-generation-webui-style web chat (Gradio) on a model"),
}


def register_command(name: str, module: str, help: str) -> None:
    COMMANDS[name] = (module, help)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggml-backend",
                                     description="Pure-Python inference for GGML/GGUF Llama-family models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
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
    except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
        # Bad files (ModelFileError is a ValueError) and bad option values: one line, no traceback.
        print(f"ggml-backend {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The web chat's status line, measured: tokens/s and time to first token of one chat reply through the page's
two backends, the model in this process (``LocalBackend``) and ``--api`` against ``ggml-backend serve`` on
loopback (``RemoteBackend``, OpenAI chat streaming), on the same model file.

usage: python benchmarks/webui_status.py [-m MODEL] [--tokens 64] [--repeat 3] [--threads 2]

Procedure: the default model (or -m) opened once for the local backend and once by the server (one slot, 2048
tokens); one warm-up reply each; then ``--repeat`` replies each, alternating, to the same ChatML prompt at
temperature 0 with end-of-text banned, so every reply has ``--tokens`` tokens. The figures are what the status line
under the chat shows (``chat.ReplyStats``): decode tokens/s after the first token, and the time to the first token
from the start of the request (prompt evaluation included). Prints each run and the median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "integrations" / "gradio"), str(REPO / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from ggml_backend import Llama
    from ggml_backend.default_model import default_model_path
    from ggml_backend.server import ModelConfig
    from ggml_webui import chat
    from ggml_webui.backend import LocalBackend, RemoteBackend
    from ggml_webui.model_manager import ModelManager
    from ggml_webui.settings import GenerationSettings
    from server_fixtures import running_server

    path = args.model or default_model_path()
    settings = GenerationSettings(max_new_tokens=args.tokens, temperature=0.0, top_k=1, top_p=1.0,
                                  repetition_penalty=1.0, ban_eos_token=True)
    prompt = "<|im_start|>user\nWrite a story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "Write a story about a lighthouse keeper."}]
    local = LocalBackend(ModelManager(Llama(path, n_ctx=2048, n_threads=args.threads, verbose=False)))
    results = {"local": [], "--api": []}
    with running_server(models=[ModelConfig(alias="m", path=path, n_ctx=2048, n_parallel=1,
                                            n_threads=args.threads)]) as (url, _):
        remote = RemoteBackend(url)

        def run(name):
            stats = chat.ReplyStats()
            if name == "local":
                stream = local.stream_prompt(prompt, settings, [], lambda: False, stats)
            else:
                stream = remote.stream_chat(messages, settings, [], lambda: False, stats)
            for _ in stream:
                pass
            return stats

        for name in results:
            run(name)   # warm-up
        for i in range(args.repeat):
            for name in results:
                stats = run(name)
                rate = (stats.tokens - 1) / (stats.elapsed_s - stats.first_token_s)
                results[name].append((rate, stats.first_token_s))
                print(f"run {i + 1} {name:6}: {stats.line()}", flush=True)
        remote.close()
    print(f"\nmodel {os.path.basename(path)}, {args.tokens} tokens, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.2f}")
    for name, runs in results.items():
        print(f"{name:6}: median {statistics.median(r for r, _ in runs):.1f} tokens/s, first token after "
              f"{statistics.median(t for _, t in runs):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

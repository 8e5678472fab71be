"""Pieces shared by ``ggml-backend run`` and ``ggml-backend chat``: llama.cpp-style options, model loading,
prompt escapes, terminal colors and the ``llama_print_timings`` summary.

Options follow llama.cpp's ``main`` (common.cpp of 2023-2024): the same spellings, meanings and defaults, and every
long option also answers to its underscore spelling (``--repeat_penalty``), as llama.cpp accepted both.
"""
from __future__ import annotations

import os
import string
import sys
import time

from ..api import Llama
from ..generation import Sampler, SamplingParams
from ..model.kv_cache import CACHE_TYPES
from ..speculative import LlamaPromptLookupDecoding
from .lookup import add_lookup_arguments, lookup_draft_max

# llama.cpp's console colors (common/console.cpp)
ANSI_RESET = "\x1b[0m"
ANSI_PROMPT = "\x1b[33m"            # yellow: the prompt
ANSI_USER_INPUT = "\x1b[1m\x1b[32m"  # bold green: what the user types


def add_option(parser, *flags: str, **kwargs):
    """``parser.add_argument`` that also registers ``--a_b`` for every ``--a-b`` long flag."""
    names = list(flags)
    for flag in flags:
        if flag.startswith("--") and "-" in flag[2:]:
            alias = "--" + flag[2:].replace("-", "_")
            if alias not in names:
                names.append(alias)
    return parser.add_argument(*names, **kwargs)


def add_model_arguments(parser) -> None:
    add_option(parser, "-m", "--model", default=None,
               help="GGUF or GGML (ggjt v3) model file (default: the embedded default model)")
    add_option(parser, "-c", "--ctx-size", type=int, default=512, help="context size in tokens (default: 512; "
               "0 = the model's training context)")
    add_option(parser, "-t", "--threads", type=int, default=None, help="number of threads (default: all cores)")
    add_option(parser, "-b", "--batch-size", type=int, default=512, help="prompt batch size (default: 512)")
    add_option(parser, "-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0,
               help="layers to offload to an NVIDIA GPU, the last ones (-1: all, and the output layer); needs the "
                    "cuda extra, else runs on the CPU (default: 0)")
    add_option(parser, "--no-mmap", action="store_true",
               help="read the model file into memory (huge pages: faster decode, slower load) instead of mapping it")
    add_option(parser, "-mg", "--main-gpu", type=int, default=0, help="the GPU to use (default: 0)")
    add_option(parser, "--rope-freq-base", type=float, default=0.0, help="RoPE base frequency (0 = from the file)")
    add_option(parser, "--rope-freq-scale", type=float, default=0.0,
               help="RoPE frequency scaling factor (0 = from the file)")
    add_option(parser, "-ctk", "--cache-type-k", default="f16", choices=CACHE_TYPES,
               help="KV cache type of the keys: f16 (default, as llama.cpp), f32 or q8_0")
    add_option(parser, "-ctv", "--cache-type-v", default="f16", choices=CACHE_TYPES,
               help="KV cache type of the values: f16 (default, as llama.cpp), f32 or q8_0")
    add_option(parser, "--gqa", type=int, default=None,
               help="grouped-query attention factor n_head/n_head_kv (GGML files; e.g. 8 for LLaMA-2 70B)")
    add_lookup_arguments(parser)
    add_option(parser, "--chat-template", default=None,
               help="chat template: a built-in name, a file (.jinja/.yaml/.json) or Jinja text")
    add_option(parser, "--log-disable", action="store_true",
               help="no informational messages on stderr (errors are still printed)")


def add_sampling_arguments(parser) -> None:
    """llama.cpp main's sampling flags with its defaults."""
    add_option(parser, "-n", "--n-predict", type=int, default=-1,
               help="tokens to predict (default: -1 = until end of text, shifting the context when full; "
                    "-2 = until the context is full)")
    add_option(parser, "--temp", type=float, default=0.8, help="temperature (default: 0.8; <= 0 = greedy)")
    add_option(parser, "--top-k", type=int, default=40, help="top-k sampling (default: 40, 0 = disabled)")
    add_option(parser, "--top-p", type=float, default=0.95, help="top-p sampling (default: 0.95, 1.0 = disabled)")
    add_option(parser, "--min-p", type=float, default=0.05, help="min-p sampling (default: 0.05, 0.0 = disabled)")
    add_option(parser, "--tfs", type=float, default=1.0, help="tail free sampling z (default: 1.0 = disabled)")
    add_option(parser, "--typical", type=float, default=1.0, help="locally typical p (default: 1.0 = disabled)")
    add_option(parser, "--repeat-penalty", type=float, default=1.1,
               help="penalty for repeated tokens (default: 1.1, 1.0 = disabled)")
    add_option(parser, "--repeat-last-n", type=int, default=64,
               help="tokens considered for the penalties (default: 64, 0 = disabled, -1 = the context)")
    add_option(parser, "--presence-penalty", type=float, default=0.0, help="presence penalty (default: 0.0)")
    add_option(parser, "--frequency-penalty", type=float, default=0.0, help="frequency penalty (default: 0.0)")
    add_option(parser, "--mirostat", type=int, default=0, help="mirostat: 0 off, 1 mirostat, 2 mirostat 2.0")
    add_option(parser, "--mirostat-lr", type=float, default=0.1, help="mirostat learning rate eta (default: 0.1)")
    add_option(parser, "--mirostat-ent", type=float, default=5.0, help="mirostat target entropy tau (default: 5.0)")
    add_option(parser, "--no-penalize-nl", dest="penalize_nl", action="store_false",
               help="do not apply the repetition penalty to the newline token")
    add_option(parser, "-s", "--seed", type=int, default=-1, help="RNG seed (default: -1 = random)")
    add_option(parser, "--ignore-eos", action="store_true", help="never sample end-of-text tokens")
    add_option(parser, "--color", action="store_true", help="color the prompt and user input (ANSI)")
    add_option(parser, "--grammar", default=None, metavar="GBNF",
               help="a GBNF grammar the output must follow (llama.cpp's syntax)")
    add_option(parser, "--grammar-file", default=None, metavar="FILE", help="read the GBNF grammar from a file")
    add_option(parser, "-j", "--json-schema", default=None, metavar="SCHEMA",
               help="a JSON schema the output must follow (e.g. '{}' for any JSON object)")


class InfoLog:
    """Informational lines on stderr, silenced by --log-disable."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str = "") -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)


class TimedLlama(Llama):
    """A Llama that times its evaluations as llama.cpp does: batches of several tokens count as prompt eval,
    single tokens as eval."""

    def __init__(self, *args, **kwargs):
        self.t_start = time.perf_counter()
        self.prompt_eval_s = 0.0
        self.n_prompt_eval = 0
        self.eval_s = 0.0
        self.n_eval = 0
        super().__init__(*args, **kwargs)

    def _eval_every_row(self, tokens):
        """A speculative verification pass counts as one eval run (llama.cpp's lookup counts its decode calls)."""
        t0 = time.perf_counter()
        rows = super()._eval_every_row(tokens)
        self.eval_s += time.perf_counter() - t0
        self.n_eval += 1
        return rows

    def eval(self, tokens) -> None:
        tokens = list(tokens)
        t0 = time.perf_counter()
        super().eval(tokens)
        elapsed = time.perf_counter() - t0
        if len(tokens) == 1:
            self.eval_s += elapsed
            self.n_eval += 1
        elif tokens:
            self.prompt_eval_s += elapsed
            self.n_prompt_eval += len(tokens)


class TimedSampler(Sampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_s = 0.0
        self.n_sample = 0

    def sample(self, logits, recent_tokens=()) -> int:
        t0 = time.perf_counter()
        token = super().sample(logits, recent_tokens)
        self.sample_s += time.perf_counter() - t0
        self.n_sample += 1
        return token


def _rate_line(label: str, seconds: float, count: int, unit: str) -> str:
    ms = seconds * 1000.0
    per_token = ms / count if count else 0.0
    per_second = count / seconds if seconds > 0 and count else 0.0
    return (f"llama_print_timings: {label:>16} = {ms:10.2f} ms / {count:5d} {unit} "
            f"({per_token:8.2f} ms per token, {per_second:8.2f} tokens per second)")


def timing_summary(llm: TimedLlama, sampler: TimedSampler | None) -> str:
    """The five lines of llama.cpp's ``llama_print_timings``."""
    lines = ["", f"llama_print_timings: {'load time':>16} = {llm.load_time_s * 1000.0:10.2f} ms"]
    if sampler is not None:
        lines.append(_rate_line("sample time", sampler.sample_s, sampler.n_sample, "runs  "))
    lines.append(_rate_line("prompt eval time", llm.prompt_eval_s, llm.n_prompt_eval, "tokens"))
    lines.append(_rate_line("eval time", llm.eval_s, llm.n_eval, "runs  "))
    if llm.draft_model is not None:
        share = 100.0 * llm.n_draft_accepted / llm.n_drafted if llm.n_drafted else 0.0
        lines.append(f"llama_print_timings: {'prompt lookup':>16} = {llm.n_drafted:10d} drafted tokens verified, "
                     f"{llm.n_draft_accepted} accepted ({share:.1f}%)")
    lines.append(f"llama_print_timings: {'total time':>16} = {(time.perf_counter() - llm.t_start) * 1000.0:10.2f} ms")
    return "\n".join(lines)


def process_escapes(text: str) -> str:
    """llama.cpp's ``process_escapes``: \\n \\r \\t \\' \\" \\\\ and \\xHH; any other backslash stays as it is."""
    simple = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            hex_digits = text[i + 2:i + 4]
            if nxt == "x" and len(hex_digits) == 2 and all(c in string.hexdigits for c in hex_digits):
                out.append(chr(int(hex_digits, 16)))
                i += 4
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def check_model_arguments(args) -> None:
    if args.ctx_size < 0:
        raise ValueError(f"--ctx-size must be >= 0, got {args.ctx_size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.gqa is not None and args.gqa < 1:
        raise ValueError(f"--gqa must be >= 1, got {args.gqa}")
    if args.n_predict < -2:
        raise ValueError(f"--n-predict must be >= -2, got {args.n_predict}")
    lookup_draft_max(args)


def grammar_from_args(args):
    """The LlamaGrammar of --grammar / --grammar-file / --json-schema (at most one), or None."""
    given = [name for name in ("grammar", "grammar_file", "json_schema") if getattr(args, name, None) is not None]
    if len(given) > 1:
        raise ValueError("give one of --grammar, --grammar-file and --json-schema")
    if not given:
        return None
    from ..generation.grammar import LlamaGrammar
    if args.grammar is not None:
        return LlamaGrammar.from_string(args.grammar)
    if args.grammar_file is not None:
        return LlamaGrammar.from_file(args.grammar_file)
    schema = args.json_schema
    return LlamaGrammar.from_json_schema(schema if schema.strip() not in ("{}", "") else '{"type": "object"}')


def sampling_params(args) -> SamplingParams:
    """SamplingParams from the flags (raises SamplingError, a ValueError, on a bad value)."""
    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, tfs_z=args.tfs,
        typical_p=args.typical, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        mirostat_mode=args.mirostat, mirostat_tau=args.mirostat_ent, mirostat_eta=args.mirostat_lr,
        seed=_flag_seed(args), penalize_nl=args.penalize_nl)


def _flag_seed(args) -> int | None:
    """--seed as the engine keeps it (None: random, by SamplingParams' rule), any negative value meaning -1 as
    in llama.cpp's main."""
    from ..generation.sampling import normalize_seed
    return normalize_seed(None if args.seed is None else max(-1, int(args.seed)))


def _n_head_kv_for_gqa(model_path: str, gqa: int) -> int:
    """--gqa is a factor (n_head / n_head_kv); the engine wants the head count, so read n_head from the file."""
    from ..formats import ModelFileError, load
    model_file = load(model_path)
    arch = model_file.metadata.get("general.architecture", "llama")
    n_head = model_file.metadata.get(f"{arch}.attention.head_count")
    if not isinstance(n_head, int) or n_head < 1:
        raise ModelFileError(model_file.path, f"metadata {arch}.attention.head_count = {n_head!r}; expected a "
                                              "positive integer (--gqa divides it)")
    if n_head % gqa:
        raise ValueError(f"--gqa {gqa} does not divide the model's n_head={n_head}")
    return n_head // gqa


def load_model(args, log: InfoLog) -> TimedLlama:
    """The model the flags ask for, with a clear error for a missing file."""
    check_model_arguments(args)
    model_path = args.model
    if model_path is not None:
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"model file not found: {model_path}")
        if os.path.isdir(model_path):
            raise IsADirectoryError(f"model path is a directory, not a file: {model_path}")
    else:
        from ..default_model import default_model_path
        model_path = default_model_path(progress=log.enabled)
    n_head_kv = _n_head_kv_for_gqa(model_path, args.gqa) if args.gqa else None
    return TimedLlama(model_path, n_ctx=args.ctx_size, n_threads=args.threads, n_batch=args.batch_size,
                      n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu, seed=args.seed,
                      rope_freq_base=args.rope_freq_base, rope_freq_scale=args.rope_freq_scale, verbose=log.enabled, chat_format=args.chat_template,
                      n_head_kv=n_head_kv, type_k=args.cache_type_k, type_v=args.cache_type_v,
                      use_mmap=not args.no_mmap, draft_model=draft_model_from_args(args))


def draft_model_from_args(args):
    """--lookup [--draft-max N]: prompt lookup drafting up to N tokens; None without --lookup."""
    draft_max = lookup_draft_max(args)
    return LlamaPromptLookupDecoding(num_pred_tokens=draft_max) if draft_max else None


def eog_bias(llm: Llama) -> dict[int, float]:
    """--ignore-eos: ban every end-of-generation token (llama.cpp sets their logit bias to -inf)."""
    return {int(t): float("-inf") for t in llm.tokenizer.eog_ids}


def resolve_seed(args) -> int:
    """main's rule: a random seed (negative, or LLAMA_DEFAULT_SEED) becomes the current time."""
    seed = _flag_seed(args)
    return int(time.time()) & 0xFFFFFFFF if seed is None else seed


def make_sampler(args, llm: Llama, seed: int, extra_bias: dict | None = None) -> TimedSampler:
    params = sampling_params(args)
    if extra_bias:
        import dataclasses
        params = dataclasses.replace(params, logit_bias={**params.logit_bias, **extra_bias})
    return TimedSampler(params, n_vocab=llm.n_vocab(), seed=seed, newline_token=llm.token_nl())


class Painter:
    """Writes to stdout, switching colors only with --color."""

    def __init__(self, use_color: bool, stream=None):
        self.use_color = use_color
        self.stream = stream if stream is not None else sys.stdout
        self._current = ANSI_RESET

    def set(self, color: str) -> None:
        if self.use_color and color != self._current:
            self.stream.write(color)
            self._current = color
            self.stream.flush()

    def write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()

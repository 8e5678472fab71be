"""Perplexity of a text, computed as llama.cpp's ``perplexity`` tool computes it (tools/perplexity/perplexity.cpp):
``ggml_backend.perplexity(llm_or_path, text, n_ctx=512)`` returns a ``PerplexityResult``; ``ggml-backend
perplexity`` (cli/perplexity.py) prints it as llama.cpp does.

The procedure, step for step:

* the text is tokenized once, with BOS when the model adds one (special tokens as text);
* it needs at least 2 * n_ctx tokens (llama.cpp's rule, and its message); it is cut into ``len // n_ctx``
  consecutive chunks of n_ctx tokens (or the first ``chunks`` of them);
* each chunk is evaluated from an empty KV cache, its first token replaced by BOS when the model adds BOS, with
  logits for every position;
* only the second half of each chunk is scored, so that every prediction has at least n_ctx/2 tokens of context:
  with ``first = n_ctx // 2``, the logits at positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1 (the
  original tokens); each contributes ``nll = max + log(sum exp(logit - max)) - logit[token]``;
* the running perplexity after chunk i is exp(mean nll so far); the final estimate's uncertainty is llama.cpp's:
  ``sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)) * ppl``.

As in llama.cpp, ``n_batch`` (default 2048) decides how chunks meet the weights: below n_ctx, a chunk is
evaluated in batches of n_batch tokens; from n_ctx on (a multiple of it), ``n_batch // n_ctx`` chunks go through
the weights together in one pass, each in its own KV cache. Passes of many rows are where this engine's prompt
path is fastest: its per-pass cost of dequantizing the weights for sgemm is shared by more tokens.

Memory stays bounded whatever the vocabulary: no n_ctx x n_vocab logits array is ever made (Qwen2.5: 512 x 152k
float32 = 311 MB). The forward pass returns the final hidden states ([n_ctx, n_embd]); the rows to score go
through the output matrix one band of vocabulary rows at a time (about 64 MB of logits), and each row's
log-sum-exp is accumulated over the bands (a running maximum and a rescaled sum of exponentials, in float64),
which is the same quantity llama.cpp computes from the whole row.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .quant.matmul import matmul, single_threaded_blas

#: the most bytes of text read or tokenized: wikitext-2's test set, llama.cpp's usual text, is 1.3 MB; 16 MiB
#: tokenize in about 20 s into a few million ids (a list of Python ints: a few hundred MB at most)
MAX_TEXT_BYTES = 16 << 20
#: float32 logits computed at once while scoring (a band of vocabulary rows for every scored position)
LOGITS_BLOCK_BYTES = 64 << 20


@dataclass
class PerplexityResult:
    """What ``perplexity`` measured. ``ppl_std`` is llama.cpp's "+/-" (NaN when the variance of the
    negative log-likelihoods is not positive, where llama.cpp prints "Unexpected negative standard deviation")."""
    ppl: float
    ppl_std: float
    n_ctx: int
    chunks: int                  # chunks evaluated
    n_batch: int
    n_seq: int                   # chunks per pass through the weights
    n_tokens: int                # tokens of the whole text (with BOS when the model adds one)
    tokens_scored: int           # chunks * (n_ctx - n_ctx // 2 - 1)
    mean_nll: float
    chunk_ppl: list[float] = field(default_factory=list)   # the running value after each chunk ([i] in llama.cpp)
    eval_seconds: float = 0.0    # forward passes and scoring of every chunk
    first_pass_seconds: float = 0.0

    @property
    def tokens_evaluated(self) -> int:
        return self.chunks * self.n_ctx

    @property
    def tokens_per_second(self) -> float:
        """Evaluated tokens (every position of every chunk) per second of evaluation: the prompt path's speed."""
        return self.tokens_evaluated / self.eval_seconds if self.eval_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tokens_evaluated"] = self.tokens_evaluated
        out["tokens_per_second"] = self.tokens_per_second
        return out


def read_text_file(path, max_bytes: int | None = None) -> str:
    """A text file as llama.cpp's ``-f`` reads it: the whole file (UTF-8), one trailing newline dropped; at most
    ``max_bytes`` (default ``MAX_TEXT_BYTES``)."""
    path = os.fspath(path)
    max_bytes = MAX_TEXT_BYTES if max_bytes is None else max_bytes
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"text path is a directory, not a file: {path}")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"text file {path} is larger than {max_bytes} bytes (the most perplexity reads)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8: byte {exc.start} ({data[exc.start]:#04x}) does not "
                         f"decode") from None
    return text[:-1] if text.endswith("\n") else text


def _positive_int(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def perplexity(model, text, n_ctx: int = 512, *, n_batch: int = 2048, chunks: int | None = None,
               n_threads: int | None = None, on_start: Callable[[int, int], None] | None = None,
               progress: Callable[[int, float, float], None] | None = None) -> PerplexityResult:
    """llama.cpp's perplexity of ``text`` (str or UTF-8 bytes) under ``model``: a ``Llama``, or a model file's path
    (loaded here and closed after; None means the default model). See the module docstring for the procedure.

    ``n_ctx``: the chunk size, at most the model's training context; ``n_batch``: tokens per pass (below n_ctx,
    or a multiple of it, as llama.cpp asserts); ``chunks``: evaluate at most this many (default all);
    ``n_threads``: threads for the forward passes (default the ``Llama``'s). ``on_start(chunks, n_tokens)`` is
    called once the text is tokenized and checked, before the first pass; ``progress(chunk_number,
    running_ppl, pass_seconds)`` is called after each chunk is scored, ``pass_seconds`` being how long the pass
    holding that chunk took. A ``Llama``'s own context (KV cache, tokens, logits) is not touched: the chunks run in
    KV caches made for the call, so a generation may be under way in it meanwhile.

    Raises ValueError for a text shorter than 2 * n_ctx tokens (saying how many are needed), n_ctx beyond the
    model's context, a bad n_batch or chunks; TypeError for arguments of the wrong type."""
    n_ctx = _positive_int("n_ctx", n_ctx)
    n_batch = _positive_int("n_batch", n_batch)
    chunks = _positive_int("chunks", chunks, allow_none=True)
    n_threads = _positive_int("n_threads", n_threads, allow_none=True)
    if n_ctx < 3:
        raise ValueError(f"n_ctx must be >= 3 (each chunk scores its tokens after position n_ctx/2 + 1), "
                         f"got {n_ctx}")
    if n_batch >= n_ctx and n_batch % n_ctx:
        raise ValueError(f"n_batch ({n_batch}) must be below n_ctx ({n_ctx}) or a multiple of it")
    if isinstance(text, str):
        text_bytes = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray)):
        text_bytes = bytes(text)
    else:
        raise TypeError(f"text must be a str or bytes, got {type(text).__name__}")
    if len(text_bytes) > MAX_TEXT_BYTES:
        raise ValueError(f"the text is {len(text_bytes)} bytes, more than the {MAX_TEXT_BYTES} perplexity reads")

    from .api import Llama
    owned = not isinstance(model, Llama)
    if owned:
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a Llama or a model file's path, got {type(model).__name__}")
        if model is not None and not os.path.isfile(model):
            raise FileNotFoundError(f"model file not found: {os.fspath(model)}")
        llm = Llama(model, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, verbose=False)
    else:
        llm = model
        if llm.__dict__.get("_closed", True):
            raise ValueError("the Llama is closed")
    try:
        return _perplexity(llm, text_bytes, n_ctx, n_batch, chunks,
                           n_threads if n_threads is not None else llm.n_threads, on_start, progress)
    finally:
        if owned:
            llm.close()


def _perplexity(llm, text: bytes, n_ctx: int, n_batch: int, chunks: int | None, n_threads: int,
                on_start, progress) -> PerplexityResult:
    from .model.session import set_threads as _set_threads
    from .model.validate import check_memory
    hp, tokenizer, model = llm.hparams, llm.tokenizer, llm.model
    if n_ctx > hp.n_ctx_train:
        raise ValueError(f"n_ctx {n_ctx} is larger than the model's context length {hp.n_ctx_train}")
    if tokenizer.add_eos:   # llama.cpp asserts this too: a chunk would end in an end-of-text token
        raise ValueError("the model's tokenizer adds an EOS token to a text; perplexity needs one that does not")
    add_bos = bool(tokenizer.add_bos) and tokenizer.bos_id is not None
    tokens = np.asarray(llm.tokenize(text, add_bos=True, special=False), dtype=np.int64)
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx}; "
                         f"the text tokenizes to only {len(tokens)} tokens")
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if chunks is None else min(chunks, n_chunk_max)
    n_seq = max(1, n_batch // n_ctx)
    step = min(n_batch, n_ctx)                  # tokens of one chunk per forward pass
    check_memory(hp, n_ctx * min(n_seq, n_chunk), step * min(n_seq, n_chunk), False,
                 context=f"perplexity with n_ctx={n_ctx} x {min(n_seq, n_chunk)} chunks per pass")
    first = n_ctx // 2
    n_score = n_ctx - first - 1
    caches = [model.new_cache(n_ctx) for _ in range(min(n_seq, n_chunk))]
    scorer = _Scorer(model)

    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    eval_s = first_pass_s = 0.0
    if on_start is not None:
        on_start(n_chunk, len(tokens))
    _set_threads(n_threads)
    for pass_start in range(0, n_chunk, n_seq):
        seqs = range(pass_start, min(pass_start + n_seq, n_chunk))
        t0 = time.perf_counter()
        chunk_tokens = []
        for cache, i in zip(caches, seqs):
            cache.n_past = 0                    # llama_memory_clear: a fresh context for every chunk
            ids = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
            if add_bos:
                ids[0] = tokenizer.bos_id
            chunk_tokens.append(ids)
        hidden = np.empty((len(chunk_tokens), n_score, hp.n_embd), np.float32)
        for start in range(0, n_ctx, step):
            items = [(ids[start:start + step], cache) for ids, cache in zip(chunk_tokens, caches)]
            with model.turns, single_threaded_blas():   # as Model.forward: our own threads do the parallel work
                outs = model.forward_many(items, all_logits=True, output="hidden")
            lo, hi = max(start, first), min(start + step, n_ctx - 1)   # rows of this batch that are scored
            if lo < hi:
                for s, out in enumerate(outs):
                    hidden[s, lo - first:hi - first] = out[lo - start:hi - start]
        targets = np.stack([tokens[i * n_ctx + first + 1:(i + 1) * n_ctx] for i in seqs])
        with model.turns, single_threaded_blas():
            nll = scorer.nll(hidden.reshape(-1, hp.n_embd), targets.reshape(-1)).reshape(len(chunk_tokens), n_score)
        seconds = time.perf_counter() - t0
        eval_s += seconds
        if pass_start == 0:
            first_pass_s = seconds
        for s, i in enumerate(seqs):            # llama.cpp's order: chunk by chunk
            nll_sum += float(nll[s].sum())
            nll2_sum += float(np.square(nll[s]).sum())
            count += n_score
            running.append(math.exp(nll_sum / count))
            if progress is not None:
                progress(i + 1, running[-1], seconds)
    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll2_sum / count - mean * mean
    std = math.sqrt(variance / (count - 1)) * ppl if variance > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl=ppl, ppl_std=std, n_ctx=n_ctx, chunks=n_chunk, n_batch=n_batch, n_seq=n_seq,
                            n_tokens=len(tokens), tokens_scored=count, mean_nll=mean, chunk_ppl=running,
                            eval_seconds=eval_s, first_pass_seconds=first_pass_s)


class _Scorer:
    """Negative log-likelihoods of target tokens from final hidden states, through the model's output matrix one
    band of vocabulary rows at a time (see the module docstring)."""

    def __init__(self, model):
        self.output = model.output      # a Linear: the output matrix (or the tied embedding) in its ggml blocks
        self.n_vocab = model.hp.n_vocab

    def nll(self, hidden: np.ndarray, targets: np.ndarray) -> np.ndarray:
        n_rows = hidden.shape[0]
        band = int(max(256, min(self.n_vocab, LOGITS_BLOCK_BYTES // 4 // max(1, n_rows))))
        row_max = np.full(n_rows, -np.inf, np.float64)
        sum_exp = np.zeros(n_rows, np.float64)
        picked = np.zeros(n_rows, np.float64)
        out = np.empty((n_rows, band), np.float32)
        rows = np.arange(n_rows)
        for v0 in range(0, self.n_vocab, band):
            v1 = min(v0 + band, self.n_vocab)
            logits = out[:, :v1 - v0]
            logits = matmul(self.output.qtype, self.output.data[v0:v1], hidden,
                            out=logits if logits.flags.c_contiguous else None)
            if self.output.bias is not None:
                logits += self.output.bias[v0:v1]
            new_max = np.maximum(row_max, logits.max(axis=1))
            # expf(logit - max) in float32 as llama.cpp, summed in float64; earlier bands' sums rescaled
            sum_exp *= np.exp(row_max - new_max)
            sum_exp += np.exp(logits - new_max.astype(np.float32)[:, None]).sum(axis=1, dtype=np.float64)
            row_max = new_max
            inside = (targets >= v0) & (targets < v1)
            picked[inside] = logits[rows[inside], targets[inside] - v0]
        return row_max + np.log(sum_exp) - picked

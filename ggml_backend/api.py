"""``Llama``: the public face of the engine, shaped like llama-cpp-python's ``Llama`` so its users feel at home."""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from .formats import load
from .model.forward import Model
from .model.spec import resolve_hparams
from .tokenizer import Tokenizer


@dataclass
class LlamaState:
    """What save_state() captures: the evaluated tokens, their keys/values and the last logits."""
    input_ids: np.ndarray
    kv: dict
    last_logits: np.ndarray | None
    all_logits: np.ndarray | None


def _set_threads(n_threads: int) -> None:
    import numba
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))


class Llama:
    """A loaded model with its tokenizer, KV cache and generation methods.

    ``n_ctx=0``, ``rope_freq_base=0`` and ``rope_freq_scale=0`` mean "from the file". ``n_gpu_layers`` is accepted
    for compatibility; this engine runs on the CPU (``verbose`` says so when layers were asked for).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, n_ctx: int = 512,
                 n_threads: int | None = None, n_batch: int = 512, n_gpu_layers: int = 0, seed: int = -1,
                 logits_all: bool = False, rope_freq_base: float = 0.0, rope_freq_scale: float = 0.0,
                 verbose: bool = True, chat_format: str | None = None, n_head_kv: int | None = None,
                 **_ignored):
        t0 = time.perf_counter()
        if model_path is None:
            from .default_model import default_model_path
            model_path = default_model_path(progress=verbose)
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if n_batch == 0:
            raise ValueError("n_batch must be at least 1")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, got {n_threads}")
        self.model_path = str(model_path)
        self.verbose = verbose
        self.model_file = load(model_path, n_head_kv=n_head_kv)
        self.metadata = self.model_file.metadata
        shapes = {name: tuple(t.shape) for name, t in self.model_file.tensors.items()}
        self.hparams = resolve_hparams(self.metadata, shapes, rope_freq_base=rope_freq_base,
                                       rope_freq_scale=rope_freq_scale)
        self.model = Model(self.model_file, self.hparams)
        self.tokenizer = Tokenizer.from_metadata(self.metadata, ggml_legacy=self.model_file.format == "ggml")
        self._n_ctx = int(n_ctx) or self.hparams.n_ctx_train
        self.n_batch = int(min(n_batch, self._n_ctx))
        self.n_threads = int(n_threads or os.cpu_count() or 1)
        self.seed = seed
        self.logits_all = logits_all
        self.chat_format = chat_format
        self.cache = self.model.new_cache(self._n_ctx)
        self.input_ids = np.zeros(self._n_ctx, dtype=np.int64)
        self.n_tokens = 0
        self._last_logits: np.ndarray | None = None
        self._all_logits = np.zeros((self._n_ctx, self.hparams.n_vocab), np.float32) if logits_all else None
        self._lock = threading.RLock()
        self.load_time_s = time.perf_counter() - t0
        if verbose:
            hp = self.hparams
            print(f"ggml_backend: loaded {self.model_path} ({self.model_file.format}, {hp.arch.name}, "
                  f"{hp.n_layer} layers, n_embd {hp.n_embd}, vocab {hp.n_vocab}) in {self.load_time_s:.2f} s; "
                  f"n_ctx {self._n_ctx}, {self.n_threads} threads", file=sys.stderr)
            if n_gpu_layers:
                print(f"ggml_backend: n_gpu_layers={n_gpu_layers} ignored: this engine runs on the CPU only",
                      file=sys.stderr)

    # --- vocabulary ---------------------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        return self.tokenizer.decode(list(tokens), skip_special=not special)

    def token_bos(self) -> int:
        return self.tokenizer.bos_id

    def token_eos(self) -> int:
        return self.tokenizer.eos_id

    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    def n_ctx(self) -> int:
        return self._n_ctx

    # --- evaluation -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.n_tokens = 0
            self.cache.n_past = 0
            self._last_logits = None

    def eval(self, tokens) -> None:
        """Evaluate tokens after the ones already in the KV cache, n_batch at a time."""
        tokens = [int(t) for t in tokens]
        with self._lock:
            if self.n_tokens + len(tokens) > self._n_ctx:
                raise ValueError(f"{self.n_tokens} evaluated + {len(tokens)} new tokens exceed the context size "
                                 f"n_ctx={self._n_ctx}")
            bad = [t for t in tokens if not 0 <= t < self.hparams.n_vocab]
            if bad:
                raise ValueError(f"token ids out of range [0, {self.hparams.n_vocab}): {bad[:5]}")
            _set_threads(self.n_threads)
            for i in range(0, len(tokens), self.n_batch):
                batch = tokens[i:i + self.n_batch]
                logits = self.model.forward(batch, self.cache, all_logits=self.logits_all)
                start = self.n_tokens
                self.input_ids[start:start + len(batch)] = batch
                self.n_tokens += len(batch)
                if self._all_logits is not None:
                    self._all_logits[start:start + len(batch)] = logits
                self._last_logits = logits[-1]

    @property
    def scores(self) -> np.ndarray:
        """Logits [n_ctx, n_vocab]: every evaluated row when logits_all, else only row n_tokens-1 is filled.

        Without logits_all the array is made on access (np.zeros pages cost nothing until written), so a long
        context does not keep n_ctx x n_vocab floats resident."""
        if self._all_logits is not None:
            return self._all_logits
        scores = np.zeros((self._n_ctx, self.hparams.n_vocab), np.float32)
        if self._last_logits is not None and self.n_tokens:
            scores[self.n_tokens - 1] = self._last_logits
        return scores

    @property
    def eval_logits(self) -> np.ndarray | None:
        """The logits after the last evaluated token (float32 [n_vocab])."""
        return self._last_logits

    def save_state(self) -> LlamaState:
        with self._lock:
            n = self.n_tokens
            return LlamaState(
                input_ids=self.input_ids[:n].copy(), kv=self.cache.snapshot(),
                last_logits=None if self._last_logits is None else self._last_logits.copy(),
                all_logits=None if self._all_logits is None else self._all_logits[:n].copy())

    def load_state(self, state: LlamaState) -> None:
        with self._lock:
            n = len(state.input_ids)
            if n > self._n_ctx:
                raise ValueError(f"state of {n} tokens does not fit n_ctx={self._n_ctx}")
            self.cache.restore(state.kv)
            self.input_ids[:n] = state.input_ids
            self.n_tokens = n
            self._last_logits = None if state.last_logits is None else state.last_logits.copy()
            if self._all_logits is not None and state.all_logits is not None:
                self._all_logits[:n] = state.all_logits

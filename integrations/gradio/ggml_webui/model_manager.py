"""The one model the web UI serves (shared by every browser session, as in text-generation-webui), its loading
from the model directory, its description, and the per-session Stop flags."""
from __future__ import annotations

import os
import threading
from collections import Counter

from ggml_backend.templates import JinjaTemplate, TemplateError, TextgenTemplate

from .template_store import textgen_from_jinja


MODEL_SUFFIXES = (".gguf", ".bin")


class ModelManager:
    """Holds the current ``Llama``; ``load`` swaps it (a failed load keeps the previous one).

    Clients choose models only by name from ``model_files()``, the model files in ``model_dir``; ``load_named``
    never touches a path a client wrote, so the page cannot be used to learn whether a server path exists, is a
    directory, or what its first bytes are."""

    def __init__(self, llama=None, model_dir: str | os.PathLike | None = None, draft_max: int = 0):
        self.llama = llama
        # speculative decoding by prompt lookup for every model loaded here, drafting up to this many tokens
        # (0: off); the replies are the same (ggml_backend/speculative.py)
        self.draft_max = int(draft_max)
        self.model_dir = os.path.abspath(model_dir) if model_dir is not None else None
        self.model_template: TextgenTemplate | None = None
        self.model_jinja = None
        self.load_error: str | None = None
        self._swap_lock = threading.Lock()
        self._stop_flags: dict[str, threading.Event] = {}
        self._flags_lock = threading.Lock()
        if llama is not None:
            self._read_template()

    def load(self, path: str | None, n_ctx: int = 2048, n_threads: int | None = None, n_gpu_layers: int = 0):
        """Load a GGUF/GGML file (None: the default model). Raises the loader's ValueError on a bad file."""
        from ggml_backend import Llama, LlamaPromptLookupDecoding
        path = (path or "").strip() or None
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"no such model file: {path}")
        draft_model = LlamaPromptLookupDecoding(num_pred_tokens=self.draft_max) if self.draft_max else None
        with self._swap_lock:
            llama = Llama(model_path=path, n_ctx=int(n_ctx), n_threads=int(n_threads) if n_threads else None,
                          n_gpu_layers=int(n_gpu_layers or 0), draft_model=draft_model, verbose=True)
            # a reply being written on the old model finishes on it (its stream holds that Llama); new requests
            # get the new one
            self.llama = llama
            self._read_template()
        return llama

    def model_files(self) -> list[str]:
        """The model files a client may load: GGUF/GGML files directly in the model directory (not hidden)."""
        folder = self.model_dir
        if folder is None:
            return []
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return []
        return sorted(e.name for e in entries if not e.name.startswith(".")
                      and e.name.lower().endswith(MODEL_SUFFIXES) and e.is_file())

    def current_file(self) -> str | None:
        """The loaded model's name in the model directory (None when it lives elsewhere)."""
        if self.llama is None or self.model_dir is None:
            return None
        path = os.path.abspath(self.llama.model_path)
        return os.path.basename(path) if os.path.dirname(path) == self.model_dir else None

    def load_named(self, name: str, **kwargs):
        """Load the model file ``name`` from the model directory; anything not in ``model_files()`` is refused
        with the same message whether or not such a path exists."""
        if self.model_dir is None:
            raise ValueError("loading models is off: the server was started without a model directory")
        if not isinstance(name, str) or name not in self.model_files():
            raise ValueError("choose a model file from the list (the GGUF/GGML files in the model directory)")
        return self.load(os.path.join(self.model_dir, name), **kwargs)

    def _read_template(self) -> None:
        self.model_template, self.model_jinja = None, None
        metadata = self.llama.model_file.metadata
        if metadata.get("tokenizer.chat_template"):
            try:
                self.model_jinja = JinjaTemplate.from_gguf_metadata(metadata)
            except TemplateError:
                return
            self.model_template = textgen_from_jinja(self.model_jinja)

    def require(self):
        if self.llama is None:
            raise ValueError("no model is loaded: load one in the Model tab")
        return self.llama

    def describe(self) -> str:
        """Markdown: file, format, architecture, sizes, and the quantization types of the tensors."""
        if self.llama is None:
            return "No model loaded."
        llama = self.llama
        hp = llama.hparams
        model_file = llama.model_file
        types = Counter(t.type.name for t in model_file.tensors.values())
        n_params = sum(int(_prod(t.shape)) for t in model_file.tensors.values())
        try:
            size = os.path.getsize(llama.model_path) / 2**20
        except OSError:
            size = float("nan")
        name = llama.metadata.get("general.name") or os.path.basename(llama.model_path)
        if self.model_template is not None:
            template_note = "its chat template is shown as text-generation-webui fields"
        elif self.model_jinja is not None:
            template_note = "its Jinja chat template is used as is (instruct mode)"
        else:
            template_note = "it has no chat template"
        lines = [
            f"**{name}**  ",
            f"File: `{llama.model_path}` ({model_file.format.upper()}, {size:,.1f} MiB)  ",
            f"Architecture: {hp.arch.name}, {hp.n_layer} layers, n_embd {hp.n_embd}, vocabulary {hp.n_vocab:,}, "
            f"{n_params / 1e6:,.0f}M parameters  ",
            f"Context: {llama.n_ctx()} of {hp.n_ctx_train} trained; {llama.n_threads} threads  ",
            "Tensor types: " + ", ".join(f"{name} x{count}" for name, count in types.most_common()) + "  ",
            f"Chat template: {template_note}.",
        ]
        return "\n".join(lines)

    # ---- Stop, per browser session -----------------------------------------------------------------------------
    def stop_flag(self, session: str | None) -> threading.Event:
        with self._flags_lock:
            return self._stop_flags.setdefault(session or "", threading.Event())


def _prod(shape) -> int:
    total = 1
    for n in shape:
        total *= int(n)
    return total

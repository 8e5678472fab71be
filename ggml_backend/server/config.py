"""What ``ggml-backend serve`` serves: one or more models (each an alias, a file, a context size, a chat template,
a number of parallel slots) and the server's own settings. ``--models CONFIG.yaml`` lists several models:

```yaml
models:
  - alias: qwen-coder           # the name clients put in "model" (required, unique)
    path: /models/qwen.gguf     # a GGUF/GGML file; omitted: the default model
    n_ctx: 8192                 # context of all slots together (each slot gets n_ctx / n_parallel); default 8192
    n_parallel: 4               # slots: requests in flight at once; default the server's -np
    chat_template: chatml       # a template name, file or Jinja text; default the file's own template
    n_threads: 2                # default the server's -t
    cache_type_k: f16           # KV cache type of keys and values: f16 (default), f32 or q8_0
    cache_type_v: f16
    n_gpu_layers: 0             # layers offloaded to an NVIDIA GPU (-1: all); default the server's -ngl
    main_gpu: 0                 # which GPU; default the server's --main-gpu
    use_mmap: true              # false: read the file into memory (huge pages), as --no-mmap; default true
    draft_max: 0                # speculative decoding by prompt lookup, drafting up to N tokens (--lookup
                                # --draft-max N); 0: off (default)
```
Models are loaded when first asked for; the first one in the list serves requests that name no model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..model.kv_cache import DEFAULT_CACHE_TYPE, cache_type

#: context of all slots together when neither -c nor the YAML says (2048 tokens per slot with 4 slots)
DEFAULT_N_CTX = 8192
DEFAULT_N_PARALLEL = 4
#: requests waiting for a slot beyond which the server answers 503 with Retry-After
DEFAULT_QUEUE_LIMIT = 64
#: the largest request body accepted (a prompt of a full 32k context is well under 1 MiB)
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
#: the smallest context a slot may have
MIN_SLOT_CTX = 16


@dataclass
class ModelConfig:
    alias: str
    path: str | None = None              # None: the default model
    n_ctx: int = DEFAULT_N_CTX           # all slots together
    n_parallel: int = DEFAULT_N_PARALLEL
    chat_template: str | None = None     # None: the file's own template (ChatML when it has none)
    n_threads: int | None = None         # None: all cores
    cache_type_k: str = DEFAULT_CACHE_TYPE   # the slots' KV cache types (model/kv_cache.py)
    cache_type_v: str = DEFAULT_CACHE_TYPE
    n_gpu_layers: int = 0                # the last layers on an NVIDIA GPU (-1: all; ggml_backend/cuda)
    main_gpu: int = 0
    use_mmap: bool = True                # False: the file read into memory (formats/resident.py)
    draft_max: int = 0                   # > 0: prompt lookup drafts of up to this many tokens (speculative.py)

    @property
    def slot_ctx(self) -> int:
        return self.n_ctx // self.n_parallel

    def check(self, where: str = "") -> None:
        at = f"{where}: " if where else ""
        if not isinstance(self.alias, str) or not self.alias.strip():
            raise ValueError(f"{at}alias must be a non-empty string")
        for name in ("n_ctx", "n_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{at}{name} must be a positive integer, got {value!r}")
        if self.n_threads is not None and (isinstance(self.n_threads, bool) or not isinstance(self.n_threads, int)
                                           or self.n_threads < 1):
            raise ValueError(f"{at}n_threads must be a positive integer, got {self.n_threads!r}")
        for name, low in (("n_gpu_layers", -1), ("main_gpu", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{at}{name} must be an integer >= {low}, got {value!r}")
        from ..speculative import MAX_DRAFT
        if isinstance(self.draft_max, bool) or not isinstance(self.draft_max, int) \
                or not 0 <= self.draft_max <= MAX_DRAFT:
            raise ValueError(f"{at}draft_max must be an integer from 0 (off) to {MAX_DRAFT}, got {self.draft_max!r}")
        if not isinstance(self.use_mmap, bool):
            raise ValueError(f"{at}use_mmap must be true or false, got {self.use_mmap!r}")
        for name in ("cache_type_k", "cache_type_v"):
            try:
                setattr(self, name, cache_type(getattr(self, name), name))
            except (ValueError, NotImplementedError) as exc:
                raise ValueError(f"{at}{exc}") from None
        if self.slot_ctx < MIN_SLOT_CTX:
            raise ValueError(f"{at}n_ctx={self.n_ctx} over n_parallel={self.n_parallel} slots leaves "
                             f"{self.slot_ctx} tokens per slot; at least {MIN_SLOT_CTX} are needed")
        if self.path is not None and not os.path.isfile(self.path):
            raise ValueError(f"{at}model file not found: {self.path}")


@dataclass
class ServerConfig:
    models: list[ModelConfig]
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def check(self) -> None:
        if not self.models:
            raise ValueError("no model to serve")
        aliases = [m.alias for m in self.models]
        duplicates = sorted({a for a in aliases if aliases.count(a) > 1})
        if duplicates:
            raise ValueError(f"model aliases must be unique: {', '.join(duplicates)} given twice")
        for m in self.models:
            m.check(f"model {m.alias!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.queue_limit < 0:
            raise ValueError(f"queue limit must be >= 0, got {self.queue_limit}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")


_MODEL_KEYS = {"alias", "path", "n_ctx", "n_parallel", "chat_template", "n_threads", "cache_type_k", "cache_type_v",
               "n_gpu_layers", "main_gpu", "use_mmap", "draft_max"}


def load_models_file(path: str, defaults: ModelConfig) -> list[ModelConfig]:
    """The models of a ``--models`` YAML file; fields a model leaves out come from ``defaults`` (the command
    line). Relative paths are relative to the YAML file's folder. Every mistake is a ValueError naming where."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > 1024 * 1024:
                raise ValueError(f"{path}: larger than 1 MiB; not a models file")
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'models' list")
    unknown = set(data) - {"models"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys: {', '.join(sorted(map(str, unknown)))}")
    base = os.path.dirname(os.path.abspath(path))
    models = []
    for index, entry in enumerate(data["models"]):
        where = f"{path}: models[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))} "
                             f"(known: {', '.join(sorted(_MODEL_KEYS))})")
        if "alias" not in entry:
            raise ValueError(f"{where}: 'alias' is required")
        model_path = entry.get("path")
        if model_path is not None:
            if not isinstance(model_path, str):
                raise ValueError(f"{where}: path must be a string")
            model_path = os.path.join(base, os.path.expanduser(model_path))
        model = ModelConfig(alias=entry["alias"], path=model_path,
                            n_ctx=entry.get("n_ctx", defaults.n_ctx),
                            n_parallel=entry.get("n_parallel", defaults.n_parallel),
                            chat_template=entry.get("chat_template", defaults.chat_template),
                            n_threads=entry.get("n_threads", defaults.n_threads),
                            cache_type_k=entry.get("cache_type_k", defaults.cache_type_k),
                            cache_type_v=entry.get("cache_type_v", defaults.cache_type_v),
                            n_gpu_layers=entry.get("n_gpu_layers", defaults.n_gpu_layers),
                            main_gpu=entry.get("main_gpu", defaults.main_gpu),
                            use_mmap=entry.get("use_mmap", defaults.use_mmap),
                            draft_max=entry.get("draft_max", defaults.draft_max))
        model.check(where)
        models.append(model)
    return models

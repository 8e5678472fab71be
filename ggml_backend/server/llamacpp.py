"""llama.cpp's own server dialect (``llama-server``'s native routes): what llama.cpp's web UI, llama.vim /
llama.vscode, SillyTavern's llama.cpp connector and scripts written against ``llama-server`` speak.

Routes: ``GET /health``, ``POST /completion`` (alias ``/completions``; OpenAI's is ``/v1/completions``, elsewhere),
``POST /tokenize``, ``POST /detokenize``, ``GET /props``, ``GET /slots``, ``GET /metrics`` (Prometheus text).
Field names and reply shapes follow llama.cpp's ``tools/server/README.md``; a request that names no model gets
the first one, ``"model"`` in the body (``?model=`` on the GET routes) picks another. What this engine cannot do
(DRY, XTC, LoRA, several prompts at once, post-sampling probabilities...) is a 400 saying so when a
request turns it on, never a reply that silently ignores it. No route reveals a server path: ``model_path`` is
the model's alias.

How a completion maps onto ``Llama.create_completion``: ``n_predict`` -1 (the default) runs to the end of the
slot's context and larger values are cut to it, as llama-server does; ``ignore_eos`` gives the end-of-generation
tokens a bias of -inf (llama.cpp's way) and no stop tokens; ``cache_prompt`` is accepted and always on in effect
(a slot reuses the longest prefix it holds, with unchanged numbers); ``id_slot`` is checked but the line picks the
free slot sharing the longest prefix, which is the slot that holds the conversation whenever one does (the reply's
``id_slot`` says which ran it). The defaults are llama-server's: ``repeat_penalty`` 1.0, no ``penalize_nl``.
``samplers`` may leave stages out (they are then off) but not reorder them: the engine's order is fixed.
``n_probs`` gives llama.cpp's ``completion_probabilities`` from the raw logits; the engine names tokens by their
text, so a token whose text another token shares (a lone byte of a multi-byte character) may get that token's id.
Replies carry text, not token ids (``tokens`` is always empty; ``return_tokens`` is refused). Slot actions
(``POST /slots/{id}?action=save|restore|erase``) answer 501: slots keep their caches in memory only.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import time
import weakref
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..generation.stopping import StopStringMatcher
from ..generation.grammar import GrammarError, LlamaGrammar
from ..generation.sampling import LLAMA_DEFAULT_SEED, seed_is_random
from .common import Body, event_stream, read_json, sampling_kwargs, start
from .errors import APIError, error_body
from .slots import ClientGone, SlotPool

router = APIRouter()

#: llama-server's defaults where they differ from the shared ones (common.DEFAULT_SAMPLING, llama-cpp-python's)
LLAMACPP_DEFAULTS = {"repeat_penalty": 1.0, "penalize_nl": False}
#: the sampling stages this engine runs, in its fixed order (llama.cpp's classic order); see ``_samplers``
SAMPLER_ORDER = ("top_k", "tfs_z", "typ_p", "top_p", "min_p", "temperature")
#: llama.cpp's names and one-letter codes for them; "penalties" always runs first (it is first in llama.cpp's
#: default order too); "dry", "xtc" and "top_n_sigma" are stages this engine lacks, off unless their own fields
#: turn them on (which is refused), so where a list puts them does not matter
_SAMPLER_NAMES = {"top_k": "top_k", "tfs_z": "tfs_z", "tfs": "tfs_z", "typ_p": "typ_p", "typical_p": "typ_p",
                  "typical": "typ_p", "typ": "typ_p", "top_p": "top_p", "nucleus": "top_p", "min_p": "min_p",
                  "temperature": "temperature", "temp": "temperature", "penalties": "penalties", "dry": None,
                  "xtc": None, "top_n_sigma": None}
_SAMPLER_CHARS = {"k": "top_k", "f": "tfs_z", "y": "typ_p", "p": "top_p", "m": "min_p", "t": "temperature",
                  "e": "penalties", "d": "dry", "x": "xtc", "s": "top_n_sigma"}
#: what a stage left out of ``samplers`` is set to, so that it does nothing (llama.cpp: "If a sampler is not set,
#: it will not be used")
_STAGE_OFF = {"top_k": ("top_k", 0), "tfs_z": ("tfs_z", 1.0), "typ_p": ("typical_p", 1.0), "top_p": ("top_p", 1.0),
              "min_p": ("min_p", 0.0), "temperature": ("temperature", 1.0)}
#: the most alternatives ``n_probs`` may ask for per token (each costs a sort of the vocabulary and JSON per token)
MAX_N_PROBS = 100
#: the seed llama.cpp reports when the request left it random (LLAMA_DEFAULT_SEED)
RANDOM_SEED = LLAMA_DEFAULT_SEED
#: what llama.cpp writes for log(0) (nlohmann's JSON has no -inf): the lowest float32
LOWEST_FLOAT = -3.4028234663852886e+38
#: stop reasons as llama.cpp names them (``stop_type``)
STOP_EOS, STOP_WORD, STOP_LIMIT = "eos", "word", "limit"


def _registry(request: Request):
    return request.app.state.registry


# --- /health -------------------------------------------------------------------------------------------------
@router.get("/health")
async def health():
    """200 ``{"status": "ok"}``: models load on first use, so there is no "Loading model" 503 state to report
    (a request that loads one just takes longer). Open without the API key (app.OPEN_ROUTES)."""
    return {"status": "ok"}


# --- /completion -----------------------------------------------------------------------------------------------
@dataclass
class _Completion:
    """One /completion request, checked: what to run and what to report."""
    tokens: list[int]
    prompt_text: str
    kwargs: dict                 # create_completion's keyword arguments
    settings: dict               # the reply's generation_settings
    stream: bool
    n_probs: int
    discard: bool                # n_predict 0: evaluate the prompt into the slot's cache, keep no token
    cut_by_context: bool         # the slot's context, not n_predict, sets the limit
    stops: list[str]
    timings_per_token: bool
    response_fields: list[str] = field(default_factory=list)


@router.post("/completion")
@router.post("/completions")
async def completion(request: Request):
    data = await read_json(request)
    pool = await _registry(request).pool(data.get("model"))
    job = await _parse_completion(pool, data)
    piece_ids = await _piece_ids(pool) if job.n_probs else None   # before taking a slot: it takes a while once
    ticket, chunks = await start(request, pool, job.tokens,
                                 lambda llm: llm.create_completion(job.tokens, **job.kwargs))
    run = _Run(job, pool, ticket.slot, piece_ids)
    _slot_records(request)[(pool.alias, ticket.slot.id)] = (ticket.slot.task_id, job)
    if not job.stream:
        final = None
        async with aclosing(pool.chunks(ticket, chunks)) as running:
            async for chunk in running:
                final = run.feed(chunk) or final
                if await request.is_disconnected():
                    raise ClientGone()
        if final is None:   # the generation ended without its last chunk (closed by shutdown)
            raise APIError(503, "the generation was stopped before it finished (the server is shutting down)")
        return JSONResponse(_clean(final))
    return event_stream(_events(pool, ticket, chunks, run))


async def _events(pool: SlotPool, ticket, chunks, run: "_Run"):
    """llama-server's stream: ``data: {"content": ..., "stop": false, ...}`` per token, then one event with
    ``"stop": true`` and everything the non-streamed reply has but the text already sent."""
    try:
        async with aclosing(pool.chunks(ticket, chunks)) as running:
            async for chunk in running:
                event = run.feed(chunk)
                if event is not None:
                    yield {"data": json.dumps(_clean(event), ensure_ascii=False)}
    except (ValueError, TypeError, RuntimeError) as exc:   # mid-stream: the status line is gone already
        yield {"data": json.dumps(error_body(APIError(500, f"generation failed: {exc}"), "llamacpp"))}


async def _parse_completion(pool: SlotPool, data: dict) -> _Completion:
    llm = pool.llm
    given = {k: v for k, v in data.items() if v is not None}
    body = Body({**LLAMACPP_DEFAULTS, **given})
    _refuse_unsupported(body)
    stream = body.bool("stream", default=False)
    n_predict = body.int("n_predict", "max_tokens", default=-1, low=-1)
    n_probs = body.int("n_probs", default=0, low=0, high=MAX_N_PROBS)
    if body.bool("post_sampling_probs", default=False) and n_probs:
        raise APIError(400, "'post_sampling_probs' is not supported: n_probs gives the probabilities of the raw "
                            "logits (before the sampling stages)", param="post_sampling_probs")
    cache_prompt = body.bool("cache_prompt", default=True)
    body.int("id_slot", default=-1, low=-1, high=len(pool.slots) - 1)
    ignore_eos = body.bool("ignore_eos", default=False)
    n_keep = body.int("n_keep", default=0, low=-1)
    timings_per_token = body.bool("timings_per_token", default=False)
    response_fields = body.data.get("response_fields") or []
    if not isinstance(response_fields, list) or not all(isinstance(f, str) for f in response_fields):
        raise APIError(400, "'response_fields' must be a list of strings", param="response_fields")
    stops = body.stops("stop")
    samplers = _samplers(body)
    prompt = body.data.get("prompt", "")

    def prepare():   # tokenizing can take a while: in a worker thread
        tokens = _prompt_tokens(llm, prompt, "prompt")
        bias_pairs = _logit_bias_pairs(llm, body.data.get("logit_bias"))
        return tokens, bias_pairs, llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")
    tokens, bias_pairs, prompt_text = await anyio.to_thread.run_sync(prepare)
    if not tokens:
        raise APIError(400, "the prompt is empty (and the model adds no BOS token)", param="prompt")
    room = pool.n_ctx - len(tokens)
    if room < 1:
        raise APIError(400, f"the prompt is {len(tokens)} tokens long; the context of each slot of model "
                            f"{pool.alias!r} holds {pool.n_ctx}, which leaves no room to generate",
                       param="prompt", code="context_length_exceeded")
    body.data["logit_bias"] = bias_pairs
    sampling = sampling_kwargs(body, llm.n_vocab())
    settings = _generation_settings(pool, sampling, bias_pairs, samplers, stops=stops, n_predict=n_predict,
                                    n_keep=n_keep, ignore_eos=ignore_eos, stream=stream, n_probs=n_probs,
                                    timings_per_token=timings_per_token, cache_prompt=cache_prompt)
    if sampling["mirostat_mode"] == 0:   # mirostat ignores the list in llama.cpp too
        for stage in SAMPLER_ORDER:
            if stage not in samplers:
                name, off = _STAGE_OFF[stage]
                sampling[name] = off
    stop_tokens = None
    if ignore_eos:
        eog = llm.tokenizer.eog_ids
        sampling["logit_bias"] = {**(sampling["logit_bias"] or {}), **{t: -math.inf for t in eog}}
        stop_tokens = []
    discard = n_predict == 0
    max_tokens = 1 if discard else (room if n_predict < 0 else min(n_predict, room))
    # logprobs always: each token then comes in its own chunk, which tells an end token (never shown) from a stop
    # string and gives the stream one event per token, as llama-server's; the cost is small next to a token
    kwargs = dict(sampling, max_tokens=max_tokens, stop=stops, logprobs=max(1, n_probs), model=pool.alias,
                  stream=True, stop_tokens=stop_tokens, grammar=_grammar(body))
    return _Completion(tokens=tokens, prompt_text=prompt_text, kwargs=kwargs, settings=settings, stream=stream,
                       n_probs=n_probs, discard=discard, cut_by_context=n_predict < 0 or n_predict > room,
                       stops=stops, timings_per_token=timings_per_token, response_fields=response_fields)


def _grammar(body: Body):
    """llama-server's ``grammar`` (GBNF) or ``json_schema`` (an object): the grammar the reply must follow."""
    gbnf, schema = body.data.get("grammar"), body.data.get("json_schema")
    try:
        if gbnf not in (None, "") and schema is not None:
            raise GrammarError("give 'grammar' or 'json_schema', not both")
        if gbnf not in (None, ""):
            return LlamaGrammar.from_string(gbnf)
        if schema is not None:
            return LlamaGrammar.from_json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, str(exc), param="json_schema" if schema is not None else "grammar") from None
    return None


def _refuse_unsupported(body: Body) -> None:
    """llama.cpp fields that would change the reply and that this engine cannot honour: a 400 when turned on."""
    def off(name, value, is_off):
        if value is not None and not is_off(value):
            raise APIError(400, f"'{name}' is not supported by this server ({_what(name)})", param=name)
    data = body.data
    off("lora", data.get("lora"), lambda v: v == [])
    off("dynatemp_range", body.float("dynatemp_range", default=None), lambda v: v == 0)
    off("xtc_probability", body.float("xtc_probability", default=None), lambda v: v <= 0)
    off("dry_multiplier", body.float("dry_multiplier", default=None), lambda v: v == 0)
    off("top_n_sigma", body.float("top_n_sigma", default=None), lambda v: v <= 0)
    off("min_keep", body.int("min_keep", default=None), lambda v: v <= 0)
    off("n_indent", body.int("n_indent", default=None), lambda v: v <= 0)
    off("t_max_predict_ms", body.int("t_max_predict_ms", default=None), lambda v: v <= 0)
    off("return_tokens", body.bool("return_tokens", default=None), lambda v: not v)
    off("return_progress", body.bool("return_progress", default=None), lambda v: not v)
    off("n_cmpl", body.int("n_cmpl", "n", default=None, low=1), lambda v: v == 1)
    if data.get("suffix") or data.get("input_suffix"):
        raise APIError(400, "fill in the middle ('suffix') is not supported by this server", param="suffix")


def _what(name: str) -> str:
    return {"lora": "no LoRA adapters", "dynatemp_range": "no dynamic temperature", "xtc_probability": "no XTC",
            "dry_multiplier": "no DRY sampling", "top_n_sigma": "no top-n-sigma sampling",
            "min_keep": "each stage keeps at least one token", "n_indent": "no indentation limit",
            "t_max_predict_ms": "no time limit on generation", "n_cmpl": "one completion per request",
            "return_tokens": "the reply carries text, not token ids",
            "return_progress": "no prompt progress events"}[name]


def _prompt_tokens(llm, prompt, where: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """A prompt as llama.cpp accepts one: a string, token ids, a mix of both (``[12, 34, "text", 56]``), or
    ``{"prompt_string": ...}``. A BOS is added when the model wants one and the prompt starts with text; special
    tokens written in the text are parsed. Several prompts at once get a 400 (one request per prompt)."""
    if isinstance(prompt, dict):
        if prompt.get("multimodal_data"):
            raise APIError(400, f"'{where}': multimodal data is not supported by this server (text only)",
                           param=where)
        prompt = prompt.get("prompt_string")
        if not isinstance(prompt, str):
            raise APIError(400, f"'{where}.prompt_string' must be a string", param=where)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list, dict)):
        return _prompt_tokens(llm, prompt[0], where, add_special, parse_special)
    add_bos = add_special and llm.tokenizer.add_bos
    if isinstance(prompt, str):
        return llm.tokenize(prompt, add_bos=add_bos, special=parse_special)
    if not isinstance(prompt, list):
        raise APIError(400, f"'{where}' must be a string or a list of token ids and strings, got "
                            f"{type(prompt).__name__}", param=where)
    is_id = [isinstance(p, int) and not isinstance(p, bool) for p in prompt]
    if not all(ok or isinstance(p, str) for ok, p in zip(is_id, prompt)) or (prompt and not any(is_id)):
        raise APIError(400, f"'{where}' holds several prompts; this server answers one prompt per request",
                       param=where)
    n_vocab = llm.n_vocab()
    tokens = []
    for i, piece in enumerate(prompt):
        if isinstance(piece, str):
            tokens += llm.tokenize(piece, add_bos=add_bos and i == 0, special=parse_special)
        elif not 0 <= piece < n_vocab:
            raise APIError(400, f"'{where}[{i}]': token id {piece} is outside the vocabulary (0..{n_vocab - 1})",
                           param=where)
        else:
            tokens.append(piece)
    return tokens


def _logit_bias_pairs(llm, value) -> list[list]:
    """llama.cpp's ``logit_bias``, as ``[[token id, bias or false], ...]``: pairs or an object, a token given by
    its id or by text (then every token of that text, tokenized without BOS, gets the bias)."""
    if value is None or value == [] or value == {}:
        return []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = value
    else:
        raise APIError(400, "'logit_bias' must be a list of [token, bias] pairs or an object", param="logit_bias")
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise APIError(400, "'logit_bias' entries must be [token id or text, bias] pairs", param="logit_bias")
        token, bias = pair
        if isinstance(token, str) and not token.strip().lstrip("-").isdigit():
            out += [[t, bias] for t in llm.tokenize(token, add_bos=False, special=False)]
        else:
            out.append([token, bias])
    return out


def _samplers(body: Body) -> list[str]:
    """The stages ``samplers`` asks for (llama.cpp's names or one-letter codes). The engine's order is fixed, so
    a list must keep it (stages may be left out, which turns them off); any other order is a 400."""
    value = body.data.get("samplers")
    if value is None:
        return list(SAMPLER_ORDER)
    if isinstance(value, str):
        unknown = sorted(set(value) - set(_SAMPLER_CHARS))
        if unknown:
            raise APIError(400, f"'samplers': unknown sampler codes {''.join(unknown)!r} (known: "
                                f"{''.join(_SAMPLER_CHARS)})", param="samplers")
        names = [_SAMPLER_CHARS[c] for c in value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        unknown = [v for v in value if v not in _SAMPLER_NAMES]
        if unknown:
            raise APIError(400, f"'samplers': unknown samplers {unknown[:5]} (known: {', '.join(_SAMPLER_NAMES)})",
                           param="samplers")
        names = [_SAMPLER_NAMES[v] for v in value]
    else:
        raise APIError(400, "'samplers' must be a list of sampler names or a string of sampler codes",
                       param="samplers")
    stages = [n for n in names if n is not None]
    if "penalties" in stages and stages.index("penalties") != 0:
        raise APIError(400, "'samplers': this engine applies the penalties before every other stage; put "
                            "'penalties' first or leave it out", param="samplers")
    stages = [n for n in stages if n != "penalties"]
    positions = [SAMPLER_ORDER.index(n) for n in stages]
    if positions != sorted(set(positions)):
        raise APIError(400, f"'samplers': this engine runs its stages in one order, {', '.join(SAMPLER_ORDER)} "
                            f"(any may be left out, none repeated); got {', '.join(stages)}", param="samplers")
    return stages


def _generation_settings(pool: SlotPool, sampling: dict, bias_pairs: list, samplers: list[str], **fields) -> dict:
    """The reply's ``generation_settings``, in llama-server's field names (the request's values, defaults filled
    in; stages this engine lacks at their "off" values)."""
    seed = sampling["seed"]
    return {
        "n_ctx": pool.n_ctx, "model": pool.alias,
        "seed": RANDOM_SEED if seed_is_random(seed) else seed,
        "temperature": sampling["temperature"], "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
        "top_k": sampling["top_k"], "top_p": sampling["top_p"], "min_p": sampling["min_p"],
        "top_n_sigma": -1.0, "xtc_probability": 0.0, "xtc_threshold": 0.1,
        "typical_p": sampling["typical_p"], "tfs_z": sampling["tfs_z"],
        "repeat_last_n": sampling["repeat_last_n"], "repeat_penalty": sampling["repeat_penalty"],
        "presence_penalty": sampling["presence_penalty"], "frequency_penalty": sampling["frequency_penalty"],
        "penalize_nl": sampling["penalize_nl"],
        "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
        "mirostat": sampling["mirostat_mode"], "mirostat_tau": sampling["mirostat_tau"],
        "mirostat_eta": sampling["mirostat_eta"],
        "stop": fields["stops"], "max_tokens": fields["n_predict"], "n_predict": fields["n_predict"],
        "n_keep": fields["n_keep"], "n_discard": 0, "ignore_eos": fields["ignore_eos"], "stream": fields["stream"],
        "logit_bias": [{"bias": None if b is False else float(b), "token": int(t)} for t, b in bias_pairs],
        "n_probs": fields["n_probs"], "min_keep": 0, "grammar": "",
        "samplers": ["penalties", *samplers],
        "timings_per_token": fields["timings_per_token"], "post_sampling_probs": False,
        "cache_prompt": fields["cache_prompt"], "lora": [],
    }


class _Run:
    """Turns a generation's completion chunks into llama-server's replies: one event per token while it runs,
    the whole reply (``feed`` returns it) when the last chunk comes."""

    def __init__(self, job: _Completion, pool: SlotPool, slot, piece_ids: dict | None):
        self.job = job
        self.pool = pool
        self.slot = slot
        self.piece_ids = piece_ids
        self.parts: list[str] = []          # the text shown
        self.pieces: list[str] = []         # every token's text, stop strings included
        self.probs: list[dict] = []
        self.offsets: list[int] = []        # how much text was shown before each token
        self.n_seen = 0                     # tokens that came with a chunk (an end token never does)
        self.cache_n = _reused_prefix(slot, job.tokens)
        # the slot's speculative decoding counters when this request began (its own are the difference)
        self.drafted_before = (getattr(slot.llm, "n_drafted", 0), getattr(slot.llm, "n_draft_accepted", 0))

    def feed(self, chunk: dict) -> dict | None:
        """The event for ``chunk`` (None when it has nothing to say); the final reply for the last chunk."""
        choice = chunk["choices"][0]
        text, lp = choice.get("text") or "", choice.get("logprobs")
        entries = []
        if lp:
            self.n_seen += len(lp["tokens"])
            self.pieces += lp["tokens"]
            if self.job.n_probs and not self.job.discard:
                entries = self._probs(lp)
                self.offsets += [len("".join(self.parts))] * len(entries)
                self.probs += entries
        if self.job.discard:
            text = ""
        if choice.get("finish_reason") is not None:
            return self._final(chunk, text)
        self.parts.append(text)
        if not self.job.stream or not (text or entries or self.job.timings_per_token):
            return None
        event = {"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": self.slot.id,
                 "tokens_predicted": self.n_seen, "tokens_evaluated": len(self.job.tokens)}
        if self.job.timings_per_token:
            event["timings"] = self._timings(self.n_seen)
        if entries:
            event["completion_probabilities"] = entries
        return event

    def _probs(self, lp: dict) -> list[dict]:
        """llama.cpp's ``completion_probabilities`` entries for the tokens of one chunk (raw-logit log-probs)."""
        out = []
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            alternatives = sorted((top or {}).items(), key=lambda item: -item[1])[:self.job.n_probs]
            out.append({**self._token(token), "logprob": _finite(logprob),
                        "top_logprobs": [{**self._token(t), "logprob": _finite(v)} for t, v in alternatives]})
        return out

    def _token(self, text: str) -> dict:
        token_id = self.piece_ids.get(text, -1) if self.piece_ids is not None else -1
        raw = self.pool.llm.tokenizer.token_to_piece(token_id) if token_id >= 0 else text.encode("utf-8")
        return {"id": token_id, "token": text, "bytes": list(raw)}

    def _final(self, chunk: dict, tail: str) -> dict:
        job = self.job
        usage = chunk.get("usage") or {}
        n_decoded = int(usage.get("completion_tokens", self.n_seen))
        finish = chunk["choices"][0]["finish_reason"]
        self.parts.append(tail)
        content = "".join(self.parts)
        if finish == "length":
            stop_type = STOP_LIMIT
        elif self.n_seen < n_decoded:   # the end token came without a chunk of its own
            stop_type = STOP_EOS
        else:
            stop_type = STOP_WORD
        stopping_word = self._stopping_word() if stop_type == STOP_WORD else ""
        probs = self.probs
        if stop_type == STOP_WORD:   # as llama.cpp: the stop string's tokens are not part of the reply
            probs = [p for p, offset in zip(probs, self.offsets) if offset < len(content)]
        n_predicted = 0 if job.discard else n_decoded
        reply = {
            "index": 0, "content": tail if job.stream else content, "tokens": [], "id_slot": self.slot.id,
            "stop": True, "model": self.pool.alias, "tokens_predicted": n_predicted,
            "tokens_evaluated": len(job.tokens), "generation_settings": job.settings, "prompt": job.prompt_text,
            "has_new_line": "\n" in content,
            "truncated": stop_type == STOP_LIMIT and job.cut_by_context and not job.discard,
            "stop_type": stop_type, "stopped_eos": stop_type == STOP_EOS, "stopped_word": stop_type == STOP_WORD,
            "stopped_limit": stop_type == STOP_LIMIT, "stopping_word": stopping_word,
            "tokens_cached": self.slot.n_past, "timings": self._timings(n_predicted),
        }
        if job.n_probs and not job.stream:
            reply["completion_probabilities"] = probs
        if job.response_fields:   # a stream's last event keeps "stop": clients end the stream on it
            reply = {**({"stop": True} if job.stream else {}), **_pick_fields(reply, job.response_fields)}
        return reply

    def _stopping_word(self) -> str:
        """Which stop string ended the text: the one the engine's matcher finds first in the tokens' text."""
        matcher = StopStringMatcher(self.job.stops)
        for piece in self.pieces:
            matcher.feed(piece)
            if matcher.stopped:
                return matcher.matched_stop
        return self.job.stops[0] if self.job.stops else ""

    def _timings(self, predicted_n: int) -> dict:
        now = time.monotonic()
        first = self.slot.t_first or now
        prompt_n = len(self.job.tokens) - self.cache_n
        prompt_ms = max(0.0, (first - self.slot.t_start) * 1000.0)
        predicted_ms = max(0.0, (now - first) * 1000.0)
        timings = {"cache_n": self.cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                   "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                   "prompt_per_second": prompt_n * 1000.0 / prompt_ms if prompt_ms > 0 else 0.0,
                   "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                   "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                   "predicted_per_second": predicted_n * 1000.0 / predicted_ms if predicted_ms > 0 else 0.0}
        if getattr(self.slot.llm, "draft_model", None) is not None:
            # as llama.cpp's server with speculative decoding: drafted tokens verified, and accepted, this request
            timings["draft_n"] = self.slot.llm.n_drafted - self.drafted_before[0]
            timings["draft_n_accepted"] = self.slot.llm.n_draft_accepted - self.drafted_before[1]
        return timings


def _reused_prefix(slot, tokens: list[int]) -> int:
    """How many prompt tokens the slot's cache spares (``timings.cache_n``); read before the generation touches
    the cache."""
    return slot.llm.reusable_prefix(tokens)


def _pick_fields(reply: dict, paths: list[str]) -> dict:
    """llama.cpp's ``response_fields``: only the fields named; "a/b" takes field b of object a, under the key
    "a/b". Fields that do not exist are left out."""
    out = {}
    for path in paths:
        value, found = reply, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            out[path] = value
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOWEST_FLOAT


def _clean(value):
    """JSON has no infinities or NaN: what could carry one (a bias of -inf, a log-prob of 0) gets llama.cpp's
    stand-in."""
    if isinstance(value, float) and not math.isfinite(value):
        return LOWEST_FLOAT if value < 0 else None if math.isnan(value) else -LOWEST_FLOAT
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


#: token text -> token id, per tokenizer (for the ids in completion_probabilities; see _piece_ids)
_PIECE_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


async def _piece_ids(pool: SlotPool) -> dict:
    """Token ids by their text, built once per model (about half a second for 150k tokens). The engine's
    log-probs name tokens by text; a text that two tokens share (a lone byte of a multi-byte character shows as
    U+FFFD) maps to the lower id."""
    tokenizer = pool.llm.tokenizer
    ids = _PIECE_IDS.get(tokenizer)
    if ids is None:
        def build():
            table = {}
            for token_id in range(pool.llm.n_vocab()):
                table.setdefault(tokenizer.token_to_piece(token_id).decode("utf-8", errors="replace"), token_id)
            return table
        ids = await anyio.to_thread.run_sync(build)
        _PIECE_IDS[tokenizer] = ids
    return ids


def _slot_records(request: Request) -> dict:
    """(alias, slot id) -> (task id, the /completion request that ran there last), for /slots' params."""
    state = request.app.state
    if not hasattr(state, "llamacpp_slot_records"):
        state.llamacpp_slot_records = {}
    return state.llamacpp_slot_records


# --- /tokenize, /detokenize ------------------------------------------------------------------------------------
@router.post("/tokenize")
async def tokenize(request: Request):
    """``{"tokens": [ids]}``, or with ``with_pieces`` ``[{"id", "piece"}]`` (the piece a string when it is valid
    UTF-8 on its own, else its bytes)."""
    body = Body(await read_json(request))
    pool = await _registry(request).pool(body.data.get("model"))
    if body.data.get("content") is None:
        raise APIError(400, "'content' is required: the text to tokenize", param="content")
    add_special = body.bool("add_special", default=False)
    parse_special = body.bool("parse_special", default=True)
    with_pieces = body.bool("with_pieces", default=False)
    llm = pool.llm
    tokens = await anyio.to_thread.run_sync(
        lambda: _prompt_tokens(llm, body.data["content"], "content", add_special, parse_special))
    if not with_pieces:
        return {"tokens": tokens}
    out = []
    for token_id in tokens:
        piece = llm.tokenizer.token_to_piece(token_id)
        try:
            out.append({"id": token_id, "piece": piece.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"id": token_id, "piece": list(piece)})
    return {"tokens": out}


@router.post("/detokenize")
async def detokenize(request: Request):
    """``{"content": text}`` of token ids (special tokens written out, as llama-server does)."""
    body = Body(await read_json(request))
    pool = await _registry(request).pool(body.data.get("model"))
    tokens = body.token_ids("tokens", pool.llm.n_vocab())
    text = await anyio.to_thread.run_sync(lambda: pool.llm.detokenize(tokens, special=True))
    return {"content": text.decode("utf-8", errors="replace")}


# --- /props, /slots ----------------------------------------------------------------------------------------------
def _default_settings(pool: SlotPool) -> dict:
    """generation_settings of a request that sets nothing."""
    body = Body(dict(LLAMACPP_DEFAULTS))
    return _generation_settings(pool, sampling_kwargs(body, pool.llm.n_vocab()), [], list(SAMPLER_ORDER),
                                stops=[], n_predict=-1, n_keep=0, ignore_eos=False, stream=False, n_probs=0,
                                timings_per_token=False, cache_prompt=True)


def _build_info() -> str:
    try:
        return f"ggml_backend {importlib.metadata.version('ggml-backend')}"
    except importlib.metadata.PackageNotFoundError:
        return "ggml_backend (not installed: source tree)"


@router.get("/props")
async def props(request: Request, model: str | None = None):
    """The server's properties as llama-server's ``GET /props`` gives them; ``model_path`` is the alias."""
    pool = await _registry(request).pool(model)
    llm = pool.llm
    try:
        template = llm.chat_template()
        source = getattr(template, "source", None)
        template_text = source if isinstance(source, str) else template.name
    except ValueError:   # a broken template in the file: /props still answers (chats will get the 400)
        template_text = ""
    return {
        "default_generation_settings": {
            "id": 0, "id_task": -1, "n_ctx": pool.n_ctx, "speculative": False, "is_processing": False,
            "params": _default_settings(pool), "prompt": "",
            "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": -1, "n_decoded": 0,
                           "stopping_word": ""}},
        "total_slots": len(pool.slots),
        "model_alias": pool.alias,
        "model_path": pool.alias,
        "chat_template": template_text,
        "chat_template_caps": {},
        "modalities": {"vision": False, "audio": False},
        "bos_token": _token_text(llm, llm.token_bos()),
        "eos_token": _token_text(llm, llm.token_eos()),
        "build_info": _build_info(),
        "is_sleeping": False,
    }


def _token_text(llm, token_id) -> str:
    if token_id is None or not 0 <= token_id < llm.n_vocab():
        return ""
    return llm.tokenizer.token_to_piece(token_id).decode("utf-8", errors="replace")


@router.get("/slots")
async def slots(request: Request, model: str | None = None, fail_on_no_slot: str | None = None):
    """Each slot's state as llama-server's ``GET /slots`` gives it, plus ``n_past`` (tokens in its cache) and
    ``n_prompt_tokens``. Prompt texts are left out: they are other clients' requests.
    ``?fail_on_no_slot=1``: 503 when every slot is busy."""
    pool = await _registry(request).pool(model)
    if fail_on_no_slot not in (None, "", "0", "false") and all(s.busy for s in pool.slots):
        raise APIError(503, f"no slot available: all {len(pool.slots)} slots of model {pool.alias!r} are busy")
    records = _slot_records(request)
    out = []
    for slot in pool.slots:
        task_id, job = records.get((pool.alias, slot.id), (None, None))
        mine = job is not None and task_id == slot.task_id   # the last request there was a /completion
        n_remain = -1
        if mine and slot.busy:
            n_remain = max(0, job.kwargs["max_tokens"] - slot.n_decoded)
        entry = {"id": slot.id, "id_task": slot.task_id if slot.task_id is not None else -1, "n_ctx": pool.n_ctx,
                 "speculative": False, "is_processing": slot.busy, "n_past": slot.n_past,
                 "n_prompt_tokens": slot.n_prompt}
        if mine:
            entry["params"] = job.settings
        entry["next_token"] = {"has_next_token": slot.busy, "has_new_line": False, "n_remain": n_remain,
                               "n_decoded": slot.n_decoded}
        out.append(entry)
    return out


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: str, action: str | None = None):
    raise APIError(501, f"slot action {action!r} on slot {id_slot} is not supported by this server (slots keep "
                        "their caches in memory only; no save, restore or erase)")


# --- /metrics ----------------------------------------------------------------------------------------------------
def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


#: (name, type, help, value of a SlotPool) in llama-server's names; n_decode_total counts one forward pass per
#: predicted token (the prompt's pass gives the first token), which is what llama_decode() calls are here unless
#: a prompt is longer than one batch
_LLAMACPP_METRICS = [
    ("prompt_tokens_total", "counter", "Number of prompt tokens processed.",
     lambda p: p.metrics.prompt_tokens_total),
    ("prompt_seconds_total", "counter", "Prompt process time", lambda p: p.metrics.prompt_seconds_total),
    ("tokens_predicted_total", "counter", "Number of generation tokens processed.",
     lambda p: p.metrics.tokens_predicted_total),
    ("tokens_predicted_seconds_total", "counter", "Predict process time",
     lambda p: p.metrics.predicted_seconds_total),
    ("n_decode_total", "counter", "Total number of llama_decode() calls",
     lambda p: p.metrics.tokens_predicted_total),
    ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
     lambda p: _rate(p.metrics.prompt_tokens_total, p.metrics.prompt_seconds_total)),
    ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
     lambda p: _rate(p.metrics.tokens_predicted_total, p.metrics.predicted_seconds_total)),
    ("requests_processing", "gauge", "Number of requests processing.", lambda p: p.n_busy),
    ("requests_deferred", "gauge", "Number of requests deferred.", lambda p: len(p.waiting)),
]
_OWN_METRICS = [
    ("requests_total", "counter", "Generations finished (every dialect).", lambda p: p.metrics.requests_total),
    ("requests_failed_total", "counter", "Generations that ended in an error or a client that went.",
     lambda p: p.metrics.requests_failed),
]
#: per slot: (name, help, value of a Slot)
_SLOT_METRICS = [
    ("slot_busy", "1 while the slot runs a request.", lambda s: int(s.busy)),
    ("slot_n_past", "Tokens in the slot's KV cache.", lambda s: s.n_past),
    ("slot_n_decoded", "Tokens generated by the slot's current request.", lambda s: s.n_decoded),
]


@router.get("/metrics")
async def metrics(request: Request, model: str | None = None):
    """Prometheus text format (0.0.4): llama-server's ``llamacpp:*`` metrics, this server's ``ggml_backend:*``
    ones (per slot as gauges). Samples carry a ``model`` label when the server has several models; ``?model=``
    keeps one. A model not loaded yet counts zeros and has no slots. Scraping never loads a model."""
    registry = _registry(request)
    aliases = [registry.resolve(model).alias] if model else list(registry.configs)
    labelled = len(registry.configs) > 1
    pools = [(alias, registry.pools.get(alias)) for alias in aliases]
    lines = []

    def family(prefix, name, kind, help_text, samples):
        lines.append(f"# HELP {prefix}:{name} {help_text}")
        lines.append(f"# TYPE {prefix}:{name} {kind}")
        for labels, value in samples:
            lines.append(f"{prefix}:{name}{_labels(labels)} {_number(value)}")

    for prefix, table in (("llamacpp", _LLAMACPP_METRICS), ("ggml_backend", _OWN_METRICS)):
        for name, kind, help_text, get in table:
            family(prefix, name, kind, help_text,
                   [({"model": alias} if labelled else {}, get(pool) if pool is not None else 0)
                    for alias, pool in pools])
    family("ggml_backend", "model_loaded", "gauge", "1 once the model is loaded (models load on first use).",
           [({"model": alias}, int(pool is not None)) for alias, pool in pools])
    for name, help_text, get in _SLOT_METRICS:
        family("ggml_backend", name, "gauge", help_text,
               [({**({"model": alias} if labelled else {}), "slot": str(slot.id)}, get(slot))
                for alias, pool in pools if pool is not None for slot in pool.slots])
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _labels(labels: dict) -> str:
    """``{k="v",...}`` with the text format's escapes (backslash, double quote, newline)."""
    if not labels:
        return ""
    def escape(value) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)

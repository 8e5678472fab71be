"""The KoboldAI / KoboldCpp dialect (``/api/v1/...``, ``/api/extra/...``): what KoboldAI Lite, SillyTavern's KoboldCpp
and KoboldAI Classic backends and other Kobold clients speak. Routes, field names, defaults and reply shapes follow
KoboldCpp's server (the KoboldAI United API 1.2.5 plus KoboldCpp's ``/api/extra`` routes).

* These clients send every setting they have, so unknown fields are ignored; a known field asking for something
  this engine cannot do (DRY, XTC, dynamic temperature, images, banned strings, a repetition
  penalty slope, another sampler order) is a 400 saying so and how to turn it off, never a reply that silently
  differs from what KoboldCpp would give.
* Stop sequences are matched here, on the engine's text (``_Completion``), rather than by ``Llama``: KoboldCpp keeps
  the stop sequence in the text unless ``trim_stop``, and reports which of EOS and a stop sequence ended it.
* ``genkey``: KoboldCpp's key that lets a client poll the text so far (``/api/extra/generate/check``) and abort its
  own generation (``/api/extra/abort``) while other clients generate too. Generations without a key can be polled
  and aborted without one, as SillyTavern does; keyed ones only with their key.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
from fastapi import APIRouter, Request

from ..generation import StopStringMatcher
from ..generation.grammar import GrammarError, LlamaGrammar
from .common import Body, check_max_tokens, event_stream, read_json, start, tokenize
from .common import logit_bias as common_logit_bias
from .errors import APIError, error_body
from .slots import ClientGone, SlotPool

router = APIRouter()

#: the KoboldAI (United) API version KoboldCpp reports; clients feature-match against it
KOBOLDAI_API_VERSION = "1.2.5"
#: the KoboldCpp release whose API this dialect follows (clients enable features by it, e.g. SillyTavern's
#: stop sequences, streaming, token counting, min-p, mirostat); our own name and version are reported beside it
KOBOLDCPP_VERSION = "1.82"
#: KoboldCpp prefixes the model name with this; SillyTavern recognises KoboldCpp by it
MODEL_PREFIX = "koboldcpp/"
#: what /api/v1/generate does when a field is absent (KoboldCpp's defaults)
DEFAULT_MAX_LENGTH = 200
DEFAULTS = {"temperature": 0.75, "top_k": 100, "top_p": 0.92, "min_p": 0.0, "typical": 1.0, "tfs": 1.0,
            "rep_pen": 1.0, "rep_pen_range": 320, "rep_pen_slope": 1.0, "presence_penalty": 0.0,
            "mirostat_tau": 5.0, "mirostat_eta": 0.1}
#: KoboldCpp's samplers by number, and the order it applies them unless a request says otherwise; this engine
#: applies them in that order only (rep pen, top-k, top-a, tail-free, typical, top-p then min-p, temperature)
SAMPLER_NAMES = {0: "top-k", 1: "top-a", 2: "top-p/min-p", 3: "tail-free", 4: "typical", 5: "temperature",
                 6: "repetition penalty"}
DEFAULT_SAMPLER_ORDER = [6, 0, 1, 3, 4, 2, 5]
#: KoboldCpp ignores a sampler_order longer than this (and uses the default)
MAX_SAMPLER_ORDER = 7
#: KoboldCpp clamps logit biases to this range; custom_token_bans get the lower end
MAX_LOGIT_BIAS = 100.0
#: KoboldCpp's stop_reason codes (/api/extra/perf): a generation ends at max_length (or aborted), at an end
#: token, or at a stop sequence; -1: no generation yet
STOP_LENGTH, STOP_EOS, STOP_SEQUENCE, STOP_NONE = 0, 1, 2, -1
#: generations tracked for check/abort at most (each is one running or waiting request; leftovers are dropped)
MAX_TRACKED = 1024


def _registry(request: Request):
    return request.app.state.registry


def _model_name(body: Body):
    """The ``model`` field, also accepted with KoboldCpp's prefix (a client may echo /api/v1/model's answer)."""
    name = body.data.get("model")
    if isinstance(name, str) and name.startswith(MODEL_PREFIX):
        name = name[len(MODEL_PREFIX):]
    return name


async def _pool(request: Request, body: Body) -> SlotPool:
    return await _registry(request).pool(_model_name(body))


def _alias(request: Request, body: Body) -> str | None:
    """The model a check or abort names (404 for an unknown one), without loading it; None: any model."""
    if body.data.get("model") in (None, ""):
        return None
    return _registry(request).resolve(_model_name(body)).alias


def _slot_ctx(request: Request) -> int:
    """The context of one slot of the default model (without loading it)."""
    registry = _registry(request)
    pool = registry.pools.get(registry.default_alias)
    return pool.n_ctx if pool is not None else registry.configs[registry.default_alias].slot_ctx


async def _optional_json(request: Request) -> Body:
    """The body of a route whose body is optional (check, abort): empty is {}, anything else must be JSON."""
    if not (await request.body()).strip():
        return Body({})
    return Body(await read_json(request))


# --- what the server is ----------------------------------------------------------------------------------------
@router.get("/api/v1/model")
@router.get("/api/latest/model")
async def model(request: Request):
    return {"result": MODEL_PREFIX + _registry(request).default_alias}


@router.get("/api/v1/info/version")
@router.get("/api/latest/info/version")
async def info_version(request: Request):
    return {"result": KOBOLDAI_API_VERSION}


@router.get("/api/extra/version")
async def extra_version(request: Request):
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("ggml-backend")
    except PackageNotFoundError:
        ours = "unknown"
    # KoboldCpp's capability flags, each honest: text generation only (no images, vision, audio, speech, web
    # search, embeddings, server-side saves, admin, multiplayer, MCP)
    return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": bool(request.app.state.config.api_key),
            "llm": True, "txt2img": False, "vision": False, "audio": False, "transcribe": False,
            "multiplayer": False, "websearch": False, "tts": False, "embeddings": False, "music": False,
            "savedata": False, "admin": 0, "router": False, "guidance": False, "jinja": False, "mcp": False,
            "server": "ggml_backend", "server_version": ours}


@router.get("/api/v1/config/max_length")
@router.get("/api/latest/config/max_length")
async def config_max_length(request: Request):
    return {"value": DEFAULT_MAX_LENGTH}


@router.get("/api/v1/config/max_context_length")
@router.get("/api/latest/config/max_context_length")
async def config_max_context_length(request: Request):
    return {"value": _slot_ctx(request)}


@router.get("/api/extra/true_max_context_length")
async def true_max_context_length(request: Request):
    return {"value": _slot_ctx(request)}


@router.get("/api/v1/config/soft_prompt")
@router.get("/api/latest/config/soft_prompt")
async def soft_prompt(request: Request):
    return {"value": ""}


@router.get("/api/v1/config/soft_prompts_list")
@router.get("/api/latest/config/soft_prompts_list")
async def soft_prompts_list(request: Request):
    return {"values": []}


@router.get("/api/extra/preloadstory")
async def preloadstory(request: Request):
    return {}   # KoboldAI Lite asks on connecting; this server preloads no story


# --- reading a generation request ------------------------------------------------------------------------------
@dataclass
class _Job:
    pool: SlotPool
    tokens: list[int]
    kwargs: dict
    stops: list[str]
    trim_stop: bool
    genkey: str
    seed: int


def _reject_on(body: Body, name: str, what: str) -> None:
    """A KoboldCpp sampler this engine lacks: any value that turns it on (> 0) is a 400."""
    value = body.float(name, default=0.0)
    if value > 0:
        raise APIError(400, f"'{name}' is {value}: {what} is not supported by this server; send 0 to turn it off",
                       param=name)


def _string_list(body: Body, name: str) -> list[str]:
    value = body.data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, f"'{name}' must be a list of strings", param=name)
    return [s for s in value if s]


def _unsupported(body: Body) -> None:
    """Everything KoboldCpp would honour and this engine cannot: a 400 naming it, never a silent difference."""
    if body.int("n", default=1) != 1:
        raise APIError(400, "'n' must be 1: one reply per request (send several requests)", param="n")
    _reject_on(body, "dynatemp_range", "dynamic temperature")
    _reject_on(body, "smoothing_factor", "quadratic sampling (smoothing factor)")
    _reject_on(body, "dry_multiplier", "DRY repetition penalty")
    _reject_on(body, "xtc_probability", "XTC sampling")
    if body.data.get("images"):
        raise APIError(400, "'images': this server has no vision model", param="images")
    for name in ("banned_tokens", "banned_strings"):
        if _string_list(body, name):
            raise APIError(400, f"'{name}': banning phrases is not supported by this server; ban single tokens "
                                "with 'logit_bias' (-100) instead", param=name)
    if body.bool("bypass_eos", default=False):
        raise APIError(400, "'bypass_eos' is not supported: an end token always ends the generation here "
                            "(ban it with use_default_badwordsids instead)", param="bypass_eos")
    if body.bool("logprobs", default=False):
        raise APIError(400, "'logprobs' is not supported on this route; use /v1/completions", param="logprobs")


def _logit_bias(body: Body, n_vocab: int, eog_ids) -> dict | None:
    """KoboldCpp's ``logit_bias`` ({"token id": bias}, clamped to +-100), ``custom_token_bans`` ("id,id,...": -100)
    and the EOS ban (``ban_eos_token``, or ``use_default_badwordsids`` as KoboldAI clients call it)."""
    bias: dict[int, float] = {}
    if body.data.get("logit_bias") not in (None, {}, []) and not isinstance(body.data["logit_bias"], dict):
        raise APIError(400, "'logit_bias' must map token ids to numbers, e.g. {\"2\": -100}", param="logit_bias")
    for token, amount in (common_logit_bias(body, n_vocab) or {}).items():
        bias[token] = max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, amount))
    for item in body.str("custom_token_bans", default="").split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 0 <= int(item) < n_vocab:
            raise APIError(400, f"'custom_token_bans': {item[:40]!r} is not a token id (0..{n_vocab - 1})",
                           param="custom_token_bans")
        bias[int(item)] = -MAX_LOGIT_BIAS
    ban_eos = body.bool("ban_eos_token", default=None)
    if ban_eos is None:
        ban_eos = body.bool("use_default_badwordsids", default=False)
    if ban_eos:
        for token in eog_ids:
            bias[int(token)] = -math.inf
    return bias or None


def _check_sampler_order(body: Body, active: dict[int, bool]) -> None:
    """The samplers in use must run in the order this engine runs them (KoboldCpp's default); the place of a
    sampler that changes nothing does not matter."""
    order = body.data.get("sampler_order")
    if order is None:
        return
    if not isinstance(order, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in order):
        raise APIError(400, "'sampler_order' must be a list of sampler numbers (0..6)", param="sampler_order")
    if not order or len(order) > MAX_SAMPLER_ORDER:
        return   # KoboldCpp uses its default order then
    wanted = [s for s in order if active.get(s)]
    ours = [s for s in DEFAULT_SAMPLER_ORDER if active.get(s)]
    if wanted != ours:
        names = lambda seq: ", ".join(SAMPLER_NAMES[s] for s in seq) or "none"  # noqa: E731
        raise APIError(400, f"'sampler_order' {order} applies the samplers in use as [{names(wanted)}]; this server "
                            f"applies them only in KoboldCpp's default order {DEFAULT_SAMPLER_ORDER} "
                            f"([{names(ours)}])", param="sampler_order")


async def _job(request: Request) -> _Job:
    """A generation request read and checked: the prompt as tokens, cut to fit as KoboldCpp cuts it, and the
    Llama arguments its settings map to."""
    body = Body(await read_json(request))
    pool = await _pool(request, body)
    llm = pool.llm
    _unsupported(body)
    d = DEFAULTS
    temperature = body.float("temperature", default=d["temperature"], low=0.0)
    top_k = body.int("top_k", default=d["top_k"], low=0)
    top_p = body.float("top_p", default=d["top_p"], low=0.0, high=1.0)
    min_p = body.float("min_p", default=d["min_p"], low=0.0, high=1.0)
    typical = body.float("typical", default=d["typical"], low=0.0, high=1.0)
    tfs = body.float("tfs", default=d["tfs"], low=0.0, high=1.0)
    # KoboldCpp takes the largest of its three spellings, each defaulting to 1: a penalty below 1 does nothing
    rep_pen = max([1.0] + [body.float(name) for name in ("rep_pen", "repetition_penalty", "repeat_penalty")
                           if body.has(name)])
    # ... and a range below 1 penalizes the last token
    rep_pen_range = max(1, body.int("rep_pen_range", default=d["rep_pen_range"], low=0))
    rep_pen_slope = body.float("rep_pen_slope", default=d["rep_pen_slope"])
    presence_penalty = body.float("presence_penalty", default=d["presence_penalty"])
    mirostat = body.int("mirostat", default=0, low=0, high=2)
    mirostat_tau = body.float("mirostat_tau", default=d["mirostat_tau"], low=0.0)
    mirostat_eta = body.float("mirostat_eta", default=d["mirostat_eta"], low=0.0)
    seed = body.int("sampler_seed", default=-1, high=2 ** 64 - 1)
    if seed <= 0:
        seed = secrets.randbelow(999_999) + 1   # KoboldCpp picks a seed (and /api/extra/perf reports it)
    # KoboldCpp ignores a slope outside (0, 1]; inside it, tokens only in the older half of the range get a
    # smaller penalty, 1 + (rep_pen - 1) * slope (SamplingParams.repeat_penalty_slope)
    if not 0.0 < rep_pen_slope <= 1.0:
        rep_pen_slope = 1.0
    top_a = body.float("top_a", default=0.0, low=0.0)
    if mirostat:
        if mirostat_tau <= 0.0:
            raise APIError(400, "'mirostat_tau' must be > 0 with mirostat on", param="mirostat_tau")
    else:
        mirostat_tau, mirostat_eta = d["mirostat_tau"], d["mirostat_eta"]   # unused; KoboldCpp ignores them
        # KoboldCpp's temperature 0 keeps the top token where temperature stands in the chain, after typical
        # sampling may have dropped it; this engine's temperature 0 is the plain argmax
        if temperature <= 0.0 and typical < 1.0:
            raise APIError(400, "'typical' sampling with temperature 0 is not supported (greedy decoding here "
                                "ignores it); send typical 1, or a temperature above 0", param="typical")
        _check_sampler_order(body, {6: rep_pen != 1.0 or presence_penalty != 0.0, 0: top_k > 0, 1: top_a > 0.0,
                                    3: tfs < 1.0,
                                    4: typical < 1.0, 2: top_p < 1.0 or min_p > 0.0, 5: temperature != 1.0})
    stops = body.stops("stop_sequence")
    trim_stop = body.bool("trim_stop", default=True)
    genkey = body.str("genkey", default="")
    # special tokens are rendered as their text here (render_special true); KoboldCpp's default hides them, which
    # only shows for a control token other than an end token (an end token ends the generation either way)
    body.bool("render_special", default=False)
    logit_bias = _logit_bias(body, llm.n_vocab(), llm.tokenizer.eog_ids)

    prompt = body.str("prompt", default="")
    memory = body.str("memory", default="")
    max_length = body.int("max_length", default=DEFAULT_MAX_LENGTH, low=1)
    max_context_length = body.int("max_context_length", default=None, low=1)
    tokens = await tokenize(pool, prompt)
    memory_tokens = await tokenize(pool, memory) if memory else []
    if max_context_length is None:
        tokens = _with_memory(memory_tokens, tokens, llm)
        if not tokens:
            raise APIError(400, "the prompt is empty (and the model adds no BOS token)", param="prompt")
        check_max_tokens(max_length, len(tokens), pool.n_ctx)
    else:
        tokens, max_length = _fit(tokens, memory_tokens, max_length, min(max_context_length, pool.n_ctx), llm)
    kwargs = dict(max_tokens=max_length, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  typical_p=typical, tfs_z=tfs, repeat_penalty=rep_pen, repeat_last_n=rep_pen_range,
                  repeat_penalty_slope=rep_pen_slope, top_a=top_a,
                  presence_penalty=presence_penalty, frequency_penalty=0.0, penalize_nl=True,
                  mirostat_mode=mirostat, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed,
                  logit_bias=logit_bias, stop=None, model=pool.alias, stream=True, grammar=_grammar(body))
    return _Job(pool, tokens, kwargs, stops, trim_stop, genkey, seed)


def _grammar(body: Body):
    """KoboldCpp's ``grammar`` (GBNF; empty: none): the grammar the text must follow."""
    text = body.str("grammar", default="")
    if not text.strip():
        return None
    try:
        return LlamaGrammar.from_string(text)
    except GrammarError as exc:
        raise APIError(400, f"'grammar': {exc}", param="grammar") from None


def _with_memory(memory_tokens: list[int], tokens: list[int], llm) -> list[int]:
    """KoboldCpp's ``memory`` goes before the prompt; the prompt's own BOS then goes (the memory has one)."""
    if not memory_tokens:
        return tokens
    bos = llm.tokenizer.bos_id
    if tokens and llm.tokenizer.add_bos and tokens[0] == bos:
        tokens = tokens[1:]
    return memory_tokens + tokens


def _fit(tokens: list[int], memory_tokens: list[int], max_length: int, budget: int, llm) -> tuple[list[int], int]:
    """KoboldCpp's cut to ``max_context_length`` (``budget``, at most the slot's context): max_length leaves the
    prompt at least min(budget - 4, 16) tokens; then the prompt loses tokens from its front (its first token
    becomes BOS again if the model uses one) until prompt + max_length fit; a memory is kept whole if it can be
    (else cut from its front likewise, leaving 4 tokens spare) and the prompt behind it loses its front instead."""
    min_remain = min(budget - 4, 16)
    if max_length >= budget - min_remain:
        max_length = budget - min_remain
    room = budget - max_length
    if room < 1:
        raise APIError(400, f"max_context_length {budget} leaves no room for a prompt", param="max_context_length")
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None

    def cut_front(seq: list[int], keep: int) -> list[int]:
        if len(seq) <= keep:
            return seq
        seq = seq[len(seq) - keep:] if keep > 0 else []
        if seq and bos is not None:
            seq = [bos] + seq[1:]
        return seq

    tokens = cut_front(tokens, room)
    if memory_tokens:
        if tokens and bos is not None and tokens[0] == bos:
            tokens = tokens[1:]
        memory_tokens = cut_front(memory_tokens, max(0, room - 4))
        excess = len(memory_tokens) + len(tokens) + max_length - budget
        if excess > 0:
            tokens = tokens[excess:]
        tokens = memory_tokens + tokens
    if not tokens:
        raise APIError(400, "the prompt is empty (and the model adds no BOS token)", param="prompt")
    return tokens, max_length


# --- running one: stop sequences, the text so far, abort --------------------------------------------------------
class _Completion:
    """Llama's completion chunks with KoboldCpp's stop sequences applied: the text is cut at the first stop
    sequence (which stays in unless ``trim_stop``), the generation stops there, and ``stop_reason`` says what
    ended it. Advanced in worker threads (as ``SlotPool.chunks`` does), closed from any thread."""

    def __init__(self, chunks, llm, n_prompt: int, stops: list[str], trim_stop: bool):
        self._chunks = chunks
        self._llm = llm
        self._n_prompt = n_prompt
        self._matcher = StopStringMatcher(stops)
        self._trim = trim_stop
        self._done = False
        self.stop_reason = STOP_LENGTH      # also what an abort leaves, as in KoboldCpp
        self.n_completion = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        chunk = next(self._chunks)   # ends (StopIteration) when closed: an abort, a client gone
        choice = chunk["choices"][0]
        # tokens are computed when asked for: the one in hand is sampled but not evaluated yet
        self.n_completion = max(self.n_completion, int(self._llm.n_tokens) - self._n_prompt + 1)
        text = self._matcher.feed(choice["text"])
        usage = chunk.get("usage")
        if self._matcher.stopped:
            self._done = True
            self._chunks.close()     # the model is free now, before the reply is written
            if not self._trim:
                text += self._matcher.matched_stop
            self.stop_reason = STOP_SEQUENCE
            if usage is None:
                usage = {"prompt_tokens": self._n_prompt, "completion_tokens": self.n_completion,
                         "total_tokens": self._n_prompt + self.n_completion}
            self.n_completion = usage["completion_tokens"]
            return dict(chunk, choices=[dict(choice, text=text, finish_reason="stop")], usage=usage)
        if choice["finish_reason"] is not None:
            self._done = True
            text += self._matcher.finish()
            self.stop_reason = STOP_EOS if choice["finish_reason"] == "stop" else STOP_LENGTH
            if usage is not None:
                self.n_completion = usage["completion_tokens"]
        return dict(chunk, choices=[dict(choice, text=text)])

    def close(self) -> None:
        self._chunks.close()

    @property
    def finished(self) -> bool:
        """Whether it ended by itself (max_length, an end token, a stop sequence), not closed."""
        return self._done

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stop_reason in (STOP_EOS, STOP_SEQUENCE) else "length"


_ids = itertools.count(1)


@dataclass
class _Run:
    """One generation of this dialect from its request to its end: the text so far (/check) and whether it was
    aborted (/abort); tracked in the app's state while it runs."""
    pool: SlotPool
    genkey: str              # the client's ("" without one)
    slot_key: str            # the key its slot carries (SlotPool.abort): the client's, or a private one
    parts: list[str] = field(default_factory=list)
    aborted: bool = False
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _runs(app) -> dict[int, _Run]:
    runs = getattr(app.state, "kobold_runs", None)
    if runs is None:
        runs = app.state.kobold_runs = {}
    return runs


def _open_run(request: Request, job: _Job) -> _Run:
    runs = _runs(request.app)
    while len(runs) >= MAX_TRACKED:
        runs.pop(next(iter(runs)))   # the oldest: a leftover (entries leave when their generation ends)
    # a generation without a key gets an unguessable one, so that no other client can abort it by key
    slot_key = job.genkey or f"kobold-anonymous-{secrets.token_hex(8)}"
    run = _Run(job.pool, job.genkey, slot_key)
    runs[run.id] = run
    return run


def _close_run(request: Request, run: _Run) -> None:
    _runs(request.app).pop(run.id, None)


def _matching_runs(request: Request, body: Body) -> list[_Run]:
    genkey = body.str("genkey", default="")
    alias = _alias(request, body)
    return [run for run in _runs(request.app).values()
            if run.genkey == genkey and (alias is None or run.pool.alias == alias)]


async def _begin(request: Request, job: _Job, run: _Run):
    """Wait for a slot and start the generation: (ticket, _Completion), or None if it was aborted meanwhile."""
    tokens, kwargs = job.tokens, job.kwargs

    def make(llm):
        return _Completion(llm.create_completion(tokens, **kwargs), llm, len(tokens), job.stops, job.trim_stop)
    try:
        ticket, completion = await start(request, job.pool, tokens, make, genkey=run.slot_key)
    except asyncio.CancelledError:
        # an abort while it waited in line cancels its place (SlotPool.abort); a cancelled request goes on
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", lambda: 0)()
        if run.aborted and not cancelling:
            return None
        raise
    if run.aborted:          # aborted while its stream was being made (the slot had no stream to close yet)
        completion.close()
    return ticket, completion


def _remember(request: Request, job: _Job, completion: _Completion | None) -> None:
    """The last generation of each model, for /api/extra/perf: its seed and KoboldCpp's stop reason, with the
    pool's count of generations once it was recorded (perf trusts it while no other generation came after)."""
    if completion is None:   # aborted before it started: the pool recorded nothing
        return
    last = getattr(request.app.state, "kobold_last", None)
    if last is None:
        last = request.app.state.kobold_last = {}
    last[job.pool.alias] = (job.pool.metrics.requests_total, job.seed, completion.stop_reason)


@router.post("/api/v1/generate")
@router.post("/api/latest/generate")
async def generate(request: Request):
    job = await _job(request)
    run = _open_run(request, job)
    completion = None
    try:
        begun = await _begin(request, job, run)
        if begun is not None:
            ticket, completion = begun
            async with aclosing(job.pool.chunks(ticket, completion)) as running:
                async for chunk in running:
                    run.parts.append(chunk["choices"][0]["text"])
                    if await request.is_disconnected():
                        raise ClientGone()
    finally:
        _close_run(request, run)
    if completion is not None and not completion.finished and not run.aborted:
        # closed by neither its end nor /abort: the server is shutting down (as the llama.cpp dialect answers)
        raise APIError(503, "the generation was stopped before it finished (the server is shutting down)")
    _remember(request, job, completion)
    return {"results": [{"text": run.text,
                         "finish_reason": completion.finish_reason if completion is not None else "length",
                         "logprobs": None, "prompt_tokens": len(job.tokens),
                         "completion_tokens": completion.n_completion if completion is not None else 0}]}


@router.post("/api/extra/generate/stream")
async def generate_stream(request: Request):
    """KoboldCpp's stream: ``event: message`` / ``data: {"token": text, "finish_reason": null}`` per piece of
    text, the last one with the finish reason (and any last text)."""
    job = await _job(request)
    run = _open_run(request, job)
    try:
        begun = await _begin(request, job, run)
    except BaseException:
        _close_run(request, run)
        raise

    def message(token: str, finish_reason) -> dict:
        return {"event": "message", "data": json.dumps({"token": token, "finish_reason": finish_reason},
                                                       ensure_ascii=False)}

    async def events():
        completion, last = None, ""
        try:
            if begun is not None:
                ticket, completion = begun
                async with aclosing(job.pool.chunks(ticket, completion)) as running:
                    async for chunk in running:
                        choice = chunk["choices"][0]
                        run.parts.append(choice["text"])
                        if choice["finish_reason"] is not None:
                            last = choice["text"]
                        elif choice["text"]:
                            yield message(choice["text"], None)
        except (ValueError, TypeError, RuntimeError) as exc:   # mid-stream: the status line is gone already
            yield {"event": "error",
                   "data": json.dumps(error_body(APIError(500, f"generation failed: {exc}"), "kobold"))}
            return
        finally:
            _close_run(request, run)
        _remember(request, job, completion)
        yield message(last, completion.finish_reason if completion is not None else "length")
    return event_stream(events())


@router.get("/api/extra/generate/check")
@router.post("/api/extra/generate/check")
async def generate_check(request: Request):
    """The text so far of the generation with this genkey (KoboldAI Lite's polled streaming); "" when none runs."""
    runs = _matching_runs(request, await _optional_json(request))
    return {"results": [{"text": runs[-1].text if runs else ""}]}


@router.post("/api/extra/abort")
async def abort(request: Request):
    """Stop the generation with this genkey (without one: the generations started without one) after the token
    in progress; the request that ran it answers with the text so far. One still waiting in line leaves it."""
    runs = _matching_runs(request, await _optional_json(request))
    for run in runs:
        run.aborted = True
        run.pool.abort(run.slot_key)
    found = "true" if runs else "false"
    return {"success": found, "done": found}


# --- tokens -------------------------------------------------------------------------------------------------
@router.post("/api/extra/tokencount")
@router.post("/api/extra/tokenize")
async def tokencount(request: Request):
    """The prompt's tokens; ``special`` (default true) adds the BOS token if the model uses one. Chat
    ``messages`` instead of a prompt are counted as rendered by the model's chat template."""
    body = Body(await read_json(request))
    pool = await _pool(request, body)
    prompt = body.str("prompt", default="")
    add_special = body.bool("special", default=True)
    messages = body.data.get("messages")
    if messages is not None and not prompt:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a list of message objects", param="messages")
        llm = pool.llm
        try:
            ids, _, _ = await anyio.to_thread.run_sync(lambda: llm.render_chat_prompt(messages))
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"cannot render the messages on the chat template: {exc}", param="messages") from None
    else:
        ids = await tokenize(pool, prompt, add_bos=add_special)
    return {"value": len(ids), "ids": ids}


@router.post("/api/extra/detokenize")
async def detokenize(request: Request):
    """The text of token ids; ``special`` (default true) renders special tokens as their text."""
    body = Body(await read_json(request))
    pool = await _pool(request, body)
    ids = body.token_ids("ids", pool.llm.n_vocab())
    special = body.bool("special", default=True)
    llm = pool.llm
    text = (await anyio.to_thread.run_sync(lambda: llm.detokenize(ids, special=special))).decode("utf-8",
                                                                                              errors="replace")
    return {"result": text, "success": True}


# --- performance --------------------------------------------------------------------------------------------
def _stop_code(reason: str) -> int:
    """Metrics' last stop reason as KoboldCpp's code (an end token and a stop string are both "stop" there)."""
    if not reason:
        return STOP_NONE
    return STOP_LENGTH if reason in ("length", "abort") else STOP_EOS


@router.get("/api/extra/perf")
async def perf(request: Request):
    """KoboldCpp's performance report for the default model: the last generation (``last_process``/``last_eval``
    in ms per token, as KoboldCpp gives them), totals and the line. A model not loaded yet reports zeros."""
    registry = _registry(request)
    pool = registry.pools.get(registry.default_alias)
    uptime = time.time() - request.app.state.started
    report = {"last_process": 0.0, "last_eval": 0.0, "last_token_count": 0, "last_input_count": 0,
              "last_process_time": 0.0, "last_eval_time": 0.0, "last_process_speed": 0.0, "last_eval_speed": 0.0,
              "last_seed": -1, "last_draft_success": 0, "last_draft_failed": 0, "total_gens": 0,
              "stop_reason": STOP_NONE, "total_img_gens": 0, "total_tts_gens": 0, "total_transcribe_gens": 0,
              "queue": 0, "idle": 1, "hordeexitcounter": 0, "uptime": uptime, "idletime": uptime, "quiet": True}
    if pool is None:
        return report
    m = pool.metrics
    # the prompt of the last generation: the slot released last holds it
    released = [s for s in pool.slots if not s.busy] or pool.slots
    n_input = max(released, key=lambda s: s.last_used).n_prompt if m.requests_total else 0
    n_output = m.last_tokens_predicted
    t_process, t_eval = m.last_prompt_seconds, m.last_predicted_seconds
    report.update(last_process=1000.0 * t_process / n_input if n_input else 0.0,
                  last_eval=1000.0 * t_eval / n_output if n_output else 0.0,
                  last_token_count=n_output, last_input_count=n_input, last_process_time=t_process,
                  last_eval_time=t_eval, last_process_speed=n_input / t_process if t_process > 0 else 0.0,
                  last_eval_speed=n_output / t_eval if t_eval > 0 else 0.0, total_gens=m.requests_total,
                  stop_reason=_stop_code(m.last_stop_reason), queue=len(pool.waiting),
                  idle=0 if pool.n_busy else 1,
                  idletime=0.0 if pool.n_busy else time.monotonic() - max(s.last_used for s in pool.slots))
    mine = getattr(request.app.state, "kobold_last", {}).get(pool.alias)
    if mine is not None and mine[0] == m.requests_total:   # the last generation was this dialect's: exact
        report.update(last_seed=mine[1], stop_reason=mine[2])
    return report

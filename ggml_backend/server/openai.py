"""The OpenAI dialect (``/v1/...``): what Open WebUI, SillyTavern, LibreChat, LiteLLM, the ``openai`` package and
LangChain's ``ChatOpenAI`` speak. Fields follow OpenAI's API and llama-cpp-python's server (which adds
``top_k``, ``min_p``, ``repeat_penalty``, ``mirostat``...); what cannot be honoured is a 400 saying so.
"""
from __future__ import annotations

import base64
import json
from contextlib import aclosing

import anyio

from fastapi import APIRouter, Request

from ..api import collect_chat, collect_completion
from ..generation.grammar import GrammarError, LlamaGrammar, forced_call_grammar, grammar_from_response_format
from .common import (Body, check_max_tokens, checked_token_ids, collect, event_stream, read_json, sampling_kwargs,
                     start, tokenize)
from .errors import APIError, error_body

router = APIRouter()


def _registry(request: Request):
    return request.app.state.registry


@router.get("/v1/models")
async def list_models(request: Request):
    registry = _registry(request)
    started = int(request.app.state.started)
    data = []
    for alias, config in registry.configs.items():
        pool = registry.pools.get(alias)
        meta = {"n_ctx_slot": config.slot_ctx, "n_parallel": config.n_parallel, "loaded": pool is not None}
        if pool is not None:
            meta.update(n_vocab=pool.llm.n_vocab(), n_ctx_train=pool.llm.hparams.n_ctx_train,
                        architecture=pool.llm.hparams.arch.name)
        data.append({"id": alias, "object": "model", "created": started, "owned_by": "ggml_backend", "meta": meta})
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    registry = _registry(request)
    config = registry.resolve(model_id)
    return {"id": config.alias, "object": "model", "created": int(request.app.state.started),
            "owned_by": "ggml_backend"}


#: the most choices one request may ask for (``n``): they are decoded together in the request's slot, each with a
#: KV cache of its own, so the bound keeps one request from taking a slot's worth of memory many times over
MAX_N = 16


def _unsupported(body: Body) -> None:
    """Requests we cannot honour get a 400, never a reply that silently ignores what they asked."""
    body.int("n", default=1, low=1, high=MAX_N)
    if body.int("best_of", default=1, low=1) != 1:
        raise APIError(400, "best_of > 1 is not supported", param="best_of")


def _grammar(body: Body):
    """The grammar a request asks for: ``response_format`` (json_object, with or without llama-cpp-python's
    "schema", or OpenAI's json_schema) or a GBNF ``grammar`` (llama-cpp-python's server field); a 400 naming what
    cannot be compiled."""
    fmt, gbnf = body.data.get("response_format"), body.data.get("grammar")
    try:
        grammar = grammar_from_response_format(fmt)
        if gbnf is not None:
            if grammar is not None:
                raise GrammarError("give 'grammar' or a JSON 'response_format', not both")
            grammar = LlamaGrammar.from_string(gbnf)
    except GrammarError as exc:
        raise APIError(400, str(exc), param="grammar" if gbnf is not None else "response_format") from None
    return grammar


def _stream_options(body: Body) -> bool:
    options = body.data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return Body(options).bool("include_usage", default=False)


async def _generation_request(request: Request):
    """(the checked body, the pool of the model it names) of a completion or chat request."""
    body = Body(await read_json(request))
    pool = await _registry(request).pool(body.data.get("model"))
    _unsupported(body)
    return body, pool


@router.post("/v1/completions")
async def completions(request: Request):
    body, pool = await _generation_request(request)
    prompt = body.data.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "a list of several prompts is not supported: send one request per prompt",
                           param="prompt")
        prompt = prompt[0]
    if body.data.get("suffix"):
        raise APIError(400, "'suffix' (fill in the middle) is not supported", param="suffix")
    tokens = await tokenize(pool, prompt)
    if not tokens:
        raise APIError(400, "the prompt is empty", param="prompt")
    max_tokens = check_max_tokens(body.int("max_tokens", default=16, low=1), len(tokens), pool.n_ctx)
    logprobs = body.int("logprobs", default=None, low=0, high=20)
    kwargs = dict(sampling_kwargs(body, pool.llm.n_vocab()), max_tokens=max_tokens, stop=body.stops("stop"),
                  echo=body.bool("echo", default=False), logprobs=logprobs, model=pool.alias, stream=True,
                  grammar=_grammar(body), n=body.int("n", default=1))
    stream = body.bool("stream", default=False)
    include_usage = _stream_options(body)
    ticket, chunks = await start(request, pool, tokens, lambda llm: llm.create_completion(tokens, **kwargs))
    if not stream:
        return collect_completion(await collect(request, pool, ticket, chunks))
    return _sse(pool, ticket, chunks, include_usage)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body, pool = await _generation_request(request)
    messages = body.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    tools = body.data.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise APIError(400, "'tools' must be a list of tool objects", param="tools")
    tool_choice = body.data.get("tool_choice")
    try:   # "required" or a named tool: the reply is constrained to a call (generation/grammar.py)
        forced = forced_call_grammar(tools or [], tool_choice)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"tool_choice: {exc}", param="tool_choice") from None
    prefill = forced[0] if forced is not None else ""
    if tool_choice == "none" or not tools:
        tools, tool_choice = None, None
    grammar = _grammar(body)
    if grammar is not None and forced is not None:
        raise APIError(400, "a forced tool_choice constrains the reply already: give no response_format or grammar "
                            "with it", param="response_format")
    llm = pool.llm
    try:
        tokens, _, _ = await _in_thread(lambda: llm.render_chat_prompt(messages, tools=tools))
        if prefill:
            tokens = tokens + llm.tokenize(prefill, add_bos=False, special=True)
    except (ValueError, TypeError) as exc:   # TemplateError is a ValueError
        raise APIError(400, f"cannot render the messages on the chat template: {exc}", param="messages") from None
    logprobs = body.bool("logprobs", default=False)
    top_logprobs = body.int("top_logprobs", default=None, low=0, high=20)
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    max_tokens = check_max_tokens(body.int("max_completion_tokens", "max_tokens", default=None, low=1),
                                  len(tokens), pool.n_ctx)
    kwargs = dict(sampling_kwargs(body, llm.n_vocab()), max_tokens=max_tokens, stop=body.stops("stop"),
                  logprobs=logprobs, top_logprobs=top_logprobs, tools=tools, tool_choice=tool_choice,
                  grammar=grammar, model=pool.alias, stream=True, n=body.int("n", default=1))
    stream = body.bool("stream", default=False)
    include_usage = _stream_options(body)
    ticket, chunks = await start(request, pool, tokens,
                                 lambda slot_llm: slot_llm.create_chat_completion(messages, **kwargs))
    if not stream:
        return collect_chat(await collect(request, pool, ticket, chunks))
    return _sse(pool, ticket, chunks, include_usage)


#: the most inputs one /v1/embeddings request may carry (OpenAI's limit)
MAX_EMBEDDING_INPUTS = 2048


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    """OpenAI's embeddings: ``input`` a string, a list of strings, a list of token ids or a list of such lists;
    one vector per input, pooled by the model file's ``pooling_type``, else by the mean of the tokens
    (embeddings.one_vector_pooling); ``encoding_format`` "float" or "base64" (little-endian float32, what the
    ``openai`` package asks for by default). Each input runs in a KV cache of its own on the pool's weights, in a
    worker thread, taking turns with the slots' forward passes: no slot's cache or line is touched."""
    from ..embeddings import embed_token_lists, one_vector_pooling, tokenize_texts
    body = Body(await read_json(request))
    pool = await _registry(request).pool(body.data.get("model"))
    llm = pool.llm
    encoding = body.str("encoding_format", default="float")
    if encoding not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}",
                       param="encoding_format")
    dimensions = body.int("dimensions", default=None, low=1)
    if dimensions is not None and dimensions != llm.n_embd():
        raise APIError(400, f"this model's embeddings have {llm.n_embd()} dimensions; 'dimensions' cannot change "
                            "that", param="dimensions")
    inputs = body.data.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise APIError(400, "'input' must be a non-empty string, list of strings, list of token ids or list of "
                            "such lists", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")

    def run():
        token_lists = []
        for item in inputs:
            tokens = (checked_token_ids(item, llm.n_vocab(), "input") if isinstance(item, list)
                      else tokenize_texts(llm, item, truncate=False)[0])
            if not tokens:
                raise ValueError("an input is empty")
            if len(tokens) > llm.n_batch:
                raise ValueError(f"an input of {len(tokens)} tokens exceeds the batch size of {llm.n_batch}")
            token_lists.append(tokens)
        pooling = one_vector_pooling(None, llm.metadata)
        return embed_token_lists(llm, token_lists, pooling), sum(len(t) for t in token_lists)

    try:
        vectors, n_tokens = await anyio.to_thread.run_sync(run)
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="input") from None
    if encoding == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    return {"object": "list", "model": pool.alias,
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def _sse(pool, ticket, chunks, include_usage: bool):
    """OpenAI's stream: one ``data: {chunk}`` event per chunk, ``data: [DONE]`` at the end; usage in a last
    chunk with no choices when ``stream_options.include_usage`` asks for it (else nowhere)."""
    async def events():
        usage, last = None, None
        try:
            async with aclosing(pool.chunks(ticket, chunks)) as running:
                async for chunk in running:
                    usage = chunk.pop("usage", None) or usage
                    if include_usage:
                        chunk["usage"] = None
                    last = chunk
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
        except (ValueError, TypeError, RuntimeError) as exc:   # mid-stream: the status line is gone already
            yield {"data": json.dumps(error_body(APIError(500, f"generation failed: {exc}"), "openai"))}
            return
        if include_usage and last is not None:
            yield {"data": json.dumps({"id": last["id"], "object": last["object"], "created": last["created"],
                                       "model": last["model"], "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}
    return event_stream(events())


async def _in_thread(fn):
    import anyio
    return await anyio.to_thread.run_sync(fn)


"""``ChatGGML``: a LangChain chat model (``BaseChatModel``) on ggml_backend, with tool calling."""
from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, FunctionMessage,
                                     HumanMessage, SystemMessage, ToolMessage)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field

from ggml_backend.generation.grammar import forced_call_grammar, grammar_from_response_format, tool_call_grammar
from ggml_backend.templates.tool_calls import CALL_CLOSE, ToolCallSplitter, resolve_tool_choice

from ggml_backend.api import _chat_logprobs

from ._params import LlamaCppParams
from ._shared import SharedModel, aiter_in_thread, model_name_of

#: a call's arguments ChatGGML reads itself; the others go to ``create_completion``
_CHAT_ONLY_KWARGS = frozenset({"tools", "tool_choice", "response_format", "chat_template", "model", "grammar"})



class ChatGGML(LlamaCppParams, BaseChatModel):
    """Chat with a GGUF/GGML model file run by ggml_backend (pure Python, CPU).

    Messages are rendered with the model file's own chat template (Jinja, in a sandbox), or ``chat_template`` (a
    built-in name such as ``"chatml"``, a template file, or Jinja text); a file without a template gets ChatML.
    Tools bound with ``bind_tools`` are described to the model through its template and the
    ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks it writes come back as ``AIMessage.tool_calls``
    (Qwen2.5 / Hermes convention). ``tool_choice="any"`` or a tool's name forces a call by starting the reply with
    the call's opening text; a forced reply holds exactly one call.

    Example:
        .. code-block:: python

            from langchain_ggml import ChatGGML

            chat = ChatGGML(temperature=0, max_tokens=128)   # model_path=None: the default Qwen2.5-Coder-0.5B
            chat.invoke([("system", "Answer briefly."), ("human", "What is a Python generator?")])

    A drop-in for LangChain's ``ChatLlamaCpp``: its constructor parameters with the same names, defaults and
    meaning (see ``LlamaCppParams`` and the README's table); the model is loaded at construction and exposed as
    ``client``, shared with other instances of the same model settings. ``grammar`` / ``grammar_path`` hold
    every reply to a GBNF grammar (then no tool call is parsed out of a reply unless the grammar writes one;
    with a forced tool call or JSON mode, which have their own grammar, it is an error). ``suffix`` and
    ``echo`` (text-completion settings that ``ChatLlamaCpp`` accepts and never uses) are refused when set.
    """

    chat_template: str | None = None
    """None: the model file's template (ChatML if it has none); else a built-in name, a file, or Jinja text."""
    max_tokens: int | None = 256
    """Most tokens in a reply; None or <= 0: until the model ends its turn."""
    timeout: float | None = None
    """Inert: LangChain's standard parameter for remote APIs; a local model has no request to time out."""
    max_retries: int | None = None
    """Inert: LangChain's standard parameter for remote APIs; a local model has no request to retry."""
    api_key: Any = Field(default=None, exclude=True, repr=False)
    """Inert: LangChain's standard parameter for remote APIs; a local model needs no key."""

    model_config = ConfigDict(protected_namespaces=())

    # --- LangChain plumbing ----------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "ggml-chat"

    @property
    def _default_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "max_tokens": self.max_tokens, "seed": self.seed,
                "logprobs": self.logprobs}

    def _check_settings(self) -> None:
        super()._check_settings()
        for name, value, default in (("suffix", self.suffix, None), ("echo", self.echo, False)):
            if value != default:
                raise ValueError(f"{name}={value!r} is a text-completion setting that a chat reply has no use for "
                                 "(ChatLlamaCpp accepts it and never uses it); use GGMLLLM for it")

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "n_ctx": self.n_ctx, "chat_template": self.chat_template,
                **self._default_params}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ggml"
        params["ls_model_name"] = kwargs.get("model") or model_name_of(self.model_path or "default")
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _shared_model(self, model_path: str | None = None) -> SharedModel:
        """This instance's model, or (a call's ``model=``) another file with the same settings."""
        if model_path is None or model_path == self.model_path:
            return self.shared_model
        return self._load(model_path)

    # --- tools -------------------------------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything ``convert_to_openai_tool`` accepts).

        ``tool_choice``: None/"auto" (the model decides), "none" (tools not offered), "any"/"required"/True (a
        call is forced), a tool's name or ``{"type": "function", "function": {"name": ...}}`` (that tool is forced).
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        resolve_tool_choice(tool_choice, formatted)   # fail here, at bind time, on a bad choice
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
                               strict: bool | None = None, **kwargs: Any) -> Runnable:
        """Structured output through a forced tool call ("function_calling", "json_schema"), constrained to
        arguments that validate against the schema, or "json_mode": the reply constrained to a JSON object
        (the prompt should still say what to put in it) and parsed."""
        if method in ("function_calling", "json_schema"):
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method != "json_mode":
            raise ValueError(f"unknown structured output method {method!r}; expected 'function_calling', "
                             "'json_schema' or 'json_mode'")
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        # JSON mode asks for any JSON object; knowing the schema, the reply is held to it (its keys, their types)
        json_schema = schema.model_json_schema() if is_pydantic else schema if isinstance(schema, dict) else None
        response_format = {"type": "json_object"}
        if json_schema is not None and "properties" in json_schema:
            response_format["schema"] = json_schema
        llm = self.bind(response_format=response_format,
                        ls_structured_output_format={"kwargs": {"method": "json_mode"}, "schema": schema})
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if include_raw:
            parser_assign = RunnablePassthrough.assign(parsed=lambda x: parser.invoke(x["raw"]),
                                                       parsing_error=lambda _: None)
            parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return llm | parser

    # --- generation ------------------------------------------------------------------------------------------
    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> Iterator[ChatGenerationChunk]:
        """The reply as ChatGenerationChunks: text as it comes, each tool call once complete, then a last chunk
        with usage, finish_reason and model_name."""
        shared = self._shared_model(kwargs.get("model"))
        llama = shared.llama
        tools = kwargs.get("tools") or None
        # A forced call: the reply starts with the call's opening text, written by us, and the grammar makes the
        # rest a call whose arguments validate; else a JSON response_format (json_mode) constrains the reply
        forced = forced_call_grammar(tools or [], kwargs.get("tool_choice"))
        prefill, grammar = forced if forced is not None else ("", None)
        if grammar is None:
            grammar = grammar_from_response_format(kwargs.get("response_format"))
        own_grammar = kwargs.get("grammar", self._compiled_grammar)
        if own_grammar is not None:
            if grammar is not None:
                raise ValueError("grammar holds every reply to its own rules; a forced tool call or a JSON "
                                 "response_format needs its own grammar: give one or the other")
            grammar = own_grammar
        if grammar is None and tools and kwargs.get("tool_choice") != "none":
            grammar = tool_call_grammar(tools, llama.tokenizer)   # a call the model starts is held to the tools
        if kwargs.get("tool_choice") == "none":
            tools = None
        chat_messages = convert_messages(messages)
        prompt_tokens, template_stops, _ = llama.render_chat_prompt(
            chat_messages, template=kwargs.get("chat_template") or self.chat_template, tools=tools)
        if prefill:
            prompt_tokens = prompt_tokens + llama.tokenize(prefill, add_bos=False, special=True)
        stops = template_stops + list(self.stop or []) + list(stop or [])
        if prefill:
            stops.append(CALL_CLOSE)   # one forced call, then the reply is over

        # the call's other arguments go to create_completion (an unknown one is its TypeError)
        params = {**self._default_params, "repeat_last_n": self.last_n_tokens_size,
                  **{k: v for k, v in kwargs.items() if k not in _CHAT_ONLY_KWARGS}}
        params["seed"] = self._call_seed(kwargs.get("seed"))
        n_top = params.get("logprobs")
        pending_logprobs: list[dict] = []
        splitter = ToolCallSplitter(parse_calls=bool(tools), prefill=prefill, tools=tools or [])
        pieces: list = []
        finish_reason, usage = None, None
        # closed on every exit, also when this generator is closed or dropped mid-stream: the model is freed at once
        with shared.stream_completion(prompt_tokens, stop=stops, grammar=grammar, **params) as chunks:
            for chunk in chunks:
                choice = chunk["choices"][0]
                pieces += splitter.feed(choice["text"])
                if n_top is not None and choice.get("logprobs"):
                    pending_logprobs.append(_chat_logprobs(choice["logprobs"], n_top))
                if choice["finish_reason"] is not None:
                    usage = chunk["usage"]
                    last_pieces, finish_reason = splitter.end(choice["finish_reason"])
                    pieces += last_pieces
                for piece in pieces:
                    yield _piece_to_chunk(piece, pending_logprobs)
                    pending_logprobs = []
                pieces = []
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", chunk_position="last",
                usage_metadata={"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                                "total_tokens": usage["total_tokens"]},
                response_metadata={"model_name": shared.model_name, "finish_reason": finish_reason,
                                   "model_provider": "ggml"}),
            generation_info={"finish_reason": finish_reason,
                             **({"logprobs": _join_logprobs(pending_logprobs)} if pending_logprobs else {})})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in aiter_in_thread(lambda: self._chunks(messages, stop, kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        return generate_from_stream(self._chunks(messages, stop, kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        return await agenerate_from_stream(aiter_in_thread(lambda: self._chunks(messages, stop, kwargs)))


# --- messages ----------------------------------------------------------------------------------------------------
def convert_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages as the OpenAI-style dicts chat templates take (tool-call arguments as objects)."""
    return [_convert_message(message) for message in messages]


def _text_of(content: Any, role: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") in ("tool_use", "tool_call", "thinking", "reasoning"):
            continue   # tool calls travel in AIMessage.tool_calls; reasoning is not replayed to the model
        else:
            raise ValueError(f"ChatGGML runs text-only models: a {role} message's {block.get('type')!r} content "
                             "block cannot be given to the model")
    return "".join(parts)


def _convert_message(message: BaseMessage) -> dict:
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text_of(message.content, "system")}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": _text_of(message.content, "human")}
    if isinstance(message, AIMessage):
        out: dict[str, Any] = {"role": "assistant", "content": _text_of(message.content, "AI")}
        if message.tool_calls:
            out["tool_calls"] = [{"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": call["name"], "arguments": call["args"]}}
                                 for call in message.tool_calls]
        return out
    if isinstance(message, ToolMessage):
        content = message.content
        if not isinstance(content, str):
            try:
                content = _text_of(content, "tool")
            except ValueError:
                content = json.dumps(content, ensure_ascii=False)
        out = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
        if message.name:
            out["name"] = message.name
        return out
    if isinstance(message, FunctionMessage):
        return {"role": "tool", "content": _text_of(message.content, "function"), "name": message.name}
    if isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"ChatMessage role {message.role!r} has no place in a chat template")
        return {"role": role, "content": _text_of(message.content, role)}
    raise ValueError(f"ChatGGML cannot send a {type(message).__name__} to the model")


def _join_logprobs(parts: list[dict]) -> dict:
    return {"content": [entry for part in parts for entry in part["content"]]}


def _piece_to_chunk(piece: tuple[str, Any], logprobs: list[dict] | None = None) -> ChatGenerationChunk:
    """A text piece or a complete tool call as a chunk; ``logprobs``: the chat-shaped log-probabilities of the
    tokens generated since the last chunk (in generation_info, as ChatLlamaCpp's)."""
    info = {"logprobs": _join_logprobs(logprobs)} if logprobs else None
    kind, value = piece
    if kind == "text":
        return ChatGenerationChunk(message=AIMessageChunk(content=value), generation_info=info)
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    return ChatGenerationChunk(message=AIMessageChunk(
        content="", tool_call_chunks=[tool_call_chunk(name=value["name"], id=call_id, index=None,
                                                      args=json.dumps(value["arguments"], ensure_ascii=False))]),
        generation_info=info)

"""Structured output: grammars that constrain every sampled token, compiled and matched by llguidance.

llguidance (the engine llama.cpp itself now uses for grammars) reads llama.cpp's GBNF, JSON schemas, Lark and
regexes, and computes the set of tokens that keep the output inside the grammar (a bitmask over the vocabulary)
in tens of microseconds, against the vocabulary given as byte strings. Per generated token:

    mask = matcher.allowed()              # which tokens may come next
    token = sample(logits where mask)      # the sampler never sees the others
    matcher.accept(token)                  # the grammar moves on; done() once it is complete

``LlamaGrammar`` is the compiled grammar, shaped like llama-cpp-python's (``from_string`` for GBNF, ``from_file``,
``from_json_schema``); ``grammar.matcher(tokenizer)`` is one generation's state. A grammar llguidance cannot
compile raises ``GrammarError`` (a ValueError) naming what it could not read.
"""
from __future__ import annotations

import json
import os
import weakref
from typing import Any

import numpy as np

#: the largest grammar text accepted (a grammar is client input: bound what the compiler is given)
MAX_GRAMMAR_CHARS = 256 * 1024


class GrammarError(ValueError):
    """A grammar or JSON schema that cannot be compiled, or output that left the grammar."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError as exc:   # pragma: no cover - a dependency of the package
        raise GrammarError(f"grammars need the llguidance package: pip install llguidance ({exc})") from None
    return llguidance


class LlamaGrammar:
    """A compiled grammar (llguidance's grammar definition) and where it came from."""

    def __init__(self, definition: str, source: str, trigger_token: int | None = None):
        self.definition = definition
        self.source = source          # a short description for errors: "GBNF", "JSON schema", ...
        # a lazy grammar: the output is free until this token is sampled, then follows the grammar until it is
        # complete, then is free again (tool calls that the model chooses to start)
        self.trigger_token = trigger_token

    # --- constructors (llama-cpp-python's names) ----------------------------------------------------------
    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        """A grammar in llama.cpp's GBNF (Lark is accepted too, as llguidance reads both)."""
        text = _checked_text(grammar, "grammar")
        ll = _llguidance()
        try:
            definition = ll.grammar_from("gbnf", text)
        except ValueError as exc:
            raise GrammarError(f"cannot read the GBNF grammar: {exc}") from None
        return cls._validated(definition, "GBNF grammar")

    @classmethod
    def from_file(cls, file: str | os.PathLike, verbose: bool = True) -> "LlamaGrammar":
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read(MAX_GRAMMAR_CHARS + 1)
        except OSError as exc:
            raise GrammarError(f"cannot read the grammar file {file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise GrammarError(f"the grammar file {file} is not UTF-8 text") from None
        return cls.from_string(text, verbose=verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str | dict, verbose: bool = True) -> "LlamaGrammar":
        """Output that is JSON valid against the schema (a JSON string, as llama-cpp-python takes, or a dict)."""
        if isinstance(json_schema, str):
            _checked_text(json_schema, "json_schema")
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(json_schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(json_schema).__name__}")
        ll = _llguidance()
        try:
            # whitespace as the model likes it would let a small model pad forever: compact JSON, as OpenAI's
            definition = ll.LLMatcher.grammar_from_json_schema(
                json_schema, defaults={"whitespace_flexible": False, "item_separator": ", ",
                                       "key_separator": ": "})
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"cannot compile the JSON schema: {exc}") from None
        return cls._validated(definition, "JSON schema")

    @classmethod
    def any_json_object(cls) -> "LlamaGrammar":
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.from_json_schema({"type": "object"})

    @classmethod
    def from_lark(cls, lark: str) -> "LlamaGrammar":
        return cls._validated(_llguidance().LLMatcher.grammar_from_lark(_checked_text(lark, "grammar")),
                              "Lark grammar")

    @classmethod
    def from_regex(cls, regex: str) -> "LlamaGrammar":
        return cls._validated(_llguidance().LLMatcher.grammar_from_regex(_checked_text(regex, "regex")), "regex")

    @classmethod
    def _validated(cls, definition: str, source: str) -> "LlamaGrammar":
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(definition)
        if is_error:
            raise GrammarError(f"the {source} cannot be used: {messages[0] if messages else 'invalid'}")
        return cls(definition, source)

    def matcher(self, tokenizer) -> "GrammarMatcher | LazyGrammarMatcher":
        """The state of one generation under this grammar, for ``tokenizer`` (our Tokenizer)."""
        if self.trigger_token is not None:
            return LazyGrammarMatcher(self, tokenizer)
        return GrammarMatcher(self, _ll_tokenizer(tokenizer), tokenizer)

    def __repr__(self) -> str:
        return f"LlamaGrammar({self.source})"


def _checked_text(text: Any, name: str) -> str:
    if not isinstance(text, str):
        raise GrammarError(f"{name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise GrammarError(f"{name} is empty")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"{name} is {len(text):,} characters long; the limit is {MAX_GRAMMAR_CHARS:,}")
    return text


class GrammarMatcher:
    """One generation's position in a grammar: the tokens allowed next, and the grammar moved on by each token."""

    def __init__(self, grammar: LlamaGrammar, ll_tokenizer, tokenizer):
        ll = _llguidance()
        self.grammar = grammar
        self._matcher = ll.LLMatcher(ll_tokenizer, grammar.definition, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the {grammar.source} cannot be used: {self._matcher.get_error()}")
        self.n_vocab = ll_tokenizer.vocab_size
        self._bitmask = ll.numpy.allocate_token_bitmask(1, self.n_vocab)
        self._eog = sorted(tokenizer.eog_ids)
        self._next = None   # the next mask, being computed while the forward pass runs (prepare)

    def prepare(self) -> None:
        """Start computing the next mask in the background: called after ``accept``, before the forward pass,
        so that the mask (a millisecond or a few for a JSON schema) costs no time of its own."""
        if self._next is None:
            self._next = _background().submit(self._compute)

    def allowed(self) -> np.ndarray:
        """Booleans [n_vocab]: the tokens that keep the output inside the grammar (end-of-generation tokens only
        where the grammar is complete)."""
        if self._next is not None:
            pending, self._next = self._next, None
            return pending.result()
        return self._compute()

    def _compute(self) -> np.ndarray:
        _llguidance().numpy.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            raise GrammarError(f"the output left the {self.grammar.source}: {self._matcher.get_error()}")
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[:self.n_vocab]
        return bits.astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with every token outside the grammar at -inf."""
        allowed = self.allowed()
        if not allowed[:logits.shape[0]].any():
            raise GrammarError(f"no token can continue the {self.grammar.source}")
        masked = np.full_like(logits, -np.inf)
        n = min(len(allowed), logits.shape[0])
        masked[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return masked

    def accept(self, token: int) -> None:
        if self._next is not None:   # the matcher is not to be moved while a mask is being computed
            self._next.result()
            self._next = None
        if token in self._eog and self._matcher.is_accepting():
            return
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} is outside the {self.grammar.source}: {self._matcher.get_error()}")

    def done(self) -> bool:
        """True once the grammar is complete and nothing more can follow (generation should end)."""
        return self._matcher.is_stopped()


class LazyGrammarMatcher:
    """A lazy grammar's state: the output is free (the logits pass untouched) until the trigger token is sampled;
    from the next token on it follows the grammar, and once the grammar is complete it is free again, waiting for
    the next trigger. A generation under it never ends because of it (``done`` is always False)."""

    def __init__(self, grammar: LlamaGrammar, tokenizer):
        self.grammar = grammar
        self._tokenizer = tokenizer
        self._active: GrammarMatcher | None = None

    def prepare(self) -> None:
        if self._active is not None:
            self._active.prepare()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        return logits if self._active is None else self._active.mask(logits)

    def accept(self, token: int) -> None:
        if self._active is None:
            if token == self.grammar.trigger_token:
                self._active = GrammarMatcher(self.grammar, _ll_tokenizer(self._tokenizer), self._tokenizer)
            return
        self._active.accept(token)
        if self._active.done():
            self._active = None

    def done(self) -> bool:
        return False


_EXECUTOR = None


def _background():
    """Threads computing next masks (llguidance releases the GIL while it computes one)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        from concurrent.futures import ThreadPoolExecutor
        _EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ggml-backend grammar")
    return _EXECUTOR


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer):
    """llguidance's view of our tokenizer (every token's bytes, the special ids, an encoder), built once per
    tokenizer: ~1 s for a 150k vocabulary."""
    cached = _TOKENIZERS.get(tokenizer)
    if cached is not None:
        return cached
    ll = _llguidance()

    class _Vocabulary:
        eos_token_id = tokenizer.eos_id
        bos_token_id = tokenizer.bos_id
        tokens = [tokenizer.token_to_piece(i) for i in range(tokenizer.n_vocab)]
        special_token_ids = [i for i in range(tokenizer.n_vocab) if tokenizer.is_control(i)]

        def __call__(self, text):
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode(text, add_bos=False)

    ll_tokenizer = ll.LLTokenizer(ll.TokenizerWrapper(_Vocabulary()), n_vocab=tokenizer.n_vocab,
                                  eos_token=sorted(tokenizer.eog_ids) or None)
    _TOKENIZERS[tokenizer] = ll_tokenizer
    return ll_tokenizer


def grammar_from_response_format(response_format) -> LlamaGrammar | None:
    """The grammar of an OpenAI / llama-cpp-python ``response_format`` (None for plain text):
    ``{"type": "text"}``, ``{"type": "json_object"}`` (any object), ``{"type": "json_object", "schema": {...}}``
    (llama-cpp-python's form), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return LlamaGrammar.from_json_schema(schema) if schema is not None else LlamaGrammar.any_json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise GrammarError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return LlamaGrammar.from_json_schema(spec["schema"])
    raise GrammarError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")


def forced_call_grammar(tools: list[dict], tool_choice) -> tuple[str, LlamaGrammar] | None:
    """A forced tool call (``tool_choice`` "required"/"any" or a named tool) as (prefill, grammar), or None when
    the choice forces nothing. The prefill opens the ``<tool_call>`` block up to the arguments (the name included
    when it is known, else up to its opening quote); the grammar makes the rest the name of a tool (if open) and
    arguments valid against that tool's parameters schema, then the closing brace: the reply can only be a call
    that parses and validates (extra keys only where the schema's ``additionalProperties`` allows them)."""
    from ..templates.tool_calls import CALL_OPEN, resolve_tool_choice
    forced_name, forced_any = resolve_tool_choice(tool_choice, tools or [])
    if not forced_any:
        return None

    by_name = {tool["function"]["name"]: tool for tool in tools}
    if forced_name is not None:
        prefill = f'{CALL_OPEN}\n{{"name": "{forced_name}", "arguments": '
        lark = f'start: %json {_parameters_schema(by_name[forced_name])} "}}"'
    else:
        prefill = f'{CALL_OPEN}\n{{"name": "'
        branches = [f'{json.dumps(name + chr(34) + ", " + chr(34) + "arguments" + chr(34) + ": ")} '
                    f'%json {_parameters_schema(tool)}' for name, tool in by_name.items()]
        lark = "start: (" + " | ".join(branches) + ') "}"'
    try:
        return prefill, LlamaGrammar.from_lark(lark)
    except GrammarError as exc:
        raise GrammarError(f"the tools' parameter schemas cannot constrain a call: {exc}") from None


def tool_call_grammar(tools: list[dict], tokenizer) -> LlamaGrammar | None:
    """The lazy grammar of tool calls the model may choose to make (``tool_choice`` "auto"): once it writes the
    ``<tool_call>`` token, the block must be ``{"name": <a tool>, "arguments": <valid against that tool's
    parameters>}`` and its closing tag, so a call that is started always parses. None when the vocabulary writes
    either tag in several tokens (the reply is then parsed leniently, unconstrained)."""
    from ..templates.tool_calls import CALL_CLOSE, CALL_OPEN
    if not tools:
        return None
    opening = tokenizer.encode(CALL_OPEN, add_bos=False, special=True)
    closing = tokenizer.encode(CALL_CLOSE, add_bos=False, special=True)
    if len(opening) != 1 or len(closing) != 1:
        return None
    rules, names = [], []
    for index, tool in enumerate(tools):
        name = tool["function"]["name"]
        rules.append(f'call_{index}: {json.dumps(name + chr(34) + ", " + chr(34) + "arguments" + chr(34) + ": ")} '
                     f'%json {_parameters_schema(tool)}')
        names.append(f"call_{index}")
    lark = (f'start: /[ \\t\\n]*/ "{{\\"name\\": \\"" ({" | ".join(names)}) "}}" /[ \\t\\n]*/ <[{closing[0]}]>\n'
            + "\n".join(rules) + "\n")
    try:
        grammar = LlamaGrammar.from_lark(lark)
    except GrammarError as exc:
        raise GrammarError(f"the tools' parameter schemas cannot constrain a call: {exc}") from None
    grammar.trigger_token = opening[0]
    return grammar


def _parameters_schema(tool: dict) -> str:
    """A tool's parameters schema as JSON; a call's arguments are the declared parameters only (OpenAI's strict
    mode) unless the schema says otherwise: left open, a small model fills the object with keys copied from the
    schema itself."""
    schema = dict(tool["function"].get("parameters") or {"type": "object", "properties": {}})
    schema.setdefault("additionalProperties", False)
    return json.dumps(schema, ensure_ascii=False)


def as_grammar(grammar):
    """A ``grammar=`` argument checked: a ``LlamaGrammar`` or None, else a TypeError saying how to make one."""
    if grammar is not None and not isinstance(grammar, LlamaGrammar):
        raise TypeError(f"grammar must be a LlamaGrammar (LlamaGrammar.from_string(gbnf), .from_json_schema(...)), "
                        f"got {type(grammar).__name__}")
    return grammar

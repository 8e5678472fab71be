"""Jinja chat templates (GGUF ``tokenizer.chat_template``, Hugging Face ``chat_template``, user-supplied).

A template comes from a model file, that is, from a stranger, so it is rendered only in Jinja's
``ImmutableSandboxedEnvironment``, configured as Hugging Face transformers and llama.cpp do (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text). On top of the
sandbox:

- reaching for an unsafe attribute (anything starting with ``_``, function internals...) raises at once instead of
  yielding an undefined value, so injection payloads fail loudly with ``TemplateSecurityError``;
- rendering is bounded in time and in size, failing with ``TemplateLimitError`` that names the limit. The sandbox
  stops escapes but not a template that loops 10^10 times or builds a gigabyte string, and a prompt never needs
  either. The bounds are checked where a template can spend time or memory: every attribute, item, call and
  intercepted operator, every loop iteration (each ``{% for %}`` iterable is wrapped when the template is parsed),
  every chunk of output (rendered as a stream, so the output is counted as it grows) and every captured block
  (``{% set %}...{% endset %}``, macros); and before anything that allocates in one step: repetition, ``+``, ``~``,
  printf and ``str.format`` widths, ``center``/``ljust``/``rjust``/``zfill``/``indent``/``wordwrap`` widths,
  ``replace``/``join``, integer powers and products, ``range``, ``lipsum`` and ``tojson``.
"""
from __future__ import annotations

import contextvars
import json
import math
import operator
import re
import string
import time
from datetime import datetime
from functools import update_wrapper
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import filters as jinja_filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum

from .base import ChatTemplate, TemplateError, TemplateLimitError, TemplateSecurityError, normalize_messages

# Limits. A chat prompt is at most a few hundred thousand characters (a 128k-token context) and a template does
# no real computation, so these sit far above any real template and far below what hurts the machine.
RENDER_TIME_LIMIT_S = 1.5           # wall-clock time of one render
MAX_OUTPUT_CHARS = 4_000_000        # the rendered prompt, and any one captured block
MAX_STRING_CHARS = 4_000_000        # any one string a template builds
MAX_PRODUCED_CHARS = 64_000_000     # all strings built during one render: a loop cannot build 4M chars 10^5 times
MAX_SEQUENCE_ITEMS = 1_000_000      # a list or tuple built by repetition or +
MAX_INT_BITS = 65_536               # an integer built by ** or * (about 20,000 digits)
MAX_FORMAT_WIDTH = 10_000           # a width or precision: printf, str.format, padding and indent filters
MAX_RANGE = 100_000                 # items in one range() (the sandbox's own default)
MAX_LIPSUM_WORDS = 10_000

# Text markers that end an assistant turn in common templates; those present in a template become stop strings.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|EOT|>", "<|endoftext|>",
                       "<|end_of_text|>", "</s>")


# ---- the budget of one render -----------------------------------------------------------------------------------

class _RenderBudget:
    """Time and characters left to one render; the sandbox's hooks find it through ``_BUDGET``."""

    __slots__ = ("deadline", "time_limit_s", "max_output_chars", "output_chars", "produced_chars")

    def __init__(self, time_limit_s: float, max_output_chars: int):
        self.time_limit_s = time_limit_s
        self.deadline = time.monotonic() + time_limit_s
        self.max_output_chars = max_output_chars
        self.output_chars = 0
        self.produced_chars = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"ran past the render time limit of {self.time_limit_s:g} s", "time")

    def produce(self, n_chars: int) -> None:
        self.produced_chars += n_chars
        if self.produced_chars > MAX_PRODUCED_CHARS:
            raise TemplateLimitError(f"built more than {MAX_PRODUCED_CHARS:,} characters of strings in one render "
                                     "(the limit on all strings built)", "produced size")

    def emit(self, n_chars: int) -> None:
        self.check_time()
        self.output_chars += n_chars
        if self.output_chars > self.max_output_chars:
            raise TemplateLimitError(f"output grew past the output size limit of {self.max_output_chars:,} "
                                     "characters", "output size")


# A context variable, not an attribute of the shared environment: renders in several threads each have their own.
_BUDGET: contextvars.ContextVar[_RenderBudget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()


def _check_string(n_chars: int, how: str) -> None:
    """Before building a string of n_chars characters."""
    if n_chars > MAX_STRING_CHARS:
        raise TemplateLimitError(f"{how} would build a string of {n_chars:,} characters, over the string size limit "
                                 f"of {MAX_STRING_CHARS:,}", "string size")
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()
        budget.produce(n_chars)


def _check_width(width: Any, how: str) -> None:
    if isinstance(width, int) and width > MAX_FORMAT_WIDTH:
        raise TemplateLimitError(f"{how} asks for a width of {width:,}, over the width limit of {MAX_FORMAT_WIDTH:,}",
                                 "format width")


def _text_length(value: Any, limit: int = MAX_STRING_CHARS) -> int:
    """About how many characters ``str(value)`` has (a lower bound for containers), without building it; the walk
    stops as soon as the count passes ``limit``, so a huge or self-repeating structure costs little to measure."""
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 1
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)       # brackets and ", " between items
            stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)       # braces, ": " and ", "
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 1
    return total


def _check_text(value: Any, how: str) -> None:
    """Before turning value into text (output, concatenation, a filter that stringifies its input)."""
    if not isinstance(value, str):
        _check_string(_text_length(value), how)


# ---- format strings -----------------------------------------------------------------------------------------------

_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")


def _width_value(number: str | None, how: str) -> int:
    if not number:
        return 0
    if number == "*":
        raise TemplateLimitError(f"{how} takes a width from an argument ('*'), which the width limit does not allow",
                                 "format width")
    width = int(number) if len(number) <= 9 else MAX_FORMAT_WIDTH + 1
    _check_width(width, how)
    return width


def _check_printf(fmt: str, args: Any, how: str) -> None:
    """Widths of a printf-style format, and a bound on its result: every field may hold the biggest argument."""
    fields = _PRINTF_FIELD.findall(fmt)
    widest = 0
    for width, precision in fields:
        widest = max(widest, _width_value(width, how), _width_value(precision, how))
    values = (args, *args.values()) if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
    biggest = max((_text_length(v) for v in values), default=0)
    _check_string(len(fmt) + len(fields) * (widest + biggest), how)


def _check_str_format(fmt: str, args: tuple, kwargs: dict, how: str) -> None:
    """The same for ``str.format``: widths in each field's spec (a nested ``{}`` in a spec is refused, its value
    being unknown until formatting), and a bound on the result."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return   # str.format raises its own error for a malformed format string
    widest = n_fields = 0
    for _literal, field, spec, _conversion in parsed:
        if field is None:
            continue
        n_fields += 1
        if spec and "{" in spec:
            raise TemplateLimitError(f"{how} takes a width from an argument (a nested {{}} in a format spec), which "
                                     "the width limit does not allow", "format width")
        for number in re.findall(r"\d+", spec or ""):
            widest = max(widest, _width_value(number, how))
    biggest = max((_text_length(v) for v in (*args, *kwargs.values())), default=0)
    _check_string(len(fmt) + n_fields * (widest + biggest), how)


# ---- filters and globals with bounds ------------------------------------------------------------------------------

def _raise_exception(message: str):
    raise TemplateError(f"chat template error: {message}")


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators=None,
           sort_keys: bool = False) -> str:
    # As transformers' chat-template tojson: no HTML escaping (unlike Jinja's built-in), non-ASCII kept. Encoded
    # piece by piece so that a structure repeating itself a million times stops at the string size limit.
    _check_width(indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0, "tojson")
    try:
        encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                   sort_keys=sort_keys)
        pieces, size = [], 0
        for piece in encoder.iterencode(value):
            size += len(piece)
            if size > MAX_STRING_CHARS:
                _check_string(size, "tojson")
            pieces.append(piece)
    except TemplateError:
        raise
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"chat template: tojson cannot serialize {type(value).__name__}: {exc}") from None
    _check_string(size, "tojson")
    return "".join(pieces)


def _bounded_range(*args: Any) -> range:
    numbers = range(*args)
    try:
        n_items = len(numbers)
    except OverflowError:      # more items than a C ssize_t
        n_items = math.inf
    if n_items > MAX_RANGE:
        raise TemplateLimitError(f"asks for range{args} of {n_items:,} items, over the range limit of "
                                 f"{MAX_RANGE:,}", "range")
    return numbers


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (Jinja's names)
    if not all(isinstance(x, int) for x in (n, min, max)):
        raise TemplateError("lipsum takes integer arguments")
    if n * max > MAX_LIPSUM_WORDS:
        raise TemplateLimitError(f"asks lipsum for up to {n * max:,} words, over the lipsum limit of "
                                 f"{MAX_LIPSUM_WORDS:,}", "lipsum")
    return generate_lorem_ipsum(n, html, min, max)


def _center(value: Any, width: int = 80) -> str:
    _check_text(value, "center")
    _check_width(width, "center")
    return jinja_filters.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    _check_text(s, "indent")
    pad = len(width) if isinstance(width, str) else width
    _check_width(pad, "indent")
    text = str(s)
    if isinstance(pad, int):
        _check_string(len(text) + (text.count("\n") + 1) * max(pad, 0), "indent")
    return jinja_filters.do_indent(s, width, first, blank)


@jinja2.pass_environment
def _wordwrap(environment, s: Any, width: int = 79, break_long_words: bool = True, wrapstring: str | None = None,
              break_on_hyphens: bool = True) -> str:
    _check_text(s, "wordwrap")
    _check_width(width, "wordwrap")
    if isinstance(wrapstring, str):
        _check_string(len(str(s)) * (len(wrapstring) + 1), "wordwrap")
    return jinja_filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_text(value, "the format filter")
    _check_printf(str(value), kwargs or args, "the format filter")
    return jinja_filters.do_format(value, *args, **kwargs)


def _replaced_length(text: str | bytes, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, (str, bytes)) or not isinstance(new, (str, bytes)):
        return len(text)
    n = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(text) + n * (len(new) - len(old))


@jinja2.pass_eval_context
def _replace(eval_ctx, s: Any, old: str, new: str, count: int | None = None) -> str:
    _check_text(s, "replace")
    _check_string(_replaced_length(str(s), old, new, count), "replace")
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _join(eval_ctx, value: Any, d: str = "", attribute: str | int | None = None) -> str:
    items = list(value)
    _check_string(sum(_text_length(item) for item in items) + _text_length(d) * max(len(items) - 1, 0), "join")
    return jinja_filters.do_join(eval_ctx, items, d, attribute)


def _text_first(func, name: str):
    """A filter that turns its input into text, refused when that text would pass the string size limit."""
    pass_arg = getattr(func, "jinja_pass_arg", None)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value = args[1] if pass_arg is not None else args[0]
        _check_text(value, f"the {name} filter")
        return func(*args, **kwargs)

    update_wrapper(wrapper, func)
    if pass_arg is not None:
        wrapper.jinja_pass_arg = pass_arg
    return wrapper


_STRINGIFYING_FILTERS = ("string", "upper", "lower", "title", "capitalize", "trim", "striptags", "pprint",
                         "urlencode", "escape", "e", "forceescape", "truncate", "wordcount", "safe")


def _finalize(value: Any) -> Any:
    """Every ``{{ ... }}`` value before it is written out: a container printed as text can be far bigger than it
    looks (a list holding the same list a thousand times)."""
    _check_text(value, "printing a value")
    return value


# ---- the sandbox --------------------------------------------------------------------------------------------------

class _BoundedBuffer(list):
    """The list that collects a captured block's text ({% set %}...{% endset %}, a macro's body, a filter block):
    bounded like the output, since it never passes through the output stream."""

    __slots__ = ("_size",)

    def __init__(self):
        super().__init__()
        self._size = 0

    def _grow(self, n_chars: int) -> None:
        self._size += n_chars
        if self._size > MAX_OUTPUT_CHARS:
            raise TemplateLimitError(f"captured a block of more than {MAX_OUTPUT_CHARS:,} characters, over the "
                                     "output size limit", "output size")
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_time()
            budget.produce(n_chars)

    def append(self, text: str) -> None:
        self._grow(len(text))
        super().append(text)

    def extend(self, texts) -> None:
        texts = tuple(texts)
        self._grow(sum(len(t) for t in texts))
        super().extend(texts)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator with captured blocks in ``_BoundedBuffer``s and ``~`` through a bounded join."""

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.bounded_buffer()")

    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _guarded_iteration(iterable: Any, budget: _RenderBudget):
    budget.check_time()
    for count, item in enumerate(iterable, 1):
        if not count & 63:
            budget.check_time()
        yield item


_STR_PADDING_METHODS = ("center", "ljust", "rjust", "zfill")


class ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict about unsafe access and bounded in time and size."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])
    code_generator_class = _BoundedCodeGenerator

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")

    # -- parsing: every for-loop's iterable goes through guard_iterable, so even an empty loop body is timed
    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            guard = nodes.EnvironmentAttribute("guard_iterable", lineno=loop.lineno)
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.lineno)
            loop.iter.set_environment(self)
        return tree

    def guard_iterable(self, iterable: Any) -> Any:
        budget = _BUDGET.get()
        return iterable if budget is None else _guarded_iteration(iterable, budget)

    def bounded_buffer(self) -> _BoundedBuffer:
        return _BoundedBuffer()

    def bounded_concat(self, parts: tuple) -> str:
        _check_string(sum(_text_length(p) for p in parts), "'~' concatenation")
        return "".join(map(str, parts))

    # -- hooks the compiled template calls for every attribute, item, call and intercepted operator
    def getattr(self, obj: Any, attribute: str):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any):
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any):  # noqa: N805 (Jinja's signature)
        _tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        elif isinstance(owner, int) and getattr(__obj, "__name__", "") == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            if isinstance(length, int):
                _check_string(length, "int.to_bytes")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__
        how = f"str.{value.__name__}"

        def bounded(*args: Any, **kwargs: Any) -> str:
            mapping = args[0] if how == "str.format_map" and len(args) == 1 and isinstance(args[0], dict) else {}
            _check_str_format(fmt, args, {**kwargs, **mapping}, how)
            return wrapper(*args, **kwargs)

        return update_wrapper(bounded, value)

    def call_binop(self, context, operator_name: str, left: Any, right: Any):
        _tick()
        if operator_name == "*":
            _check_product(left, right)
        elif operator_name == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                    and left.bit_length() * right > MAX_INT_BITS:
                raise TemplateLimitError(f"raises a {left.bit_length()}-bit integer to the power {right:,}, over "
                                         f"the integer size limit of {MAX_INT_BITS:,} bits", "integer size")
            return operator.pow(left, right)
        elif operator_name == "+":
            if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
                _check_string(len(left) + len(right), "'+'")
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                _check_items(len(left) + len(right), "'+'")
        elif operator_name == "%" and isinstance(left, (str, bytes)):
            _check_printf(left if isinstance(left, str) else left.decode("latin-1"), right, "'%' formatting")
        return super().call_binop(context, operator_name, left, right)


def _check_items(n_items: int, how: str) -> None:
    if n_items > MAX_SEQUENCE_ITEMS:
        raise TemplateLimitError(f"{how} would build a sequence of {n_items:,} items, over the sequence length "
                                 f"limit of {MAX_SEQUENCE_ITEMS:,}", "sequence length")
    _tick()


def _check_product(left: Any, right: Any) -> None:
    for sequence, count in ((left, right), (right, left)):
        if isinstance(count, int) and not isinstance(count, bool):
            if isinstance(sequence, (str, bytes)):
                _check_string(len(sequence) * max(count, 0), "repeating a string")
                return
            if isinstance(sequence, (list, tuple)):
                _check_items(len(sequence) * max(count, 0), "repeating a sequence")
                return
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"multiplies integers of {left.bit_length()} and {right.bit_length()} bits, over "
                                 f"the integer size limit of {MAX_INT_BITS:,} bits", "integer size")


def _check_str_method(owner: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Bounds for the str (and bytes, from ``encode``) methods that can build a big string in one step; returns the
    (possibly materialized) positional arguments to call with."""
    how = f"{type(owner).__name__}.{name}"
    if name in _STR_PADDING_METHODS:
        width = args[0] if args else kwargs.get("width")
        if isinstance(width, int) and width > len(owner):
            _check_width(width - len(owner), how)
            _check_string(width, how)
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        _check_width(tabsize, how)
        if isinstance(tabsize, int):
            _check_string(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(tabsize, 0),
                          how)
    elif name == "replace" and len(args) >= 2:
        _check_string(_replaced_length(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count")),
                      how)
    elif name == "join" and args:
        items = list(args[0])   # materialized once: it may be an iterator, and it is measured before joining
        _check_string(sum(len(i) if isinstance(i, (str, bytes)) else 0 for i in items)
                      + len(owner) * max(len(items) - 1, 0), how)
        return (items, *args[1:])
    return args


def _make_environment() -> ChatTemplateSandbox:
    env = ChatTemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                              finalize=_finalize)
    env.filters["tojson"] = tojson
    for name in _STRINGIFYING_FILTERS:
        if name in env.filters:
            env.filters[name] = _text_first(env.filters[name], name)
    env.filters.update(center=_center, indent=_indent, wordwrap=_wordwrap, format=_format, replace=_replace,
                       join=_join)
    env.globals["range"] = _bounded_range
    env.globals["lipsum"] = _bounded_lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENVIRONMENT = _make_environment()


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template, compiled once (syntax errors raise ``TemplateError`` here) and rendered sandboxed,
    within ``time_limit_s`` seconds and ``max_output_chars`` characters of output (``TemplateLimitError`` past
    either)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "jinja",
                 extra_stop_strings: tuple[str, ...] | list[str] = (), time_limit_s: float = RENDER_TIME_LIMIT_S,
                 max_output_chars: int = MAX_OUTPUT_CHARS):
        if not isinstance(source, str):
            raise TemplateError(f"a Jinja chat template must be a string, got {type(source).__name__}")
        if not (isinstance(time_limit_s, (int, float)) and 0 < time_limit_s < math.inf):
            raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
        if not isinstance(max_output_chars, int) or max_output_chars <= 0:
            raise ValueError(f"max_output_chars must be a positive integer, got {max_output_chars!r}")
        self.time_limit_s = float(time_limit_s)
        self.max_output_chars = max_output_chars
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.name = name
        self.extra_stop_strings = tuple(extra_stop_strings)
        try:
            self._compiled = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {name!r} has a syntax error at line {exc.lineno}: {exc.message}") \
                from None
        except SecurityError as exc:
            raise TemplateSecurityError(f"chat template {name!r} is unsafe: {exc}") from None

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, name: str = "tokenizer.chat_template") -> "JinjaTemplate":
        """The template stored in GGUF metadata, with the BOS/EOS token texts looked up in the vocabulary."""
        source = metadata.get(name)
        if not isinstance(source, str) or not source:
            raise TemplateError(f"the model file has no {name} metadata")
        tokens = metadata.get("tokenizer.ggml.tokens")

        def token_text(key: str) -> str:
            token_id = metadata.get(key)
            if tokens is None or token_id is None:
                return ""
            token_id = int(token_id[0] if isinstance(token_id, (list, tuple)) else token_id)
            return str(tokens[token_id]) if 0 <= token_id < len(tokens) else ""

        return cls(source, bos_token=token_text("tokenizer.ggml.bos_token_id"),
                   eos_token=token_text("tokenizer.ggml.eos_token_id"), name=name)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False, **extra_variables: Any) -> str:
        messages = normalize_messages(messages)
        if continue_final_message:
            if not messages:
                raise TemplateError("continue_final_message needs at least one message")
            if add_generation_prompt:
                add_generation_prompt = False  # the reply being continued is the last message itself
        variables = dict(extra_variables)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        budget = _RenderBudget(self.time_limit_s, self.max_output_chars)
        reset_token = _BUDGET.set(budget)
        stream = None
        try:
            # Streamed, so the output is counted as it grows instead of after it has filled memory.
            stream = self._compiled.generate(**variables)
            pieces = []
            for piece in stream:
                budget.emit(len(piece))
                pieces.append(piece)
            prompt = "".join(pieces)
        except TemplateLimitError as exc:
            raise TemplateLimitError(f"chat template {self.name!r}: {exc}", exc.limit) from None
        except SecurityError as exc:
            raise TemplateSecurityError(f"chat template {self.name!r} tried an unsafe operation: {exc}") from None
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                OverflowError, RecursionError) as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}") from None
        except MemoryError:
            raise TemplateLimitError(f"chat template {self.name!r} ran out of memory", "memory") from None
        finally:
            if stream is not None:
                stream.close()
            _BUDGET.reset(reset_token)
        if continue_final_message:
            prompt = _cut_after_final_message(prompt, messages[-1]["content"])
        return prompt

    @property
    def stop_strings(self) -> list[str]:
        found = [marker for marker in END_OF_TURN_MARKERS if marker in self.source]
        if self.eos_token and self.eos_token not in found:
            found.append(self.eos_token)
        found += [s for s in self.extra_stop_strings if s not in found]
        return found


def _cut_after_final_message(prompt: str, final_content: str) -> str:
    # As transformers' continue_final_message: the prompt stops right after the last message's (stripped) text.
    content = final_content.strip()
    if not content:
        raise TemplateError("continue_final_message needs a final message with text")
    position = prompt.rfind(content)
    if position < 0:
        raise TemplateError("continue_final_message: the final message's text is not in the rendered prompt")
    return prompt[:position + len(content)]

"""The chat itself, without any Gradio: prompts from a history, streamed replies, and the history edits behind the
buttons, as text-generation-webui's ``modules/chat.py`` did them.

A history is a list of ``[user message, bot reply]`` pairs (textgen's "internal" history; there is no separate
"visible" one since the Chatbot component escapes and renders the text itself); a character's greeting is the
pair ``["<|BEGIN-VISIBLE-CHAT|>", greeting]``, as in textgen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ggml_backend.generation import StopReason, TokenTextStream
from ggml_backend.templates import ChatTemplate, TemplateError, TextgenTemplate

from . import chat_modes
from .chat_modes import BEGIN_VISIBLE_CHAT, DEFAULT_CHAT_INSTRUCT_COMMAND, Character

from .settings import GenerationSettings, parse_stop_strings

History = list  # list[list[str, str]]


def copy_history(history) -> list[list[str]]:
    return [[str(user), str(bot)] for user, bot in (history or [])]


def history_to_messages(history) -> list[dict]:
    """The Chatbot component's value: alternating user/assistant messages (an empty user side is a greeting)."""
    messages = []
    for user, bot in history or []:
        if user and user != BEGIN_VISIBLE_CHAT:
            messages.append({"role": "user", "content": user})
        if bot:
            messages.append({"role": "assistant", "content": bot})
    return messages


@dataclass
class PromptSettings:
    """How the prompt is written: textgen's mode, instruction template, character and chat-instruct command.

    ``template`` is a TextgenTemplate, or another ChatTemplate (the model's Jinja template when it cannot be
    written as textgen fields), which only does instruct mode.
    """
    template: ChatTemplate
    mode: str = "instruct"
    custom_system_message: str = ""
    character: Character = field(default_factory=Character)
    chat_instruct_command: str = DEFAULT_CHAT_INSTRUCT_COMMAND

    def stop_strings(self, custom: str = "") -> list[str]:
        if isinstance(self.template, TextgenTemplate):
            found = self.template.stop_strings if self.mode == "instruct" else \
                chat_modes.stopping_strings(self.template, self.mode, self.character)
        else:
            found = list(self.template.stop_strings)
        return [s for s in found + parse_stop_strings(custom) if s]

    def build_prompt(self, history, user_input: str = "", *, continue_: bool = False, impersonate: bool = False,
                     max_prompt_tokens: int | None = None, count_tokens: Callable[[str], int] | None = None) -> str:
        """The exact text sent to the model (textgen's ``generate_chat_prompt``); for impersonate, ``user_input``
        is the user's partial message that the model goes on writing."""
        history = copy_history(history)
        if isinstance(self.template, TextgenTemplate):
            prompt = chat_modes.build_prompt(
                self.template, history, "" if impersonate else user_input, mode=self.mode,
                system_message=self.custom_system_message or None, character=self.character,
                chat_instruct_command=self.chat_instruct_command, continue_=continue_, impersonate=impersonate,
                max_prompt_tokens=max_prompt_tokens, count_tokens=count_tokens)
            return prompt + user_input if impersonate else prompt
        if self.mode != "instruct" or impersonate:
            raise TemplateError("the model file's own chat template only supports instruct mode without impersonate; "
                                "pick a text-generation-webui template for the others")
        messages = [{"role": "system", "content": self.custom_system_message}] if self.custom_system_message else []
        for user, bot in history:
            if user and user != BEGIN_VISIBLE_CHAT:
                messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": bot})
        if not continue_ and user_input:
            messages.append({"role": "user", "content": user_input})
        kwargs = {"continue_final_message": True} if continue_ else {}
        return self.template.render(messages, add_generation_prompt=not continue_, **kwargs)


def prompt_tokens(llama, prompt: str, settings: GenerationSettings) -> list[int]:
    """The prompt's tokens: special tokens written in the template are parsed; BOS as the "add BOS" box says."""
    tokens = llama.tokenize(prompt, add_bos=False, special=True)
    bos = llama.tokenizer.bos_id
    if settings.add_bos_token and bos is not None and tokens[:1] != [bos]:
        tokens.insert(0, bos)
    return tokens


def prompt_budget(llama, settings: GenerationSettings) -> int:
    """textgen's truncation: the prompt may use the truncation length (the context when 0) minus max new tokens."""
    n_ctx = llama.n_ctx()
    limit = min(settings.truncation_length or n_ctx, n_ctx)
    return max(1, limit - settings.max_new_tokens)


@dataclass
class ReplyStats:
    """What the status line under the chat says about the last reply."""
    tokens: int = 0                  # tokens generated
    prompt_tokens: int | None = None
    n_ctx: int | None = None
    first_token_s: float | None = None   # from the request to the first token
    elapsed_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    stop_reason: str | None = None   # a generation.StopReason once the reply ended (in-process model only)

    def token(self) -> None:
        self.tokens += 1
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started

    def finish(self) -> None:
        self.elapsed_s = time.perf_counter() - self.started

    def line(self) -> str:
        """``12 tokens, 8.3 tokens/s, first token after 0.41 s, context 345 / 2048 tokens``."""
        parts = [f"{self.tokens} token{'s' if self.tokens != 1 else ''}"]
        if self.first_token_s is not None and self.tokens > 1 and self.elapsed_s > self.first_token_s:
            parts.append(f"{(self.tokens - 1) / (self.elapsed_s - self.first_token_s):.1f} tokens/s")
        if self.first_token_s is not None:
            parts.append(f"first token after {self.first_token_s:.2f} s")
        if self.prompt_tokens is not None:
            used = self.prompt_tokens + self.tokens
            parts.append(f"context {used:,} / {self.n_ctx:,} tokens" if self.n_ctx else f"context {used:,} tokens")
        return ", ".join(parts)


def stream_reply(llama, prompt: str, settings: GenerationSettings, stops: list[str],
                 should_stop: Callable[[], bool] = lambda: False, stats: ReplyStats | None = None) -> Iterator[str]:
    """Yield the reply so far (the whole text each time) as tokens arrive.

    A stop string never shows, not even the start of one (TokenTextStream holds such a tail back). ``should_stop``
    is asked after every token: when it says yes the reply ends there, keeping what was produced. ``stats``, when
    given, is filled in as the reply goes (tokens, time to the first one, context used, why it ended).
    """
    stats = stats if stats is not None else ReplyStats()
    tokens = prompt_tokens(llama, prompt, settings)
    stats.prompt_tokens, stats.n_ctx = len(tokens), llama.n_ctx()
    room = llama.n_ctx() - len(tokens)
    if room < 1:
        raise ValueError(f"the prompt is {len(tokens)} tokens, the context holds {llama.n_ctx()}: lower "
                         f"\"max new tokens\" or the truncation length, or remove messages")
    max_tokens = max(1, min(int(settings.max_new_tokens), room))
    eog = set(llama.tokenizer.eog_ids)
    stop_tokens = set() if settings.ban_eos_token else eog   # banned: an end token is text like any other
    output = TokenTextStream(llama.tokenizer, stops, eog_ids=stop_tokens, special=not settings.skip_special_tokens)
    grammar = None
    if settings.grammar_string.strip():
        from ggml_backend.generation.grammar import LlamaGrammar
        grammar = LlamaGrammar.from_string(settings.grammar_string)   # a GrammarError (ValueError) names the fault
    tokens_out = llama.generate_tokens(tokens, params=settings.sampling_params(eog), max_tokens=max_tokens,
                                       stop_tokens=stop_tokens, grammar=grammar)
    ended = StopReason.INTERRUPTED   # unless the tokens run out (below) or the stream ends itself
    try:
        for token in tokens_out:
            text = output.feed(token)
            if output.stop_reason == StopReason.EOG:
                break   # the end token is not part of the reply, nor counted in it
            stats.token()
            if text:
                yield output.text
            if output.done or should_stop():
                break
        else:
            # the generation ended by itself: the budget (or the context), or a complete grammar
            ended = StopReason.GRAMMAR if grammar is not None and output.n_tokens < max_tokens else StopReason.LENGTH
    finally:
        tokens_out.close()   # ends the generation now: the model is free for the next request
        stats.finish()
    tail = output.finish(ended)
    stats.stop_reason = output.stop_reason
    if tail:
        yield output.text
    elif not output.text:
        yield ""


# ---- the buttons that only edit the history (textgen's chat.py helpers) ---------------------------------------------

def remove_last(history) -> tuple[str, list]:
    """"Remove last": drops the last exchange and gives its user message back to the input box."""
    history = copy_history(history)
    if not history or history[-1][0] == BEGIN_VISIBLE_CHAT:   # the greeting stays (textgen's rule)
        return "", history
    user, _ = history.pop()
    return user, history


def last_reply(history) -> str:
    """"Copy last reply"."""
    history = copy_history(history)
    return history[-1][1] if history else ""


def replace_last_reply(history, text: str) -> list:
    """"Replace last reply": the input box's text becomes the last reply."""
    history = copy_history(history)
    if history and text.strip():
        history[-1][1] = text
    return history

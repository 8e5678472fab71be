"""``ggml-backend chat``: an interactive chat on the model's chat template (ChatML for the default model).

Each reply streams through ``Llama.create_chat_completion(stream=True)``. The history is kept within the context:
the oldest turns are dropped (the system message stays) when the prompt would leave less than the reply's room
(``-n`` tokens, or a quarter of the context up to 256 tokens when ``-n`` is -1). Ctrl-C interrupts a reply (what
was said so far stays in the history); ``/reset`` clears the history; Ctrl-D (or Ctrl-C at the prompt) exits.
"""
from __future__ import annotations

import signal
import sys

from .common import (ANSI_RESET, ANSI_USER_INPUT, InfoLog, Painter, add_model_arguments, add_option,
                     add_sampling_arguments, eog_bias, grammar_from_args, load_model, resolve_seed, sampling_params, timing_summary)

RESET_COMMAND = "/reset"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_option(parser, "--system", default=None, metavar="MSG", help="system message")
    add_sampling_arguments(parser)


def run(args) -> int:
    log = InfoLog(not args.log_disable)
    return chat_session(args, system=args.system, log=log)


def reply_room(n_predict: int, n_ctx: int) -> int:
    """Tokens kept free for the reply when trimming the history."""
    if n_predict > 0:
        return min(n_predict, n_ctx - 1)
    return max(1, min(256, n_ctx // 4))


def fit_history(llm, system_messages: list[dict], turns: list[dict], room: int, template=None):
    """Drop the oldest turns until the rendered prompt leaves ``room`` tokens; (turns kept, prompt length).

    Turns are dropped from the front a user message at a time (with the replies that followed it), so the kept
    history always starts with a user message. Raises ValueError when even the last message alone does not fit."""
    n_ctx = llm.n_ctx()
    turns = list(turns)
    while True:
        tokens, _, _ = llm.render_chat_prompt(system_messages + turns, template=template)
        if len(tokens) + room <= n_ctx:
            return turns, len(tokens)
        user_positions = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if len(user_positions) <= 1:
            raise ValueError(f"the message does not fit the context: {len(tokens)} prompt tokens + {room} for the "
                             f"reply > n_ctx={n_ctx}")
        turns = turns[user_positions[1]:]


class ChatSession:
    def __init__(self, args, llm, system: str | None, seed: int, log: InfoLog):
        self.args = args
        self.llm = llm
        self.log = log
        self.painter = Painter(args.color)
        self.system_messages = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []
        self.params = sampling_params(args)
        self.seed = seed
        self.bias = eog_bias(llm) if args.ignore_eos else {}
        self.template = args.chat_template
        self.grammar = grammar_from_args(args)
        self.replying = False
        self.interrupted = False
        llm.chat_template(self.template)        # a bad --chat-template fails now, not at the first message

    def _on_sigint(self, signum, frame):
        if self.replying and not self.interrupted:
            self.interrupted = True
            return
        raise KeyboardInterrupt

    def _finish(self, code: int) -> int:
        self.painter.set(ANSI_RESET)
        self.log(timing_summary(self.llm, None))
        return code

    def run(self) -> int:
        self.log("== Chat mode. Ctrl+C interrupts a reply, /reset clears the history, Ctrl+D exits. ==\n")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while True:
                self.painter.write("> ")
                self.painter.set(ANSI_USER_INPUT)
                line = sys.stdin.readline()
                self.painter.set(ANSI_RESET)
                if line == "":
                    self.painter.write("\n")
                    return self._finish(0)
                text = line.rstrip("\n")
                if text.strip() == RESET_COMMAND:
                    self.turns = []
                    self.painter.write("(history cleared)\n")
                    continue
                if not text.strip():
                    continue
                self._reply(text)
        except KeyboardInterrupt:
            self.painter.write("\n")
            return self._finish(130)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _reply(self, text: str) -> None:
        llm, p = self.llm, self.params
        candidate = self.turns + [{"role": "user", "content": text}]
        room = reply_room(self.args.n_predict, llm.n_ctx())
        try:
            kept, n_prompt = fit_history(llm, self.system_messages, candidate, room, self.template)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        if len(kept) < len(candidate):
            self.log(f"(dropped {len(candidate) - len(kept)} old messages to fit the context)")
        self.turns = kept
        max_tokens = llm.n_ctx() - n_prompt
        if self.args.n_predict > 0:
            max_tokens = min(max_tokens, self.args.n_predict)
        stream = llm.create_chat_completion(
            self.system_messages + self.turns, stream=True, max_tokens=max_tokens, temperature=p.temperature,
            top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, typical_p=p.typical_p, tfs_z=p.tfs_z,
            repeat_penalty=p.repeat_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, mirostat_mode=p.mirostat_mode, mirostat_tau=p.mirostat_tau,
            mirostat_eta=p.mirostat_eta, seed=self.seed, logit_bias={**p.logit_bias, **self.bias},
            chat_template=self.template, grammar=self.grammar)
        parts: list[str] = []
        self.replying, self.interrupted = True, False
        try:
            for chunk in stream:
                content = chunk["choices"][0]["delta"].get("content")
                if content:
                    parts.append(content)
                    self.painter.write(content)
                if self.interrupted:
                    break
        finally:
            self.replying = False
            stream.close()
        self.painter.write("\n")
        self.turns.append({"role": "assistant", "content": "".join(parts)})


def chat_session(args, system: str | None, log: InfoLog) -> int:
    seed = resolve_seed(args)
    log(f"chat: seed  = {seed}")
    llm = load_model(args, log)
    return ChatSession(args, llm, system, seed, log).run()

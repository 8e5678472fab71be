"""``ggml-backend run``: llama.cpp's ``main`` example, flag for flag.

A model card's ``./main -t 10 -ngl 32 -m MODEL --color -c 2048 --temp 0.7 --repeat_penalty 1.1 -n -1 -p "..."``
runs as ``ggml-backend run`` with the same arguments. As in llama.cpp's ``main`` (2023-2024):

- the prompt is echoed (unless ``--no-display-prompt``) and generated text streams to stdout; informational lines
  and the ``llama_print_timings`` summary go to stderr;
- without ``-e`` a ``\\n`` typed in ``-p`` stays a backslash and an ``n`` (main's ``escape`` was off by default);
- ``-n -1`` generates until an end-of-text token, shifting the context when it fills (``--keep`` tokens of the
  prompt are kept); ``-n -2`` stops when the context is full;
- ``-i`` / ``-ins`` are interactive: a reverse prompt (``-r``) at the end of the output, an end-of-text token, or
  Ctrl-C hands control to the user; an empty line hands it back; a line ending in ``\\`` continues on the next
  line, one ending in ``/`` returns control without a newline; Ctrl-C at the prompt or Ctrl-D exits with the
  timings. ``-r`` without ``-i`` stops generation at the reverse prompt.
- ``--chat-template`` (or ``-cnv``) runs a conversation on a chat template instead, with ``-p`` as the system
  message (see ``ggml-backend chat``).
"""
from __future__ import annotations

import signal
import sys

from ..generation.stopping import StopReason, TokenTextStream
from .common import (ANSI_PROMPT, ANSI_RESET, ANSI_USER_INPUT, InfoLog, Painter, add_model_arguments, add_option,
                     add_sampling_arguments, eog_bias, grammar_from_args, load_model, make_sampler, process_escapes, resolve_seed,
                     timing_summary)

# main's instruct mode (Alpaca)
INSTRUCT_PREFIX = "\n\n### Instruction:\n\n"
INSTRUCT_SUFFIX = "\n\n### Response:\n\n"
INSTRUCT_REVERSE_PROMPT = "### Instruction:\n\n"


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_option(parser, "-p", "--prompt", default=None, help="prompt to start generation with")
    add_option(parser, "-f", "--file", default=None, help="read the prompt from a file")
    add_option(parser, "-e", "--escape", action="store_true",
               help="process escapes (\\n, \\r, \\t, \\', \\\", \\\\, \\xHH) in the prompt, reverse prompts, "
                    "input prefix/suffix and user input")
    add_option(parser, "--keep", type=int, default=0,
               help="prompt tokens to keep when the context is shifted (default: 0, -1 = all)")
    add_option(parser, "-i", "--interactive", action="store_true", help="run in interactive mode")
    add_option(parser, "--interactive-first", action="store_true",
               help="interactive mode, waiting for user input before generating")
    add_option(parser, "-ins", "--instruct", action="store_true",
               help="instruction mode (Alpaca: '### Instruction:' / '### Response:' around each input)")
    add_option(parser, "-cnv", "--conversation", action="store_true",
               help="chat on the model's chat template, -p being the system message")
    add_option(parser, "-r", "--reverse-prompt", action="append", default=[], metavar="PROMPT",
               help="hand control to the user when the output ends with PROMPT (repeatable)")
    add_option(parser, "--in-prefix", default="", help="text put before each user input")
    add_option(parser, "--in-suffix", default="", help="text put after each user input")
    add_option(parser, "--no-display-prompt", dest="display_prompt", action="store_false",
               help="do not echo the prompt")
    add_option(parser, "--verbose-prompt", action="store_true", help="print the prompt's tokens before generating")
    add_sampling_arguments(parser)


def _read_prompt(args) -> str:
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read prompt file {args.file}: {exc.strerror or exc}") from None
        # main drops one trailing newline of a prompt file
        return text[:-1] if text.endswith("\n") else text
    return args.prompt or ""


def run(args) -> int:
    log = InfoLog(not args.log_disable)
    prompt = _read_prompt(args)
    if args.escape:
        prompt = process_escapes(prompt)
        args.in_prefix = process_escapes(args.in_prefix)
        args.in_suffix = process_escapes(args.in_suffix)
        args.reverse_prompt = [process_escapes(r) for r in args.reverse_prompt]
    if args.conversation or args.chat_template is not None:
        from .chat import chat_session
        return chat_session(args, system=prompt or None, log=log)
    seed = resolve_seed(args)
    log(f"main: seed  = {seed}")
    llm = load_model(args, log)
    return RunSession(args, llm, prompt, seed, log).run()


class RunSession:
    """main's generation loop over ``Llama.generate``: tokens queued (``pending``) are evaluated by the next
    ``generate`` call, which reuses the KV cache for everything already evaluated."""

    def __init__(self, args, llm, prompt: str, seed: int, log: InfoLog):
        self.args = args
        self.llm = llm
        self.tok = llm.tokenizer
        self.prompt = prompt
        self.log = log
        self.painter = Painter(args.color)
        self.instruct = args.instruct
        self.interactive = args.interactive or args.interactive_first or args.instruct
        self.antiprompts = [r for r in args.reverse_prompt if r]
        if self.instruct:
            self.antiprompts.append(INSTRUCT_REVERSE_PROMPT)
        self.eog = set(self.tok.eog_ids)
        self.sampler = make_sampler(args, llm, seed, eog_bias(llm) if args.ignore_eos else None)
        self.grammar = grammar_from_args(args)
        self.is_interacting = False
        self.recent_text = ""      # the tail of what was shown (prompt, output, input), for reverse prompts
        # one stream for the whole session: a character split over two stretches of generation (Ctrl-C, a
        # reverse prompt) still comes out whole; each stretch resumes it with its own budget
        self.output = TokenTextStream(self.tok, eog_ids=self.eog, special=False)

    # --- helpers ----------------------------------------------------------------------------------------------
    def _tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.llm.tokenize(text, add_bos=add_bos, special=special) if text else []

    def _remember(self, text: str) -> None:
        keep = max((len(a) for a in self.antiprompts), default=0) + 8
        self.recent_text = (self.recent_text + text)[-keep:] if keep > 8 else ""

    def _ends_with_antiprompt(self) -> bool:
        # main: interactive runs need the reverse prompt at the very end; otherwise a couple of characters may
        # follow it (the token that completed it may carry more text)
        slack = 0 if self.interactive else 2
        for antiprompt in self.antiprompts:
            if antiprompt in self.recent_text[-(len(antiprompt) + slack):]:
                return True
        return False

    def _on_sigint(self, signum, frame):
        if self.interactive and not self.is_interacting:
            self.is_interacting = True      # finish the current token, then hand over to the user
            return
        raise KeyboardInterrupt

    def _finish(self, code: int) -> int:
        self.painter.write(self.output.finish(StopReason.INTERRUPTED if code == 130 else StopReason.LENGTH))
        self.painter.set(ANSI_RESET)
        self.log(timing_summary(self.llm, self.sampler))
        return code

    # --- the prompt ---------------------------------------------------------------------------------------------
    def _prompt_tokens(self) -> list[int]:
        tokens = self._tokenize(self.prompt, add_bos=self.tok.add_bos)
        if not tokens:
            # main never runs on nothing: it starts from BOS
            if self.tok.bos_id is None:
                raise ValueError("the prompt is empty and the model has no BOS token to start from")
            tokens = [self.tok.bos_id]
        n_ctx = self.llm.n_ctx()
        if len(tokens) > n_ctx - 4:
            raise ValueError(f"prompt is too long ({len(tokens)} tokens, max {n_ctx - 4}); raise -c/--ctx-size")
        return tokens

    def _n_keep(self, prompt_tokens: list[int]) -> int:
        keep = self.args.keep
        if keep < 0 or keep > len(prompt_tokens) or self.instruct:
            return len(prompt_tokens)
        has_bos = bool(prompt_tokens) and prompt_tokens[0] == self.tok.bos_id
        return min(len(prompt_tokens), keep + int(has_bos))      # BOS is always kept

    def _print_verbose_prompt(self, tokens: list[int], n_keep: int) -> None:
        lines = ["", f"main: prompt: '{self.prompt}'", f"main: number of tokens in prompt = {len(tokens)}"]
        for t in tokens:
            piece = self.tok.token_to_piece(t).decode("utf-8", "replace")
            lines.append(f"{t:6d} -> '{piece}'")
        if n_keep > 0:
            static = self.llm.detokenize(tokens[:n_keep], special=True).decode("utf-8", "replace")
            lines.append(f"main: static prompt based on n_keep: '{static}'")
        print("\n".join(lines) + "\n", file=sys.stderr, flush=True)

    # --- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> int:
        args, llm = self.args, self.llm
        prompt_tokens = self._prompt_tokens()
        n_keep = self._n_keep(prompt_tokens)
        if args.verbose_prompt:
            self._print_verbose_prompt(prompt_tokens, n_keep)
        p = self.sampler.params
        if self.interactive:
            self.log("main: interactive mode on.")
            for antiprompt in self.antiprompts:
                self.log(f"Reverse prompt: '{antiprompt}'")
            if args.in_prefix:
                self.log(f"Input prefix: '{args.in_prefix}'")
            if args.in_suffix:
                self.log(f"Input suffix: '{args.in_suffix}'")
        self.log(f"sampling: repeat_last_n = {p.repeat_last_n}, repeat_penalty = {p.repeat_penalty:.3f}, "
                 f"frequency_penalty = {p.frequency_penalty:.3f}, presence_penalty = {p.presence_penalty:.3f}\n"
                 f"\ttop_k = {p.top_k}, tfs_z = {p.tfs_z:.3f}, top_p = {p.top_p:.3f}, min_p = {p.min_p:.3f}, "
                 f"typical_p = {p.typical_p:.3f}, temp = {p.temperature:.3f}\n"
                 f"\tmirostat = {p.mirostat_mode}, mirostat_lr = {p.mirostat_eta:.3f}, "
                 f"mirostat_ent = {p.mirostat_tau:.3f}")
        self.log(f"generate: n_ctx = {llm.n_ctx()}, n_batch = {llm.n_batch}, n_predict = {args.n_predict}, "
                 f"n_keep = {n_keep}\n")
        if self.interactive:
            self.log("== Running in interactive mode. ==\n"
                     " - Press Ctrl+C to interject at any time.\n"
                     " - Press Return to return control to LLaMa.\n"
                     " - To return control without starting a new line, end your input with '/'.\n"
                     " - If you want to submit another line, end your input with '\\'.\n")

        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return self._loop(prompt_tokens, n_keep)
        except KeyboardInterrupt:
            # main's SIGINT handler: a newline, the timings, exit status 130
            self.painter.set(ANSI_RESET)
            self.painter.write("\n")
            return self._finish(130)
        finally:
            signal.signal(signal.SIGINT, previous_handler)

    def _loop(self, prompt_tokens: list[int], n_keep: int) -> int:
        args, llm = self.args, self.llm
        n_predict = args.n_predict
        if args.display_prompt:
            self.painter.set(ANSI_PROMPT)
            self.painter.write(self.prompt)
        self._remember(self.prompt)
        pending = list(prompt_tokens)   # queued tokens, not evaluated yet
        history: list[int] = []         # tokens in the context, plus the last sampled one (not evaluated yet)
        n_remain = n_predict
        self.is_interacting = args.interactive_first or self.instruct
        last_was_antiprompt = False
        if n_predict == 0 and not self.interactive:
            return self._finish(0)
        while True:
            if not self.is_interacting and self.antiprompts and self._ends_with_antiprompt():
                last_was_antiprompt = True
                if not self.interactive:
                    break
                self.is_interacting = True
            if self.is_interacting:
                self.painter.set(ANSI_RESET)
                read = self._user_turn(last_was_antiprompt)
                if read is None:
                    self.painter.write("\n")
                    return self._finish(0)
                pending.extend(read[0])
                n_remain -= read[1]
                self.is_interacting = False
                last_was_antiprompt = False
                continue
            if n_predict >= 0 and n_remain <= 0:
                if not self.interactive:
                    break
                n_remain = n_predict
                self.is_interacting = True
                continue
            tokens = self._fit_context(history, pending, n_keep)
            if n_predict > 0:
                max_tokens = n_remain
            elif n_predict == -2:
                max_tokens = llm.n_ctx() - len(tokens)
                if max_tokens <= 0:
                    break
            else:
                max_tokens = None
            self.painter.set(ANSI_RESET)
            last, produced, ended = self._generate(tokens, max_tokens, n_keep)
            n_remain -= produced
            pending = []
            history = [int(t) for t in llm.input_ids[:llm.n_tokens]] + ([last] if last is not None else [])
            if self.is_interacting:
                # interrupted by Ctrl-C: the user types on a fresh line (main's handler printed this newline)
                self.painter.write("\n")
            if ended:
                if not self.interactive:
                    self.log(" [end of text]")
                    break
                if not self.instruct:
                    if self.antiprompts:
                        # main injects the first reverse prompt after an end-of-text token
                        first = self.antiprompts[0]
                        pending.extend(self._tokenize(first))
                        self.painter.write(first)
                        self._remember(first)
                    self.painter.write("\n")
                self.is_interacting = True
                last_was_antiprompt = bool(self.antiprompts) and not self.instruct
            elif n_predict == -2 and llm.n_tokens + 1 >= llm.n_ctx():
                break
        return self._finish(0)

    def _fit_context(self, history: list[int], pending: list[int], n_keep: int) -> list[int]:
        """history + pending, with main's context shift (drop half of what follows the kept prompt) applied to
        the history until it fits; generate_tokens() then re-evaluates what follows the kept tokens."""
        n_ctx = self.llm.n_ctx()
        while len(history) + len(pending) > n_ctx:
            n_discard = (len(history) - n_keep) // 2
            if n_discard <= 0:
                raise ValueError(f"input too long for the context: {len(pending)} new tokens, "
                                 f"n_ctx={n_ctx}, n_keep={n_keep}")
            history = history[:n_keep] + history[n_keep + n_discard:]
        return history + pending

    def _generate(self, tokens: list[int], max_tokens: int | None, n_keep: int):
        """Stream one stretch of generation; (last token, tokens produced, ended: an end-of-text token or a
        complete grammar, which end main's generation).

        Every exit leaves the generator right after it yielded, so the last token is never evaluated yet (the
        stream's budget ends the stretch at its last token, before generate_tokens() would evaluate it)."""
        last, produced = None, 0
        self.output.resume(max_tokens)
        stream = self.llm.generate_tokens(tokens, sampler=self.sampler, params=self.sampler.params,
                                          max_tokens=max_tokens, n_keep=n_keep, stop_tokens=self.eog,
                                          grammar=self.grammar)
        try:
            for token in stream:
                last = token
                produced += 1
                text = self.output.feed(token)
                self.painter.write(text)
                self._remember(text)
                if self.output.done or self.is_interacting or (self.antiprompts and self._ends_with_antiprompt()):
                    break
            else:
                # the stream ended by itself without an end-of-text token: the grammar is complete, as
                # llama.cpp's main ends there
                if self.grammar is not None and produced > 0:
                    self.output.stop(StopReason.GRAMMAR)
        finally:
            stream.close()
        return last, produced, self.output.stop_reason in (StopReason.EOG, StopReason.GRAMMAR)

    # --- user input ---------------------------------------------------------------------------------------------
    def _read_input(self) -> str | None:
        """main's console::readline: a trailing '\\' continues on the next line, a trailing '/' ends the input
        without a newline. None at end of input (Ctrl-D)."""
        buffer = ""
        while True:
            line = sys.stdin.readline()
            if line == "":
                return None
            line = line[:-1] if line.endswith("\n") else line
            if line.endswith("\\"):
                buffer += line[:-1] + "\n"
                continue
            if line.endswith("/"):
                return buffer + line[:-1]
            return buffer + line + "\n"

    def _user_turn(self, after_antiprompt: bool):
        """Read the user's input; (tokens to queue, tokens counted against n_predict), or None to exit."""
        args = self.args
        if self.instruct:
            self.painter.write("\n> ")
        if args.in_prefix:
            self.painter.write(args.in_prefix)
        self.painter.set(ANSI_USER_INPUT)
        buffer = self._read_input()
        self.painter.set(ANSI_RESET)
        if buffer is None:
            return None
        if len(buffer) <= 1:
            return [], 0        # an empty line hands control back to the model
        if args.in_suffix:
            self.painter.write(args.in_suffix)
        tokens: list[int] = []
        if self.instruct and not after_antiprompt:
            tokens.extend(self._tokenize(INSTRUCT_PREFIX, add_bos=self.tok.add_bos))
        if args.escape:
            buffer = process_escapes(buffer)
        line_tokens = self._tokenize(buffer, special=False)
        tokens.extend(self._tokenize(args.in_prefix))
        tokens.extend(line_tokens)
        tokens.extend(self._tokenize(args.in_suffix))
        if self.instruct:
            tokens.extend(self._tokenize(INSTRUCT_SUFFIX))
        self._remember(args.in_prefix + buffer + args.in_suffix)
        return tokens, len(line_tokens)

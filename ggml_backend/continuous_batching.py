"""``ContinuousBatcher``: many sequences of one model decoded together, one forward pass per step.

Decode reads every weight once per forward pass whatever the number of tokens it carries, so N sequences that
each want one token are served by one pass of N tokens for much less than N passes. A step of the batcher is:

1. one forward pass carrying the next token of every decoding sequence, plus a piece of a prompt still being
   evaluated (new requests join the running batch in pieces, so the others go on decoding meanwhile);
2. every sequence whose logits are now ready samples its next token (its own ``Sampler``, stop strings,
   grammar), and the step returns one ``SequenceEvent`` per such sequence.

Sequences live in a ``MultiSequenceCache`` (model/kv_cache.py) that the ``Llama``'s inference session makes
(``InferenceSession.sequence_cache``, model/session.py): memory comes as they grow and goes back when they end. A
sequence may start from another's evaluated prefix (``share_prefix_with``): ``n > 1`` completions evaluate their
prompt once, and its keys and values are copied to the others.

Results do not depend on batching. A prompt is split into the batches ``Llama.eval`` would use (near-equal ones of
at most ``n_batch`` tokens; ``session.eval_batches``). A batch on the BLAS path (``session.runs_alone``: 48 tokens
or more) runs as a pass of its own, exactly as alone (one such pass per step, so decoding sequences wait one prompt
batch at most: a smaller ``n_batch`` stalls them less); smaller ones, and decode tokens, go through the integer
kernels (and the float types' SIMD kernels, quant/float_dot.py), which give every token the numbers it gets alone
whatever the pass holds (model/batching.py), so they are freely combined. A model whose weights are not all on
those kernels (float weights on a CPU without AVX2: sgemm) gets one pass per sequence: still the numbers of each
sequence alone, without the gain. At temperature 0 a sequence thus gives the same tokens
in a batch of 8 as alone, and as ``Llama.create_completion``.

The combined passes go through the model's ``ForwardBatcher``, the same flat combining that ``Llama.new_context``
contexts (the server's slots) use, so a batcher's sequences and other contexts decoding at the same moment share
passes too: one mechanism for both.

Not thread-safe: one thread drives a batcher (``Llama.create_completion(n=K)`` drives its own on the model's
worker thread). No context shift: a sequence that fills its context ends with finish reason "length".
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .generation import SamplingParams, StopReason, TokenTextStream
from .model.session import eval_batches, runs_alone, set_threads
from .prompt_cache import common_prefix


@dataclass
class SequenceEvent:
    """What one sequence produced in one step.

    ``token``: the token sampled (None when a stopping criterion ended the sequence before sampling one);
    ``text``: the new text it makes visible (may be "": an incomplete UTF-8 character or a possible start of a
    stop string is held back; the end-of-generation token itself has no text); ``finish_reason``: None while the
    sequence goes on, else "stop" (end token, stop string, grammar complete, stopping criterion) or "length"
    (``max_tokens`` reached, or the context full); ``logits``: the float32 logits the token was sampled from,
    before any processor (for log-probabilities)."""
    seq_id: int
    token: int | None
    text: str
    finish_reason: str | None = None
    logits: np.ndarray | None = field(default=None, repr=False)


class Sequence:
    """One sequence's state, readable by the caller (``ContinuousBatcher.sequences[seq_id]``).

    ``prompt_tokens``, ``generated`` (sampled token ids, the end token included), ``text`` (the visible text so
    far), ``finish_reason`` (None while running)."""

    def __init__(self, seq_id, prompt_tokens, *, tokenizer, sampler, params, stops, stop_ids, max_tokens,
                 grammar_matcher, logits_processor, stopping_criteria, share_prefix_with):
        self.id = seq_id
        self.prompt_tokens = list(prompt_tokens)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.sampler = sampler
        self.params = params
        self.output = TokenTextStream(tokenizer, stops, eog_ids=stop_ids)   # its text and why it ended
        self.stop_ids = stop_ids
        self.max_tokens = max_tokens
        self.matcher = grammar_matcher
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.share_prefix_with = share_prefix_with
        self.started = False          # its cache exists (and holds the shared prefix, if any)
        self.n_evaluated = 0          # tokens of prompt + generated in its KV cache
        self.plan: list[tuple[int, int]] = []   # the prompt's remaining evaluation batches (first, last)
        self.logits: np.ndarray | None = None   # logits after its last evaluated token, not yet sampled from
        self.prompt_logits: np.ndarray | None = None   # logits after the last prompt token (for prefix sharing)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.generated

    @property
    def text(self) -> str:
        return self.output.text

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_tokens)


class ContinuousBatcher:
    """Continuous batching on a ``Llama``'s weights: add sequences at any time, ``step()`` runs one forward pass
    for all of them and returns what each produced.

    Parameters (defaults in brackets):

    * ``llm``: the ``Llama`` whose model, tokenizer and settings are used; its own KV cache and state are not
      touched (the sequences have caches of their own).
    * ``max_sequences`` [16]: how many sequences may be open at once (``add`` raises beyond).
    * ``n_ctx`` [``llm.n_ctx()``]: the context of each sequence (prompt + generated tokens); its memory is
      allocated as the sequence grows.
    * ``n_batch`` [``llm.n_batch``]: the largest prompt batch evaluated in one pass. A batch on the BLAS path
      (48 tokens or more) runs in a pass of its own, so it is also the most that decoding sequences wait for a
      new prompt in one step.
    * ``type_k``, ``type_v`` [``llm``'s]: the KV cache types of the sequences (f16, f32, q8_0).

    Usage::

        batcher = ContinuousBatcher(llm)
        a = batcher.add("Once upon a time", max_tokens=32, temperature=0)
        b = batcher.add("def fib(n):", max_tokens=32, seed=7)
        while batcher.active:
            for event in batcher.step():
                print(event.seq_id, repr(event.text), event.finish_reason)
    """

    def __init__(self, llm, *, max_sequences: int = 16, n_ctx: int | None = None, n_batch: int | None = None,
                 type_k=None, type_v=None):
        from .generation import validate
        self.llm = llm
        self.model = llm.model
        self.max_sequences = validate.integer("max_sequences", max_sequences, low=1)
        self.n_ctx = validate.integer("n_ctx", llm.n_ctx() if n_ctx is None else n_ctx, low=1)
        self.n_batch = validate.integer("n_batch", llm.n_batch if n_batch is None else n_batch, low=1)
        # the sequences' KV caches: the session's multi-sequence cache (its cache types unless given)
        self.cache = llm.session.sequence_cache(self.n_ctx, type_k, type_v)
        self.sequences: dict[int, Sequence] = {}
        self._next_id = 0
        # combined passes through the model's ForwardBatcher, when the numbers allow it (see the module docstring)
        self._combine = self.model.batcher is not None
        self.steps = 0            # statistics: steps run, forward passes run, tokens evaluated
        self.passes = 0
        self.tokens_evaluated = 0

    # --- sequences ----------------------------------------------------------------------------------------
    def add(self, prompt, *, max_tokens: int | None = 16, stop=None, stop_tokens=None,
            params: SamplingParams | None = None, seed: int | None = None, grammar=None, logits_processor=None,
            stopping_criteria=None, share_prefix_with: int | None = None, add_bos: bool | None = None,
            **sampling) -> int:
        """Open a sequence; returns its id (ints from 0, in order). Its prompt is evaluated by the next steps.

        * ``prompt``: text (tokenized as ``create_completion`` does: special tokens parsed, BOS as the model
          wants unless ``add_bos``) or a list of token ids.
        * ``max_tokens`` [16]: the most tokens to generate; None or <= 0: until the context is full.
        * ``stop`` [None]: stop strings (a str or a list); the text ends before the first one.
        * ``stop_tokens`` [the model's end-of-generation tokens]: token ids that end the sequence.
        * ``params`` [None]: a ``SamplingParams``; or give its fields as keywords (``temperature=0``,
          ``top_k``, ``repeat_penalty``...), with ``SamplingParams``' defaults for the rest. Not both.
        * ``seed`` [params.seed, else the ``Llama``'s seed chain]: this sequence's sampler seed.
        * ``grammar`` [None]: a ``LlamaGrammar`` constraining every token.
        * ``logits_processor``, ``stopping_criteria`` [None]: as ``Llama.create_completion``'s.
        * ``share_prefix_with`` [None]: the id of an open sequence whose evaluated prefix this one starts from
          (the longest prefix the two token lists share): those positions are copied, not evaluated again. If
          the whole prompt is shared, its last logits are too, and nothing is evaluated. The copied positions
          carry the other sequence's numbers, which are those of a fresh evaluation when both prompts are split
          into the same batches (always for a whole shared prompt)."""
        from .generation import validate
        if len(self.sequences) >= self.max_sequences:
            raise ValueError(f"{self.max_sequences} sequences are open already (max_sequences)")
        if params is not None and sampling:
            raise TypeError(f"give params or sampling keywords, not both (got {sorted(sampling)})")
        if params is None:
            try:
                params = SamplingParams(**sampling)
            except TypeError:
                unknown = sorted(set(sampling) - set(SamplingParams.__dataclass_fields__))
                raise TypeError(f"unknown argument(s) for ContinuousBatcher.add: {unknown}") from None
        elif not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        llm = self.llm
        if isinstance(prompt, (list, tuple, np.ndarray)):
            tokens = validate.eval_tokens(list(prompt), llm.n_vocab())
        elif isinstance(prompt, (str, bytes)):
            tokens = llm.tokenize(prompt, add_bos=llm.tokenizer.add_bos if add_bos is None else add_bos,
                                  special=True)
        else:
            raise TypeError(f"prompt must be text or a list of token ids, got {type(prompt).__name__}")
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"the prompt ({len(tokens)} tokens) does not fit the context of {self.n_ctx} with room "
                             "for a reply")
        if share_prefix_with is not None and share_prefix_with not in self.sequences:
            raise KeyError(f"share_prefix_with: no open sequence {share_prefix_with!r}")
        for name, value in (("logits_processor", logits_processor), ("stopping_criteria", stopping_criteria)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        if grammar is not None:
            from .generation.grammar import as_grammar
            grammar = as_grammar(grammar)
        room = self.n_ctx - len(tokens)
        max_tokens = room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)
        stop_ids = set(llm.tokenizer.eog_ids) if stop_tokens is None else {int(t) for t in stop_tokens}
        sampler = llm.make_sampler(params, seed=seed)
        seq_id = self._next_id
        self._next_id += 1
        self.sequences[seq_id] = Sequence(
            seq_id, tokens, tokenizer=llm.tokenizer, sampler=sampler, params=params,
            stops=validate.stop_strings(stop), stop_ids=stop_ids,
            max_tokens=max_tokens, grammar_matcher=grammar.matcher(llm.tokenizer) if grammar is not None else None,
            logits_processor=logits_processor, stopping_criteria=stopping_criteria,
            share_prefix_with=share_prefix_with)
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """End a sequence now, whatever its state: its memory goes back at once (KeyError for an unknown id).
        Sequences that wait to share its prefix evaluate their prompts themselves."""
        self.sequences.pop(seq_id)
        for other in self.sequences.values():
            if other.share_prefix_with == seq_id:
                other.share_prefix_with = None
        self._free(seq_id)

    remove = cancel

    @property
    def active(self) -> int:
        """Open sequences (added, not finished nor cancelled)."""
        return len(self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    # --- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[SequenceEvent]:
        """One forward pass for all open sequences (plus, when a prompt batch of BLAS size is due, that batch's
        own pass), then a token for every sequence whose logits are ready. Finished sequences are removed (their
        last event has a ``finish_reason``)."""
        if not self.sequences:
            return []
        set_threads(self.llm.n_threads)
        self.steps += 1
        self._start_sequences()
        self._run(*self._plan_step())
        self._start_sequences()   # copies of prompts that just finished take them before their source samples
        events = []
        for seq in list(self.sequences.values()):
            if seq.logits is not None and not seq.plan:
                event = self._sample(seq)
                events.append(event)
                if event.finish_reason is not None:
                    del self.sequences[seq.id]
                    self._free(seq.id)
        return events

    def run(self):
        """Step until every sequence is finished, yielding each event."""
        while self.sequences:
            yield from self.step()

    def _free(self, seq_id: int) -> None:
        if seq_id in self.cache:
            if self.model.batcher is not None:
                self.model.batcher.leave(self.cache[seq_id])   # combined passes stop waiting for it
            # a sequence whose prefix others will copy keeps nothing of its own once it ends: they copy first
            self.cache.remove(seq_id)

    def _start_sequences(self) -> None:
        """Give new sequences their cache: a copy of the shared prefix when its source has evaluated it (else
        they wait for it), and their prompt's evaluation batches."""
        for seq in self.sequences.values():
            if seq.started:
                continue
            src = self.sequences.get(seq.share_prefix_with)
            n_shared = 0
            if src is not None:
                n_common = common_prefix(src.tokens[:src.n_evaluated], seq.prompt_tokens)
                if src.plan or not src.started:
                    wanted = common_prefix(src.prompt_tokens, seq.prompt_tokens)
                    if n_common < wanted:
                        continue            # its source is still evaluating the shared part: wait for it
                n_shared = n_common
            cache = self.cache.add(seq.id)
            seq.started = True
            if n_shared:
                whole = n_shared == seq.n_prompt and src.prompt_logits is not None and src.n_prompt == seq.n_prompt
                n_copy = n_shared if whole else min(n_shared, seq.n_prompt - 1)
                cache.copy_prefix_from(self.cache[src.id], n_copy)
                seq.n_evaluated = n_copy
                if whole:
                    seq.logits = seq.prompt_logits = src.prompt_logits
            seq.plan = eval_batches(seq.n_evaluated, seq.n_prompt, self.n_batch)

    def _plan_step(self):
        """(items for the combined pass(es), items that run alone): [(sequence, tokens), ...]."""
        combined, alone = [], []
        budget = self.model.batcher.max_rows if self._combine else 0
        for seq in self.sequences.values():
            if seq.started and not seq.plan and seq.logits is None:
                # a decoding sequence: its last sampled token
                item = (seq, [seq.generated[-1]])
                if self._combine:
                    combined.append(item)
                else:
                    alone.append(item)
        used = len(combined)
        prompt_rows = 0            # at most one pass's worth of small prompt pieces per step
        blas_pass = False
        for seq in self.sequences.values():
            if not seq.started or not seq.plan:
                continue
            first, last = seq.plan[0]
            if runs_alone(last - first) or not self._combine:
                if not blas_pass:      # one whole prompt batch of its own per step
                    alone.append((seq, seq.prompt_tokens[first:last]))
                    blas_pass = True
            elif prompt_rows < budget:
                # a prompt batch below BLAS size: any piece of it gets the numbers of the whole (integer kernels);
                # the piece fills the last pass of the step (_run cuts the items into passes of max_rows), and
                # there is always room for one, however many sequences decode
                room = min(budget - used % budget, budget - prompt_rows)
                take = min(last - first, room)
                combined.append((seq, seq.prompt_tokens[first:first + take]))
                used += take
                prompt_rows += take
        return combined, alone

    def _run(self, combined, alone) -> None:
        model = self.model
        for seq, tokens in alone:
            with self._failing([seq]):
                logits = model.forward(tokens, self.cache[seq.id])
            self.passes += 1
            self._advance(seq, tokens, logits)
        if combined:
            rows = model.batcher.max_rows
            group, n = [], 0
            for seq, tokens in combined + [(None, None)]:
                if seq is None or n + len(tokens) > rows:
                    with self._failing([s for s, _ in group]):
                        for s, t in group:
                            model.check(t, self.cache[s.id])
                        results = model.batcher.forward_many([(t, self.cache[s.id]) for s, t in group])
                    self.passes += 1
                    for (s, t), logits in zip(group, results):
                        self._advance(s, t, logits)
                    group, n = [], 0
                if seq is not None:
                    group.append((seq, tokens))
                    n += len(tokens)

    @contextmanager
    def _failing(self, sequences):
        """A pass that raises ends its sequences (their caches are in doubt); the others keep their state."""
        try:
            yield
        except BaseException:
            for seq in sequences:
                if seq.id in self.sequences:
                    self.cancel(seq.id)
            raise

    def _advance(self, seq: Sequence, tokens, logits) -> None:
        """Bookkeeping after ``tokens`` of ``seq`` were evaluated: its plan, its logits."""
        self.tokens_evaluated += len(tokens)
        seq.n_evaluated += len(tokens)
        if seq.plan:
            first, last = seq.plan[0]
            first += len(tokens)
            if first >= last:
                seq.plan.pop(0)
            else:
                seq.plan[0] = (first, last)
            if seq.plan:
                return
            seq.prompt_logits = logits[-1]
        seq.logits = logits[-1]

    def _sample(self, seq: Sequence) -> SequenceEvent:
        """Sample the next token of ``seq`` from its ready logits (the chain of ``Llama.create_completion``)."""
        logits, seq.logits = seq.logits, None
        tokens = seq.tokens
        input_ids = np.asarray(tokens, dtype=np.intc)
        if seq.stopping_criteria is not None and seq.stopping_criteria(input_ids, logits.copy()):
            return self._finish(seq, None, logits, reason=StopReason.CRITERION)
        scores = logits
        if seq.logits_processor is not None:
            scores = np.asarray(seq.logits_processor(input_ids, logits.copy()), dtype=np.float32)
        if seq.matcher is not None:
            scores = seq.matcher.mask(scores)
        last_n = seq.params.repeat_last_n if seq.params.repeat_last_n >= 0 else len(tokens)
        recent = np.asarray(tokens[len(tokens) - last_n:] if last_n else [], dtype=np.int64)
        token = seq.sampler.sample(scores, recent)
        seq.generated.append(token)
        text = seq.output.feed(token)   # an end token ends the stream (no text); a stop string too
        if seq.output.stop_reason == StopReason.EOG:
            return self._finish(seq, token, logits)
        if seq.matcher is not None:
            seq.matcher.accept(token)
            if seq.matcher.done():
                seq.output.stop(StopReason.GRAMMAR)
        if len(seq.generated) >= seq.max_tokens or seq.n_evaluated + 1 > self.n_ctx:
            seq.output.stop(StopReason.LENGTH)
        if seq.output.done:
            return self._finish(seq, token, logits, text)
        if seq.matcher is not None:
            seq.matcher.prepare()
        return SequenceEvent(seq.id, token, text, None, logits)

    @staticmethod
    def _finish(seq: Sequence, token, logits, text: str = "", reason: str = StopReason.LENGTH) -> SequenceEvent:
        tail = seq.output.finish(reason)   # the reason the stream found stands; ``reason`` when it found none
        seq.finish_reason = seq.output.finish_reason
        return SequenceEvent(seq.id, token, text + tail, seq.finish_reason, logits)


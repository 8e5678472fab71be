"""Speculative decoding (ggml_backend/speculative.py, ``Llama(draft_model=...)``): the same tokens as plain decoding,
greedy and seeded, with grammars, stops, limits and logprobs, from fewer forward passes when the drafts are right;
the choice of how many drafted tokens to verify; a draft model's bad output gets a clear error."""
from __future__ import annotations

import numpy as np
import pytest

from ggml_backend import Llama, LlamaGrammar
from ggml_backend import speculative as spec
from ggml_backend.quant.matmul import KERNEL_ISA
from ggml_backend.speculative import DraftLength, LlamaDraftModel, LlamaPromptLookupDecoding, PassTimes
from refdata import real_model, synthetic_file, synthetic_types

COPY_PROMPT = ("<|im_start|>user\nRepeat this code exactly:\n```python\ndef merge(left, right):\n    out = []\n"
               "    i = j = 0\n    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
               "            out.append(left[i]); i += 1\n        else:\n            out.append(right[j]); j += 1\n"
               "    return out + left[i:] + right[j:]\n```<|im_end|>\n<|im_start|>assistant\n")
FREE_PROMPT = "<|im_start|>user\nName three rivers and say one thing about each.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def fixed_costs(monkeypatch):
    """Pass costs as a fixed model (one token 1, each further token 0.5; measured on a 2-core Zen 4: 1.1 for the
    second, 0.4 each up to eleven) instead of measured times, so which drafts are verified depends only on the
    acceptance (the outputs never depend on it)."""
    monkeypatch.setattr(PassTimes, "estimates",
                        lambda self, most: [1.0 + 0.5 * (n - 1) for n in range(1, most + 1)])


class CountingDraft(LlamaDraftModel):
    """Wraps a draft model; counts the calls and the drafted tokens offered."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, input_ids, /, **kwargs):
        self.calls += 1
        return self.inner(input_ids)


class OracleDraft(LlamaDraftModel):
    """Drafts the tokens a plain run produced after the prompt (right every time while the run is followed)."""

    def __init__(self, prompt_tokens, answer_tokens):
        self.sequence = list(prompt_tokens) + list(answer_tokens)

    def __call__(self, input_ids, /, **kwargs):
        n = len(input_ids)
        if list(input_ids) != self.sequence[:n]:
            return np.array([], dtype=np.intc)
        return np.array(self.sequence[n:n + 12], dtype=np.intc)


class WrongDraft(LlamaDraftModel):
    """Drafts a token the model would not pick next (the last token again, shifted by one)."""

    def __call__(self, input_ids, /, **kwargs):
        return np.array([(int(input_ids[-1]) + 1) % 1000] * 6, dtype=np.intc)


def count_passes(llm, monkeypatch):
    """Counts the forward passes of ``llm``'s session: [one-token passes, verification passes, tokens verified]."""
    counts = [0, 0, 0]
    session = llm.session
    plain_eval, every_row = session._eval, session.eval_every_row

    def eval_(tokens, rows=False):
        if not rows:
            counts[0] += 1
        return plain_eval(tokens, rows)

    def every_row_(tokens):
        counts[1] += 1
        counts[2] += len(tokens)
        return every_row(tokens)
    monkeypatch.setattr(session, "_eval", eval_)
    monkeypatch.setattr(session, "eval_every_row", every_row_)
    return counts


def test_prompt_lookup_finds_the_earliest_continuation():
    find = LlamaPromptLookupDecoding.find_candidate_pred_tokens
    assert find(np.array([1, 2, 3, 1, 2, 3, 1, 2, 3]), 3, 2).tolist() == [1, 2]
    assert find(np.array([5, 9, 7, 1, 2, 5, 9]), 2, 10).tolist() == [7, 1, 2, 5, 9]
    assert find(np.array([4, 8, 4]), 2, 3).tolist() == [8, 4]          # falls back to a one-token n-gram
    assert find(np.array([1, 2, 3, 4]), 3, 5).tolist() == []
    assert find(np.array([7]), 2, 5).tolist() == []
    with pytest.raises(ValueError, match="num_pred_tokens must be a positive integer"):
        LlamaPromptLookupDecoding(num_pred_tokens=0)


def test_the_draft_length_follows_acceptance(fixed_costs):
    drafting = DraftLength(PassTimes())
    assert drafting.limit(10) == 0 and drafting.wants_shadow()   # a neutral prior: verifying does not pay yet
    for _ in range(3):                        # shadow drafts followed token by token, right to their end
        drafting.follow([4, 5, 6])
        assert not drafting.wants_shadow()
        for token in (4, 5, 6):
            drafting.observe(token)
    assert drafting.wants_shadow() and 0 < drafting.limit(10) < 10
    for _ in range(6):
        drafting.update(10, 10)
    assert drafting.limit(10) == 10           # every draft right: the longest
    assert drafting.limit(3) == 3 and drafting.limit(0) == 0
    failures = 0
    while drafting.limit(10) > 0:             # then every draft wrong: soon none
        drafting.update(4, 0)
        failures += 1
    assert failures <= 10


def test_a_shadow_draft_counts_its_right_tokens_up_to_the_first_wrong_one(fixed_costs):
    counted = []
    drafting = DraftLength(PassTimes())
    drafting.update = lambda drafted, accepted: counted.append((drafted, accepted))
    drafting.follow([7, 8, 9, 10])
    for token in (7, 8, 3, 10):
        drafting.observe(token)
    assert counted == [(4, 2)] and drafting.wants_shadow()


def test_pass_times_skip_the_first_pass_and_interpolate():
    times = PassTimes()
    assert times.estimates(5)[2] == pytest.approx(1 + 2 * PassTimes.PRIOR_GROWTH)
    times.record(1, 30.0)                      # the first pass of a size: compiling, not counted
    times.record(1, 0.010)
    times.record(5, 0.5)
    times.record(5, 0.030)
    assert times.estimates(5)[0] == pytest.approx(0.010) and times.estimates(5)[4] == pytest.approx(0.030)
    assert times.estimates(5)[2] == pytest.approx(0.020)                      # between 1 and 5
    times.record(5, 1.0)                       # an outlier moves the average a little, at most to 3x
    assert times.estimates(5)[4] == pytest.approx(0.030 + PassTimes.WEIGHT * 0.060)


@pytest.fixture(scope="module")
def qwen_pair():
    path = str(real_model("qwen"))
    plain = Llama(path, n_ctx=1024, verbose=False)
    drafted = Llama(path, n_ctx=1024, verbose=False, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
    return plain, drafted


@pytest.mark.parametrize("prompt", [COPY_PROMPT, FREE_PROMPT], ids=["copying", "free"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_real_model_gives_the_same_text_and_logprobs(qwen_pair, prompt, temperature, fixed_costs):
    plain, drafted = qwen_pair
    kwargs = dict(max_tokens=90, temperature=temperature, seed=1234, logprobs=2)
    a = plain.create_completion(prompt, **kwargs)["choices"][0]
    b = drafted.create_completion(prompt, **kwargs)["choices"][0]
    assert b["text"] == a["text"] and b["finish_reason"] == a["finish_reason"]
    assert b["logprobs"]["token_logprobs"] == a["logprobs"]["token_logprobs"]   # the same logits, bit for bit
    assert b["logprobs"]["top_logprobs"] == a["logprobs"]["top_logprobs"]
    # the context is left as plain decoding leaves it (the last token sampled, not evaluated)
    assert drafted.n_tokens == plain.n_tokens
    assert np.array_equal(drafted.input_ids[:drafted.n_tokens], plain.input_ids[:plain.n_tokens])
    assert np.array_equal(drafted.session.last_logits, plain.session.last_logits)


def test_right_drafts_save_passes_and_wrong_ones_change_nothing(qwen_pair, monkeypatch, fixed_costs):
    plain, drafted = qwen_pair
    prompt_tokens = plain.tokenize(FREE_PROMPT.encode(), special=True)
    answer = plain.create_completion(prompt_tokens, max_tokens=60, temperature=0)["choices"][0]["text"]
    answer_tokens = plain.session.input_ids[len(prompt_tokens):plain.n_tokens].tolist()
    for draft_model in (OracleDraft(prompt_tokens, answer_tokens), WrongDraft()):
        with monkeypatch.context() as patches:
            counting = CountingDraft(draft_model)
            patches.setattr(drafted, "draft_model", counting)
            counts = count_passes(drafted, patches)
            text = drafted.create_completion(prompt_tokens, max_tokens=60, temperature=0)["choices"][0]["text"]
        assert text == answer
        one_token, verifications, verified = counts
        if isinstance(draft_model, OracleDraft):
            # the prompt, then a few passes that each verify many tokens
            assert verifications >= 2 and one_token + verifications <= 20 and verified >= 50
        else:
            # shadow drafts are wrong from the start: nothing is verified (the last step drafts nothing: one
            # token is left to sample)
            assert verifications == 0 and one_token == 60 and counting.calls == 58


def test_grammar_stops_and_streams_agree(qwen_pair, fixed_costs):
    plain, drafted = qwen_pair
    grammar = LlamaGrammar.from_json_schema(
        '{"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", '
        '"items": {"type": "string"}}}, "required": ["name", "tags"]}')
    prompt = ('<|im_start|>user\nGive {"name": "merge", "tags": ["sort", "merge", "sort", "merge"]} back as JSON, '
              'then the same again.<|im_end|>\n<|im_start|>assistant\n')
    for kwargs in (dict(grammar=grammar), dict(stop=["sort"]), dict(max_tokens=7)):
        base = dict(max_tokens=80, temperature=0.7, seed=5) | kwargs
        a = plain.create_completion(prompt, **base)["choices"][0]
        streamed = list(drafted.create_completion(prompt, stream=True, **base))
        assert "".join(c["choices"][0]["text"] for c in streamed) == a["text"]
        assert streamed[-1]["choices"][0]["finish_reason"] == a["finish_reason"]


def test_two_threads_streaming_from_one_context_each_get_plain_decodings_text(qwen_pair, fixed_costs):
    """Two streams of one drafting context advanced at once from two threads (the scheduler takes the model from
    one to the other between tokens, saving and restoring its state): each gets the text it gets alone."""
    from concurrent.futures import ThreadPoolExecutor
    plain, drafted = qwen_pair
    kwargs = dict(max_tokens=50, temperature=0.9, seed=3)
    want = [plain.create_completion(p, **kwargs)["choices"][0]["text"] for p in (COPY_PROMPT, FREE_PROMPT)]

    def stream(prompt):
        return "".join(c["choices"][0]["text"] for c in drafted.create_completion(prompt, stream=True, **kwargs))
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(stream, [COPY_PROMPT, FREE_PROMPT])) == want


def test_stopping_criteria_and_generate_see_the_same_tokens(qwen_pair, fixed_costs):
    plain, drafted = qwen_pair
    tokens = plain.tokenize(COPY_PROMPT.encode(), special=True)
    seen = {}

    def run(llm, key):
        seen[key] = []

        def stop_at_12(input_ids, logits):
            seen[key].append(list(input_ids[len(tokens):]))
            return len(input_ids) >= len(tokens) + 12
        return list(llm.generate(tokens, temp=0, stopping_criteria=stop_at_12))
    assert run(drafted, "drafted") == run(plain, "plain")
    assert seen["drafted"] == seen["plain"] and len(seen["plain"]) == 13


@pytest.mark.parametrize("type_name", synthetic_types())
def test_every_quantization_type_gives_the_same_tokens(type_name, fixed_costs):
    """On the synthetic models the drafts come from an oracle of the plain run, so that verification passes of
    many tokens run whatever the random weights produce."""
    path = str(synthetic_file(type_name))
    plain = Llama(path, n_ctx=128, verbose=False)
    prompt = [1, 5, 9, 13, 5, 9, 13, 5, 9]
    want = [t for t, _ in zip(plain.generate(prompt, temp=0), range(40))]
    drafted = Llama(path, n_ctx=128, verbose=False, draft_model=OracleDraft(prompt, want))
    got = [t for t, _ in zip(drafted.generate(prompt, temp=0), range(40))]
    if type_name == "f16" and KERNEL_ISA is None:
        # without AVX2 float weights go through sgemm, whose sums may differ with the number of rows
        assert len(got) == 40
    else:
        assert got == want


def test_a_bad_draft_model_gets_a_clear_error(tiny_path):
    with pytest.raises(TypeError, match="draft_model must be a LlamaDraftModel"):
        Llama(str(tiny_path), n_ctx=64, verbose=False, draft_model="prompt lookup")
    cases = [(lambda ids: np.array([10 ** 9], dtype=np.int64), ValueError, "out of range"),
             (lambda ids: np.array([[1, 2]]), TypeError, "1-D array of integer token ids"),
             (lambda ids: np.array([0.5]), TypeError, "1-D array of integer token ids")]
    for draft_model, error, message in cases:
        llm = Llama(str(tiny_path), n_ctx=64, verbose=False, draft_model=draft_model)
        # drafting always pays: the model is asked
        llm._pass_times.estimates = lambda most: [1.0 + 0.1 * (n - 1) for n in range(1, most + 1)]
        with pytest.raises(error, match=message):
            list(llm.generate([1, 2, 3], temp=0))
        llm.close()
    assert spec.MAX_DRAFT + 1 < 48


def test_the_server_with_lookup_gives_the_engines_replies(qwen_pair):
    """``serve --lookup``: two slots streaming at once (their passes combined, verifications included) reply
    what the engine alone replies; a bad --draft-max is refused."""
    openai = pytest.importorskip("openai", reason="the openai package (a dev dependency) drives the server")
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, sse-starlette) is not installed")
    from concurrent.futures import ThreadPoolExecutor

    from ggml_backend.server import ModelConfig
    from server_fixtures import running_server
    plain, _ = qwen_pair
    questions = [COPY_PROMPT, FREE_PROMPT]
    want = [plain.create_completion(q, max_tokens=60, temperature=0, repeat_penalty=1.0)["choices"][0]["text"]
            for q in questions]
    with pytest.raises(ValueError, match="draft_max must be an integer from 0"):
        ModelConfig(alias="qwen", draft_max=100).check()
    with running_server(models=[ModelConfig(alias="qwen", n_ctx=2048, n_parallel=2, draft_max=10)]) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(prompt):
            chunks = client.completions.create(model="qwen", prompt=prompt, max_tokens=60, temperature=0,
                                               stream=True, extra_body={"repeat_penalty": 1.0})
            return "".join(c.choices[0].text for c in chunks)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(ask, questions))
        # a client that vanishes after a few chunks leaves its slot in a state the next request reuses rightly
        vanished = client.completions.create(model="qwen", prompt=COPY_PROMPT, max_tokens=60, temperature=0,
                                             stream=True, extra_body={"repeat_penalty": 1.0})
        for _, _ in zip(vanished, range(3)):
            pass
        vanished.close()
        again = [ask(COPY_PROMPT)]
        # llama.cpp's /completion: the same text, and its timings count this request's drafts as llama.cpp's do
        import httpx
        reply = httpx.post(url + "/completion", json={"prompt": COPY_PROMPT, "n_predict": 60, "temperature": 0,
                                                      "repeat_penalty": 1.0}, timeout=300).json()
    assert got == want and again == want[:1]
    assert reply["content"] == want[0]
    timings = reply["timings"]
    assert 0 <= timings["draft_n_accepted"] <= timings["draft_n"]

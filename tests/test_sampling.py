"""The sampler chain, stage by stage, against hand-computed results of llama.cpp's algorithms."""
import math

import numpy as np
import pytest

from ggml_backend.generation import sampling as S
from ggml_backend.generation.sampling import Candidates, Sampler, SamplingError, SamplingParams

# Probabilities chosen so that every threshold below sits well away from a cumulative sum.
PROBS_4 = np.array([0.5, 0.3, 0.15, 0.05])


def cands_from_probs(probs, order=None):
    """Candidates whose softmax is ``probs`` (token i has probability probs[i]); optionally listed in ``order``."""
    logits = np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)
    cands = Candidates.from_logits(logits)
    if order is not None:
        order = np.asarray(order)
        cands = Candidates(cands.ids[order], cands.logits[order], False)
    return cands


def disabled(**overrides):
    """Params with every truncation and penalty off (pure temperature-1 softmax), then ``overrides``."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, tfs_z=1.0, typical_p=1.0, repeat_penalty=1.0,
                seed=1234)
    base.update(overrides)
    return SamplingParams(**base)


# ---------------------------------------------------------------------------------------------- parameters

def test_defaults_are_llama_cpp_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.tfs_z, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.frequency_penalty, p.presence_penalty) == (1.1, 64, 0.0, 0.0)
    assert (p.mirostat_mode, p.mirostat_tau, p.mirostat_eta) == (0, 5.0, 0.1)
    assert p.logit_bias == {} and p.seed is None and p.penalize_nl is True


@pytest.mark.parametrize("field, value", [
    ("top_k", -2), ("top_k", 2.5), ("top_k", True), ("top_p", 1.5), ("top_p", -0.1), ("min_p", 2.0),
    ("tfs_z", -1.0), ("typical_p", 1.01), ("temperature", float("nan")), ("temperature", float("inf")),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_last_n", -2), ("mirostat_mode", 3),
    ("mirostat_tau", 0.0), ("mirostat_eta", -0.1), ("seed", -5), ("seed", "7"), ("penalize_nl", 1),
    ("logit_bias", {"x": 1.0}), ("logit_bias", {-3: 1.0}), ("logit_bias", {3: float("inf")}),
    ("logit_bias", {3: float("nan")}), ("logit_bias", [1, 2]), ("frequency_penalty", float("nan")),
])
def test_invalid_params_raise_value_error(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_disabled_conventions_and_logit_bias_normalization():
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(repeat_last_n=-1, seed=-1).repeat_last_n == -1
    p = SamplingParams(logit_bias={"15": -100, 3: 2, 7: float("-inf")})
    assert p.logit_bias == {15: -100.0, 3: 2.0, 7: float("-inf")}


# ---------------------------------------------------------------------------------------------- stages

def test_top_k_keeps_exactly_k_highest_sorted_with_ties_by_id():
    logits = np.array([1.0, 5.0, 3.0, 5.0, -2.0, 3.0, 0.0], dtype=np.float32)
    kept = S.top_k(Candidates.from_logits(logits), 3)
    assert kept.ids.tolist() == [1, 3, 2] and kept.is_sorted
    assert kept.logits.tolist() == [5.0, 5.0, 3.0]
    assert S.top_k(Candidates.from_logits(logits), 1).ids.tolist() == [1]
    assert len(S.top_k(Candidates.from_logits(logits), 0)) == 7          # disabled
    assert len(S.top_k(Candidates.from_logits(logits), 100)) == 7        # clamped to the vocabulary
    assert S.top_k(Candidates.from_logits(logits), 1, min_keep=2).ids.tolist() == [1, 3]


def test_top_k_matches_full_sort_on_large_random_input():
    rng = np.random.default_rng(5)
    logits = np.round(rng.normal(size=5000) * 4).astype(np.float32)   # many ties
    kept = S.top_k(Candidates.from_logits(logits), 40)
    reference = np.lexsort((np.arange(5000), -logits))[:40]
    assert kept.ids.tolist() == reference.tolist()


@pytest.mark.parametrize("p, kept", [(0.4, [0]), (0.75, [0, 1]), (0.9, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
                                     (1.0, None)])
def test_top_p_keeps_minimal_prefix_reaching_p(p, kept):
    out = S.top_p(cands_from_probs(PROBS_4, order=[3, 1, 0, 2]), p)
    if kept is None:   # p >= 1 disables it: untouched, original order
        assert out.ids.tolist() == [3, 1, 0, 2]
    else:
        assert out.ids.tolist() == kept


def test_top_p_min_keep():
    assert S.top_p(cands_from_probs(PROBS_4), 0.4, min_keep=3).ids.tolist() == [0, 1, 2]
    assert S.top_p(cands_from_probs(PROBS_4), 0.0).ids.tolist() == [0]


@pytest.mark.parametrize("min_p, kept", [(0.2, [0, 1, 2]), (0.5, [0, 1]), (0.7, [0]), (0.09, [0, 1, 2, 3]),
                                         (0.0, [0, 1, 2, 3])])
def test_min_p_keeps_tokens_at_least_min_p_times_max(min_p, kept):
    # p_max = 0.5: thresholds 0.1, 0.25, 0.35, 0.045
    assert sorted(S.min_p(cands_from_probs(PROBS_4), min_p).ids.tolist()) == kept


def test_min_p_min_keep():
    assert S.min_p(cands_from_probs(PROBS_4), 0.7, min_keep=2).ids.tolist() == [0, 1]


# p sorted = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]; first differences [0.1, 0.05, 0.1, 0.04, 0.02];
# |second differences| [0.05, 0.05, 0.06, 0.02] / 0.18 -> cumulative [0.278, 0.556, 0.889, 1.0].
# Kept = first i >= min_keep with cumulative[i] > z.
TFS_PROBS = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]


@pytest.mark.parametrize("z, min_keep, kept", [(0.5, 1, 1), (0.6, 1, 2), (0.9, 1, 3), (0.2, 1, 1), (0.2, 2, 2),
                                               (0.95, 3, 3), (1.0, 1, 6)])
def test_tail_free_hand_computed(z, min_keep, kept):
    out = S.tail_free(cands_from_probs(TFS_PROBS, order=[5, 2, 0, 4, 1, 3]), z, min_keep)
    if z >= 1.0:
        assert len(out) == 6
    else:
        assert out.ids.tolist() == list(range(kept))


def test_tail_free_leaves_two_candidates_alone():
    assert len(S.tail_free(cands_from_probs([0.9, 0.1]), 0.1)) == 2


# p = [0.5, 0.25, 0.125, 0.125]: entropy H = 1.75 ln 2; |-ln p - H| = [0.75, 0.25, 1.25, 1.25] * ln 2, so the
# typical order is [1, 0, 2, 3] with cumulative probability [0.25, 0.75, 0.875, 1.0]; keep until it exceeds p.
@pytest.mark.parametrize("p, kept", [(0.2, [1]), (0.5, [1, 0]), (0.8, [1, 0, 2]), (0.9, [1, 0, 2, 3]),
                                     (1.0, [0, 1, 2, 3])])
def test_typical_hand_computed(p, kept):
    out = S.typical(cands_from_probs([0.5, 0.25, 0.125, 0.125]), p)
    assert out.ids.tolist() == kept


def test_typical_min_keep():
    assert S.typical(cands_from_probs([0.5, 0.25, 0.125, 0.125]), 0.2, min_keep=3).ids.tolist() == [1, 0, 2]


def test_temperature_scales_and_zero_is_greedy():
    cands = Candidates.from_logits(np.array([1.0, 4.0, -2.0, 4.0], dtype=np.float32))
    assert S.temperature(cands, 0.5).logits.tolist() == [2.0, 8.0, -4.0, 8.0]
    assert S.temperature(cands, 0.0).ids.tolist() == [1]          # first maximum
    assert S.temperature(cands, -1.0).ids.tolist() == [1]


def test_repetition_frequency_presence_penalties():
    cands = Candidates.from_logits(np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32))
    # repetition only: positive divided, non-positive multiplied; tokens 2 and 3 unseen.
    out = S.apply_penalties(cands, [0, 1, 1, 4], repeat_penalty=2.0)
    assert out.logits.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0]
    # plus frequency (per occurrence) and presence (once): counts 0:1, 1:2, 4:1
    out = S.apply_penalties(cands, [0, 1, 1, 4], 2.0, frequency_penalty=0.5, presence_penalty=0.25)
    assert out.logits.tolist() == pytest.approx([0.25, -3.25, 0.5, 3.0, -0.75])
    assert cands.logits.tolist() == [2.0, -1.0, 0.5, 3.0, 0.0]   # input untouched


def test_penalties_on_reordered_candidates():
    cands = Candidates.from_logits(np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32))
    shuffled = Candidates(cands.ids[[3, 1, 2, 0]], cands.logits[[3, 1, 2, 0]])
    out = S.apply_penalties(shuffled, [0, 3, 9], repeat_penalty=4.0)
    assert dict(zip(out.ids.tolist(), out.logits.tolist())) == {0: 0.5, 1: -1.0, 2: 0.5, 3: 0.75}


def test_logit_bias_adds_and_bans():
    cands = Candidates.from_logits(np.zeros(5, dtype=np.float32))
    out = S.apply_logit_bias(cands, {1: 2.5, 3: float("-inf")})
    assert out.logits.tolist() == [0.0, 2.5, 0.0, float("-inf"), 0.0]


def test_mirostat_v2_truncates_by_surprise():
    # surprises -log2 p = [1, 2, 3, 4, 4]
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert S.mirostat_v2_truncate(cands_from_probs(probs, order=[4, 2, 0, 1, 3]), 2.5).ids.tolist() == [0, 1]
    assert S.mirostat_v2_truncate(cands_from_probs(probs), 3.5).ids.tolist() == [0, 1, 2]
    assert S.mirostat_v2_truncate(cands_from_probs(probs), 0.5).ids.tolist() == [0]   # never empty
    assert len(S.mirostat_v2_truncate(cands_from_probs(probs), 10.0)) == 5


def test_mirostat_v2_mu_update():
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    rng = np.random.Generator(np.random.PCG64(3))
    seen = set()
    for _ in range(40):
        token, mu = S.mirostat_v2(cands_from_probs(probs), mu=2.5, tau=1.2, eta=0.1, rng=rng)
        # kept [0, 1] renormalized to [2/3, 1/3]: surprise log2(3/2) or log2(3)
        surprise = {0: math.log2(1.5), 1: math.log2(3.0)}[token]
        assert mu == pytest.approx(2.5 - 0.1 * (surprise - 1.2), abs=1e-6)
        seen.add(token)
    assert seen == {0, 1}


def test_mirostat_v1_k_recovers_zipf_exponent():
    s, n_vocab, mu = 1.5, 1000, 10.0
    logits = (-s * np.log(np.arange(1, n_vocab + 1))).astype(np.float32)
    k = S.mirostat_v1_k(Candidates.from_logits(logits), mu, n_vocab)
    eps = s - 1.0
    expected = int((eps * 2 ** mu / (1 - n_vocab ** -eps)) ** (1 / s))   # = 65 for these values
    assert k == expected == 65
    # lower target surprise -> fewer candidates
    assert S.mirostat_v1_k(Candidates.from_logits(logits), 4.0, n_vocab) < k


def test_mirostat_v1_step_draws_inside_k_and_updates_mu():
    s, n_vocab = 1.5, 1000
    logits = (-s * np.log(np.arange(1, n_vocab + 1))).astype(np.float32)
    rng = np.random.Generator(np.random.PCG64(11))
    k = S.mirostat_v1_k(Candidates.from_logits(logits), 6.0, n_vocab)
    zipf = np.arange(1, k + 1) ** -s
    kept_probs = zipf / zipf.sum()
    for _ in range(30):
        token, mu = S.mirostat_v1(Candidates.from_logits(logits), 6.0, 5.0, 0.1, n_vocab, rng)
        assert 0 <= token < k
        assert mu == pytest.approx(6.0 - 0.1 * (-math.log2(kept_probs[token]) - 5.0), abs=1e-5)


# ---------------------------------------------------------------------------------------------- the sampler

def test_greedy_is_argmax_after_bias_and_penalties():
    logits = np.array([0.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(disabled(temperature=0.0), 4).sample(logits, []) == 1
    # token 1 penalized 3.0 / 1.1 = 2.73 < 2.9
    assert Sampler(disabled(temperature=0.0, repeat_penalty=1.1), 4).sample(logits, [1]) == 2
    assert Sampler(disabled(temperature=-1.0, logit_bias={3: 10.0}), 4).sample(logits, [1]) == 3


def _greedy_of_the_whole_vocabulary(sampler, logits, recent):
    """What ``sample`` returned at temperature 0 before ``_greedy``: the argmax of the adjusted full copy."""
    return int(np.argmax(sampler.candidates(logits, recent).logits))


def _outcome(fn):
    try:
        return fn()
    except SamplingError as exc:
        return str(exc)


def test_greedy_equals_the_argmax_of_the_whole_adjusted_vocabulary():
    """``_greedy`` adjusts only the ids the bias, the window and the newline rule touch: on random logits with
    ties (small integers), biases that ban or lift, windows with repeats, every penalty and the newline rule, it
    returns the token (or raises the error) of the argmax over the whole adjusted vocabulary."""
    rng = np.random.default_rng(7)
    kinds = {"plain": 0, "touched best": 0, "error": 0}
    for case in range(600):
        n = int(rng.integers(2, 40))
        logits = rng.integers(-3, 4, n).astype(np.float32)
        if case % 50 == 0:
            logits[rng.integers(0, n)] = rng.choice([np.nan, np.inf])
        if case % 37 == 0:
            logits[:] = -np.inf
        bias = {int(t): float(rng.choice([-np.inf, -2.0, 0.5, 3.0])) for t in rng.integers(0, n, rng.integers(0, 4))}
        params = disabled(temperature=0.0, logit_bias=bias, repeat_penalty=float(rng.choice([1.0, 1.5, 0.8])),
                          frequency_penalty=float(rng.choice([0.0, 0.7])),
                          presence_penalty=float(rng.choice([0.0, 1.0])),
                          repeat_last_n=int(rng.choice([0, 4, 64, -1])), penalize_nl=bool(rng.integers(0, 2)),
                          repeat_penalty_slope=float(rng.choice([1.0, 0.5])))
        newline = int(rng.integers(0, n)) if rng.integers(0, 2) else None
        sampler = Sampler(params, n, newline_token=newline)
        recent = rng.integers(0, n, rng.integers(0, 8)).tolist()
        expected = _outcome(lambda: _greedy_of_the_whole_vocabulary(sampler, logits, recent))
        assert _outcome(lambda: sampler.sample(logits, recent)) == expected, (case, logits, bias, recent, newline)
        assert _outcome(lambda: sampler.sample(logits.astype(np.float64), recent)) == expected   # the full path
        if isinstance(expected, str):
            kinds["error"] += 1
        elif expected in set(bias) | set(recent) | {newline}:
            kinds["touched best"] += 1
        else:
            kinds["plain"] += 1
    assert min(kinds.values()) >= 20, kinds   # every branch was exercised


def test_greedy_on_a_real_vocabulary_size_with_a_banned_top_token():
    logits = np.random.default_rng(0).standard_normal(151936).astype(np.float32)
    top = int(np.argmax(logits))
    sampler = Sampler(disabled(temperature=0.0, logit_bias={top: -np.inf}), logits.size)
    second = int(np.argsort(logits)[-2])
    assert sampler.sample(logits, [top, 5, 5]) == second
    assert logits[top] == logits.max()   # the caller's logits are left alone


def test_repeat_window_and_penalize_nl():
    logits = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)

    def penalized(last_n, **kw):
        sampler = Sampler(disabled(repeat_penalty=2.0, repeat_last_n=last_n), 4, **kw)
        return sampler.candidates(logits, [0, 1, 2]).logits.tolist()

    assert penalized(2) == [1.0, 0.5, 0.5, 1.0]
    assert penalized(-1) == [0.5, 0.5, 0.5, 1.0]
    assert penalized(0) == [1.0, 1.0, 1.0, 1.0]
    no_nl = Sampler(disabled(repeat_penalty=2.0, penalize_nl=False), 4, newline_token=1)
    assert no_nl.candidates(logits, [0, 1, 2]).logits.tolist() == [0.5, 1.0, 0.5, 1.0]
    assert penalized(-1, newline_token=1) == [0.5, 0.5, 0.5, 1.0]   # penalize_nl=True: newline penalized too


def test_chain_order_top_k_before_min_p_and_temperature_last():
    # top_k=2 keeps tokens 0,1; the draw frequencies follow their renormalized probabilities at temperature 1.
    sampler = Sampler(disabled(top_k=2), 4, seed=7)
    logits = np.log(PROBS_4).astype(np.float32)
    draws = np.bincount([sampler.sample(logits, []) for _ in range(3000)], minlength=4)
    assert draws[2] == draws[3] == 0
    assert draws[0] / 3000 == pytest.approx(0.625, abs=0.03)
    # a high temperature applied last flattens what min_p kept but does not bring back what it removed
    sampler = Sampler(disabled(min_p=0.4, temperature=5.0), 4, seed=7)
    draws = np.bincount([sampler.sample(logits, []) for _ in range(3000)], minlength=4)
    assert draws[2] == draws[3] == 0
    flat = np.exp(np.log([0.5, 0.3]) / 5.0)
    assert draws[0] / 3000 == pytest.approx(flat[0] / flat.sum(), abs=0.03)


def test_draw_frequencies_match_probabilities():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    cands = cands_from_probs(probs)
    rng = np.random.Generator(np.random.PCG64(2024))
    n = 20000
    counts = np.bincount([S.draw(cands, rng) for _ in range(n)], minlength=5)
    chi_square = float(np.sum((counts - n * probs) ** 2 / (n * probs)))
    assert chi_square < 18.47   # 4 degrees of freedom, p = 0.001


def test_seeded_sampling_is_reproducible():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, 500)).astype(np.float32) * 2

    def run(seed, **kw):
        sampler = Sampler(SamplingParams(seed=seed, **kw), 500)
        history = []
        for row in rows:
            history.append(sampler.sample(row, history))
        return history

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(42, mirostat_mode=2) == run(42, mirostat_mode=2)
    # The explicit seed argument overrides params.seed; reset() restarts the sequence.
    a = Sampler(SamplingParams(seed=1), 500, seed=42)
    first = [a.sample(row) for row in rows[:5]]
    a.reset()
    assert [a.sample(row) for row in rows[:5]] == first
    random_seeded = Sampler(SamplingParams(seed=-1), 500)
    assert 0 <= random_seeded.seed < 2 ** 32


def test_seeded_draws_are_pinned():
    # PCG64 + Generator.random() is a fixed, platform-independent stream: these values hold on every machine.
    assert np.random.Generator(np.random.PCG64(7)).random(2).tolist() == pytest.approx(
        [0.625095466604667, 0.8972138009695755], abs=1e-15)
    cands = cands_from_probs([0.4, 0.25, 0.2, 0.1, 0.05])
    rng = np.random.Generator(np.random.PCG64(7))
    # u = 0.625 falls in (0.4, 0.65] -> token 1; u = 0.897 in (0.85, 0.95] -> token 3; ...
    assert [S.draw(cands, rng) for _ in range(12)] == [1, 3, 2, 0, 0, 3, 0, 2, 2, 1, 0, 0]


def test_mirostat_state_lives_in_the_sampler():
    logits = (-1.5 * np.log(np.arange(1, 301))).astype(np.float32)
    for mode in (1, 2):
        sampler = Sampler(SamplingParams(mirostat_mode=mode, temperature=1.0, repeat_penalty=1.0, seed=3), 300)
        assert sampler.mirostat_mu == 10.0
        sampler.sample(logits)
        moved = sampler.mirostat_mu
        assert moved != 10.0
        sampler.reset()
        assert sampler.mirostat_mu == 10.0


def test_sampler_rejects_bad_inputs():
    sampler = Sampler(SamplingParams(seed=0), 8)
    with pytest.raises(SamplingError, match="shape"):
        sampler.sample(np.zeros(7, dtype=np.float32))
    with pytest.raises(SamplingError, match="NaN"):
        sampler.sample(np.full(8, np.nan, dtype=np.float32))
    with pytest.raises(SamplingError, match="recent token"):
        sampler.sample(np.zeros(8, dtype=np.float32), [8])
    with pytest.raises(SamplingError, match="banned"):
        Sampler(disabled(logit_bias={i: float("-inf") for i in range(8)}), 8).sample(np.zeros(8, np.float32))
    with pytest.raises(SamplingError, match="out of range"):
        Sampler(SamplingParams(logit_bias={8: 1.0}), 8)
    with pytest.raises(SamplingError, match="n_vocab"):
        Sampler(SamplingParams(), 0)


def test_banned_tokens_are_never_drawn():
    sampler = Sampler(disabled(logit_bias={0: float("-inf")}), 4, seed=5)
    logits = np.array([5.0, 0.0, 0.0, 0.0], dtype=np.float32)
    assert 0 not in {sampler.sample(logits) for _ in range(200)}


def test_large_vocabulary_default_chain_is_fast_enough():
    import time
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=262_144) * 3).astype(np.float32)
    sampler = Sampler(SamplingParams(seed=9), 262_144)
    start = time.perf_counter()
    tokens = [sampler.sample(logits, list(range(64))) for _ in range(10)]
    assert (time.perf_counter() - start) / 10 < 0.1
    top40 = set(np.argsort(-logits)[:40].tolist())
    assert set(tokens) <= top40


# ---------------------------------------------------------------------------------------------- logprobs

def test_log_softmax_and_top_logprobs():
    logits = np.array([2.0, 1.0, 0.0, 1.0], dtype=np.float32)
    logprobs = S.log_softmax(logits)
    assert float(np.exp(logprobs.astype(np.float64)).sum()) == pytest.approx(1.0, abs=1e-6)
    norm = math.log(math.exp(2) + 2 * math.e + 1)
    top = S.top_logprobs(logits, 3)
    assert [t for t, _ in top] == [0, 1, 3]
    assert [v for _, v in top] == pytest.approx([2 - norm, 1 - norm, 1 - norm], abs=1e-6)
    assert S.top_logprobs(logits, 0) == []
    assert len(S.top_logprobs(logits, 10)) == 4
    with pytest.raises(SamplingError):
        S.top_logprobs(logits, -1)


def test_top_a_keeps_tokens_above_a_times_p_max_squared():
    """KoboldCpp's Top-A: p = [0.5, 0.3, 0.15, 0.05]: a=1 keeps p >= 0.25, a=0.5 keeps p >= 0.125, 0 keeps all."""
    from ggml_backend.generation.sampling import Candidates, top_a
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    candidates = Candidates(np.arange(4, dtype=np.int32), logits)
    assert list(top_a(candidates, 1.0).ids) == [0, 1]
    assert list(top_a(candidates, 0.5).ids) == [0, 1, 2]
    assert top_a(candidates, 0.0) is candidates
    with pytest.raises(SamplingError, match="top_a"):
        SamplingParams(top_a=-1)


def test_repeat_penalty_slope_eases_the_older_half_of_the_window():
    """KoboldCpp's rep_pen_slope: a token seen only in the older half of the window gets 1 + (penalty-1)*slope,
    one in the newer half the whole penalty; slope 1 is the plain penalty."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    window = [0, 0, 1, 1]   # token 0 only in the older half, token 1 in the newer half

    def penalized(slope):
        sampler = Sampler(SamplingParams(repeat_penalty=1.5, repeat_penalty_slope=slope, repeat_last_n=4,
                                         temperature=0), n_vocab=4, seed=1)
        return sampler.candidates(logits, window).logits
    eased = penalized(0.5)
    assert eased[0] == pytest.approx(logits[0] * 1.25) and eased[1] == pytest.approx(logits[1] * 1.5)
    assert penalized(0.0)[0] == pytest.approx(logits[0])
    assert penalized(1.0)[0] == pytest.approx(logits[0] * 1.5)
    with pytest.raises(SamplingError, match="repeat_penalty_slope"):
        SamplingParams(repeat_penalty_slope=1.5)


def test_the_random_seed_rule_is_one_function():
    # None, -1 and llama.cpp's LLAMA_DEFAULT_SEED (-1 as a uint32) all mean "random", kept as None
    for random_seed in (None, -1, S.LLAMA_DEFAULT_SEED):
        assert S.seed_is_random(random_seed) and S.normalize_seed(random_seed) is None
        assert SamplingParams(seed=random_seed).seed is None
    assert S.normalize_seed(0) == 0 and SamplingParams(seed=2 ** 32).seed == 2 ** 32
    with pytest.raises(SamplingError, match="seed must be >= 0, or -1/None"):
        SamplingParams(seed=-2)
    with pytest.raises(SamplingError, match="seed must be >= 0, or -1/None"):
        Sampler(SamplingParams(), 10, seed=-3)
    # a random seed is drawn and kept; a fixed one is used as given
    assert 0 <= Sampler(SamplingParams(seed=S.LLAMA_DEFAULT_SEED), 10).seed < 2 ** 32
    assert Sampler(SamplingParams(), 10, seed=5).seed == 5
    # the seeds of n choices: base + i, never the random value, random when the base is
    assert [S.derived_seed(S.LLAMA_DEFAULT_SEED - 2, i) for i in range(3)] == [2 ** 32 - 3, 2 ** 32 - 2, 0]
    assert S.derived_seed(None, 4) is None


def test_sample_reuses_its_working_copy_without_touching_earlier_results():
    """``sample`` works in a buffer of the sampler's own (no fresh vocabulary-sized arrays per token): candidates
    handed out earlier, and the caller's logits, stay as they were; each call sees only its own logits."""
    rng = np.random.default_rng(3)
    sampler = Sampler(SamplingParams(temperature=0, logit_bias={5: 50.0}, repeat_penalty=1.3), n_vocab=64)
    first = rng.standard_normal(64).astype(np.float32)
    kept = sampler.candidates(first, [1, 2])
    kept_logits = kept.logits.copy()
    second = rng.standard_normal(64).astype(np.float32)
    second_before = second.copy()
    assert sampler.sample(second, [7]) == 5                       # the bias wins
    second[5] = -100.0
    expected = second.copy()
    expected[7] = expected[7] * np.float32(1.3) if expected[7] <= 0 else expected[7] / np.float32(1.3)
    assert sampler.sample(second, [7]) == int(np.argmax(expected))
    np.testing.assert_array_equal(kept.logits, kept_logits)
    second[5] = second_before[5]
    np.testing.assert_array_equal(second, second_before)          # the caller's array is never written
    with pytest.raises(ValueError):
        kept.ids[0] = 1                                           # the shared ids are read-only
    for bad in (np.nan, np.inf):
        logits = second.copy()
        logits[10] = bad
        with pytest.raises(SamplingError, match="NaN or \\+inf"):
            sampler.sample(logits, [])

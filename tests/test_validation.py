"""One validation pass before the engine is built: a model file whose hyper-parameters or tensors do not make a
runnable model raises ModelFileError naming the key or tensor, the value and what was expected (not a KeyError,
ZeroDivisionError, numpy broadcast error, or a gigabyte allocation); API and CLI arguments are checked by name."""
from __future__ import annotations

import numpy as np
import pytest

import ggml_backend
from ggml_backend import Llama
from ggml_backend.cli.main import main
from ggml_backend.formats import GGUFValueType, ModelFileError, write_gguf
from ggml_backend.generation import Sampler, SamplingParams
from refdata import synthetic_file


def _rewrite(tmp_path, *, metadata=None, drop=(), replace=None, name="bad.gguf"):
    """The synthetic q4_0 model written again with changed metadata or tensors."""
    source = ggml_backend.load(synthetic_file("q4_0"))
    values = dict(source.metadata)
    types = dict(source.metadata_types)
    for key, value in (metadata or {}).items():
        values[key] = value
        types.pop(key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2 ** 32:
            types[key] = GGUFValueType.UINT64
    tensors = []
    for t in source.tensors.values():
        if t.name in drop:
            continue
        if replace and t.name in replace:
            tensors.append(replace[t.name])
        else:
            tensors.append((t.name, t.type, t.shape, t.data))
    path = tmp_path / name
    write_gguf(path, values, tensors, value_types=types)
    return path


BAD_HPARAMS = [
    ({"llama.block_count": 2 ** 32}, r"llama.block_count = 4294967296 \(int\); expected an integer from 1 to 4096"),
    ({"llama.block_count": 9}, r"block_count = 9 .*at most the number of blocks in the file, which holds tensors "
                               r"for 4 blocks \(blk.0 to blk.3\)"),
    ({"llama.rope.dimension_count": 2 ** 31}, r"rope.dimension_count = 2147483648 .*expected an integer from 2 "
                                              r"to 32"),
    ({"llama.attention.head_count": 0}, r"attention.head_count = 0 .*expected an integer from 1"),
    ({"llama.attention.head_count": 3, "llama.attention.head_count_kv": 1},
     r"attention.head_count = 3 .*a divisor of embedding_length = 256"),
    ({"llama.attention.head_count_kv": 3}, r"head_count_kv = 3 .*a divisor of attention.head_count = 8"),
    ({"llama.attention.head_count_kv": 16}, r"head_count_kv = 16 .*from 1 to 8"),
    ({"llama.embedding_length": 0}, r"embedding_length = 0 .*from 1 to"),
    ({"llama.embedding_length": 128, "llama.rope.dimension_count": 16}, r"tensor token_embd.weight has shape \(4096, 256\); the hyper-parameters "
                                      r"imply \(4096, 128\)"),
    ({"llama.embedding_length": "256"}, r"embedding_length = '256' \(str\); expected an integer"),
    ({"llama.feed_forward_length": 512}, r"blk.0.ffn_gate.weight has shape \(768, 256\); .* imply \(512, 256\)"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, r"layer_norm_rms_epsilon = nan .*finite"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5}, r"layer_norm_rms_epsilon = -[0-9.e-]+ \(float\); expected a finite number > 0"),
    ({"llama.rope.freq_base": float("inf")}, r"rope.freq_base = inf"),
    ({"llama.context_length": 2 ** 31}, r"context_length = 2147483648 .*from 1 to 16777216"),
    ({"general.architecture": "mamba"}, r"general.architecture = 'mamba'; expected one of llama, qwen2, gemma3"),
]


@pytest.mark.parametrize("changes, message", BAD_HPARAMS, ids=[str(c) for c, _ in BAD_HPARAMS])
def test_bad_hyper_parameters_are_named(tmp_path, changes, message):
    path = _rewrite(tmp_path, metadata=changes)
    with pytest.raises(ModelFileError, match=message) as info:
        Llama(str(path), n_ctx=32, verbose=False)
    assert str(info.value).startswith(str(path))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    path = _rewrite(tmp_path, drop={"blk.2.ffn_up.weight"})
    with pytest.raises(ModelFileError, match=r"tensor blk.2.ffn_up.weight is missing; the llama architecture "
                                             r"needs it, with shape \(768, 256\)"):
        Llama(str(path), n_ctx=32, verbose=False)
    norm = np.ones(128, np.float32)
    path = _rewrite(tmp_path, replace={"blk.1.attn_norm.weight": ("blk.1.attn_norm.weight", "f32", (128,),
                                                                  norm.view(np.uint8))}, name="norm.gguf")
    with pytest.raises(ModelFileError, match=r"tensor blk.1.attn_norm.weight has shape \(128,\); the "
                                             r"hyper-parameters imply \(256,\)"):
        Llama(str(path), n_ctx=32, verbose=False)
    path = _rewrite(tmp_path, drop={"token_embd.weight"}, name="noembd.gguf")
    with pytest.raises(ModelFileError, match="tensor token_embd.weight is missing"):
        Llama(str(path), n_ctx=32, verbose=False)


def test_a_context_that_would_not_fit_in_memory_is_refused_before_allocating(capsys):
    model = str(synthetic_file("q4_0"))
    with pytest.raises(ValueError, match=r"n_ctx=1000000000 needs .* TiB of memory \(KV cache .* TiB.*\), more "
                                         r"than the .* available; use a smaller context size"):
        Llama(model, n_ctx=1_000_000_000, verbose=False)
    assert main(["run", "-m", model, "-c", "1000000000", "-p", "hi", "-n", "1", "--log-disable"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_ctx=1000000000 needs" in err[0] and "Traceback" not in err[0]


def test_api_arguments_are_checked_by_name():
    llm = Llama(str(synthetic_file("q4_0")), n_ctx=64, n_threads=1000, verbose=False)
    import numba
    assert llm.n_threads == numba.config.NUMBA_NUM_THREADS    # the threads that run, not the 1000 asked
    llm.eval([])                                              # nothing to do (was ZeroDivisionError)
    assert llm.n_tokens == 0
    with pytest.raises(TypeError, match="stop must be a string or a list of strings, got int"):
        llm("Hello", max_tokens=2, stop=123)
    with pytest.raises(ValueError, match="logit_bias must be a mapping"):
        llm("Hello", max_tokens=2, logit_bias=[1, 2])
    with pytest.raises(TypeError, match="max_tokens must be an integer, got str"):
        llm("Hello", max_tokens="5")
    with pytest.raises(TypeError, match=r"tokens\[1\] must be an integer token id"):
        llm.eval([1, "x"])
    with pytest.raises(TypeError, match="stop must be"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1, stop=123)
    for kwargs, message in (({"n_ctx": -1}, "n_ctx must be >= 0"), ({"n_batch": 0}, "n_batch must be >= 1"),
                            ({"n_threads": 0}, "n_threads must be >= 1"),
                            ({"rope_freq_base": float("nan")}, "rope_freq_base must be a finite number"),
                            ({"n_ctx": 1.5}, "n_ctx must be an integer")):
        with pytest.raises((TypeError, ValueError), match=message):
            Llama(str(synthetic_file("q4_0")), verbose=False, **kwargs)
    assert llm("Hello", max_tokens=2, temperature=0, stop=["zzz"])["choices"][0]["finish_reason"] in ("length",
                                                                                                    "stop")


@pytest.mark.parametrize("mode", [1, 2])
def test_a_huge_mirostat_learning_rate_does_not_overflow(mode):
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingParams(mirostat_mode=mode, mirostat_eta=1e30, mirostat_tau=5.0, seed=1), n_vocab=500)
    for _ in range(20):                                       # mu swings to +-1e30 and back
        assert 0 <= sampler.sample(rng.normal(size=500).astype(np.float32) * 5) < 500


def test_cli_run_mirostat_lr_1e30(capsys):
    assert main(["run", "-m", str(synthetic_file("q4_0")), "-p", "Hello", "-n", "4", "--mirostat", "1",
                 "--mirostat-lr", "1e30", "-s", "1", "--log-disable"]) == 0


def test_a_bad_file_on_the_command_line_is_one_line_unless_verbose(tmp_path, capsys):
    path = _rewrite(tmp_path, metadata={"llama.block_count": 2 ** 31})
    assert main(["run", "-m", str(path), "-p", "hi", "-n", "1", "--log-disable"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"ggml-backend run: error: {path}: metadata llama.block_count = 2147483648 (int); expected an "
                   "integer from 1 to 4096"]
    assert main(["run", "-m", str(path), "-p", "hi", "-n", "1", "--log-disable", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_memory_estimate_of_the_default_context_is_modest():
    from ggml_backend.model.validate import build_hparams, memory_needed
    hp = build_hparams(ggml_backend.load(synthetic_file("q4_0")))
    needs = memory_needed(hp, 2048, 512, logits_all=False)
    assert needs["KV cache"] == 4 * 8 * 2048 * (32 + 32) * 2          # n_layer * n_head_kv * n_ctx * dims * f16
    assert memory_needed(hp, 2048, 512, False, ("q8_0", "f32"))["KV cache"] == 4 * 8 * 2048 * 32 * (34 / 32 + 4)
    assert sum(needs.values()) < 64 << 20

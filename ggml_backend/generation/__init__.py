"""Generation helpers: the sampler chain (``sampling``) and the text side of streaming (``stopping``)."""
from .sampling import (LLAMA_DEFAULT_SEED, Candidates, Sampler, SamplingError, SamplingParams, derived_seed,
                       log_softmax, normalize_seed, seed_is_random, top_logprobs)
from .stopping import StopStringMatcher, TextStreamer, Utf8Holdback

__all__ = [
    "LLAMA_DEFAULT_SEED", "Candidates", "Sampler", "SamplingError", "SamplingParams", "derived_seed", "log_softmax",
    "normalize_seed", "seed_is_random", "top_logprobs",
    "StopStringMatcher", "TextStreamer", "Utf8Holdback",
]

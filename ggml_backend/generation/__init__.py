"""Generation helpers: the sampler chain (``sampling``) and the token-to-text stream (``stopping``)."""
from .sampling import (LLAMA_DEFAULT_SEED, Candidates, Sampler, SamplingError, SamplingParams, derived_seed,
                       log_softmax, normalize_seed, seed_is_random, top_logprobs)
from .stopping import (StopReason, StopStringMatcher, TextStreamer, TokenTextStream, Utf8Holdback,
                       finish_reason)

__all__ = [
    "LLAMA_DEFAULT_SEED", "Candidates", "Sampler", "SamplingError", "SamplingParams", "derived_seed", "log_softmax",
    "normalize_seed", "seed_is_random", "top_logprobs",
    "StopReason", "StopStringMatcher", "TextStreamer", "TokenTextStream", "Utf8Holdback", "finish_reason",
]

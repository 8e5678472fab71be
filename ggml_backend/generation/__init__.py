"""Generation helpers: the sampler chain (``sampling``) and the token-to-text stream (``stopping``)."""
from .sampling import (Candidates, Sampler, SamplingError, SamplingParams, log_softmax, top_logprobs)
from .stopping import (StopReason, StopStringMatcher, TextStreamer, TokenTextStream, Utf8Holdback,
                       finish_reason)

__all__ = [
    "Candidates", "Sampler", "SamplingError", "SamplingParams", "log_softmax", "top_logprobs",
    "StopReason", "StopStringMatcher", "TextStreamer", "TokenTextStream", "Utf8Holdback", "finish_reason",
]

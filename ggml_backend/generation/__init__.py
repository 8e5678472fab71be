"""Generation helpers: the sampler chain (``sampling``) and the text side of streaming (``stopping``)."""
from .sampling import (Candidates, Sampler, SamplingError, SamplingParams, log_softmax, top_logprobs)
from .stopping import StopStringMatcher, TextStreamer, Utf8Holdback

__all__ = [
    "Candidates", "Sampler", "SamplingError", "SamplingParams", "log_softmax", "top_logprobs",
    "StopStringMatcher", "TextStreamer", "Utf8Holdback",
]

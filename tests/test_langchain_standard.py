"""LangChain's standard chat-model tests (langchain-tests) run against ChatGGML on the real default model.

The suite skips some of its own tests, with its own short reasons; why each does not apply here:
- "Model does not support PDF / audio / image ..." and "... Anthropic inputs": the models are text-only;
- "VCR not set up": the benchmark replays recorded HTTP cassettes, and ChatGGML makes no HTTP calls;
- "init_from_env_params not specified": ChatGGML reads no settings from environment variables;
- "Model is not serializable": ChatGGML is not registered for LangChain's dumpd/load (a loaded model file);
- "model_override_value not specified": ``model=`` at call time does choose another model file, but the suite then
  expects the given value inside ``response_metadata["model_name"]``, which here is the file's stem, not its path;
  the override itself is tested in test_langchain_chat.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests is a dev dependency (pip install -e '.[dev]')")

try:
    import langchain_ggml  # noqa: F401
except ImportError:   # not installed as a package yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "langchain"))

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from langchain_ggml import ChatGGML  # noqa: E402

# The standard async tests are coroutines: run them with anyio's pytest plugin (anyio comes with langchain-core's
# httpx dependency), which, unlike a module-wide asyncio mark, leaves the synchronous tests alone.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

# One n_ctx for every LangChain test module, so they all share one loaded model.
N_CTX = 1024
# Enough for a short greeting and for a forced tool call (the joke schema of the structured-output tests
# included); long answers are cut, which the standard tests allow. 40 cut the unicode tool call's free-text
# description mid-JSON on an AVX2-only Zen 3 (3 December 2026), whose float sums steer greedy decoding to a
# longer description; this file took 93 s with 40 and 101 s with 64 there.
MAX_TOKENS = 64


class TestChatGGMLUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatGGML]:
        return ChatGGML

    @property
    def chat_model_params(self) -> dict:
        # no max_tokens here: test_standard_params passes its own
        return {"n_ctx": N_CTX, "temperature": 0}


class TestChatGGMLIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatGGML]:
        return ChatGGML

    @property
    def chat_model_params(self) -> dict:
        # a mild repetition penalty: greedy Qwen2.5-Coder-0.5B otherwise loops on a sentence (the JSON-mode joke's
        # setup never reaches its punchline within MAX_TOKENS)
        return {"n_ctx": N_CTX, "max_tokens": MAX_TOKENS, "temperature": 0, "repeat_penalty": 1.15}

    @property
    def supports_json_mode(self) -> bool:
        return True   # with_structured_output(method="json_mode") constrains the reply to a JSON object

"""LangChain's standard chat-model tests (langchain-tests) run against ChatGGML on the real default model.

The suite skips some of its own tests with short reasons of its own ("VCR not set up", "Model is not
serializable", ...); ``DO_NOT_APPLY`` skips each of them first, saying why it does not apply here, and the model
override runs in the form that applies (``model_name`` is the file's stem, not the value given).
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

TEXT_ONLY = "the models this engine runs (Llama, Qwen2, Gemma 3 text) take text only: no {} input"
OVERRIDE = ("wants the value given to model= inside response_metadata['model_name'], which names the model file by "
            "its stem here: the same calls with that name asserted are test_model_file_override_{}")
#: standard tests that the suite itself skips here with a short reason of its own, and why each does not apply
#: (langchain-tests forbids overriding its tests except as xfail, so the skip is made by the fixture below)
DO_NOT_APPLY = {
    "test_init_from_env": "ChatGGML reads no settings from environment variables (no API key, no endpoint: every "
                          "setting is a constructor argument)",
    "test_serdes": "ChatGGML is not registered for LangChain's dumpd/load: it holds a loaded model file, which is "
                   "rebuilt from its path, not deserialized",
    "test_invoke_with_model_override": OVERRIDE.format("sync"),
    "test_stream_with_model_override": OVERRIDE.format("sync"),
    "test_ainvoke_with_model_override": OVERRIDE.format("async"),
    "test_astream_with_model_override": OVERRIDE.format("async"),
    "test_pdf_inputs": TEXT_ONLY.format("PDF"),
    "test_audio_inputs": TEXT_ONLY.format("audio"),
    "test_image_inputs": TEXT_ONLY.format("image"),
    "test_image_tool_message": TEXT_ONLY.format("image (in a tool message)"),
    "test_pdf_tool_message": TEXT_ONLY.format("PDF (in a tool message)"),
    "test_anthropic_inputs": "Anthropic's message format (content blocks with images and documents) is for "
                             "Anthropic's models; ChatGGML takes LangChain's text messages",
    "test_stream_time": "a benchmark that replays recorded HTTP cassettes (VCR); ChatGGML makes no HTTP calls",
}


@pytest.fixture(autouse=True)
def _skip_what_does_not_apply(request):
    reason = DO_NOT_APPLY.get(request.node.originalname)
    if reason:
        pytest.skip(reason=reason)


def _other_model() -> str:
    """The model file that ``model=`` asks for in the override tests: Gemma 3 270M (a dev dependency)."""
    from ggml_backend.default_model import gemma_model_path
    try:
        return str(gemma_model_path())
    except FileNotFoundError as exc:
        pytest.skip(reason=f"the override needs a second model file: {exc}")


def _joined(chunks):
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full

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

    # the suite's override tests, with the model file's stem as the name the reply reports (see DO_NOT_APPLY)
    def test_model_file_override_sync(self, model) -> None:
        other = _other_model()
        assert model.invoke("Hello", model=other, max_tokens=4).response_metadata["model_name"] == Path(other).stem
        chunks = list(model.stream("Hello", model=other, max_tokens=4))
        assert _joined(chunks).response_metadata["model_name"] == Path(other).stem

    async def test_model_file_override_async(self, model) -> None:
        other = _other_model()
        reply = await model.ainvoke("Hello", model=other, max_tokens=4)
        assert reply.response_metadata["model_name"] == Path(other).stem
        chunks = [chunk async for chunk in model.astream("Hello", model=other, max_tokens=4)]
        assert _joined(chunks).response_metadata["model_name"] == Path(other).stem

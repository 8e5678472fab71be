"""The examples in examples/ run on the real default model (small limits) and do what they claim."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_core", reason="langchain-core is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
try:
    import langchain_ggml  # noqa: F401
except ImportError:   # not installed as a package yet: use the source tree
    sys.path.insert(0, str(ROOT / "integrations" / "langchain"))

N_CTX = "1024"   # the same as the LangChain tests: one model load for all of them


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_lcel_chain_writes_a_function(capsys):
    code = load_example("lcel_chain").main(["--max-tokens", "24", "--n-ctx", N_CTX])
    assert "def " in code
    assert "```" not in code          # the stop string ended the code block and was cut
    assert code in capsys.readouterr().out


def test_chat_with_memory_remembers_the_name():
    example = load_example("chat_with_memory")
    chain, histories = example.build_chat(max_tokens=16, n_ctx=int(N_CTX))
    config = {"configurable": {"session_id": "t"}}
    chain.invoke({"input": "Hi! My name is Zorblat."}, config=config)
    reply = chain.invoke({"input": "What is my name?"}, config=config).content
    assert "Zorblat" in reply
    assert len(histories["t"].messages) == 4           # two turns, each a question and an answer
    fresh = chain.invoke({"input": "What is my name?"}, config={"configurable": {"session_id": "other"}})
    assert "Zorblat" not in fresh.content               # memory is per session


def test_agent_calculator_task_uses_the_tool(tmp_path):
    example = load_example("agent_prototype")
    assert example.calculator.invoke({"expression": "23 * 47"}) == "1081"
    assert example.calculator.invoke({"expression": "__import__('os')"}).startswith("Error")
    (tmp_path / "a.txt").write_text("x")
    assert example.list_files.invoke({"directory": str(tmp_path)}) == "a.txt"

    results = example.main(["--tasks", "multiply", "--max-tokens", "40", "--n-ctx", N_CTX])
    run = results["multiply"][0]
    task = example.make_tasks(str(tmp_path))[0]
    assert [call["name"] for call in run.tool_calls][:1] == ["calculator"]
    tool_results = [m.content for m in run.messages if m.type == "tool"]
    assert tool_results and tool_results[0] == "1081"   # a real call, really executed
    assert run.final_answer is not None and "1081" in run.final_answer
    assert run.completes(task)

"""A chat that remembers: ChatGGML with RunnableWithMessageHistory and an in-memory history per session.

    python examples/chat_with_memory.py --name Ada
"""
from __future__ import annotations

import argparse

from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

from langchain_ggml import ChatGGML


def build_chat(max_tokens: int = 32, model_path: str | None = None, n_ctx: int = 1024):
    """(the chain with memory, the histories it keeps by session id)."""
    prompt = ChatPromptTemplate.from_messages([
        ("system", "You are a helpful assistant. Answer in one short sentence."),
        MessagesPlaceholder("history"),
        ("human", "{input}"),
    ])
    chat = ChatGGML(model_path=model_path, n_ctx=n_ctx, max_tokens=max_tokens, temperature=0)
    histories: dict[str, InMemoryChatMessageHistory] = {}

    def history_for(session_id: str) -> InMemoryChatMessageHistory:
        return histories.setdefault(session_id, InMemoryChatMessageHistory())

    chain = RunnableWithMessageHistory(prompt | chat, history_for, input_messages_key="input",
                                       history_messages_key="history")
    return chain, histories


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="Ada")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-ctx", type=int, default=1024)
    args = parser.parse_args(argv)
    chain, _ = build_chat(args.max_tokens, args.model, args.n_ctx)
    config = {"configurable": {"session_id": "demo"}}
    replies = []
    for text in (f"Hi! My name is {args.name}.", "What is my name?"):
        reply = chain.invoke({"input": text}, config=config).content
        print(f"user: {text}\nassistant: {reply}\n")
        replies.append(reply)
    return replies


if __name__ == "__main__":
    main()

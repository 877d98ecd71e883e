"""Test helpers for crews: a scripted model that answers without a server.

Unit tests of a crew's own logic use :class:`ScriptedModel`; integration tests talk to the real
llama-server. ``ScriptedModel`` satisfies :class:`typhon.models.ModelClient`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from typhon._types import Usage
from typhon.config import TyphonConfig
from typhon.models import ChatResult, ChatStream, Message, ModelClient, ModelRegistry

__all__ = ["ScriptedModel", "ScriptedModels"]

Reply = str | Callable[[Sequence[Message]], str] | BaseException


class ScriptedModel:
    """Answers from a script: each call takes the next reply (a string, a function of the
    messages, or an exception to raise); the last reply repeats once the script runs out."""

    def __init__(self, *replies: Reply, alias: str = "scripted", url: str = "scripted://"):
        if not replies:
            raise ValueError("give at least one reply")
        self.alias = alias
        self.url = url
        self._replies = list(replies)
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _next(self, messages: Sequence[Message]) -> str:
        with self._lock:
            reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply(messages) if callable(reply) else reply

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        self.calls.append({"messages": list(messages), "max_tokens": max_tokens, "tools": tools})
        text = self._next(messages)
        words = sum(len(str(m.get("content") or "").split()) for m in messages)
        return ChatResult(text, Usage(words, len(text.split()), 1, 0.0), self.alias, "stop")

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        result = self.chat(messages, max_tokens=max_tokens, temperature=temperature)

        def chunks() -> Iterator[str]:
            for word in result.content.split(" "):
                yield word + " "

        return ChatStream(chunks(), lambda: result)


class ScriptedModels(ModelRegistry):
    """A model registry whose every alias answers with the same client (a ScriptedModel):
    ``Typhon(config, models=ScriptedModels(config, ScriptedModel("hi")))``."""

    def __init__(self, config: TyphonConfig, model: ModelClient):
        super().__init__(config)
        self.model = model
        self.asked: list[str] = []

    def client(self, alias: str) -> ModelClient:
        self.asked.append(alias)
        return self.model

"""CrewAI glue: an LLM that calls Typhon's model client, and CrewAI's offline settings.

Importing this module imports crewai (5-9 s); only crews that run import it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Offline: no telemetry, no tracing, no version check. Never OTEL_SDK_DISABLED (ours would die too).
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("CREWAI_DISABLE_VERSION_CHECK", "true")

from crewai.llms.base_llm import BaseLLM
from pydantic import PrivateAttr

from typhon.errors import ModelError
from typhon.models import ModelClient

__all__ = ["TyphonLLM", "prepare_crewai"]


def prepare_crewai(home: Path) -> None:
    """Keep CrewAI's files under $TYPHON_HOME and its chatter out of our logs."""
    os.environ.setdefault("CREWAI_STORAGE_DIR", str(home / "crewai"))
    for name in ("crewai", "LiteLLM", "httpx", "chromadb"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _plain(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        return {"role": "user", "content": str(message)}
    out = {
        k: message[k]
        for k in ("role", "content", "tool_calls", "tool_call_id", "name")
        if k in message and message[k] is not None
    }
    if not isinstance(out.get("content", ""), str):
        out["content"] = json.dumps(out["content"])
    return out


class TyphonLLM(BaseLLM):
    """A CrewAI LLM whose every call goes through a Typhon :class:`ModelClient`, so usage,
    retries, cancellation and errors are handled the same as for any other crew."""

    llm_type: str = "typhon"
    context_window: int = 8192
    _client: Any = PrivateAttr(default=None)
    _errors: list[ModelError] = PrivateAttr(default_factory=list)
    _on_agent: Any = PrivateAttr(default=None)
    _agent: str | None = PrivateAttr(default=None)

    @classmethod
    def wrap(
        cls,
        client: ModelClient,
        *,
        max_tokens: int,
        temperature: float,
        context_window: int = 8192,
        on_agent: Callable[[str], None] | None = None,
    ) -> TyphonLLM:
        """``on_agent(role)`` is called when a new agent makes its first model call."""
        llm = cls(
            model=client.alias,
            max_tokens=max_tokens,
            temperature=temperature,
            context_window=context_window,
        )
        llm._client = client
        llm._on_agent = on_agent
        return llm

    @property
    def model_errors(self) -> list[ModelError]:
        """Model errors raised during the crew (CrewAI may wrap or swallow them)."""
        return list(self._errors)

    def supports_function_calling(self) -> bool:
        return True

    def get_context_window_size(self) -> int:
        return self.context_window

    def call(
        self,
        messages: Any,
        tools: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Callable[..., Any]] | None = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        role = getattr(from_agent, "role", None)
        if role and role != self._agent:
            self._agent = role
            if self._on_agent is not None:
                self._on_agent(str(role).lower())
        try:
            result = self._client.chat(
                [_plain(m) for m in messages],
                max_tokens=int(self.max_tokens) if self.max_tokens else None,
                temperature=self.temperature,
                tools=tools or None,
                stop=self.stop or None,
            )
        except ModelError as exc:
            self._errors.append(exc)
            raise
        if result.tool_calls:
            if not available_functions:
                return result.tool_calls
            call = result.tool_calls[0].get("function", {})
            fn = available_functions.get(call.get("name", ""))
            if fn is not None:
                try:
                    args = json.loads(call.get("arguments") or "{}")
                except ValueError:
                    args = {}
                return fn(**args)
        return self._apply_stop_words(result.content)

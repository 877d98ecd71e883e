"""Models: the registry of aliases, OpenAI-compatible clients, the local llama-server, routing."""

from typhon.models._client import (
    ChatResult,
    ChatStream,
    Message,
    ModelClient,
    OpenAICompatibleClient,
    RecordingClient,
    json_schema_format,
)
from typhon.models._local import LocalServer, find_llama_server, free_port
from typhon.models._registry import ModelRegistry, Route, endpoint_of

__all__ = [
    "ChatResult",
    "ChatStream",
    "LocalServer",
    "Message",
    "ModelClient",
    "ModelRegistry",
    "OpenAICompatibleClient",
    "RecordingClient",
    "Route",
    "endpoint_of",
    "find_llama_server",
    "free_port",
    "json_schema_format",
]

"""Models: the registry of aliases (LiteLLM ``model_list``), clients for OpenAI-compatible
servers and Ollama, replica balancing with failover, the local llama-server, and the router."""

from typhon.models._balance import BalancedClient, HealthChecker, Replica, ReplicaGroup
from typhon.models._client import (
    ChatResult,
    ChatStream,
    HttpModelClient,
    Message,
    ModelClient,
    OpenAICompatibleClient,
    Probe,
    RecordingClient,
    json_schema_format,
)
from typhon.models._local import LocalServer, find_llama_server, free_port
from typhon.models._ollama import OllamaClient, ollama_name
from typhon.models._registry import ModelRegistry, Route, endpoint_of
from typhon.models._router import Router, RoutingRules, rules_from_config

__all__ = [
    "BalancedClient",
    "ChatResult",
    "ChatStream",
    "HealthChecker",
    "HttpModelClient",
    "LocalServer",
    "Message",
    "ModelClient",
    "ModelRegistry",
    "OllamaClient",
    "OpenAICompatibleClient",
    "Probe",
    "RecordingClient",
    "Replica",
    "ReplicaGroup",
    "Route",
    "Router",
    "RoutingRules",
    "endpoint_of",
    "find_llama_server",
    "free_port",
    "json_schema_format",
    "ollama_name",
    "rules_from_config",
]

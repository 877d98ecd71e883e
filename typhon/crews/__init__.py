"""Crews: the contract, the registry, and the built-in crews (imported on first use)."""

from typhon.crews._base import Crew, CrewOutput, CrewRegistry, crew, default_registry

__all__ = ["Crew", "CrewOutput", "CrewRegistry", "crew", "default_registry"]

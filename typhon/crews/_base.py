"""The crew contract and the registry.

A crew is a description (name, pool, routing category, optional fixed model) plus one method,
``run(ctx)``, which gets a typed :class:`~typhon.RunContext` and returns text or a
:class:`CrewOutput`. A crew knows nothing of Celery or of the store: the worker runs it.

Define one by subclassing :class:`Crew` or with the :func:`crew` decorator::

    @crew("haiku", pool="research", category="creative")
    def haiku(ctx: RunContext) -> str:
        return ctx.model.chat([{"role": "user", "content": f"A haiku on {ctx.input}"}]).content
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

from typhon.config import CATEGORIES, Category
from typhon.errors import ConfigError, UnknownCrewError

if TYPE_CHECKING:
    from typhon.context import RunContext

__all__ = ["Crew", "CrewOutput", "CrewRegistry", "crew", "default_registry"]

# Crews that ship with Typhon, imported on first use so that `import typhon` stays light.
BUILTIN_CREWS = {
    "research": "typhon.crews.research:ResearchCrew",
    "development": "typhon.graphs.development:DevelopmentCrew",
    "creative": "typhon.crews.creative:CreativeCrew",
    "monitoring": "typhon.crews.monitoring:MonitoringCrew",
}


@dataclass(frozen=True)
class CrewOutput:
    """A crew's result: the text shown to people, and named artifacts stored with the run."""

    text: str
    artifacts: dict[str, str | bytes] = field(default_factory=dict)


class Crew(ABC):
    """Subclass, set ``name`` (and ``pool``, ``category``, ``model`` if need be), write ``run``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    pool: ClassVar[str] = "research"
    # None: the router reads the category in each run's input; set it to route every run of the
    # crew as that category. ``model`` fixes the alias outright.
    category: ClassVar[Category | None] = None
    model: ClassVar[str | None] = None

    @abstractmethod
    def run(self, ctx: RunContext) -> CrewOutput | str:
        """Do the work. Raise to fail the run; ``ctx.step()`` reports progress."""


C = TypeVar("C", bound=type[Crew])


class CrewRegistry:
    """Crew classes by name. Built-in crews are imported lazily; modules can be loaded by name."""

    def __init__(self, builtins: dict[str, str] | None = None):
        self._lazy = dict(BUILTIN_CREWS if builtins is None else builtins)
        self._crews: dict[str, type[Crew]] = {}
        self._lock = threading.Lock()

    def register(self, cls: C) -> C:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"crew class {cls.__name__} needs a `name` that is an identifier")
        if cls.category is not None and cls.category not in CATEGORIES:
            raise ValueError(
                f"crew '{name}': category must be one of {', '.join(CATEGORIES)} (or None)"
            )
        with self._lock:
            self._crews[name] = cls
            self._lazy.pop(name, None)
        return cls

    def names(self) -> list[str]:
        return sorted({*self._crews, *self._lazy})

    def get(self, name: str) -> type[Crew]:
        with self._lock:
            if name in self._crews:
                return self._crews[name]
            target = self._lazy.get(name)
        if target is None:
            raise UnknownCrewError(name, self.names())
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        self.register(cls)
        return cls  # type: ignore[no-any-return]

    def load_modules(self, modules: Iterable[str]) -> None:
        """Import modules whose ``@crew`` / ``register`` calls add crews (``crew_modules``)."""
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(
                    f"cannot import crew module '{module}': {exc}", key="crew_modules"
                ) from None


_default = CrewRegistry()


def default_registry() -> CrewRegistry:
    """The registry that ``@crew`` and ``Crew`` subclasses registered with ``register`` use."""
    return _default


def crew(
    name: str,
    *,
    pool: str = "research",
    category: Category | None = None,
    model: str | None = None,
    description: str = "",
    registry: CrewRegistry | None = None,
) -> Callable[[Callable[[RunContext], CrewOutput | str]], type[Crew]]:
    """Register a function as a crew. The function receives the run's context."""

    def wrap(fn: Callable[[RunContext], CrewOutput | str]) -> type[Crew]:
        def run(self: Crew, ctx: RunContext) -> CrewOutput | str:
            return fn(ctx)

        cls = type(
            f"FunctionCrew_{name}",
            (Crew,),
            {
                "name": name,
                "pool": pool,
                "category": category,
                "model": model,
                "description": description or (fn.__doc__ or "").strip(),
                "run": run,
                "__module__": fn.__module__,
            },
        )
        return (registry or _default).register(cls)

    return wrap

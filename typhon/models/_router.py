"""The router: which category a request is, and which model alias serves it.

The decision is made from the *active routing rules*, versioned data in the run store: the model
alias per category (the seed's ROUTING_RULES), the high-precision patterns tried first, the
learned classifier's confidence floor and the category to use below it. Version 1 is written from
the configuration (``routing:``) on first use, and a new version whenever that mapping changes;
the improve loop adds versions of its own and can roll back. Each run records the version that
routed it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog

from typhon.config import CATEGORIES, Category, TyphonConfig
from typhon.errors import InputError
from typhon.models._registry import ModelRegistry, Route

if TYPE_CHECKING:
    from typhon.models._classify import Classifier, Decision
    from typhon.store import RunStore

__all__ = ["SEED_DESCRIPTIONS", "Router", "RoutingRules", "rules_from_config"]

log = structlog.get_logger("typhon.router")

# The seed's ROUTING_RULES descriptions.
SEED_DESCRIPTIONS: dict[str, str] = {
    "simple": "Greetings, simple questions, translations",
    "complex": "Analysis, reasoning, long-form content",
    "code": "Code generation, debugging, review",
    "creative": "Creative writing, roleplay, storytelling",
}


@dataclass(frozen=True)
class RoutingRules:
    """One version of the routing rules."""

    version: int
    models: dict[str, str]  # category -> alias
    patterns: list[dict[str, str]]
    min_confidence: float
    default: Category
    use_classifier: bool
    source: str = "config"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RoutingRules:
        body = row["body"]
        categories = body.get("categories") or {}
        return cls(
            version=int(row["version"]),
            models={c: str(v["model"]) for c, v in categories.items()},
            patterns=list(body.get("patterns") or []),
            min_confidence=float(body.get("min_confidence", 0.4)),
            default=cast(Category, body.get("default", "complex")),
            use_classifier=bool(body.get("classifier", True)),
            source=str(row.get("source") or ""),
        )


def rules_from_config(config: TyphonConfig) -> dict[str, Any]:
    """The rules body the configuration implies, with a hash that says when it changed."""
    from typhon.models._classify import DEFAULT_PATTERNS

    body: dict[str, Any] = {
        "categories": {
            c: {"model": config.routing[cast(Category, c)], "description": SEED_DESCRIPTIONS[c]}
            for c in CATEGORIES
        },
        "patterns": DEFAULT_PATTERNS,
        "min_confidence": 0.4,
        "default": "complex",
        "classifier": True,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {**body, "source_hash": digest}


class Router:
    """Routes requests with the active rules (re-read at most every ``ttl_s`` seconds)."""

    def __init__(
        self,
        config: TyphonConfig,
        store: RunStore,
        models: ModelRegistry,
        *,
        ttl_s: float = 5.0,
    ):
        self.config = config
        self.store = store
        self.models = models
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._rules: RoutingRules | None = None
        self._read_at = 0.0
        self._seeded = False
        self._classifier: Classifier | None = None

    # -- rules -----------------------------------------------------------------------------------
    def rules(self, *, fresh: bool = False) -> RoutingRules:
        with self._lock:
            now = time.monotonic()
            if fresh or self._rules is None or now - self._read_at > self.ttl_s:
                if not self._seeded:
                    body = rules_from_config(self.config)
                    self.store.add_rules(
                        body, source="config", note="from the configuration's routing",
                        unless_source_hash=body["source_hash"],
                    )  # fmt: skip
                    self._seeded = True
                row = self.store.active_rules()
                if row is None:  # every version deactivated by hand: the config's mapping
                    row = self.store.add_rules(rules_from_config(self.config), source="config")
                self._rules = RoutingRules.from_row(row)
                self._read_at = now
            return self._rules

    def classifier(self) -> Classifier:
        if self._classifier is None:
            from typhon.models._classify import Classifier

            self._classifier = Classifier.load()
        return self._classifier

    # -- decisions -------------------------------------------------------------------------------
    def classify(self, text: str, rules: RoutingRules | None = None) -> Decision:
        from typhon.models._classify import classify

        rules = rules or self.rules()
        return classify(
            text,
            patterns=rules.patterns,
            classifier=self.classifier() if rules.use_classifier else None,
            min_confidence=rules.min_confidence,
            default=rules.default,
        )

    def route(
        self,
        text: str,
        *,
        category: Category | None = None,
        model: str | None = None,
        fixed_by: str = "fixed",
    ) -> Route:
        """The route for ``text``: the given ``category`` or the one read in the text; the given
        ``model`` or the rules' model for that category."""
        if not text.strip():
            raise InputError("nothing to route: the prompt is empty")
        rules = self.rules()
        if category is not None:
            reason = f"category {category} set by the crew"
        else:
            decision = self.classify(text, rules)
            category, reason = decision.category, decision.reason
        if model is not None:
            self.config.deployments(model)  # unknown alias: ConfigError naming the known ones
            endpoints = tuple(self.models.endpoints(model))
            return Route(
                category,
                model,
                ",".join(endpoints),
                f"{fixed_by}; {reason}",
                rules.version,
                endpoints,
            )
        alias = rules.models.get(category) or self.config.routing[category]
        if alias not in self.config.aliases():
            fallback = self.config.routing[category]
            reason += (
                f"; rules v{rules.version} name model '{alias}', which is not configured:"
                f" using the configuration's '{fallback}'"
            )
            log.warning("routing rules name an unknown model", alias=alias, used=fallback)
            alias = fallback
        endpoints = tuple(self.models.endpoints(alias))
        return Route(category, alias, ",".join(endpoints), reason, rules.version, endpoints)

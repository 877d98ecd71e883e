"""Evaluating a crew's prompt version on suite items: each item is a real run of the crew.

An :class:`Evaluator` holds an embedded Typhon on a throwaway SQLite store in a temporary folder
(in-process dispatch, no QA review), with the user's model list, crews and ``$TYPHON_HOME`` (so a
local llama-server already running is reused). Every item is submitted with the options
``eval``, ``no_cache`` and ``no_memory`` (no semantic cache, no memory read or written) and the
version's prompts and demonstrations inline, routed by the user's routing rules; then its
output is checked. Runs of one evaluation go at the pace of the crew's pool (its cap).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typhon._types import RunRecord, RunStatus
from typhon.config import TyphonConfig
from typhon.crews import CrewRegistry, default_registry
from typhon.errors import TyphonError
from typhon.improve._prompts import Prompts, PromptVersion
from typhon.improve._suite import JUDGE_PASS_SCORE, SuiteItem, check_output
from typhon.models import ModelRegistry, Router
from typhon.store import RunStore

if TYPE_CHECKING:
    from typhon.orchestrator import Typhon

__all__ = ["EvalResult", "Evaluator", "ItemResult"]

EVAL_OPTIONS = {"eval": True, "no_cache": True, "no_memory": True}


@dataclass(frozen=True)
class ItemResult:
    id: str
    input: str
    passed: bool
    output: str
    status: str
    detail: str = ""
    model: str | None = None
    model_calls: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "input": self.input, "passed": self.passed, "output": self.output,
                "status": self.status, "detail": self.detail, "model": self.model,
                "model_calls": self.model_calls}  # fmt: skip


@dataclass(frozen=True)
class EvalResult:
    crew: str
    prompt_version: int | None
    items: list[ItemResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def passed(self) -> int:
        return sum(1 for i in self.items if i.passed)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.n if self.items else 0.0

    @property
    def model_calls(self) -> int:
        return sum(i.model_calls for i in self.items)

    def by_id(self) -> dict[str, ItemResult]:
        return {i.id: i for i in self.items}

    def to_json(self) -> dict[str, Any]:
        return {"crew": self.crew, "prompt_version": self.prompt_version, "n": self.n,
                "passed": self.passed, "pass_rate": round(self.pass_rate, 4),
                "model_calls": self.model_calls,
                "items": [i.to_json() for i in self.items]}  # fmt: skip


def eval_config(config: TyphonConfig, folder: Path) -> TyphonConfig:
    """The user's configuration on a throwaway SQLite store, dispatched in-process, no review."""
    improve = config.improve.model_copy(update={"review": False})
    return config.model_copy(
        update={
            "database_url": f"sqlite:///{folder / 'eval.db'}",
            "broker_url": None,
            "improve": improve,
        }
    )


class Evaluator:
    """Runs suite items through an embedded Typhon (see the module's docstring). Close it (or use
    it as a context manager) to stop what it started and remove its folder."""

    def __init__(
        self,
        config: TyphonConfig,
        store: RunStore,
        *,
        registry: CrewRegistry | None = None,
        models: ModelRegistry | None = None,
    ):
        self.config = config
        self.store = store  # the user's: its routing rules
        self.registry = registry or default_registry()
        self.registry.load_modules(config.crew_modules)
        self._models = models
        self._folder: Path | None = None
        self._typhon: Typhon | None = None
        self._router: Router | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def typhon(self) -> Typhon:
        if self._typhon is None:
            from typhon.orchestrator import Typhon

            self._folder = Path(tempfile.mkdtemp(prefix="typhon-eval-"))
            try:
                self._typhon = Typhon(
                    eval_config(self.config, self._folder),
                    registry=self.registry,
                    models=self._models,
                )
            except BaseException:
                shutil.rmtree(self._folder, ignore_errors=True)
                raise
        return self._typhon

    @property
    def models(self) -> ModelRegistry:
        return self.typhon.runtime.models

    def close(self) -> None:
        typhon, self._typhon, self._router = self._typhon, None, None
        try:
            if typhon is not None:
                typhon.close()
        finally:
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- routing ---------------------------------------------------------------------------------
    def alias_for(self, crew: str, input: str) -> str:
        """The model alias a live run of ``crew`` on ``input`` would get (the user's rules)."""
        cls = self.registry.get(crew)
        settings = self.config.crew_settings(crew)
        fixed = settings.model or cls.model
        if self._router is None:
            self._router = Router(self.config, self.store, self.models)
        route = self._router.route(
            input, category=settings.category or cls.category, model=fixed, fixed_by="crew"
        )
        return route.model

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(
        self,
        crew: str,
        items: Sequence[SuiteItem],
        *,
        version: PromptVersion | None = None,
        prompts: Prompts | None = None,
        demos: Sequence[Mapping[str, str]] | None = None,
    ) -> EvalResult:
        """Run every item with ``version``'s prompts and demonstrations (or ``prompts`` and
        ``demos`` given inline) and check each output."""
        self.registry.get(crew)  # UnknownCrewError before anything runs
        if version is not None:
            prompts, demos = version.prompts, version.demos
        options: dict[str, Any] = {**EVAL_OPTIONS, "prompts": dict(prompts or {}),
                                   "demos": [dict(d) for d in demos or []]}  # fmt: skip
        if version is not None:
            options["prompt_version"] = version.version
        typhon = self.typhon
        handles = []
        for item in items:
            model = self.alias_for(crew, item.input)
            handles.append(typhon.submit(crew, item.input, model=model, **options))
        results = []
        for item, handle in zip(items, handles, strict=True):
            record = handle.wait()
            results.append(self._check(crew, item, record))
            self._drop_artifacts(record)
        return EvalResult(crew, version.version if version else None, results)

    def _check(self, crew: str, item: SuiteItem, record: RunRecord) -> ItemResult:
        # every call made, answered or not (a failed call is not in the run's usage)
        made = sum(r["calls"] for r in self.typhon.store.run_calls_by_alias(record.id))
        calls = max(record.usage.calls, made)
        if record.status is not RunStatus.SUCCEEDED:
            why = f"run {record.status.value}: {record.error or 'no output'}"
            return ItemResult(item.id, item.input, False, record.output or "",
                              record.status.value, why[:500], record.model, calls)  # fmt: skip
        output = record.output or ""
        judged = 0

        def judge(_rubric: str, text: str) -> tuple[bool, str]:
            nonlocal judged
            from typhon.improve._review import judge as review

            judged += 1
            try:
                verdict = review(
                    self.config, self.models, crew, item.input, text, record.model,
                    registry=self.registry,
                )  # fmt: skip
            except TyphonError as exc:
                return False, f"the reviewer failed: {exc}"
            if verdict.get("status") != "ok":
                return False, "the reviewer's answer was not valid"
            score = float(verdict.get("score") or 0.0)
            ok = verdict.get("verdict") == "pass" and score >= JUDGE_PASS_SCORE
            critique = str(verdict.get("critique") or "")
            return ok, f"{verdict.get('verdict')} {score:.2f}: {critique}"[:500]

        passed, detail = check_output(item.check, output, judge)
        return ItemResult(item.id, item.input, passed, output, record.status.value, detail,
                          record.model, calls + judged)  # fmt: skip

    def _drop_artifacts(self, record: RunRecord) -> None:
        """Files an evaluation run wrote under $TYPHON_HOME/artifacts are not kept."""
        if record.artifacts:
            shutil.rmtree(self.config.home / "artifacts" / record.id, ignore_errors=True)

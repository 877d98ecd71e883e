"""The QA reviewer: after a run, a model of another tier judges the output against the crew's
rubric and the review is stored with the run.

Which model reviews: ``improve.reviewers[producer]`` when the configuration names one, else the
chat model of the model list whose ``model_info.parameters_b`` differs most from the producer's
(a 7B output is reviewed by the 70B model and the other way round), else the producer itself.
The embedded default has one model (``local``): a model reviewing its own output is a weak
signal for the price of a call per run, so runs are reviewed after they finish only when another
tier reviews them, or with ``improve.self_review`` on; ``typhon improve review RUN_ID`` reviews
any finished run on demand.

The reviewer answers JSON under a schema (``REVIEW_SCHEMA``: score 0..1, verdict pass|fail,
critique, issues), which llama-server enforces by grammar; the client asks once more for an
answer that does not match, and the review checks it again. A reply that never validates is
stored as a review with status ``failed`` and the raw reply; the run itself is never touched.
A model that cannot be reached leaves the review ``pending``: ``typhon improve review
--pending`` and the beat sweep take it up later.

A run's review is created ``pending`` when the run finishes: a failed run, or a succeeded one
that used a model (a model call, or an answer from the semantic cache); not a cancelled run, an
evaluation run, a run with the ``no_review`` option, a run of the monitoring crew, nor any run
while ``improve.review`` is off (nor, see above, a run its own model would review). A run that
used no model has nothing the loop tunes (prompts, routing) and is left to people's feedback.
In a cluster the ``typhon.review`` task on the improve queue does the review; in-process
(embedded) the runner does it right after the outcome, on the same thread. A failed run with no
output is judged without a model: score 0, verdict fail, reviewer ``rules``. After each review
the learning extraction runs, the QA score goes to the producer's model-performance memory, and
the crew's canary is checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from typhon._types import RunRecord, RunStatus
from typhon.config import TyphonConfig
from typhon.crews import CrewRegistry, default_registry
from typhon.errors import InputError, ModelResponseError, TyphonError
from typhon.improve._learn import after_judgement
from typhon.models import ModelRegistry, json_schema_format
from typhon.store import RunStore, run_reviews

if TYPE_CHECKING:
    from typhon._runtime import Runtime
    from typhon.memory import Memory

__all__ = [
    "GENERIC_RUBRIC",
    "REVIEW_SCHEMA",
    "judge",
    "queue_review",
    "review_pending",
    "review_run",
    "reviewer_for",
    "rubric_for",
    "wants_review",
]

log = structlog.get_logger("typhon.improve")

GENERIC_RUBRIC = (
    "- It does what the input asks, completely.\n"
    "- It is correct: no invented facts, no wrong claims.\n"
    "- It stays on the topic of the input.\n"
    "- It is in the form asked for (format, length, language)."
)
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "verdict": {"type": "string", "enum": ["pass", "fail"]},
        "critique": {"type": "string", "maxLength": 600},
        "issues": {
            "type": "array",
            "items": {"type": "string", "maxLength": 200},
            "maxItems": 5,
        },
    },
    "required": ["score", "verdict", "critique", "issues"],
    "additionalProperties": False,
}
RULES_REVIEWER = "rules"  # a failed run with no output: judged without a model
SKIPPED_CREWS = frozenset({"monitoring"})
_MAX_TOKENS = 512
_ANSWER_TOKENS = _MAX_TOKENS + 400  # the reply and the instructions around input and output


# -- who reviews, against what ---------------------------------------------------------------
def _chat_sizes(config: TyphonConfig) -> dict[str, float | None]:
    sizes: dict[str, float | None] = {}
    for entry in config.models:
        if not entry.is_chat:
            continue
        sizes.setdefault(entry.model_name, entry.model_info.parameters_b)
    return sizes


def reviewer_for(config: TyphonConfig, producer: str | None) -> str:
    """The alias that reviews ``producer``'s output (see the module's docstring)."""
    if producer is not None and producer in config.improve.reviewers:
        return config.improve.reviewers[producer]
    sizes = _chat_sizes(config)
    own = sizes.get(producer) if producer is not None else None
    if own is not None:
        gaps = [(abs(size - own), alias) for alias, size in sizes.items() if size is not None]
        gap, alias = max(gaps, key=lambda g: g[0])  # the first of equal gaps
        if gap > 0:
            return alias
    if producer is not None and producer in config.aliases():
        return producer
    return next(iter(sizes), None) or config.routing["complex"]


def rubric_for(crew: str, registry: CrewRegistry | None = None) -> str:
    """The crew's ``rubric`` (a string or a list of criteria), else the generic one."""
    try:
        cls = (registry or default_registry()).get(crew)
    except TyphonError:  # not a registered crew (an external agent's activity)
        return GENERIC_RUBRIC
    rubric = getattr(cls, "rubric", None)
    if isinstance(rubric, str) and rubric.strip():
        return rubric.strip()
    if isinstance(rubric, list | tuple) and rubric:
        return "\n".join(f"- {item}" for item in rubric)
    return GENERIC_RUBRIC


def _budget(config: TyphonConfig, alias: str) -> int:
    """Characters of input and output that fit the reviewer's context (about 3 a token)."""
    try:
        window = config.model(alias).context_window or 8192
    except TyphonError:
        window = 8192
    return max(1500, (window - _ANSWER_TOKENS) * 3)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\n[... cut]"


def _messages(
    crew: str, rubric: str, input: str, output: str, error: str | None, budget: int
) -> list[dict[str, str]]:
    system = (
        f"You are a strict QA reviewer. Judge the OUTPUT that the '{crew}' crew gave for the"
        f" INPUT, against this rubric:\n{rubric}\n\n"
        "Answer with JSON only: score from 0 (useless) to 1 (excellent); verdict pass or fail;"
        " critique in one or two sentences; issues, a list of concrete problems (empty when"
        " there are none)."
    )
    user = f"INPUT:\n{_cut(input, budget // 3)}\n\nOUTPUT:\n{_cut(output, budget - budget // 3)}"
    if error:
        user += f"\n\nThe run failed with this error: {error[:500]}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# -- asking and checking ---------------------------------------------------------------------
def _valid(content: str) -> dict[str, Any] | None:
    """The reply as a review, or None when it is not one."""
    try:
        value = json.loads(content)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != set(REVIEW_SCHEMA["required"]):
        return None
    score, verdict = value["score"], value["verdict"]
    critique, issues = value["critique"], value["issues"]
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
        return None
    if verdict not in ("pass", "fail") or not isinstance(critique, str):
        return None
    if not isinstance(issues, list) or not all(isinstance(i, str) for i in issues):
        return None
    return {"score": float(score), "verdict": verdict, "critique": critique.strip(),
            "issues": [i.strip() for i in issues if i.strip()]}  # fmt: skip


def _ask(models: ModelRegistry, alias: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One review: ``status`` ok with the fields, or failed with the raw reply. A model that
    cannot be reached raises (ModelUnavailableError): the review stays to be done."""
    client = models.client(alias)
    raw = ""
    for _ in (0, 1):  # the client retries a reply off the schema once; a plain one may not
        try:
            result = client.chat(
                messages,
                max_tokens=_MAX_TOKENS,
                temperature=0.0,
                response_format=json_schema_format("qa_review", REVIEW_SCHEMA),
            )
        except ModelResponseError as exc:  # asked twice already by the client
            raw = str(getattr(exc, "content", None) or exc)
            break
        raw = result.content
        review = _valid(raw)
        if review is not None:
            return {"status": "ok", **review, "raw": raw}
    return {"status": "failed", "score": None, "verdict": None, "critique": None, "issues": [],
            "raw": raw}  # fmt: skip


def judge(
    config: TyphonConfig,
    models: ModelRegistry,
    crew: str,
    input: str,
    output: str,
    producer_alias: str | None,
    *,
    registry: CrewRegistry | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A review of ``output`` for ``input`` without storing it: ``{status: ok|failed, score,
    verdict, critique, issues, raw, reviewer}``. Raises ModelUnavailableError when the reviewer
    cannot be reached."""
    reviewer = reviewer_for(config, producer_alias)
    rubric = rubric_for(crew, registry)
    messages = _messages(crew, rubric, input, output, error, _budget(config, reviewer))
    return {**_ask(models, reviewer, messages), "reviewer": reviewer}


# -- the stored review -------------------------------------------------------------------------
def wants_review(config: TyphonConfig, record: RunRecord, *, cache_hit: bool = False) -> bool:
    """Whether a finished run gets a QA review (see the module's docstring); ``cache_hit``:
    the semantic cache answered one of its model calls."""
    used_a_model = record.usage.calls > 0 or cache_hit
    other_tier = config.improve.self_review or reviewer_for(config, record.model) != record.model
    return (
        config.improve.review
        and other_tier
        and (record.status is RunStatus.FAILED or (record.status is RunStatus.SUCCEEDED
                                                   and used_a_model))
        and not record.options.get("eval")
        and not record.options.get("no_review")
        and record.crew not in SKIPPED_CREWS
    )  # fmt: skip


def _cache_hit(store: RunStore, record: RunRecord) -> bool:
    if record.usage.calls > 0 or record.status is not RunStatus.SUCCEEDED:
        return False  # not needed to decide
    return any(event.kind == "cache_hit" for event in store.events(record.id))


def _to_json(row: Mapping[str, Any]) -> dict[str, Any]:
    created = row["created_at"]
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return {
        "id": row["id"], "run_id": row["run_id"], "crew": row["crew"],
        "prompt_version": row["prompt_version"], "reviewer": row["reviewer"],
        "status": row["status"], "score": row["score"], "verdict": row["verdict"],
        "critique": row["critique"], "issues": list(row["issues"] or []), "raw": row["raw"],
        "created_at": created.isoformat() if created else None,
    }  # fmt: skip


def _get(store: RunStore, review_id: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(run_reviews).where(run_reviews.c.id == review_id))
        return _to_json(dict(row.mappings().one()))


def _insert_pending(store: RunStore, record: RunRecord, reviewer: str) -> int:
    store.migrate_once()
    with store.engine.begin() as conn:
        inserted = conn.execute(
            run_reviews.insert()
            .values(
                run_id=record.id, crew=record.crew, prompt_version=record.prompt_version,
                reviewer=reviewer, status="pending", issues=[], created_at=datetime.now(UTC),
            )
            .returning(run_reviews.c.id)
        )  # fmt: skip
        return int(inserted.scalar_one())


def _pending_id(store: RunStore, run_id: str) -> int | None:
    store.migrate_once()
    c = run_reviews.c
    query = sa.select(c.id).where(c.run_id == run_id, c.status == "pending").order_by(c.id)
    with store.engine.connect() as conn:
        return conn.execute(query.limit(1)).scalar()


def _complete(store: RunStore, review_id: int, record: RunRecord, result: dict[str, Any]) -> bool:
    """Fill in a pending review; False when another process completed it first."""
    c = run_reviews.c
    with store.engine.begin() as conn:
        done = conn.execute(
            run_reviews.update()
            .where(c.id == review_id, c.status == "pending")
            .values(
                status=result["status"], reviewer=result["reviewer"], score=result["score"],
                verdict=result["verdict"], critique=result["critique"],
                issues=result["issues"], raw=result["raw"],
                prompt_version=record.prompt_version, created_at=datetime.now(UTC),
            )
        )  # fmt: skip
        return bool(done.rowcount)


def _by_rules(record: RunRecord) -> dict[str, Any]:
    error = (record.error or "no error recorded").strip()
    return {
        "status": "ok", "score": 0.0, "verdict": "fail", "reviewer": RULES_REVIEWER,
        "critique": f"The run failed before producing output: {error[:500]}",
        "issues": [error.splitlines()[0][:200] if error else "no output"], "raw": None,
    }  # fmt: skip


def _record_qa(memory: Memory | None, record: RunRecord, score: float) -> None:
    if memory is None or not record.model:
        return
    try:
        memory.backend.performance.record(record.model, record.category, qa_score=score)
    except Exception as exc:  # memory is an aid: it never fails a review
        log.warning("could not record the QA score in memory", error=str(exc))


def review_run(
    config: TyphonConfig,
    store: RunStore,
    models: ModelRegistry,
    run_id: str,
    *,
    registry: CrewRegistry | None = None,
    memory: Memory | None = None,
    pending_only: bool = False,
) -> dict[str, Any] | None:
    """Review a finished run and store the review: its pending review when it has one, else a
    new one (with ``pending_only``: None then). Returns the stored review. Raises
    RunNotFoundError, InputError for a run not finished, ModelUnavailableError when the
    reviewer cannot be reached (the review stays pending)."""
    record = store.get(run_id)
    if not record.status.finished:
        raise InputError(f"run {run_id} is {record.status.value}; review it once it has finished")
    review_id = _pending_id(store, run_id)
    if review_id is None:
        if pending_only:
            return None
        review_id = _insert_pending(store, record, reviewer_for(config, record.model))
    if record.status is RunStatus.FAILED and not (record.output or "").strip():
        result = _by_rules(record)
    else:
        result = judge(
            config, models, record.crew, record.input, record.output or "", record.model,
            registry=registry, error=record.error,
        )  # fmt: skip
    if not _complete(store, review_id, record, result):
        return _get(store, review_id)  # another process completed it meanwhile
    review = _get(store, review_id)
    log.info("run reviewed", run_id=run_id, status=review["status"], score=review["score"],
             reviewer=review["reviewer"])  # fmt: skip
    if review["status"] == "ok":
        if review["reviewer"] != RULES_REVIEWER:
            _record_qa(memory, record, float(review["score"]))
        after_judgement(config, store, run_id, memory=memory)
    return review


def review_pending(
    config: TyphonConfig,
    store: RunStore,
    models: ModelRegistry,
    *,
    older_than_s: float = 0.0,
    limit: int = 200,
    registry: CrewRegistry | None = None,
    memory: Memory | None = None,
) -> list[dict[str, Any]]:
    """Review every run whose review is pending (for at least ``older_than_s``), oldest
    first. A run whose reviewer cannot be reached stays pending and is listed with
    ``error``."""
    store.migrate_once()
    c = run_reviews.c
    query = sa.select(c.run_id).where(c.status == "pending")
    if older_than_s > 0:
        query = query.where(c.created_at <= datetime.now(UTC) - timedelta(seconds=older_than_s))
    with store.engine.connect() as conn:
        run_ids = list(dict.fromkeys(conn.execute(query.order_by(c.id).limit(limit)).scalars()))
    done: list[dict[str, Any]] = []
    for run_id in run_ids:
        try:
            review = review_run(
                config, store, models, run_id, registry=registry, memory=memory,
                pending_only=True,
            )  # fmt: skip
        except TyphonError as exc:
            log.warning("review left pending", run_id=run_id, error=str(exc))
            done.append({"run_id": run_id, "status": "pending", "error": str(exc)})
            continue
        if review is not None:
            done.append(review)
    return done


# -- after a run -------------------------------------------------------------------------------
def _send(runtime: Runtime, run_id: str) -> bool:
    """Inside a Celery task (a cluster worker): hand the review to the improve queue."""
    if not runtime.config.broker_url:
        return False
    from celery._state import get_current_task

    task = get_current_task()
    if task is None:  # a run executed in this process: review it here
        return False
    from workers.celery_app import REVIEW_TASK, REVIEW_TIME_LIMIT_S, improve_queue

    task.app.send_task(
        REVIEW_TASK,
        args=[run_id],
        queue=improve_queue(runtime.config),
        retry=False,
        time_limit=REVIEW_TIME_LIMIT_S,
    )
    return True


def queue_review(runtime: Runtime, run_id: str) -> None:
    """After a run's outcome: a pending review, then the review itself (a Celery task in a
    cluster, right here in-process). Never raises: a review not done stays pending."""
    try:
        record = runtime.store.get(run_id)
        hit = _cache_hit(runtime.store, record)
        if not wants_review(runtime.config, record, cache_hit=hit):
            return
        _insert_pending(runtime.store, record, reviewer_for(runtime.config, record.model))
        if _send(runtime, run_id):
            return
        review_in(runtime, run_id)
    except Exception as exc:  # the run's outcome is recorded; its review waits
        log.warning("review not done; left pending", run_id=run_id, error=str(exc))


def review_in(runtime: Runtime, run_id: str) -> dict[str, Any] | None:
    """Do a run's pending review with this process's runtime (the ``typhon.review`` task).
    A reviewer that cannot be reached leaves it pending: ``{run_id, status, error}``."""
    try:
        memory = None if runtime.store.get(run_id).options.get("no_memory") else runtime.memory
        return review_run(
            runtime.config, runtime.store, runtime.models, run_id,
            registry=runtime.registry, memory=memory, pending_only=True,
        )  # fmt: skip
    except TyphonError as exc:
        log.warning("review left pending", run_id=run_id, error=str(exc))
        return {"run_id": run_id, "status": "pending", "error": str(exc)}

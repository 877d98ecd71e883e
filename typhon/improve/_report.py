"""The learning loop's report: how runs went this period against the previous one.

For the runs that finished in the last ``days`` (evaluation runs left out), and the same span
before: success rate (succeeded out of succeeded + failed; cancelled runs are counted apart),
the mean QA score, people's votes (share of thumbs up), the mean run score (a vote outranks the
QA score), each overall, per crew and per model with the change from the previous period; the
top failure categories of the period's diagnoses; and where the period's reviews stand.

Written as ``report-YYYY-MM-DD.md`` and ``.json`` (the date the period ends, UTC) under
``$TYPHON_HOME/reports/``; daily from beat at ``improve.report_hour_utc``, or with ``typhon
improve report``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from typhon.config import TyphonConfig
from typhon.improve._scores import latest_by_run
from typhon.store import RunStore, improve_diagnoses, run_feedback, run_reviews, runs

__all__ = ["build_report", "render_markdown", "write_report"]

_TRENDS = ("success_rate", "qa_mean", "human_up_share", "score_mean")


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _stats(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    rows = list(rows)
    status = Counter(str(r["status"]) for r in rows)
    done = status["succeeded"] + status["failed"]
    qa = [float(r["qa"]) for r in rows if r["qa"] is not None]
    votes = [r["vote"] for r in rows if r["vote"] is not None]
    scores = [float(r["score"]) for r in rows if r["score"] is not None]
    return {
        "runs": len(rows), "succeeded": status["succeeded"], "failed": status["failed"],
        "cancelled": status["cancelled"],
        "success_rate": round(status["succeeded"] / done, 4) if done else None,
        "qa_mean": _mean(qa), "qa_reviews": len(qa),
        "human_up": votes.count("up"), "human_down": votes.count("down"),
        "human_up_share": round(votes.count("up") / len(votes), 4) if votes else None,
        "score_mean": _mean(scores),
    }  # fmt: skip


def _trend(now: dict[str, Any], before: dict[str, Any]) -> dict[str, float | None]:
    return {
        key: round(now[key] - before[key], 4)
        if now[key] is not None and before[key] is not None
        else None
        for key in _TRENDS
    }


def _load(store: RunStore, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Finished runs in [since, until) with their latest QA score, vote and review status."""
    c = runs.c
    query = sa.select(c.id, c.crew, c.model, c.status, c.options, c.finished_at).where(
        c.finished_at >= since, c.finished_at < until
    )
    r, f = run_reviews.c, run_feedback.c
    reviews: list[Mapping[str, Any]] = []
    votes: list[Mapping[str, Any]] = []
    with store.engine.connect() as conn:
        found = [dict(x) for x in conn.execute(query).mappings()]
        found = [x for x in found if not (x["options"] or {}).get("eval")]
        ids = [x["id"] for x in found]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = sa.select(r.id, r.run_id, r.status, r.score).where(r.run_id.in_(chunk))
            reviews += [dict(x) for x in conn.execute(query).mappings()]
            query = sa.select(f.id, f.run_id, f.vote).where(f.run_id.in_(chunk))
            votes += [dict(x) for x in conn.execute(query).mappings()]
    ok = latest_by_run([x for x in reviews if x["status"] == "ok"])
    last = latest_by_run(reviews)
    voted = latest_by_run(votes)
    for x in found:
        review, vote = ok.get(x["id"]), voted.get(x["id"])
        x["qa"] = review["score"] if review is not None else None
        x["vote"] = vote["vote"] if vote is not None else None
        x["review"] = last[x["id"]]["status"] if x["id"] in last else None
        x["score"] = (1.0 if x["vote"] == "up" else 0.0) if x["vote"] else x["qa"]
        x["finished_at"] = _utc(x["finished_at"])
    return found


def _grouped(
    current: list[dict[str, Any]], previous: list[dict[str, Any]], key: str
) -> list[dict[str, Any]]:
    names = sorted({str(x[key] or "-") for x in current} | {str(x[key] or "-") for x in previous})
    out = []
    for name in names:
        now = _stats(x for x in current if str(x[key] or "-") == name)
        before = _stats(x for x in previous if str(x[key] or "-") == name)
        out.append({key: name, **now, "previous": before, "trend": _trend(now, before)})
    out.sort(key=lambda g: (-g["runs"], g[key]))
    return out


def build_report(
    store: RunStore, *, days: float = 1.0, now: datetime | None = None
) -> dict[str, Any]:
    """The report's data (see the module's docstring)."""
    store.migrate_once()
    end = _utc(now or datetime.now(UTC))
    start = end - timedelta(days=days)
    before = start - timedelta(days=days)
    current, previous = _load(store, start, end), _load(store, before, start)
    ids = [x["id"] for x in current]
    categories: Counter[str] = Counter()
    d = improve_diagnoses.c
    with store.engine.connect() as conn:
        for i in range(0, len(ids), 500):
            query = sa.select(d.category).where(d.run_id.in_(ids[i : i + 500]))
            categories.update(str(c) for c in conn.execute(query).scalars())
    overall, overall_before = _stats(current), _stats(previous)
    reviews = Counter(str(x["review"] or "none") for x in current)
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "period": {"start": start.isoformat(timespec="seconds"),
                   "end": end.isoformat(timespec="seconds"), "days": days},
        "previous_period": {"start": before.isoformat(timespec="seconds"),
                            "end": start.isoformat(timespec="seconds")},
        "overall": {**overall, "previous": overall_before,
                    "trend": _trend(overall, overall_before)},
        "crews": _grouped(current, previous, "crew"),
        "models": _grouped(current, previous, "model"),
        "failure_categories": [{"category": c, "runs": n}
                               for c, n in sorted(categories.items(), key=lambda i: (-i[1], i[0]))
                               ][:5],
        "reviews": {k: reviews.get(k, 0) for k in ("ok", "failed", "pending", "none")},
    }  # fmt: skip


# -- Markdown ----------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _delta(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.0f} pts" if percent else f"{value:+.2f}"


def _table(groups: list[dict[str, Any]], key: str) -> list[str]:
    lines = [
        f"| {key} | runs | success | change | QA | change | thumbs up | change |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for g in groups:
        t = g["trend"]
        lines.append(
            f"| {g[key]} | {g['runs']} (before {g['previous']['runs']}) | "
            f"{_pct(g['success_rate'])} | {_delta(t['success_rate'], True)} | "
            f"{_num(g['qa_mean'])} | {_delta(t['qa_mean'], False)} | "
            f"{_pct(g['human_up_share'])} | {_delta(t['human_up_share'], True)} |"
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    period, o = report["period"], report["overall"]
    prev, t = o["previous"], o["trend"]
    lines = [
        f"# Typhon report, {period['end'][:10]}",
        "",
        f"Runs finished from {period['start']} to {period['end']} ({period['days']:g} days),"
        f" against the {period['days']:g} days before.",
        "",
        "## Overall",
        "",
        "| | this period | previous | change |",
        "| --- | ---: | ---: | ---: |",
        f"| runs | {o['runs']} | {prev['runs']} | {o['runs'] - prev['runs']:+d} |",
        f"| success rate | {_pct(o['success_rate'])} | {_pct(prev['success_rate'])} |"
        f" {_delta(t['success_rate'], True)} |",
        f"| mean QA score | {_num(o['qa_mean'])} ({o['qa_reviews']}) |"
        f" {_num(prev['qa_mean'])} ({prev['qa_reviews']}) | {_delta(t['qa_mean'], False)} |",
        f"| thumbs up | {_pct(o['human_up_share'])} ({o['human_up']} up, {o['human_down']}"
        f" down) | {_pct(prev['human_up_share'])} | {_delta(t['human_up_share'], True)} |",
        f"| mean run score | {_num(o['score_mean'])} | {_num(prev['score_mean'])} |"
        f" {_delta(t['score_mean'], False)} |",
        "",
        "## Per crew",
        "",
        *_table(report["crews"], "crew"),
        "",
        "## Per model",
        "",
        *_table(report["models"], "model"),
        "",
        "## Top failure categories",
        "",
    ]
    failures = report["failure_categories"]
    lines += [f"- {f['category']}: {f['runs']}" for f in failures] or ["- none"]
    r = report["reviews"]
    lines += [
        "",
        "## Reviews",
        "",
        f"{r['ok']} done, {r['failed']} failed (unusable reply), {r['pending']} pending,"
        f" {r['none']} runs without a review.",
        "",
    ]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(
    config: TyphonConfig, store: RunStore, *, days: float = 1.0, now: datetime | None = None
) -> dict[str, Any]:
    """Build the report and write it under ``$TYPHON_HOME/reports/``: ``{markdown, json,
    report}`` (the two paths and the data)."""
    report = build_report(store, days=days, now=now)
    folder = config.home / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"report-{report['period']['end'][:10]}"
    md, js = folder / f"{stem}.md", folder / f"{stem}.json"
    _write(js, json.dumps(report, indent=2) + "\n")
    _write(md, render_markdown(report))
    return {"markdown": str(md), "json": str(js), "report": report}

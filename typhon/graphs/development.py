"""The Development crew: a LangGraph graph that plans, writes code, runs its tests in a sandbox,
reviews, and revises until the tests pass and the review accepts, or a budget runs out.

::

    plan -> implement -> test -> review --(tests pass, review accepts)--> [approval] -> finalize
                          ^                 |
                          +---- revise <----+ (otherwise, while iterations, tokens and time last)

Input: the task (the run's input) and, optionally, a repository (``--repo PATH``, option
``repo``), copied into a throwaway workspace for every test run. Output: a unified diff of what
changed (for a new project, the diff from nothing and a ``project.tar.gz``), the last test output
and the review, as run artifacts. Code runs only in the sandbox (``_sandbox.py``).

The graph checkpoints after every node into the run store's database (``_checkpoint.py``): a run
whose worker died resumes at its last finished node. With approval asked (``development.approval``
or option ``approval``), the graph stops before the result is final: the run waits, holding no
worker slot, until ``typhon approve RUN_ID`` or ``typhon reject RUN_ID --note ...``; a rejection
with budget left goes back to revise with the note.

Each node reports its start and end as run events (``step`` with ``phase``).
"""

from __future__ import annotations

import difflib
import io
import json
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from typhon.config import Category
from typhon.crews._base import Crew, CrewOutput
from typhon.errors import CrewError, ModelResponseError, RunWaiting
from typhon.graphs._sandbox import SandboxLimits, SandboxResult, prepare_workspace, run_sandboxed

if TYPE_CHECKING:
    from typhon.context import RunContext

__all__ = ["PROMPTS", "DevelopmentCrew", "build_graph"]

# Node prompts. Kept as data: the improve loop versions them.
PROMPTS: dict[str, dict[str, str]] = {
    "plan": {
        "system": "You are a senior software engineer. You plan small, testable changes.",
        "user": (
            "Task: {task}\n\nRepository:\n{repository}\n\n"
            "Write a short numbered plan (at most 5 steps): which files to create or change and "
            "which tests prove the task is done."
        ),
    },
    "implement": {
        "system": (
            "You are a senior software engineer. You write complete, working files with tests."
        ),
        "user": (
            "Task: {task}\n\nPlan:\n{plan}\n\nRepository:\n{repository}\n\n{feedback}"
            'Answer with JSON: {{"files": [{{"path": "relative/path.py", "content": '
            '"the whole file"}}]}}. Give every file you create or change in full, tests '
            "included (pytest, files named test_*.py)."
        ),
    },
    "review": {
        "system": "You are a strict code reviewer.",
        "user": (
            "Task: {task}\n\nChanges:\n{diff}\n\nTest result:\n{tests}\n\n"
            "Does the change do the task, correctly and cleanly? Answer with JSON: "
            '{{"verdict": "accept" or "revise", "critique": "what to fix, briefly"}}.'
        ),
    },
}

FILES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "files": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1, "maxLength": 120},
                    "content": {"type": "string", "maxLength": 8000},
                },
                "required": ["path", "content"],
            },
        }
    },
    "required": ["files"],
}
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["accept", "revise"]},
        "critique": {"type": "string", "maxLength": 1200},
    },
    "required": ["verdict", "critique"],
}
_TEXT_SUFFIXES = {
    ".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".json", ".yaml", ".yml", ".js", ".ts",
    ".go", ".rs", ".c", ".h", ".sh",
}  # fmt: skip
_REPO_CHARS = 6000


class DevState(TypedDict, total=False):
    task: str
    repo: str | None
    plan: str
    files: dict[str, str]  # generated files (path -> content), applied over the repository
    diff: str
    tests: str
    tests_ok: bool
    verdict: str
    critique: str
    iteration: int
    tokens: int
    started: float
    approval: bool
    decision: str  # approved | rejected | "" before a person answered
    human_note: str
    outcome: str  # accepted | tests_failed | not_accepted | rejected
    budget: str  # what ran out, when something did


# -- helpers -----------------------------------------------------------------------------------
class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(template: str, **fields: str) -> str:
    """``template`` with its ``{placeholders}`` filled; a rewritten prompt with stray braces
    gets its fields appended instead of failing the run."""
    try:
        return template.format_map(_Keep(fields))
    except (ValueError, IndexError, AttributeError):
        return template + "\n\n" + "\n\n".join(f"{k}:\n{v}" for k, v in fields.items())


def repository_text(repo: Path | None, files: Mapping[str, str], limit: int = _REPO_CHARS) -> str:
    """The repository as the model sees it: a file list and the text of small files, within
    ``limit`` characters; generated files shown as they are now."""
    current: dict[str, str] = {}
    if repo is not None:
        for path in sorted(repo.rglob("*")):
            rel = path.relative_to(repo)
            if any(part.startswith(".") or part in {"__pycache__", "node_modules", "venv"}
                   for part in rel.parts):  # fmt: skip
                continue
            if path.is_file() and path.suffix in _TEXT_SUFFIXES and path.stat().st_size < 20_000:
                current[str(rel)] = path.read_text(encoding="utf-8", errors="replace")
    current.update(files)
    if not current:
        return "(empty: a new project)"
    parts = ["Files: " + ", ".join(current)]
    used = len(parts[0])
    for name, text in current.items():
        block = f"\n--- {name}\n{text}"
        if used + len(block) > limit:
            parts.append(f"\n--- {name} (not shown: over the size budget)")
            continue
        parts.append(block)
        used += len(block)
    return "".join(parts)


def unified_diff(repo: Path | None, files: Mapping[str, str]) -> str:
    """The generated files against the repository (or against nothing)."""
    out: list[str] = []
    for name in sorted(files):
        old_path = repo / name if repo is not None else None
        old = (
            old_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            if old_path is not None and old_path.is_file()
            else []
        )
        new = files[name].splitlines(keepends=True)
        if new and not new[-1].endswith("\n"):
            new[-1] += "\n"
        if old == new:
            continue
        before = f"a/{name}" if old else "/dev/null"
        out.extend(difflib.unified_diff(old, new, before, f"b/{name}"))
    return "".join(out)


def parse_files(text: str) -> dict[str, str]:
    """Files from the implement node's JSON; bad paths are dropped (the sandbox refuses them
    anyway), an unreadable answer gives no files."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    files: dict[str, str] = {}
    for item in data.get("files", []) if isinstance(data, dict) else []:
        if not isinstance(item, dict):
            continue
        path, content = str(item.get("path", "")).strip(), item.get("content")
        if not path or not isinstance(content, str):
            continue
        parts = Path(path).parts
        if Path(path).is_absolute() or ".." in parts or parts[0].startswith("."):
            continue
        files[path] = content
    return files


def test_command(work: Path, configured: list[str] | None) -> list[str]:
    """The configured command; else pytest when the workspace has tests (unittest when pytest
    is not installed); else a syntax check of every Python file."""
    if configured:
        return list(configured)
    has_tests = any(work.rglob("test_*.py")) or any(work.rglob("*_test.py"))
    if has_tests:
        import importlib.util

        if importlib.util.find_spec("pytest") is not None:
            return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        return [sys.executable, "-m", "unittest", "discover", "-v"]
    return [sys.executable, "-m", "compileall", "-q", "."]


# -- the graph ---------------------------------------------------------------------------------
class _Nodes:
    """The graph's nodes, bound to one run's context."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cfg = ctx.config.development
        self.limits = SandboxLimits(
            cpu_s=self.cfg.sandbox.cpu_s, memory_mb=self.cfg.sandbox.memory_mb,
            wall_s=self.cfg.sandbox.wall_s, file_mb=self.cfg.sandbox.file_mb,
        )  # fmt: skip
        self.root = ctx.config.home / "sandbox" / ctx.run_id

    def _repo(self, state: DevState) -> Path | None:
        repo = state.get("repo")
        return Path(repo) if repo else None

    def _chat(
        self, node: str, state: DevState, schema: dict[str, Any] | None, **fields: str
    ) -> tuple[str, int]:
        prompt = {**PROMPTS[node], **self.ctx.prompts.get(node, {})}
        messages = [
            {"role": "system", "content": prompt["system"]},
            *(self.ctx.demo_messages() if node == "implement" else []),
            {"role": "user", "content": fill(prompt["user"], task=state["task"], **fields)},
        ]
        response_format = (
            {"type": "json_schema", "json_schema": {"name": node, "schema": schema}}
            if schema
            else None
        )
        try:
            result = self.ctx.model.chat(
                messages, max_tokens=self.ctx.settings.max_tokens,
                temperature=self.ctx.settings.temperature, response_format=response_format,
            )  # fmt: skip
        except ModelResponseError as exc:  # an unusable answer is a failed attempt, not a crash
            self.ctx.log.warning("unusable model answer", node=node, error=str(exc))
            return "", 0
        return result.content, result.usage.total_tokens

    def plan(self, state: DevState) -> DevState:
        text, tokens = self._chat(
            "plan", state, None, repository=repository_text(self._repo(state), {})
        )
        return {"plan": text.strip() or "1. Implement the task with tests.", "tokens": tokens,
                "iteration": 0, "files": {}}  # fmt: skip

    def implement(self, state: DevState) -> DevState:
        feedback = ""
        if state.get("iteration", 0) > 0 or state.get("human_note"):
            feedback = (
                "Your last attempt needs fixing.\n"
                f"Test result:\n{state.get('tests', '')[-2000:]}\n"
                f"Review: {state.get('critique', '')}\n"
                + (f"A person said: {state['human_note']}\n" if state.get("human_note") else "")
                + "\n"
            )
        text, tokens = self._chat(
            "implement", state, FILES_SCHEMA, plan=state.get("plan", ""),
            repository=repository_text(self._repo(state), state.get("files", {})),
            feedback=feedback,
        )  # fmt: skip
        files = {**state.get("files", {}), **parse_files(text)}
        return {
            "files": files,
            "diff": unified_diff(self._repo(state), files),
            "tokens": state.get("tokens", 0) + tokens,
            "iteration": state.get("iteration", 0) + 1,
            "human_note": "",
        }

    def test(self, state: DevState) -> DevState:
        files = state.get("files", {})
        if not files:
            return {"tests": "no files were produced", "tests_ok": False}
        try:
            work = prepare_workspace(self.root, files, self._repo(state))
        except CrewError as exc:
            return {"tests": f"workspace refused: {exc}", "tests_ok": False}
        argv = test_command(work, self.cfg.test_command)
        result: SandboxResult = run_sandboxed(work, argv, self.limits)
        return {"tests": f"$ {' '.join(Path(a).name if a == sys.executable else a for a in argv)}\n"
                         f"{result.summary()}",
                "tests_ok": result.ok}  # fmt: skip

    def review(self, state: DevState) -> DevState:
        text, tokens = self._chat(
            "review", state, REVIEW_SCHEMA, diff=state.get("diff", "")[-4000:] or "(none)",
            tests=state.get("tests", "")[-2000:],
        )  # fmt: skip
        try:
            data = json.loads(text)
            verdict = "accept" if data.get("verdict") == "accept" else "revise"
            critique = str(data.get("critique", ""))
        except (json.JSONDecodeError, AttributeError):
            verdict, critique = "revise", "the review could not be read"
        return {"verdict": verdict, "critique": critique,
                "tokens": state.get("tokens", 0) + tokens}  # fmt: skip

    def _out_of_budget(self, state: DevState) -> str:
        if state.get("iteration", 0) >= self.cfg.max_iterations:
            return f"{self.cfg.max_iterations} iterations"
        if state.get("tokens", 0) >= self.cfg.max_tokens:
            return f"{self.cfg.max_tokens} tokens"
        if time.time() - state.get("started", time.time()) >= self.cfg.max_seconds:
            return f"{self.cfg.max_seconds:g} seconds"
        return ""

    def after_review(self, state: DevState) -> str:
        if state.get("tests_ok") and state.get("verdict") == "accept":
            return "approval" if state.get("approval") else "finalize"
        return "finalize" if self._out_of_budget(state) else "revise"

    def approval(self, state: DevState) -> DevState:
        from langgraph.types import interrupt

        answer = interrupt({"diff": state.get("diff", ""), "tests": state.get("tests", "")})
        decision = (
            str(answer.get("decision", "rejected")) if isinstance(answer, dict) else "rejected"
        )
        note = str(answer.get("note") or "") if isinstance(answer, dict) else ""
        return {"decision": decision, "human_note": note}

    def after_approval(self, state: DevState) -> str:
        if state.get("decision") == "approved":
            return "finalize"
        return "finalize" if self._out_of_budget(state) else "revise"

    def finalize(self, state: DevState) -> DevState:
        if state.get("decision") == "rejected":
            outcome = "rejected"
        elif state.get("tests_ok") and state.get("verdict") == "accept":
            outcome = "accepted"
        elif not state.get("tests_ok"):
            outcome = "tests_failed"
        else:
            outcome = "not_accepted"
        return {"outcome": outcome, "budget": self._out_of_budget(state)}


def build_graph(nodes: _Nodes, checkpointer: Any = None) -> Any:
    """The compiled graph; every node reports its start and end as run events."""
    from langgraph.graph import END, START, StateGraph

    def traced(name: str, fn: Callable[[DevState], DevState]) -> Callable[[DevState], DevState]:
        def node(state: DevState) -> DevState:
            nodes.ctx.step(name, phase="start", iteration=state.get("iteration", 0))
            update = fn(state)
            summary = {k: update[k] for k in ("tests_ok", "verdict", "decision", "outcome")  # type: ignore[literal-required]
                       if k in update}  # fmt: skip
            nodes.ctx.step(name, phase="end", **summary)
            return update

        return node

    graph: Any = StateGraph(DevState)
    for name in ("plan", "implement", "test", "review", "approval", "finalize"):
        graph.add_node(name, traced(name, getattr(nodes, name)))
    graph.add_node("revise", traced("revise", nodes.implement))
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "implement")
    graph.add_edge("implement", "test")
    graph.add_edge("revise", "test")
    graph.add_edge("test", "review")
    graph.add_conditional_edges("review", nodes.after_review, ["approval", "finalize", "revise"])
    graph.add_conditional_edges("approval", nodes.after_approval, ["finalize", "revise"])
    graph.add_edge("finalize", END)
    return graph.compile(checkpointer=checkpointer)


def _report(state: DevState, repo: Path | None) -> str:
    files = sorted(state.get("files", {}))
    outcome = {
        "accepted": "tests pass and the review accepts",
        "tests_failed": "the tests still fail",
        "not_accepted": "the tests pass but the review does not accept",
        "rejected": "rejected by a person",
    }[state.get("outcome", "tests_failed")]
    lines = [
        f"# Development: {state['task'][:120]}",
        "",
        f"**Result:** {outcome} after {state.get('iteration', 0)} iteration(s)"
        + (
            f" (budget spent: {state['budget']})"
            if state.get("budget") and outcome != "tests pass and the review accepts"
            else ""
        ),
        f"**Repository:** {repo or 'new project'}",
        f"**Files:** {', '.join(files) or 'none'}",
        "",
        "## Review",
        f"{state.get('verdict', '')}: {state.get('critique', '')}".strip(),
        "",
        "## Tests",
        "```",
        state.get("tests", "")[-3000:],
        "```",
        "",
        "## Diff",
        "```diff",
        state.get("diff", "")[-6000:] or "(no changes)",
        "```",
    ]
    return "\n".join(lines) + "\n"


def _tarball(files: Mapping[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(files):
            data = files[name].encode("utf-8")
            info = tarfile.TarInfo(f"project/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class DevelopmentCrew(Crew):
    name = "development"
    description = "Code generation, testing and refactoring: a diff with its tests and review."
    pool = "development"
    category: ClassVar[Category | None] = "code"

    def run(self, ctx: RunContext) -> CrewOutput:
        repo_opt = ctx.options.get("repo")
        repo = Path(str(repo_opt)).resolve() if repo_opt else None
        if repo is not None and not repo.is_dir():
            raise CrewError(f"repository {repo} is not a directory; give --repo a folder")
        nodes = _Nodes(ctx)
        approval = bool(ctx.options.get("approval", ctx.config.development.approval))
        from langgraph.types import Command

        from typhon.graphs._checkpoint import checkpointer

        thread = {"configurable": {"thread_id": ctx.run_id}}
        with checkpointer(ctx.store) as saver:
            graph = build_graph(nodes, saver)
            snapshot = graph.get_state(thread)
            start: Any
            if snapshot.next:  # a checkpoint of this run: resume, not restart
                waiting = any(task.interrupts for task in snapshot.tasks)
                if waiting:
                    answer = ctx.approval()
                    if answer is None:
                        raise RunWaiting(ctx.run_id, "approval")
                    start = Command(resume=answer)
                else:
                    start = None
                ctx.step("resumed from checkpoint", next=list(snapshot.next))
            else:
                start = DevState(task=ctx.input, repo=str(repo) if repo else None,
                                 started=time.time(), approval=approval, decision="")  # fmt: skip
            result = graph.invoke(start, thread)
            state: DevState = graph.get_state(thread).values  # type: ignore[assignment]
        self._artifacts(ctx, state, repo)
        if "__interrupt__" in result:
            raise RunWaiting(ctx.run_id, "approval")
        shutil.rmtree(nodes.root, ignore_errors=True)
        report = _report(state, repo)
        ctx.add_artifact("report.md", report)
        outcome = state.get("outcome")
        if outcome == "accepted":
            return CrewOutput(report, dict(ctx.artifacts))
        why = {
            "tests_failed": "the tests still fail",
            "not_accepted": "the review did not accept the change",
            "rejected": "rejected by a person",
        }.get(str(outcome), "no result")
        spent = f" after {state.get('iteration', 0)} iteration(s)"
        if state.get("budget"):
            spent += f" (budget spent: {state['budget']})"
        raise CrewError(f"{why}{spent}; the diff, test output and review are the run's artifacts")

    @staticmethod
    def _artifacts(ctx: RunContext, state: DevState, repo: Path | None) -> None:
        ctx.add_artifact("changes.diff", state.get("diff", ""))
        ctx.add_artifact("test-output.txt", state.get("tests", ""))
        ctx.add_artifact("review.md", f"{state.get('verdict', '')}: {state.get('critique', '')}\n")
        if repo is None and state.get("files"):
            ctx.add_artifact("project.tar.gz", _tarball(state.get("files", {})))

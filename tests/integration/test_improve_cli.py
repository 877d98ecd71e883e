"""`typhon improve eval | optimize | history | promote | rollback` as people type them, over a
SQLite and a PostgreSQL run store. The crew needs no model: with demonstrations it exclaims,
without them it echoes, so what a version holds decides each item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from typhon.improve._prompts import PromptVersions
from typhon.store import RunStore

pytestmark = pytest.mark.integration

TYPHON = str(Path(sys.executable).parent / "typhon")

CREW = """
from typhon import crew

PROMPTS = {"shouter": {"role": "Shouter", "prefix": ""}}


@crew("shouter", category="simple")
def shouter(ctx):
    return ctx.prompt("shouter", "prefix") + ctx.input + ("!" if ctx.demos else "")
"""


def _line(item_id: str, text: str, split: str) -> str:
    check = {"kind": "equals", "value": f"{text}!"}
    if text.isupper():  # these pass either way
        check = {"kind": "contains", "value": text}
    return json.dumps({"id": item_id, "input": text, "check": check, "split": split})


SUITE = [
    _line("t1", "hello there", "train"), _line("t2", "good morning", "train"),
    _line("t3", "see you", "train"), _line("t4", "OK 42", "train"),
    _line("t5", "thanks a lot", "train"), _line("t6", "bye now", "train"),
    _line("t7", "well done", "train"), _line("t8", "nice one", "train"),
    _line("s1", "all good", "test"), _line("s2", "YES", "test"),
]  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "shouter_crew.py").write_text(CREW)
    out = {**os.environ, "PYTHONPATH": str(tmp_path), "TYPHON_CREW_MODULES": "[shouter_crew]",
           "TYPHON_IMPROVE__BOOTSTRAP_SAMPLES": "500", "TYPHON_IMPROVE__DEMOS": "2"}  # fmt: skip
    if request.param == "postgresql":
        out["TYPHON_DATABASE_URL"] = request.getfixturevalue("pg_schema_url")
    else:
        out["TYPHON_DATABASE_URL"] = f"sqlite:///{tmp_path / 'typhon.db'}"
    return out


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    path = tmp_path / "shout.jsonl"
    path.write_text("\n".join(SUITE) + "\n")
    return path


def typhon(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TYPHON, *args], env=env, capture_output=True, text=True, timeout=120)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_eval_prints_the_contract(env: dict[str, str], suite: Path) -> None:
    result = typhon(env, "improve", "eval", "--crew", "shouter", "--suite", str(suite), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {k: out[k] for k in ("crew", "prompt_version", "n", "passed", "pass_rate")} == {
        "crew": "shouter", "prompt_version": 1, "n": 10, "passed": 2, "pass_rate": 0.2}  # fmt: skip
    assert out["items"][3] == {"id": "t4", "input": "OK 42", "passed": True, "output": "OK 42",
                               "status": "succeeded", "detail": "", "model": "local",
                               "model_calls": 0}  # fmt: skip
    assert out["items"][0]["detail"] == "is not 'hello there!'"
    test_only = typhon(env, "improve", "eval", "--crew", "shouter", "--suite", str(suite),
                       "--split", "test", "--json")  # fmt: skip
    assert [i["id"] for i in json.loads(test_only.stdout)["items"]] == ["s1", "s2"]
    text = typhon(env, "improve", "eval", "--crew", "shouter", "--suite", str(suite))
    assert text.returncode == 0 and "shouter v1: 2/10 passed (20%), 0 model calls" in text.stdout
    runs = typhon(env, "runs", "--json")
    assert json.loads(runs.stdout) == []  # evaluation runs stay out of the user's store


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('{"id": "x", "check": {"kind": "equals", "value": "A"}}', "lacks input"),
        ('{"id": "x", "input": "a"}', "lacks check"),
        ('{"id": "x", "input": "a", "check": {"kind": "similar", "value": "A"}}', "unknown check"),
    ],
)
def test_a_bad_suite_line_exits_2_naming_it(
    env: dict[str, str], tmp_path: Path, line: str, why: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*SUITE[:2], "", line, *SUITE[2:]]) + "\n")
    for command in ("eval", "optimize"):
        result = typhon(env, "improve", command, "--crew", "shouter", "--suite", str(path))
        assert result.returncode == 2
        assert error_line(result).startswith(f"error: suite {path}, line 4: {why}")


def test_unknown_crew_or_version_exits_2(env: dict[str, str], suite: Path) -> None:
    for command in ("eval", "optimize"):
        result = typhon(env, "improve", command, "--crew", "nosuch", "--suite", str(suite))
        assert result.returncode == 2
        assert "unknown crew 'nosuch'; known crews:" in error_line(result)
    result = typhon(env, "improve", "eval", "--crew", "shouter", "--suite", str(suite),
                    "--prompt-version", "9")  # fmt: skip
    assert result.returncode == 2
    assert "crew 'shouter' has no prompt version 9 (versions: none yet)" in error_line(result)
    missing = typhon(env, "improve", "eval", "--crew", "shouter", "--suite", "nope.jsonl")
    assert missing.returncode == 2 and "suite file nope.jsonl does not exist" in missing.stderr
    for args in (["history", "nosuch"], ["promote", "nosuch", "1"], ["rollback", "nosuch"]):
        result = typhon(env, "improve", *args)
        assert result.returncode == 2 and "unknown crew 'nosuch'" in error_line(result)


def test_optimize_promotes_demonstrations_to_the_canary(env: dict[str, str], suite: Path) -> None:
    result = typhon(env, "improve", "optimize", "--crew", "shouter", "--suite", str(suite),
                    "--rounds", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["crew"] == "shouter" and out["baseline"] == {"version": 1, "pass_rate": 0.125}
    assert out["best"]["version"] == 2 and out["best"]["pass_rate"] == 1.0
    assert out["promoted"] is True and out["status"] == "canary"
    [round_] = out["rounds"]
    assert {k: round_[k] for k in ("round", "version", "kind", "accepted", "model_calls", "n")} == {
        "round": 1,
        "version": 2,
        "kind": "demos",
        "accepted": True,
        "model_calls": 0,
        "n": 6,
    }
    lo, hi = round_["interval"]
    assert 0 < lo <= round_["gain"] <= hi and round_["pass_rate"] == 1.0
    # test items are never used: neither evaluated nor shown as demonstrations
    history = json.loads(typhon(env, "improve", "history", "shouter", "--json").stdout)
    v2 = history["versions"][1]
    assert (v2["status"], v2["source"], v2["parent"]) == ("canary", "optimizer:demos", 1)
    assert all(d["input"] not in ("all good", "YES") for d in v2["demos"])
    assert v2["metrics"]["train_pass_rate"] == 1.0


def _store(env: dict[str, str]) -> RunStore:
    return RunStore(env["TYPHON_DATABASE_URL"])


def test_history_promote_and_rollback(env: dict[str, str], suite: Path) -> None:
    empty = typhon(env, "improve", "history", "shouter")
    assert empty.returncode == 0 and "has no prompt versions yet" in empty.stdout
    seeded = typhon(env, "improve", "eval", "--crew", "shouter", "--suite", str(suite),
                    "--split", "test")  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr  # v1: the crew's code
    store = _store(env)
    try:
        PromptVersions(store).add("shouter", {"shouter": {"role": "Shouter", "prefix": "> "}},
                                  parent=1, source="manual", note="a prefix")  # fmt: skip
    finally:
        store.close()
    bad = typhon(env, "improve", "promote", "shouter", "2", "--canary", "1.5")
    assert bad.returncode == 2 and "--canary 1.5 must be a share" in error_line(bad)
    unknown = typhon(env, "improve", "promote", "shouter", "7")
    assert unknown.returncode == 2 and "has no prompt version 7" in error_line(unknown)

    promoted = typhon(env, "improve", "promote", "shouter", "2", "--canary", "0.3")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip() == "shouter:v2 is now the canary on 30% of live runs"
    out = json.loads(typhon(env, "improve", "history", "shouter", "--json").stdout)
    assert [(v["version"], v["status"], v["canary_share"]) for v in out["versions"]] == [
        (1, "active", None), (2, "canary", 0.3)]  # fmt: skip
    rolled = typhon(env, "improve", "rollback", "shouter", "--reason", "too loud")
    assert rolled.returncode == 0 and rolled.stdout.strip() == (
        "shouter:v2 retired; shouter:v1 is active")  # fmt: skip
    out = json.loads(typhon(env, "improve", "history", "shouter", "--json").stdout)
    assert [v["status"] for v in out["versions"]] == ["active", "retired"]
    events = [(e["kind"], e["from_version"], e["to_version"], e["reason"]) for e in out["events"]]
    assert events == [
        ("promoted", None, 1, "the crew's code"),
        ("canary", 1, 2, "promoted by hand"),
        ("rolled_back", 2, 1, "too loud"),
    ]  # fmt: skip

    assert typhon(env, "improve", "promote", "shouter", "2").returncode == 0
    text = typhon(env, "improve", "history", "shouter").stdout
    assert "v2   active" in text and "v1   retired" in text and "parent v1" in text
    back = typhon(env, "improve", "rollback", "shouter")
    assert back.stdout.strip() == "shouter:v2 retired; shouter:v1 is active"
    nothing = typhon(env, "improve", "rollback", "shouter")
    assert nothing.returncode == 2
    assert "crew 'shouter' has nothing to roll back to" in error_line(nothing)

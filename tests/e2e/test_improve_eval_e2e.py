"""`typhon improve eval` end to end: a custom crew on the real llama-server that Typhon starts
itself, evaluated on a tiny suite, then a version with demonstrations evaluated the same way."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import TYPHON_BIN

from typhon.improve._prompts import PromptVersions
from typhon.store import RunStore

pytestmark = pytest.mark.e2e

CREW = """
import json

from typhon import crew
from typhon.models import json_schema_format

PROMPTS = {"normalizer": {"role": "Normalizer", "instruction": "Write the name as First Last."}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
          "required": ["answer"], "additionalProperties": False}


@crew("names", category="simple")
def names(ctx):
    messages = [{"role": "system", "content": ctx.prompt("normalizer", "instruction")}]
    for turn in ctx.demo_messages():
        if turn["role"] == "assistant":
            turn = {**turn, "content": json.dumps({"answer": turn["content"]})}
        messages.append(turn)
    messages.append({"role": "user", "content": ctx.input})
    reply = ctx.model.chat(messages, max_tokens=24,
                           response_format=json_schema_format("answer", SCHEMA))
    return reply.content
"""

ANSWER = {"type": "object", "required": ["answer"],
          "properties": {"answer": {"type": "string"}}}  # fmt: skip
SUITE = [
    {"id": "shape", "input": "Turing, Alan", "check": {"kind": "json_schema", "value": ANSWER}},
    {"id": "never", "input": "Hopper, Grace", "check": {"kind": "equals", "value": "no such name"}},
    {"id": "found", "input": "Knuth, Donald", "check": {"kind": "regex", "value": r"\S"}},
]


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "names_crew.py").write_text(CREW)
    return {**os.environ, "TYPHON_HOME": str(tmp_path / "home"), "PYTHONPATH": str(tmp_path),
            "TYPHON_CREW_MODULES": "[names_crew]"}  # fmt: skip


def _eval(env: dict[str, str], suite: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [TYPHON_BIN, "improve", "eval", "--crew", "names", "--suite", str(suite), "--json", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _check_items(out: dict[str, Any]) -> None:
    """Each item ran on the real model and was checked: a reply the grammar finished is JSON
    (the json_schema check passes); one cut off at max_tokens fails the run, and the item."""
    items = {i["id"]: i for i in out["items"]}
    assert list(items) == ["shape", "never", "found"]
    for item in items.values():
        assert item["model"] == "local" and item["model_calls"] >= 1, item
        if item["status"] == "succeeded":
            assert isinstance(json.loads(item["output"])["answer"], str), item
        else:
            assert item["status"] == "failed" and not item["passed"], item
            assert item["detail"].startswith("run failed: model 'local' at http://127.0.0.1:")
    assert items["shape"]["passed"] is (items["shape"]["status"] == "succeeded")
    assert items["never"]["passed"] is False
    if items["never"]["status"] == "succeeded":
        assert items["never"]["detail"] == "is not 'no such name'"
    assert out["passed"] == sum(1 for i in items.values() if i["passed"])
    assert out["pass_rate"] == round(out["passed"] / 3, 4)


def test_eval_on_the_real_model(tmp_path: Path) -> None:
    env = _env(tmp_path)
    suite = tmp_path / "names.jsonl"
    suite.write_text("\n".join(json.dumps(item) for item in SUITE) + "\n")

    out = _eval(env, suite)
    assert (out["crew"], out["prompt_version"], out["n"]) == ("names", 1, 3)
    _check_items(out)

    home = tmp_path / "home"
    store = RunStore(f"sqlite:///{home / 'typhon.db'}")
    try:
        assert store.list_runs() == []  # evaluation runs never reach the user's store
        added = PromptVersions(store).add(
            "names", {"normalizer": {"role": "Normalizer", "instruction": "First Last."}},
            [{"input": "Newton, Isaac", "output": "Isaac Newton"}], parent=1, source="manual",
        )  # fmt: skip
    finally:
        store.close()
    again = _eval(env, suite, "--prompt-version", str(added.version))
    assert again["prompt_version"] == 2 and again["n"] == 3
    _check_items(again)
    assert not list((home / "run").glob("llama-*.json")), "llama-server left running"

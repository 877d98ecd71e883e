"""Task suites: JSONL files of inputs with a deterministic (or judged) check on the output.

One item per line::

    {"id": "iso-1", "input": "7 June 2019", "check": {"kind": "equals", "value": "2019-06-07"},
     "split": "train"}

``id`` defaults to the line number and ``split`` (``train`` | ``test``) is optional; blank lines
are skipped. Check kinds: ``contains`` (case-insensitive substring), ``regex`` (``re.search``),
``equals`` (stripped, case-insensitive), ``json_schema`` (the output parsed as JSON and validated
against the schema) and ``judge`` (the QA reviewer's verdict: pass with a score of at least 0.5).
A line that is not JSON, lacks ``input`` or ``check``, or names an unknown kind or a bad value
raises :class:`InputError` naming the file and the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typhon.errors import InputError

__all__ = ["CHECK_KINDS", "Check", "SuiteItem", "check_output", "load_suite", "split_items"]

CHECK_KINDS = ("contains", "regex", "equals", "json_schema", "judge")
SPLITS = ("train", "test")
JUDGE_PASS_SCORE = 0.5

# (passed, why) from the QA reviewer for one output; the evaluator supplies it.
Judge = Callable[[str, str], tuple[bool, str]]


@dataclass(frozen=True)
class Check:
    kind: str
    value: Any = None

    def describe(self) -> str:
        """What the check wants, in a few words (for people and for the rewriting model)."""
        if self.kind == "json_schema":
            return f"JSON matching the schema {json.dumps(self.value)[:300]}"
        if self.kind == "judge":
            return "an answer the reviewer passes" + (f" ({self.value})" if self.value else "")
        words = {"contains": "contains", "regex": "matches the pattern", "equals": "is exactly"}
        return f"{words[self.kind]} {json.dumps(self.value)}"


@dataclass(frozen=True)
class SuiteItem:
    id: str
    input: str
    check: Check
    split: str | None = None
    line: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "input": self.input, "split": self.split,
                "check": {"kind": self.check.kind, "value": self.check.value}}  # fmt: skip


def _fail(path: Path, line: int, why: str) -> InputError:
    return InputError(f"suite {path}, line {line}: {why}")


def _check(path: Path, line: int, raw: Any) -> Check:
    if not isinstance(raw, dict):
        raise _fail(path, line, 'the check must be an object {"kind": ..., "value": ...}')
    kind = raw.get("kind")
    if kind not in CHECK_KINDS:
        raise _fail(path, line, f"unknown check kind {kind!r}; use one of {', '.join(CHECK_KINDS)}")
    value = raw.get("value")
    if kind in ("contains", "regex", "equals"):
        if not isinstance(value, str) or not value:
            raise _fail(path, line, f"a {kind} check needs a non-empty string value")
        if kind == "regex":
            try:
                re.compile(value)
            except re.error as exc:
                raise _fail(path, line, f"the regex does not compile: {exc}") from None
    elif kind == "json_schema":
        if not isinstance(value, dict):
            raise _fail(path, line, "a json_schema check needs a JSON schema object as its value")
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as exc:
            raise _fail(path, line, f"the JSON schema is not valid: {exc.message}") from None
    return Check(kind, value)


def _item(path: Path, line: int, text: str, seen: set[str]) -> SuiteItem:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise _fail(path, line, 'each line must be a JSON object {"id", "input", "check"}')
    missing = [key for key in ("input", "check") if key not in raw]
    if missing:
        raise _fail(path, line, f"lacks {' and '.join(missing)}")
    if not isinstance(raw["input"], str) or not raw["input"].strip():
        raise _fail(path, line, "input must be a non-empty string")
    split = raw.get("split")
    if split is not None and split not in SPLITS:
        raise _fail(path, line, f"split must be train or test, not {split!r}")
    item_id = str(raw.get("id", line))
    if item_id in seen:
        raise _fail(path, line, f"id {item_id!r} appears twice")
    seen.add(item_id)
    return SuiteItem(item_id, raw["input"], _check(path, line, raw["check"]), split, line)


def load_suite(path: str | Path) -> list[SuiteItem]:
    """The items of a JSONL suite (see the module's docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"suite file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read suite file {path}: {exc}") from None
    seen: set[str] = set()
    items = [
        _item(path, number, line, seen)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not items:
        raise InputError(f"suite {path} holds no items")
    return items


def split_items(items: Sequence[SuiteItem], split: str | None) -> list[SuiteItem]:
    """The items of one split (all of them for None). Items without a split count as train
    items when the suite has no test items, so a suite without splits optimizes on all."""
    if split is None:
        return list(items)
    if split not in SPLITS:
        raise InputError(f"split must be train or test, not {split!r}")
    chosen = [i for i in items if i.split == split]
    if split == "train" and not any(i.split == "test" for i in items):
        chosen = [i for i in items if i.split in (None, "train")]
    return chosen


def check_output(check: Check, output: str, judge: Judge | None = None) -> tuple[bool, str]:
    """(passed, why) for one output."""
    kind, value = check.kind, check.value
    if kind == "contains":
        ok = value.lower() in output.lower()
        return ok, "" if ok else f"does not contain {value!r}"
    if kind == "regex":
        ok = re.search(value, output) is not None
        return ok, "" if ok else f"does not match {value!r}"
    if kind == "equals":
        ok = output.strip().lower() == value.strip().lower()
        return ok, "" if ok else f"is not {value!r}"
    if kind == "json_schema":
        return _json_schema(value, output)
    if judge is None:
        return False, "no reviewer to judge it"
    return judge(check.value or "", output)


def _json_schema(schema: dict[str, Any], output: str) -> tuple[bool, str]:
    from jsonschema import Draft202012Validator

    text = output.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, f"not JSON ({exc.msg})"
    error = next(iter(Draft202012Validator(schema).iter_errors(data)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the document"
        return False, f"{where}: {error.message}"[:300]
    return True, ""

"""Suites (loading, bad lines, checks) and the optimizer's own pieces: the paired bootstrap and
the gate, placeholders in rewrites, the choice of demonstrations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from typhon.config import ImproveConfig
from typhon.errors import InputError
from typhon.improve._optimize import (
    gate,
    keeps_placeholders,
    paired_bootstrap,
    placeholders,
    select_demos,
    shape,
)
from typhon.improve._suite import Check, check_output, load_suite, split_items

GOOD = {"id": "a", "input": "7 June 2019", "check": {"kind": "equals", "value": "2019-06-07"}}


def _suite(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_suite_loads_with_ids_splits_and_blank_lines(tmp_path: Path) -> None:
    path = _suite(
        tmp_path,
        json.dumps({**GOOD, "split": "train"}),
        "",
        "   ",
        json.dumps({"input": "x", "check": {"kind": "contains", "value": "y"}, "split": "test"}),
        json.dumps({"input": "z", "check": {"kind": "judge"}}),
    )
    items = load_suite(path)
    assert [(i.id, i.split, i.line) for i in items] == [("a", "train", 1), ("4", "test", 4),
                                                        ("5", None, 5)]  # fmt: skip
    assert items[0].check == Check("equals", "2019-06-07")
    assert [i.id for i in split_items(items, "train")] == ["a"]
    assert [i.id for i in split_items(items, "test")] == ["4"]
    assert len(split_items(items, None)) == 3


def test_without_test_items_every_item_is_a_train_item(tmp_path: Path) -> None:
    path = _suite(tmp_path, json.dumps(GOOD), json.dumps({**GOOD, "id": "b", "split": "train"}))
    assert [i.id for i in split_items(load_suite(path), "train")] == ["a", "b"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"id": "x", "input": "a", "check": ', "not valid JSON"),
        ('["a", "b"]', "must be a JSON object"),
        ('{"id": "x", "check": {"kind": "equals", "value": "a"}}', "lacks input"),
        ('{"id": "x", "input": "a"}', "lacks check"),
        ('{"id": "x"}', "lacks input and check"),
        ('{"input": "  ", "check": {"kind": "equals", "value": "a"}}', "non-empty string"),
        ('{"input": "a", "check": {"kind": "fuzzy", "value": "a"}}', "unknown check kind 'fuzzy'"),
        ('{"input": "a", "check": "equals a"}', "must be an object"),
        ('{"input": "a", "check": {"kind": "regex", "value": "("}}', "does not compile"),
        ('{"input": "a", "check": {"kind": "equals"}}', "needs a non-empty string"),
        ('{"input": "a", "check": {"kind": "json_schema", "value": "x"}}', "JSON schema object"),
        ('{"input": "a", "check": {"kind": "json_schema", "value": {"type": 5}}}', "not valid"),
        ('{"input": "a", "check": {"kind": "equals", "value": "b"}, "split": "dev"}', "split"),
        ('{"id": "a", "input": "a", "check": {"kind": "equals", "value": "b"}}', "appears twice"),
    ],
)
def test_a_bad_line_is_refused_naming_the_file_and_line(
    tmp_path: Path, line: str, why: str
) -> None:
    path = _suite(tmp_path, json.dumps(GOOD), "", line)
    with pytest.raises(InputError) as caught:
        load_suite(path)
    assert str(caught.value).startswith(f"suite {path}, line 3: ")
    assert why in str(caught.value)


def test_a_missing_or_empty_suite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_suite(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="holds no items"):
        load_suite(_suite(tmp_path, "", " "))


@pytest.mark.parametrize(
    ("check", "output", "passed"),
    [
        (Check("contains", "Paris"), "It is paris, France.", True),
        (Check("contains", "Paris"), "Lyon", False),
        (Check("regex", r"^\d{4}-\d{2}-\d{2}$"), "2019-06-07", True),
        (Check("regex", r"^\d{4}-\d{2}-\d{2}$"), "on 2019-06-07", False),
        (Check("equals", "2019-06-07"), "  2019-06-07\n", True),
        (Check("equals", "Alan Turing"), "alan turing", True),
        (Check("equals", "Alan Turing"), "Alan Turing.", False),
        (Check("json_schema", {"type": "object", "required": ["a"]}), '{"a": 1}', True),
        (
            Check("json_schema", {"type": "object", "required": ["a"]}),
            '```json\n{"a": 1}\n```',
            True,
        ),
        (Check("json_schema", {"type": "object", "required": ["a"]}), '{"b": 1}', False),
        (Check("json_schema", {"type": "object"}), "not json", False),
    ],
)
def test_checks(check: Check, output: str, passed: bool) -> None:
    assert check_output(check, output)[0] is passed


def test_a_judge_check_asks_the_judge() -> None:
    asked: list[tuple[str, str]] = []

    def judge(rubric: str, output: str) -> tuple[bool, str]:
        asked.append((rubric, output))
        return output == "good", "pass 0.9" if output == "good" else "fail 0.1"

    check = Check("judge", "is polite")
    assert check_output(check, "good", judge) == (True, "pass 0.9")
    assert check_output(check, "bad", judge) == (False, "fail 0.1")
    assert asked == [("is polite", "good"), ("is polite", "bad")]
    assert check_output(check, "good") == (False, "no reviewer to judge it")


def test_the_failure_detail_says_what_was_wanted() -> None:
    assert check_output(Check("equals", "a"), "b") == (False, "is not 'a'")
    ok, why = check_output(Check("json_schema", {"type": "object", "required": ["a"]}), "{}")
    assert not ok and "'a' is a required property" in why


# -- the gate ------------------------------------------------------------------------------------
def test_the_bootstrap_is_fixed_by_its_seed() -> None:
    diffs = [1.0] * 6 + [0.0] * 10 + [-1.0] * 2
    first = paired_bootstrap(diffs, confidence=0.95, samples=2000, seed=3)
    assert first == paired_bootstrap(diffs, confidence=0.95, samples=2000, seed=3)
    assert first == pytest.approx((-1 / 18, 0.5))  # pinned: the same seed, the same interval
    low, high = first
    assert low < sum(diffs) / len(diffs) < high
    assert paired_bootstrap([0.0] * 8, confidence=0.95, samples=500) == (0.0, 0.0)
    assert paired_bootstrap([], confidence=0.95, samples=500) == (0.0, 0.0)


def test_the_gate_needs_the_margin_and_an_interval_above_zero() -> None:
    settings = ImproveConfig(gain_margin=0.05, confidence=0.95, bootstrap_samples=1000)
    worse = gate([1.0] * 10, [0.0] * 10, settings)
    assert (worse.gain, worse.accepted) == (-1.0, False) and "below the margin" in worse.reason
    better = gate([0.0] * 10, [1.0] * 8 + [0.0] * 2, settings)
    assert better.accepted and better.gain == pytest.approx(0.8) and better.interval[0] > 0
    # a gain over the margin that is one lucky item: the interval includes 0
    lucky = gate([0.0] * 10, [1.0] + [0.0] * 9, settings)
    assert lucky.gain == pytest.approx(0.1) and not lucky.accepted
    assert lucky.interval[0] <= 0 and "includes 0" in lucky.reason
    equal = gate([1.0, 0.0] * 5, [1.0, 0.0] * 5, ImproveConfig(gain_margin=0.0))
    assert (equal.gain, equal.interval, equal.accepted) == (0.0, (0.0, 0.0), False)
    assert not gate([], [], settings).accepted


# -- candidates ----------------------------------------------------------------------------------
def test_placeholders_of_a_rewrite_must_match_the_original() -> None:
    original = "Write a brief on {topic} from {material}. Use {{braces}} literally."
    assert placeholders(original) == {"topic", "material"}
    assert keeps_placeholders(original, "From {material}, brief me on {topic}.")
    assert not keeps_placeholders(original, "Write a brief on {topic}.")
    assert not keeps_placeholders(original, "On {topic} from {material} for {audience}.")
    assert keeps_placeholders("No placeholders here.", "Still none {{x}}.")


def test_demonstrations_cover_the_shapes_that_fail_first() -> None:
    assert shape("7 June 2019") == "9 a 9"
    assert shape("June 7, 2019") == "a 9, 9"
    assert shape("07.06.2019") == "9.9.9"
    pool = [
        {"input": "1 May 2000", "output": "2000-05-01"},
        {"input": "2 May 2001", "output": "2001-05-02"},
        {"input": "May 3, 2002", "output": "2002-05-03"},
        {"input": "04.05.2003", "output": "2003-05-04"},
        {"input": "2004/5/5", "output": "2004-05-05"},
    ]
    failing = ["09.10.2011", "10.10.2012", "Oct 9, 2011"]
    chosen = select_demos(pool, failing, 2, random.Random(1))
    assert [shape(d["input"]) for d in chosen] == ["9.9.9", "a 9, 9"]
    three = select_demos(pool, failing, 3, random.Random(1))
    assert [shape(d["input"]) for d in three][:2] == ["9.9.9", "a 9, 9"]
    assert len({d["input"] for d in three}) == 3
    assert len(select_demos(pool, [], 9, random.Random(1))) == len(pool)

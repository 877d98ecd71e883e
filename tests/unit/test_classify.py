"""typhon.models._classify: the router's rules, hashed-feature classifier, data and model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from typhon.config import CATEGORIES
from typhon.models import _classify as clf
from typhon.models._classify import (
    DEFAULT_PATTERNS,
    Classifier,
    classify,
    data_path,
    evaluate,
    file_sha256,
    load_examples,
    match_rule,
)

# rules + shipped model on routing_heldout.jsonl, measured when the model was trained: 0.988
# (158/160). The floor sits a few points below, so a broken model, rule or data set fails.
HELDOUT_ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load()


@pytest.fixture(scope="module")
def small_model() -> Classifier:
    """A quick model on a slice of the train split (a few epochs): for round trips."""
    return Classifier.train(load_examples("train")[:120], epochs=3, dim=2**12)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# -- rules ----------------------------------------------------------------------------------------
RULE_EXAMPLES = [
    ("code-fence", "what does this do?\n```\nx = [i for i in range(3)]\n```"),
    ("python-traceback", 'Traceback (most recent call last):\n  File "a.py", line 1'),
    ("stack-trace", "panic: runtime error: index out of range [3] with length 3"),
    ("stack-trace", "my program prints Segmentation fault (core dumped) on start"),
    ("exception-name", "I get a KeyError when I read the config, why?"),
    ("exception-name", "npm ERR! code ENOENT"),
    ("code-definition", "def load(path):\n    return open(path).read()"),
    ("code-definition", "class Queue:\n    pass\n\nhow do I make it thread-safe?"),
    ("code-statement", "import os\nprint(os.listdir('.'))"),
    ("code-statement", "why is select id, name from users so slow on a big table"),
    ("code-line-end", "int main() {\n  return 0;\n}"),
    ("diff", "diff --git a/app.py b/app.py\n--- a/app.py\n+++ b/app.py"),
    ("diff", "can you review my pull request before I merge it?"),
    ("code-request", "Write a function that sorts a list of dicts by a key"),
    ("code-request", "Please implement a ring buffer in Rust"),
    ("code-request", "can you write a regex for UK postcodes"),
    ("code-request-intl", "Écris une fonction Python qui compte les voyelles."),
    ("roleplay", "Let's roleplay: you are a ship's captain in a storm."),
    ("pretend", "Pretend you are a tour guide in ancient Rome."),
    ("pretend", "Once upon a time there was a robot... continue it"),
    ("creative-form", "write me a short poem about tea"),
    ("creative-form", "Compose a haiku on winter light"),
    ("creative-form", "tell me a bedtime story about a sleepy bear"),
    ("creative-form-intl", "Schreib ein Gedicht über den Herbst"),
    ("translate", "Translate 'see you soon' into German"),
    ("translate", "how do you say good luck in Japanese?"),
    ("translate", "Traduis en anglais : bonne nuit"),
    ("greeting", "hello!"),
    ("greeting", "Good morning Typhon"),
    ("thanks-bye", "thanks a lot"),
    ("word-meaning", "what does 'serendipity' mean?"),
    ("weigh-up", "What are the pros and cons of solar panels on a flat roof?"),
]


@pytest.mark.parametrize(("name", "text"), RULE_EXAMPLES)
def test_rule_fires_on_its_example(name: str, text: str) -> None:
    assert match_rule(text) == name
    decision = classify(text, classifier=None)
    category = next(p["category"] for p in DEFAULT_PATTERNS if p["name"] == name)
    assert (decision.category, decision.source, decision.reason) == (
        category,
        "rule",
        f"rule {name}",
    )
    assert decision.confidence == 1.0


def test_every_default_rule_has_an_example() -> None:
    names = [p["name"] for p in DEFAULT_PATTERNS]
    assert len(names) == len(set(names))
    assert set(names) == {name for name, _ in RULE_EXAMPLES}
    json.dumps(DEFAULT_PATTERNS)  # plain data
    assert all(p["category"] in CATEGORIES for p in DEFAULT_PATTERNS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a request after a greeting is not small talk
        ("Hi, can you write me a Python function to merge two dicts?", "code-request"),
        ("hey, tell me a story about a fox", "creative-form"),
        ("thanks, now explain how raft elects a leader", None),
        ("translate this Python 2 code to Python 3: print 'x'", None),  # no natural language
        ("Write a user story for the password reset page", None),  # agile, not fiction
        ("I mostly write backend services in Python; should I learn Go next?", None),
        ("What's the difference between an error and an exception in Java?", None),
        ("Open the pod bay doors", None),  # "pen" inside a word
        ("what does this code mean?", None),  # no quoted word
    ],
)
def test_rules_leave_near_misses_alone(text: str, expected: str | None) -> None:
    assert match_rule(text) == expected


def test_first_matching_rule_wins() -> None:
    a = {"name": "a", "category": "code", "pattern": r"\bbug\b"}
    b = {"name": "b", "category": "creative", "pattern": r"\bstory\b"}
    text = "tell me a story about a bug"
    assert classify(text, patterns=[a, b], classifier=None).reason == "rule a"
    assert classify(text, patterns=[b, a], classifier=None).reason == "rule b"
    assert classify(text, patterns=[b, a], classifier=None).category == "creative"


def test_rules_match_case_insensitively() -> None:
    rule = [{"name": "shout", "category": "simple", "pattern": r"^hello there$"}]
    assert classify("HeLLo THERE", patterns=rule, classifier=None).source == "rule"


def test_invalid_pattern_raises_naming_it() -> None:
    bad = [*DEFAULT_PATTERNS, {"name": "broken-one", "category": "code", "pattern": r"(unclosed"}]
    with pytest.raises(ValueError, match="broken-one"):
        classify("hello", patterns=bad, classifier=None)
    with pytest.raises(ValueError, match="odd-category"):
        classify("x", patterns=[{"name": "odd-category", "category": "poetry", "pattern": "x"}],
                 classifier=None)  # fmt: skip
    with pytest.raises(ValueError, match="no-pattern"):
        classify("x", patterns=[{"name": "no-pattern", "category": "code"}], classifier=None)


def test_compiled_rules_are_cached() -> None:
    classify("warm the cache", classifier=None)
    before = clf._compile.cache_info()
    for text in ("hello", "write a poem", "fix this bug", "what is DNS"):
        classify(text, classifier=None)
    after = clf._compile.cache_info()
    assert after.misses == before.misses
    assert after.hits >= before.hits + 4
    assert clf._rules(DEFAULT_PATTERNS) is clf._rules([dict(p) for p in DEFAULT_PATTERNS])


def test_prefilter_agrees_with_plain_regex_search() -> None:
    """The needle prefilter only skips work: the first rule is the same with and without it."""
    rules = clf._rules(DEFAULT_PATTERNS)
    texts = [t for name in ("train", "heldout") for t, _ in load_examples(name)]
    texts += [t.swapcase() for t in texts[:200]] + [t * 40 for t in texts[:40]]
    texts += ["WRİTE A POEM", "wrıte a poem", "ſup", "Pretend you are ſomeone", "x" * 5000]
    texts += ["\n" * 3 + "hi", "  hello", "a" * 1990 + "```", "a" * 2100 + "```"]
    for text in texts:
        fast = clf._first_rule(text, rules)
        slow = clf._first_rule(text, rules, prefilter=False)
        assert (fast and fast.name) == (slow and slow.name), text[:80]


def test_rules_look_at_the_start_of_long_texts_only() -> None:
    assert match_rule("x " * 500 + "```") == "code-fence"
    assert match_rule("x " * (clf.RULE_MAX_CHARS // 2) + "```") is None


# -- the classifier -------------------------------------------------------------------------------
def test_prediction_is_a_softmax(shipped: Classifier) -> None:
    pred = shipped.predict("Compare the economic policies of two countries in detail.")
    assert set(pred.scores) == set(CATEGORIES)
    assert sum(pred.scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert pred.confidence == max(pred.scores.values())
    assert pred.scores[pred.category] == pred.confidence


def test_save_load_round_trip(small_model: Classifier, tmp_path: Path) -> None:
    small_model.info["note"] = "round trip"
    path = tmp_path / "model.npz"
    small_model.save(path)
    loaded = Classifier.load(path)
    assert loaded.dim == small_model.dim
    assert loaded.info == small_model.info
    assert np.array_equal(loaded.weights, small_model.weights)
    assert np.array_equal(loaded.bias, small_model.bias)
    for text, _ in load_examples("heldout"):
        assert loaded.predict(text) == small_model.predict(text)


def test_training_is_deterministic(tmp_path: Path) -> None:
    examples = load_examples("train")[:100]
    first = Classifier.train(examples, epochs=2, dim=2**12, seed=7)
    second = Classifier.train(examples, epochs=2, dim=2**12, seed=7)
    assert np.array_equal(first.weights, second.weights)
    assert np.array_equal(first.bias, second.bias)
    first.save(tmp_path / "a.npz")
    second.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_training_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown category"):
        Classifier.train([("hello", "greeting")])
    with pytest.raises(ValueError, match="no examples"):
        Classifier.train([])
    with pytest.raises(ValueError, match="power of two"):
        Classifier.train([("hello", "simple")], dim=1000)


def test_features_use_a_stable_hash() -> None:
    """The same buckets in another process with another hash seed (no use of hash())."""
    text = "Write a haiku about GPUs, then translate it into French."
    idx, val = clf.features(text)
    code = (
        "import json, sys; from typhon.models._classify import features; "
        "i, v = features(sys.argv[1]); print(json.dumps([i.tolist(), v.tolist()]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, text], env=env, capture_output=True, text=True, check=True
    )
    other_idx, other_val = json.loads(out.stdout)
    assert idx.tolist() == other_idx
    assert np.allclose(val, other_val)


def test_features_are_unit_length_and_capped() -> None:
    idx, val = clf.features("Explain how DNS resolution works, step by step.")
    assert len(idx) == len(set(idx.tolist()))
    assert float(val @ val) == pytest.approx(1.0, abs=1e-5)
    long_text = "word " * 5000
    assert np.array_equal(clf.features(long_text)[0], clf.features(long_text[: clf.MAX_CHARS])[0])
    assert len(clf.features("")[0]) > 0  # shape features only


# -- the decision ---------------------------------------------------------------------------------
def _uniform() -> Classifier:
    """A model that gives every category 0.25."""
    return Classifier(np.zeros((2**8, len(CATEGORIES)), np.float32), np.zeros(4, np.float32))


def test_low_confidence_falls_back_to_the_default() -> None:
    text = "an unremarkable sentence with no rule in it"
    assert match_rule(text) is None
    decision = classify(text, classifier=_uniform(), min_confidence=0.4)
    assert (decision.category, decision.source) == ("complex", "default")
    assert decision.reason == "low confidence (simple 0.25 < 0.40): default complex"
    assert decision.confidence == pytest.approx(0.25)
    other = classify(text, classifier=_uniform(), min_confidence=0.4, default="simple")
    assert (other.category, other.source) == ("simple", "default")
    taken = classify(text, classifier=_uniform(), min_confidence=0.2)
    assert (taken.category, taken.source, taken.reason) == (
        "simple",
        "classifier",
        "classifier: simple 0.25",
    )


def test_no_classifier_means_rules_then_default() -> None:
    decision = classify("an unremarkable sentence with no rule in it", classifier=None)
    assert (decision.category, decision.source, decision.confidence) == ("complex", "default", 0.0)
    assert decision.reason == "no rule matched: default complex"
    assert classify("hello", classifier=None).source == "rule"


def test_confident_model_decides(shipped: Classifier) -> None:
    text = "Why did the Ottoman Empire decline over the 18th and 19th centuries?"
    assert match_rule(text) is None
    decision = classify(text, classifier=shipped)
    assert decision.source == "classifier"
    assert decision.category == "complex"
    assert decision.reason == f"classifier: complex {decision.confidence:.2f}"


# -- data, shipped model, evaluation --------------------------------------------------------------
def test_splits_share_no_text() -> None:
    train = {_norm(t) for t, _ in load_examples("train")}
    heldout = [_norm(t) for t, _ in load_examples("heldout")]
    assert len(heldout) == len(set(heldout))
    assert not train & set(heldout)


@pytest.mark.parametrize(("name", "floor"), [("train", 100), ("heldout", 35)])
def test_every_category_is_well_represented(name: str, floor: int) -> None:
    counts = Counter(category for _, category in load_examples(name))
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= floor, counts


def test_data_files_are_well_formed() -> None:
    for name in ("train", "heldout"):
        for line in data_path(name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert set(row) == {"text", "category"}
            assert row["text"].strip() and row["category"] in CATEGORIES
    with pytest.raises(ValueError, match="no split"):
        load_examples("validation")


def test_shipped_model_was_trained_on_the_current_train_file(shipped: Classifier) -> None:
    """Edit routing_train.jsonl without running scripts/train-router and this fails."""
    assert shipped.info.get("train_sha256") == file_sha256(data_path("train"))
    assert int(shipped.info["examples"]) == len(load_examples("train"))
    assert clf.DEFAULT_MODEL_PATH.stat().st_size < 2 * 1024 * 1024


def test_shipped_model_heldout_accuracy(shipped: Classifier) -> None:
    result = evaluate(shipped, load_examples("heldout"))
    assert result.accuracy >= HELDOUT_ACCURACY_FLOOR, result.render()
    assert all(result.recall[c] >= 0.85 for c in CATEGORIES), result.render()


def test_evaluation_counts_and_renders() -> None:
    examples = [("hello", "simple"), ("write a poem about rain", "creative"), ("hmm", "code")]
    result = evaluate(None, examples)
    assert result.n == 3
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.confusion["code"]["complex"] == 1  # no rule: the default
    assert result.recall["code"] == 0.0 and result.precision["simple"] == 1.0
    assert result.sources == {"rule": 2, "default": 1}
    assert [(t, true) for t, true, _ in result.errors] == [("hmm", "code")]
    table = result.render()
    for category in CATEGORIES:
        assert category in table
    assert "accuracy 0.667 (2/3)" in table


def test_import_typhon_does_not_load_the_classifier() -> None:
    code = "import sys, typhon, typhon.models; print('typhon.models._classify' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The request classifier behind the model router: high-precision rules, then a small learned model.

A request is given one of the categories of :data:`typhon.config.CATEGORIES` (``simple``,
``complex``, ``code``, ``creative``) by :func:`classify`:

1. the rules of ``patterns`` (:data:`DEFAULT_PATTERNS` unless told), in order, each a regular
   expression searched case-insensitively in the first :data:`RULE_MAX_CHARS` characters; the
   first that matches decides (``source="rule"``);
2. otherwise the :class:`Classifier`: a multinomial logistic regression over hashed features
   (word unigrams and bigrams, character 3-5-grams of the words, a few shape features), whose
   softmax probabilities decide when the top one is at least ``min_confidence``
   (``source="classifier"``);
3. otherwise the ``default`` category (``source="default"``).

The features are hashed with :func:`zlib.crc32` (stable across processes, unlike :func:`hash`)
into ``dim`` buckets; each of the two groups (words, characters) is weighted with sublinear TF
(``1 + log tf``) and L2-normalised. The features read the first :data:`MAX_CHARS` characters, the
rules the first :data:`RULE_MAX_CHARS`; a prefilter derived from each pattern (strings every match
must contain) skips regex scans that cannot match, so long requests stay cheap.

The shipped model, ``data/router_model.npz``, is trained by ``scripts/train-router`` on
``data/routing_train.jsonl`` only; ``data/routing_heldout.jsonl`` is kept for evaluation.
This module imports numpy: import it lazily (the router does), never from ``typhon/__init__``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import math
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from typhon.config import CATEGORIES, Category

__all__ = [
    "CATEGORIES",
    "DATA_DIR",
    "DEFAULT_MODEL_PATH",
    "DEFAULT_PATTERNS",
    "MAX_CHARS",
    "RULE_MAX_CHARS",
    "Category",
    "Classifier",
    "Decision",
    "Evaluation",
    "Prediction",
    "classify",
    "data_path",
    "evaluate",
    "features",
    "file_sha256",
    "load_examples",
    "match_rule",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL_PATH = DATA_DIR / "router_model.npz"
SPLITS = {"train": "routing_train.jsonl", "heldout": "routing_heldout.jsonl"}

MAX_CHARS = 1000  # characters of a request the classifier's features look at
RULE_MAX_CHARS = 2000  # characters the rules search
_MAX_TRIES = 48  # match attempts a rule's prefilter makes before it searches instead
MAX_WORD_CHARS = 24  # characters of one word its character n-grams are taken from
DEFAULT_DIM = 2**16
MODEL_FORMAT = 1

FloatArray = npt.NDArray[np.float32]
_UNBOUNDED = 1 << 62
_Needles = tuple[frozenset[str], int]  # needles, widest the pattern can be before them

# -- rules ----------------------------------------------------------------------------------------
# Words that make a short "hi ..."/"thanks ..." message a request rather than small talk.
_ASKS = (
    r"(?![^\n]*\b(?:write|fix|explain|compare|translate|debug|review|code|story|poem|analy[sz]e"
    r"|implement|create|generate|summari[sz]e|plan|roleplay|pretend)\b)"
)
_LANGUAGES = (
    r"(?:english|french|german|spanish|italian|portuguese|dutch|polish|russian|japanese|chinese"
    r"|mandarin|cantonese|korean|arabic|hindi|turkish|swedish|norwegian|danish|finnish|greek"
    r"|hebrew|thai|vietnamese|indonesian|ukrainian|czech|romanian|hungarian|latin|swahili)"
)
_CODE_LANGUAGES = (
    r"(?:python|javascript|typescript|rust|golang|java|c\+\+|c#|haskell|kotlin|swift|php|ruby"
    r"|bash|powershell|elixir|scala|lua|perl|sql|node(?:\.?js)?)"
)
# The start of a request: the text's or a sentence's, then perhaps "please" or "can you".
_IMPERATIVE = (
    r"(?:^|[.!?:;,]\s{1,4}|\n)\s{0,8}(?:(?:please|pls|now|can you|could you|help me)\s{1,4})?"
)
# "write" in French, German, Spanish, Italian, Portuguese (imperatives).
_WRITE_INTL = (
    r"(?:écris|ecris|écrivez|rédige|schreib|schreibe|schreiben sie|escribe|escriba|scrivi|scriva"
    r"|escreva|escreve)"
)
_FORMS = (
    r"(?:poems?|haikus?|limericks?|sonnets?|villanelles?|sestinas?|odes?|ballads?|lullab(?:y|ies)"
    r"|lyrics|songs?|raps?|verses?|(?<!user )stor(?:y|ies)|fables?|fairy ?tales?|short stories"
    r"|flash fiction|microfiction|screenplay|monologue|eulogy|riddles?|tongue twisters?"
    r"|bedtime stor(?:y|ies)|sea shanty|shanty)"
)

DEFAULT_PATTERNS: list[dict[str, str]] = [
    # code: unmistakable artefacts of programs first
    {"name": "code-fence", "category": "code", "pattern": r"```"},
    {
        "name": "python-traceback",
        "category": "code",
        "pattern": r"traceback \(most recent call last\)",
    },
    {
        "name": "stack-trace",
        "category": "code",
        "pattern": r"panic: |goroutine \d+ \[|segmentation fault|core dumped",
    },
    {
        "name": "exception-name",
        "category": "code",
        "pattern": r"(?-i:[A-Z][a-zA-Z]{0,40}(?:Error|Exception)\b)|^(?-i:Error): |npm ERR!",
    },
    {
        "name": "code-definition",
        "category": "code",
        "pattern": r"(?m)\b(?:def|function|func|fn)\s+\w+\s*\(|^[ \t]{0,16}class\s+\w+\s*[(:{]"
        r"|^[ \t]{0,16}(?:public|private|static)\s+[\w<>\[\]]+\s+\w+\s*\(",
    },
    {
        "name": "code-statement",
        "category": "code",
        "pattern": r"(?m)^[ \t]{0,16}(?:import [\w.]+|from [\w.]+ import |#include\s*[<\"]"
        r"|using namespace |\$ \w+)|\bconsole\.log\(|\bSystem\.out\.print|\bprintln!?\("
        r"|\bselect\s+[\w*,. ]+\s+from\s+\w+",
    },
    {"name": "code-line-end", "category": "code", "pattern": r"(?m);[ \t]*$|\{[ \t]*$"},
    {
        "name": "diff",
        "category": "code",
        "pattern": r"(?m)^(?:diff --git |@@ -\d)|\b(?:review|check)\b.{0,30}"
        r"\b(?:pr|pull request|diff|patch|merge request)\b",
    },
    {
        "name": "code-request",
        "category": "code",
        "pattern": rf"{_IMPERATIVE}(?:write|implement|create|generate|give me|build)\b"
        r"[^.?!\n]{0,40}?\b(?:functions?|regex(?:es)?|regular expressions?|unit tests?|sql"
        r"|dockerfile|makefile"
        rf"|{_CODE_LANGUAGES} (?:script|program|class|module|cli))\b"
        rf"|{_IMPERATIVE}(?:write|implement|code|create|build|generate)\b[^.?!\n]{{0,60}}"
        rf"\b(?:in|using)\s+{_CODE_LANGUAGES}(?![\w+#])",
    },
    {
        "name": "code-request-intl",
        "category": "code",
        "pattern": rf"\b{_WRITE_INTL}\b[^.?!\n]{{0,40}}?(?:fonction|funktion|función|funzione"
        r"|função|skript|script|consulta sql|requête sql|abfrage|programm)",
    },
    # creative
    {
        "name": "roleplay",
        "category": "creative",
        "pattern": r"\brole[- ]?play|\bstay in character\b",
    },
    {
        "name": "pretend",
        "category": "creative",
        "pattern": r"\bpretend (?:you(?:'re| are)|to be)\b|\bdungeon master\b|\bonce upon a time\b",
    },
    {
        "name": "creative-form",
        "category": "creative",
        "pattern": r"\b(?:write|compose|pen|tell|make up|give)\s+(?:me\s+|us\s+)?"
        r"(?:an?|the|some|my|another|\d+)?\s*(?:[\w'-]+\s+){0,3}?"
        rf"{_FORMS}\b(?!\s*(?:generator|app|api|bot|template|format|tests?|points?|tickets?))",
    },
    {
        "name": "creative-form-intl",
        "category": "creative",
        "pattern": rf"\b{_WRITE_INTL}\b[^.?!\n]{{0,40}}?(?:poème|poeme|poésie|histoire|conte"
        r"|chanson|gedicht|geschichte|märchen|lied|poema|poesía|cuento|historia|canción|poesia"
        r"|storia|racconto|canzone|fiaba|história|conto)",
    },
    # simple
    {
        "name": "translate",
        "category": "simple",
        "pattern": rf"\btranslat\w*\b[\s\S]{{0,200}}?\b(?:in|into|to)\s+{_LANGUAGES}\b"
        rf"|\bhow (?:do|would) (?:you|i) say\b.{{0,80}}\bin {_LANGUAGES}\b"
        r"|^\s{0,8}(?:traduis|traduire|traduce|traduci|traduzir|traducir|übersetze|übersetzen|翻译)",
    },
    {
        "name": "greeting",
        "category": "simple",
        "pattern": r"^\s{0,8}(?:hi|hello|hey|hiya|howdy|yo|sup|greetings|good (?:morning|afternoon"
        r"|evening|night|day)|morning|hola|bonjour|hallo|ciao|salut|guten (?:morgen|tag))\b"
        rf"{_ASKS}[\s\S]{{0,40}}$",
    },
    {
        "name": "thanks-bye",
        "category": "simple",
        "pattern": r"^\s{0,8}(?:thanks|thank you|thx|ty|cheers|bye|goodbye|see you|ok(?:ay)?|cool"
        rf"|great|perfect|nice|awesome|got it)\b{_ASKS}[\s\S]{{0,30}}$",
    },
    {
        "name": "word-meaning",
        "category": "simple",
        "pattern": r"^\s{0,8}what does (?:the word )?['\"‘“][^'\"’”\n]{1,40}['\"’”] mean\W*$",
    },
    # complex
    {
        "name": "weigh-up",
        "category": "complex",
        "pattern": r"\b(?:pros and cons|advantages and disadvantages|arguments for and against"
        r"|for and against)\b",
    },
]


@dataclass(frozen=True)
class _Rule:
    name: str
    category: Category
    regex: re.Pattern[str]
    #: Folded strings of which every match contains one, and the widest the pattern can be before
    #: them (see :func:`_needles`): the most selective set (gate), the one to seek from (seek).
    gate: _Needles | None
    seek: _Needles | None
    #: Whether every match starts at the start of the text (a leading ``^`` without MULTILINE).
    anchored: bool = False


def _rules(patterns: Sequence[Mapping[str, str]]) -> tuple[_Rule, ...]:
    key = []
    for i, spec in enumerate(patterns):
        try:
            key.append((spec["name"], spec["category"], spec["pattern"]))
        except (KeyError, TypeError) as exc:
            name = spec.get("name", f"#{i}") if isinstance(spec, Mapping) else f"#{i}"
            raise ValueError(f"pattern {name}: needs name, category and pattern") from exc
    return _compile(tuple(key))


@functools.lru_cache(maxsize=32)
def _compile(key: tuple[tuple[str, str, str], ...]) -> tuple[_Rule, ...]:
    rules = []
    for name, category, pattern in key:
        if category not in CATEGORIES:
            raise ValueError(
                f"pattern {name}: category {category!r} is not one of {', '.join(CATEGORIES)}"
            )
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"pattern {name}: invalid regular expression: {exc}") from exc
        gate, seek, anchored = _needles(pattern)
        rules.append(_Rule(name, cast(Category, category), regex, gate, seek, anchored))
    return tuple(rules)


# The prefilter. A rule's regex runs only if the text holds one of its "needles": strings that
# every match contains, read off the parsed pattern (literal runs, alternations of them, groups and
# repeats of at least one). When the pattern before such a set has a bounded width W, a match
# starts at most W characters before a needle of the set: with few such places the regex is
# tried at each (``Pattern.match(text, pos)``), else searched from W before the first needle on
# (``pos`` still lets ``\b`` and lookbehinds see the text before it, and ``^`` keeps its
# meaning). Both sides are case-folded the way re.IGNORECASE compares characters (simple lower
# case, plus the extra equivalences re knows, e.g. "ſ" ~ "s"), one character for one, so the
# positions agree. The prefilter never skips a match: it only saves scans of long texts.


def _fold_table() -> tuple[dict[int, str], dict[int, str]]:
    before = {0x130: "i"}  # str.lower() gives "i̇" (two characters); re's simple lower case, "i"
    after: dict[int, str] = {}
    try:
        extra: dict[int, tuple[int, ...]] = importlib.import_module("re._casefix")._EXTRA_CASES
    except (ImportError, AttributeError):  # pragma: no cover - other Pythons
        return before, after
    for code, others in extra.items():
        rep = min((code, *others))
        for member in (code, *others):
            if member != rep:
                after[member] = chr(rep)
    return before, after


_FOLD_BEFORE, _FOLD_AFTER = _fold_table()
_FOLD_SPECIAL = re.compile("[" + "".join(re.escape(chr(c)) for c in _FOLD_AFTER) + "]")


def _fold(text: str) -> str:
    if text.isascii():
        return text.lower()
    if "\u0130" in text:
        text = text.translate(_FOLD_BEFORE)
    text = text.lower()
    return text.translate(_FOLD_AFTER) if _FOLD_SPECIAL.search(text) else text


def _better(a: _Needles | None, b: _Needles | None, *, seek: bool) -> _Needles | None:
    """The more useful of two needle sets. Gate: the most selective (longest shortest needle, up
    to 5 characters, then fewest needles: fewer to look for). Seek (``seek``): only sets with a
    bounded width before them, the most selective, then the narrowest."""
    if b is None or (seek and b[1] >= _UNBOUNDED):
        return a
    if a is None:
        return b

    def rank(n: _Needles) -> tuple[int, int, int]:  # 5 characters are rare enough
        return min(5, *map(len, n[0])), -len(n[0]), -n[1] if seek else 0

    return b if rank(b) > rank(a) else a


class _NeedleScan:
    """Finds a pattern's gate and seek needle sets in its parse tree (``re._parser``)."""

    def __init__(self, parsed: Any, parser: Any, ops: Any) -> None:
        self.state, self.parser, self.ops = parsed.state, parser, ops
        self.limit = int(parser.MAXREPEAT)
        self.gate, self.seek = self.sequence(list(parsed.data))
        first = parsed.data[0] if len(parsed.data) else (None, None)
        self.anchored = (
            first[0] is ops.AT
            and first[1] in (ops.AT_BEGINNING, ops.AT_BEGINNING_STRING)
            and not parsed.state.flags & re.MULTILINE
        )

    def width(self, items: list[Any]) -> int:
        hi = int(self.parser.SubPattern(self.state, items).getwidth()[1])
        return _UNBOUNDED if hi >= self.limit else hi

    def sequence(self, items: list[Any]) -> tuple[_Needles | None, _Needles | None]:
        found: list[_Needles] = []
        run: list[str] = []
        run_at = before = 0  # widest the pattern can be before the run / the current item
        for op, av in items:
            if op is self.ops.LITERAL:
                run_at = run_at if run else before
                run.append(chr(av))
                before = min(_UNBOUNDED, before + 1)
                continue
            found.extend(self.item(op, av, before, "".join(run), run_at))
            if run:
                found.append((frozenset(["".join(run)]), run_at))
                run = []
            before = min(_UNBOUNDED, before + self.width([(op, av)]))
        if run:
            found.append((frozenset(["".join(run)]), run_at))
        gate = seek = None
        for needles in found:
            gate = _better(gate, needles, seek=False)
            seek = _better(seek, needles, seek=True)
        return gate, seek

    def item(self, op: Any, av: Any, before: int, run: str, run_at: int) -> list[_Needles]:
        ops = self.ops
        if op is ops.BRANCH:
            alts = [self.sequence(list(alt)) for alt in av[1]]
            found = []
            for pick in (0, 1):
                chosen = [alt[pick] for alt in alts]
                if all(n is not None for n in chosen):
                    sets = [n for n in chosen if n is not None]
                    union = frozenset().union(*(n[0] for n in sets))
                    found.append((union, min(_UNBOUNDED, before + max(n[1] for n in sets))))
            leads = [self.lead(list(alt)) for alt in av[1]]
            if run and all(leads):
                found.append((frozenset(run + lead for lead in leads), run_at))
            return found
        if op is ops.SUBPATTERN:
            inner = self.sequence(list(av[-1]))
        elif op is ops.ATOMIC_GROUP:
            inner = self.sequence(list(av))
        elif op in (ops.MAX_REPEAT, ops.MIN_REPEAT, ops.POSSESSIVE_REPEAT) and av[0] >= 1:
            inner = self.sequence(list(av[2]))
        else:
            return []
        return [(n[0], min(_UNBOUNDED, before + n[1])) for n in inner if n is not None]

    def lead(self, items: list[Any]) -> str:
        """The literal characters an alternative starts with."""
        lead = []
        for op, av in items:
            if op is not self.ops.LITERAL:
                break
            lead.append(chr(av))
        return "".join(lead)


def _needles(pattern: str) -> tuple[_Needles | None, _Needles | None, bool]:
    """``pattern``'s gate and seek needle sets, folded (None where none is known), and whether
    it is anchored at the start of the text."""
    try:
        parser = importlib.import_module("re._parser")
        ops = importlib.import_module("re._constants")
        scan = _NeedleScan(parser.parse(pattern, re.IGNORECASE), parser, ops)
    except Exception:  # a private module that may change: no prefilter then
        return None, None, False

    def folded(n: _Needles | None) -> _Needles | None:
        if n is None or not n[0] or not all(n[0]):
            return None
        return frozenset(_fold(s) for s in n[0]), n[1]

    return folded(scan.gate), folded(scan.seek), scan.anchored


def _starts(folded: str, seek: _Needles) -> list[int] | None:
    """Every position a match can start at, given where ``seek``'s needles are in ``folded``;
    None when there are more than _MAX_TRIES (then search from the first one on)."""
    needles, width = seek
    starts: set[int] = set()
    for needle in needles:
        at = folded.find(needle)
        while at >= 0:
            starts.update(range(max(0, at - width), at + 1))
            if len(starts) > _MAX_TRIES:
                return None
            at = folded.find(needle, at + 1)
    return sorted(starts)


def _matches(rule: _Rule, head: str, folded: str) -> bool:
    """Whether ``rule`` matches ``head`` (``folded`` is its case fold), by the prefilter."""
    if rule.anchored:  # one place to try
        return rule.regex.match(head) is not None
    if rule.gate is not None and not any(n in folded for n in rule.gate[0]):
        return False
    if rule.seek is None:
        return rule.regex.search(head) is not None
    starts = _starts(folded, rule.seek)
    if starts is not None:  # few: try a match at each
        return any(rule.regex.match(head, at) for at in starts)
    first = min(at for n in rule.seek[0] if (at := folded.find(n)) >= 0)
    return rule.regex.search(head, max(0, first - rule.seek[1])) is not None


def _first_rule(text: str, rules: tuple[_Rule, ...], *, prefilter: bool = True) -> _Rule | None:
    """The first of ``rules`` whose regex matches in the first RULE_MAX_CHARS of ``text``."""
    head = text[:RULE_MAX_CHARS]
    if not prefilter:
        return next((rule for rule in rules if rule.regex.search(head)), None)
    folded = _fold(head)
    return next((rule for rule in rules if _matches(rule, head, folded)), None)


def match_rule(text: str, patterns: Sequence[Mapping[str, str]] = DEFAULT_PATTERNS) -> str | None:
    """The name of the first rule of ``patterns`` that matches ``text``, or None."""
    rule = _first_rule(text, _rules(patterns))
    return rule.name if rule else None


# -- features -------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\w+|[^\w\s]")
# Salts (crc32 start values) that keep the feature kinds apart in the hash space.
_SALT_WORD, _SALT_CHAR, _SALT_META = 0x5EED01, 0x5EED02, 0x5EED03
_BIGRAM_MUL = np.uint64(0x9E3779B1)
_MASK32 = np.uint64(0xFFFFFFFF)
_NO_GRAMS = np.zeros(0, np.int64)
_WORD_CACHE: dict[str, tuple[int, npt.NDArray[np.int64]]] = {}
_WORD_CACHE_MAX = 50_000


def _word(token: str) -> tuple[int, npt.NDArray[np.int64]]:
    """``token``'s hash and its character 3-5-grams' hashes (``<`` and ``>`` mark its ends).

    Punctuation tokens have no character n-grams. Cached: words repeat."""
    hit = _WORD_CACHE.get(token)
    if hit is not None:
        return hit
    word_hash = zlib.crc32(token.encode("utf-8", "surrogatepass"), _SALT_WORD)
    grams = _NO_GRAMS
    if token[0].isalnum() or token[0] == "_":
        padded = f"<{token[:MAX_WORD_CHARS]}>".encode("utf-8", "surrogatepass")
        size = len(padded)
        grams = np.array(
            [
                zlib.crc32(padded[i : i + n], _SALT_CHAR)
                for n in (3, 4, 5)
                for i in range(size - n + 1)
            ],
            dtype=np.int64,
        )
    entry = (word_hash, grams)
    if len(_WORD_CACHE) >= _WORD_CACHE_MAX:
        _WORD_CACHE.clear()
    _WORD_CACHE[token] = entry
    return entry


def _bucket(n: int, edges: tuple[int, ...]) -> int:
    for i, edge in enumerate(edges):
        if n <= edge:
            return i
    return len(edges)


def _meta(text: str, tokens: list[str]) -> list[int]:
    """Shape features: length in tokens, lines, first token."""
    marks = [
        f"len:{_bucket(len(tokens), (1, 3, 6, 12, 25, 50, 100))}",
        f"lines:{_bucket(text.count(chr(10)), (0, 1, 3, 8))}",
        f"first:{tokens[0] if tokens else ''}",
    ]
    return [zlib.crc32(m.encode("utf-8", "surrogatepass"), _SALT_META) for m in marks]


def _weighted(
    hashes: npt.NDArray[np.int64], counts: npt.NDArray[np.float64], dim: int
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Distinct buckets of ``hashes`` (each seen ``counts`` times): sublinear TF, L2-normalised."""
    buckets = hashes & (dim - 1)
    if len(buckets) * 64 < dim:  # few: sort them
        buckets, where = np.unique(buckets, return_inverse=True)
        tf = np.bincount(where, weights=counts)
    else:  # many: count into every bucket (the same sums; counts are small whole numbers)
        tf = np.bincount(buckets, weights=counts, minlength=dim)
        buckets = (tf != 0).nonzero()[0]
        tf = tf[buckets]
    values = 1.0 + np.log(tf)
    values /= math.sqrt(float(values @ values))
    return buckets.astype(np.int64), values.astype(np.float32)


def features(text: str, dim: int = DEFAULT_DIM) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The hashed feature vector of ``text``'s first MAX_CHARS characters: indices and values.

    Two groups, each weighted with sublinear TF and L2-normalised, then scaled by 1/sqrt(2):
    words (unigrams, bigrams, shape features) and the words' character 3-5-grams."""
    head = text[:MAX_CHARS].lower()
    tokens = _TOKEN.findall(head)
    meta = _meta(head, tokens)
    mask = dim - 1
    if not tokens:
        idx = np.array(meta, np.int64) & mask
        return idx, np.full(len(idx), 1.0 / math.sqrt(len(idx)), np.float32)
    counts = Counter(tokens)
    entries = {word: _word(word) for word in counts}
    seq = np.array([entries[t][0] for t in tokens], dtype=np.uint64)
    bigrams = ((seq[:-1] * _BIGRAM_MUL) ^ seq[1:]) & _MASK32
    tf = np.fromiter(counts.values(), np.float64, len(counts))
    words = np.concatenate(
        [np.fromiter((e[0] for e in entries.values()), np.int64, len(entries)),
         np.array(meta, np.int64), bigrams.astype(np.int64)]
    )  # fmt: skip
    word_tf = np.concatenate([tf, np.ones(len(meta) + len(bigrams))])
    w_idx, w_val = _weighted(words, word_tf, dim)
    grams = [e[1] for e in entries.values()]
    sizes = [len(g) for g in grams]
    if not any(sizes):
        return w_idx, w_val
    c_idx, c_val = _weighted(np.concatenate(grams), np.repeat(tf, sizes), dim)
    # Each group is a unit vector; their sum is scaled back to about unit length.
    scale = np.float32(1.0 / math.sqrt(2.0))
    return np.concatenate([w_idx, c_idx]), np.concatenate([w_val, c_val]) * scale


# -- the learned model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """The classifier's answer: the top category, its probability, and all probabilities."""

    category: Category
    confidence: float
    scores: dict[str, float]


def _softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return cast(npt.NDArray[np.float64], e / e.sum(axis=-1, keepdims=True))


class Classifier:
    """Multinomial logistic regression over :func:`features`; weights ``(dim, 4)`` float32."""

    def __init__(
        self,
        weights: FloatArray,
        bias: FloatArray,
        *,
        info: Mapping[str, str] | None = None,
    ) -> None:
        dim = weights.shape[0]
        if weights.shape != (dim, len(CATEGORIES)) or dim & (dim - 1) or dim < 2:
            raise ValueError(f"weights must be (power of two, {len(CATEGORIES)}): {weights.shape}")
        if bias.shape != (len(CATEGORIES),):
            raise ValueError(f"bias must be ({len(CATEGORIES)},): {bias.shape}")
        self.weights: FloatArray = np.ascontiguousarray(weights, dtype=np.float32)
        self.bias: FloatArray = np.ascontiguousarray(bias, dtype=np.float32)
        self.dim = dim
        #: Free-form facts saved with the model, e.g. ``train_sha256`` of the data it learnt from.
        self.info: dict[str, str] = dict(info or {})

    # prediction
    def probabilities(self, text: str) -> FloatArray:
        idx, val = features(text, self.dim)
        z = val @ self.weights[idx] + self.bias
        z = z - z.max()
        e = np.exp(z)
        return cast(FloatArray, e / e.sum())

    def predict(self, text: str) -> Prediction:
        p = self.probabilities(text).tolist()
        best = max(range(len(CATEGORIES)), key=p.__getitem__)
        return Prediction(
            cast(Category, CATEGORIES[best]),
            float(p[best]),
            {c: float(x) for c, x in zip(CATEGORIES, p, strict=True)},
        )

    # persistence
    @classmethod
    def load(cls, path: Path | None = None) -> Classifier:
        """Read a model written by :meth:`save` (the shipped one unless ``path`` is given)."""
        with np.load(path or DEFAULT_MODEL_PATH, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"].item()))
            if meta.get("format") != MODEL_FORMAT or tuple(meta.get("categories", ())) != tuple(
                CATEGORIES
            ):
                raise ValueError(f"{path or DEFAULT_MODEL_PATH}: not a router model this reads")
            dim = int(meta["dim"])
            weights = np.zeros((dim, len(CATEGORIES)), np.float32)
            weights[npz["rows"]] = npz["values"]
            bias = npz["bias"].astype(np.float32)
        return cls(weights, bias, info=meta.get("info", {}))

    def save(self, path: Path) -> None:
        """Write the nonzero rows of the weights, the bias and the facts, as a ``.npz``.

        The same model gives the same bytes: the archive's timestamps are fixed."""
        rows = np.flatnonzero(np.any(self.weights != 0, axis=1)).astype(np.int32)
        meta = {
            "format": MODEL_FORMAT,
            "categories": list(CATEGORIES),
            "dim": self.dim,
            "info": dict(sorted(self.info.items())),
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            "meta": np.array(json.dumps(meta, sort_keys=True)),
            "rows": rows,
            "values": self.weights[rows],
            "bias": self.bias,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
                entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.external_attr = 0o644 << 16
                archive.writestr(entry, buf.getvalue())

    # training
    @classmethod
    def train(
        cls,
        examples: Sequence[tuple[str, str]],
        *,
        epochs: int = 20,
        l2: float = 3e-5,
        learning_rate: float = 0.05,
        batch_size: int = 32,
        dim: int = DEFAULT_DIM,
        seed: int = 0,
    ) -> Classifier:
        """Fit on ``(text, category)`` pairs with mini-batch Adam and L2 weight decay.

        Deterministic: the same examples, options and ``seed`` give the same weights."""
        if not examples:
            raise ValueError("no examples to train on")
        if dim < 2 or dim & (dim - 1):
            raise ValueError(f"dim must be a power of two: {dim}")
        k = len(CATEGORIES)
        labels = np.empty(len(examples), np.int64)
        rows: list[tuple[npt.NDArray[np.int64], FloatArray]] = []
        for i, (text, category) in enumerate(examples):
            if category not in CATEGORIES:
                raise ValueError(f"example {i}: unknown category {category!r}")
            labels[i] = CATEGORIES.index(category)
            rows.append(features(text, dim))
        onehot = np.eye(k)[labels]
        w = np.zeros((dim, k))
        b = np.log(np.bincount(labels, minlength=k) + 1.0)
        b -= b.mean()
        m_w, v_w = np.zeros_like(w), np.zeros_like(w)
        m_b, v_b = np.zeros_like(b), np.zeros_like(b)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        rng = np.random.default_rng(seed)
        step = 0
        for _ in range(epochs):
            order = rng.permutation(len(examples))
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                idx = np.concatenate([rows[j][0] for j in batch])
                val = np.concatenate([rows[j][1] for j in batch]).astype(np.float64)
                sizes = np.array([len(rows[j][0]) for j in batch])
                owner = np.repeat(np.arange(len(batch)), sizes)
                z = np.zeros((len(batch), k))
                np.add.at(z, owner, val[:, None] * w[idx])
                g = (_softmax(z + b) - onehot[batch]) / len(batch)
                grad_w: npt.NDArray[np.float64] = np.stack(
                    [np.bincount(idx, weights=val * g[owner, c], minlength=dim) for c in range(k)],
                    axis=1,
                )
                grad_w += l2 * w
                grad_b = g.sum(axis=0)
                step += 1
                lr = learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                for param, grad, m, v in ((w, grad_w, m_w, v_w), (b, grad_b, m_b, v_b)):
                    m *= beta1
                    m += (1 - beta1) * grad
                    v *= beta2
                    v += (1 - beta2) * grad * grad
                    param -= lr * m / (np.sqrt(v) + eps)
        info = {
            "examples": str(len(examples)),
            "epochs": str(epochs),
            "l2": repr(l2),
            "learning_rate": repr(learning_rate),
            "batch_size": str(batch_size),
            "seed": str(seed),
        }
        return cls(w.astype(np.float32), b.astype(np.float32), info=info)


# -- the decision ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """Where a request goes and why. ``source``: ``rule``, ``classifier`` or ``default``.

    ``confidence``: 1.0 for a rule, the top probability for the classifier (also when it fell
    short of ``min_confidence`` and the default was taken), 0.0 for the default without one."""

    category: Category
    confidence: float
    reason: str
    source: str


def classify(
    text: str,
    *,
    patterns: Sequence[Mapping[str, str]] = DEFAULT_PATTERNS,
    classifier: Classifier | None,
    min_confidence: float = 0.4,
    default: Category = "complex",
) -> Decision:
    """Rules first, then ``classifier`` (None: no model), then ``default``."""
    rule = _first_rule(text, _rules(patterns))
    if rule is not None:
        return Decision(rule.category, 1.0, f"rule {rule.name}", "rule")
    if classifier is None:
        return Decision(default, 0.0, f"no rule matched: default {default}", "default")
    pred = classifier.predict(text)
    if pred.confidence < min_confidence:
        reason = (
            f"low confidence ({pred.category} {pred.confidence:.2f} < {min_confidence:.2f}):"
            f" default {default}"
        )
        return Decision(default, pred.confidence, reason, "default")
    return Decision(
        pred.category,
        pred.confidence,
        f"classifier: {pred.category} {pred.confidence:.2f}",
        "classifier",
    )


# -- data and evaluation --------------------------------------------------------------------------
def data_path(name: str) -> Path:
    """The file of the labelled split ``name`` (``train`` or ``heldout``)."""
    try:
        return DATA_DIR / SPLITS[name]
    except KeyError:
        raise ValueError(f"no split {name!r}: expected one of {', '.join(SPLITS)}") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_examples(name: str) -> list[tuple[str, str]]:
    """The ``(text, category)`` pairs of the split ``name`` (``train`` or ``heldout``)."""
    path = data_path(name)
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        text, category = row.get("text"), row.get("category")
        if not isinstance(text, str) or not text or category not in CATEGORIES:
            raise ValueError(f"{path}:{lineno}: needs a text and a category of {CATEGORIES}")
        examples.append((text, str(category)))
    return examples


@dataclass(frozen=True)
class Evaluation:
    """How :func:`classify` did on labelled examples. ``confusion[true][predicted]`` counts."""

    n: int
    accuracy: float
    precision: dict[str, float]
    recall: dict[str, float]
    confusion: dict[str, dict[str, int]]
    sources: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, str, Decision]] = field(default_factory=list)

    def render(self) -> str:
        width = max(len(c) for c in CATEGORIES) + 2
        corner = "true \\ predicted"
        head = f"{corner:<18}" + "".join(f"{c:>{width}}" for c in CATEGORIES)
        lines = [head + f"{'recall':>{width}}", "-" * (len(head) + width)]
        for true in CATEGORIES:
            cells = "".join(f"{self.confusion[true][p]:>{width}}" for p in CATEGORIES)
            lines.append(f"{true:<18}{cells}{self.recall[true]:>{width}.2f}")
        precision = "".join(f"{self.precision[c]:>{width}.2f}" for c in CATEGORIES)
        lines.append(f"{'precision':<18}{precision}")
        correct = round(self.accuracy * self.n)
        sources = ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items()))
        lines.append(f"accuracy {self.accuracy:.3f} ({correct}/{self.n}); decided by: {sources}")
        return "\n".join(lines)


def evaluate(
    classifier: Classifier | None,
    examples: Sequence[tuple[str, str]],
    *,
    patterns: Sequence[Mapping[str, str]] = DEFAULT_PATTERNS,
    min_confidence: float = 0.4,
    default: Category = "complex",
) -> Evaluation:
    """Run :func:`classify` (rules + model) over ``examples`` and score it against the labels."""
    confusion = {t: dict.fromkeys(CATEGORIES, 0) for t in CATEGORIES}
    sources: dict[str, int] = {}
    errors: list[tuple[str, str, Decision]] = []
    for text, true in examples:
        decision = classify(
            text,
            patterns=patterns,
            classifier=classifier,
            min_confidence=min_confidence,
            default=default,
        )
        confusion[true][decision.category] += 1
        sources[decision.source] = sources.get(decision.source, 0) + 1
        if decision.category != true:
            errors.append((text, true, decision))
    n = len(examples)
    correct = sum(confusion[c][c] for c in CATEGORIES)
    precision, recall = {}, {}
    for c in CATEGORIES:
        predicted = sum(confusion[t][c] for t in CATEGORIES)
        actual = sum(confusion[c].values())
        precision[c] = confusion[c][c] / predicted if predicted else 0.0
        recall[c] = confusion[c][c] / actual if actual else 0.0
    return Evaluation(n, correct / n if n else 0.0, precision, recall, confusion, sources, errors)

"""The semantic cache in front of model calls.

A request is served from the cache only when an earlier answer's request is at least
``threshold`` similar (cosine of the MiniLM embeddings; 0.92 by default, as in the seed), was
answered by the same model alias, under the same prompt-template version, within ``ttl_s``.
Entries of a retired prompt version are deleted and never served. Hits and misses are counted
per alias in the database.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from typhon._types import Usage
from typhon.config import MemoryCacheSettings
from typhon.memory._builtin import _slug
from typhon.memory._embed import Embedder
from typhon.memory._index import Condition, Match, Range, VectorIndex
from typhon.models._client import ChatResult, ChatStream, Message, ModelClient
from typhon.store import RunStore, cache_counts, cache_entries

__all__ = [
    "CacheHit",
    "CachingClient",
    "SemanticCache",
    "compatible",
    "context_hash",
    "request_text",
]

_MAX_REQUEST_CHARS = 1000  # about the 256 tokens MiniLM reads


def request_text(messages: Sequence[Message]) -> str:
    """What the cache compares by meaning: the last user message."""
    for message in reversed(messages):
        if message.get("role", "user") == "user":
            return str(message.get("content") or "")
    return ""


def context_hash(messages: Sequence[Message]) -> str:
    """Everything before the last user message (system prompt, earlier turns), hashed: a hit
    needs exactly the same context, so a long shared system prompt cannot make every request
    look alike."""
    last = max((i for i, m in enumerate(messages) if m.get("role", "user") == "user"), default=-1)
    before = [(m.get("role"), m.get("content")) for m in messages[:last]]
    return hashlib.sha256(repr(before).encode()).hexdigest()[:32]


# A paraphrase keeps its numbers, its negations and its direction; look-alike requests that
# differ in them ("Celsius to Fahrenheit" / "Fahrenheit to Celsius", "ascending" / "descending",
# 5 / 50) embed very close together, so they must also agree on these before a hit is served.
def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\S+", text))


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[a-z][a-z'-]*")
_CONTRAST = _words(
    """not no never without nothing none nor cannot dont don't doesnt doesn't isnt isn't
    cant can't wont won't shouldnt shouldn't stop start starting stopping increase decrease
    ascending descending first last pros cons advantages disadvantages benefits drawbacks good
    bad better worse shorter longer read reads reading write writes writing today tomorrow
    yesterday more less fewer before after min max minimum maximum enable disable add remove
    open close encrypt decrypt upload download import export buy sell higher lower larger
    smaller bigger faster slower hot cold previous next monday tuesday wednesday thursday
    friday saturday sunday english german french spanish italian portuguese dutch russian
    chinese japanese korean arabic hindi polish swedish greek turkish"""
)
# "to" orders a request ("X to Y") but is too common to have to match; the others must.
_DIRECTION = _words("into from than vs versus")
_ORDERING = _DIRECTION | {"to"}
_STOP = _words(
    """a an the this that these those my your our its of in on at for with by and or is are was
    were be do does did how what which who whom why when where can could would should will i me
    you it please give tell show"""
)


def _signature(text: str) -> tuple[list[str], list[str], list[str]]:
    low = text.lower()
    words = _WORD.findall(low)
    return (
        sorted(_NUMBER.findall(low)),
        sorted({w for w in words if w in _CONTRAST}),
        sorted({w for w in words if w in _DIRECTION}),
    )


def compatible(a: str, b: str) -> bool:
    """Whether two similar requests may share an answer: the same numbers, negations and
    direction words, and the words they share in the same order when a direction is given."""
    if _signature(a) != _signature(b):
        return False
    wa, wb = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if not (_ORDERING & set(wa) and _ORDERING & set(wb)):
        return True
    shared = (set(wa) & set(wb)) - _STOP - _ORDERING
    order_a = list(dict.fromkeys(w for w in wa if w in shared))
    order_b = list(dict.fromkeys(w for w in wb if w in shared))
    return order_a == order_b


@dataclass(frozen=True)
class CacheHit:
    id: str
    response: str
    score: float
    request: str


class SemanticCache:
    """Answers by meaning, on the run store's database and a vector index."""

    def __init__(
        self,
        store: RunStore,
        embedder: Embedder,
        index: VectorIndex,
        settings: MemoryCacheSettings | None = None,
    ):
        self.store = store
        self.embedder = embedder
        self.index = index
        self.settings = settings or MemoryCacheSettings()
        self._ready = False

    @property
    def _name(self) -> str:
        return f"typhon_cache_{_slug(self.embedder.model)}"

    def _prepare(self) -> None:
        if not self._ready:
            self.store.migrate_once()
            self._ready = True

    @staticmethod
    def _conditions(alias: str, prompt_version: str, context: str, now: float) -> list[Condition]:
        return [
            Match("alias", alias),
            Match("prompt_version", prompt_version),
            Match("context", context),
            Range("expires_at", gt=now),
        ]

    def cacheable(self, request: str) -> bool:
        """Requests longer than the embedding model reads are not cached: their ends would be
        cut off and compared blind."""
        return bool(request.strip()) and len(request) <= _MAX_REQUEST_CHARS

    def lookup(
        self, alias: str, prompt_version: str, request: str, context: str = ""
    ) -> CacheHit | None:
        """The best earlier answer at or above the threshold whose request is compatible
        (same numbers, negations and direction), or None; counted either way."""
        self._prepare()
        hit: CacheHit | None = None
        if self.cacheable(request):
            [vector] = self.embedder.embed([request])
            found = self.index.query(
                self._name,
                vector,
                5,
                self._conditions(alias, prompt_version, context, time.time()),
                self.settings.threshold,
            )
            if found:
                ids = [pid for pid, _ in found]
                query = sa.select(cache_entries).where(cache_entries.c.id.in_(ids))
                with self.store.engine.connect() as conn:
                    rows = {r["id"]: r for r in conn.execute(query).mappings()}
                for pid, score in found:
                    row = rows.get(pid)
                    if row is None or row["expires_at"] <= time.time():
                        continue
                    if compatible(request, row["request"]):
                        hit = CacheHit(row["id"], row["response"], score, row["request"])
                        break
        self._count(alias, hit is not None, hit.id if hit else None)
        return hit

    def put(
        self, alias: str, prompt_version: str, request: str, response: str, context: str = ""
    ) -> str | None:
        """Keep an answer; None when the request is not cacheable."""
        if not self.cacheable(request):
            return None
        self._prepare()
        [vector] = self.embedder.embed([request])
        entry_id = str(uuid.uuid4())
        expires = time.time() + self.settings.ttl_s
        payload = {
            "alias": alias, "prompt_version": prompt_version, "context": context,
            "expires_at": expires,
        }  # fmt: skip
        with self.store.engine.begin() as conn:
            conn.execute(
                cache_entries.insert().values(
                    id=entry_id, alias=alias, prompt_version=prompt_version, request=request,
                    response=response, created_at=datetime.now(UTC), expires_at=expires,
                )
            )  # fmt: skip
            self.index.add(conn, self._name, [entry_id], [vector], [payload])
        self._trim()
        return entry_id

    def _trim(self) -> None:
        """Keep at most ``max_entries``: the oldest go first."""
        with self.store.engine.connect() as conn:
            count = int(
                conn.execute(sa.select(sa.func.count()).select_from(cache_entries)).scalar_one()
            )
        over = count - self.settings.max_entries
        if over > 0:
            self._delete(
                sa.select(cache_entries.c.id)
                .order_by(cache_entries.c.created_at, cache_entries.c.id)
                .limit(over)
            )

    def _delete(self, ids_query: sa.Select[Any]) -> int:
        """Delete the entries the query selects, with their vectors, in one transaction."""
        with self.store.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(ids_query)]
            if not ids:
                return 0
            conn.execute(cache_entries.delete().where(cache_entries.c.id.in_(ids)))
            self.index.remove(conn, self._name, ids)
        return len(ids)

    def retire(self, prompt_version: str) -> int:
        """Delete every entry of a retired prompt version."""
        self._prepare()
        c = cache_entries.c
        return self._delete(sa.select(c.id).where(c.prompt_version == prompt_version))

    def expire(self) -> int:
        """Delete expired entries (their vectors too)."""
        self._prepare()
        c = cache_entries.c
        return self._delete(sa.select(c.id).where(c.expires_at <= time.time()))

    def _count(self, alias: str, hit: bool, entry_id: str | None) -> None:
        self.store.add_to_totals(
            cache_counts, {"alias": alias}, {"hits": int(hit), "misses": int(not hit)}
        )
        if entry_id is not None:
            with self.store.engine.begin() as conn:
                conn.execute(
                    cache_entries.update()
                    .where(cache_entries.c.id == entry_id)
                    .values(hits=cache_entries.c.hits + 1)
                )

    def stats(self) -> dict[str, dict[str, int]]:
        self._prepare()
        with self.store.engine.connect() as conn:
            rows = list(conn.execute(sa.select(cache_counts)).mappings())
            entries = int(
                conn.execute(sa.select(sa.func.count()).select_from(cache_entries)).scalar_one()
            )
        out = {r["alias"]: {"hits": int(r["hits"]), "misses": int(r["misses"])} for r in rows}
        out["_all"] = {
            "hits": sum(v["hits"] for v in out.values()),
            "misses": sum(v["misses"] for v in out.values()),
            "entries": entries,
        }
        return out


def drop_prompt_versions(store: RunStore, versions: Sequence[str]) -> int:
    """Delete the entries of retired prompt versions and their vectors, whatever embedding
    model's collection holds them (for callers without a SemanticCache, e.g. when a version is
    promoted or rolled back from the command line)."""
    from typhon.memory._index import _remove_rows
    from typhon.store import memory_vectors

    if not versions:
        return 0
    c, v = cache_entries.c, memory_vectors.c
    store.migrate_once()
    with store.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.select(c.id).where(c.prompt_version.in_(versions)))]
        if not ids:
            return 0
        conn.execute(cache_entries.delete().where(c.id.in_(ids)))
        query = sa.select(v.collection, v.point_id).where(v.point_id.in_(ids), v.op == "add")
        by_collection: dict[str, list[str]] = {}
        for collection, point in conn.execute(query):
            by_collection.setdefault(collection, []).append(point)
        for collection, points in by_collection.items():
            _remove_rows(conn, collection, points)
    return len(ids)


def prompt_version_of(*parts: object) -> str:
    """A short stable version id for a set of prompt templates (until they are versioned)."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return f"h:{digest}"


class CachingClient:
    """A ModelClient in front of another: plain chat calls (no tools) are answered from the
    semantic cache when it has a close enough earlier answer, and stored when it has not."""

    def __init__(
        self,
        inner: ModelClient,
        cache: SemanticCache,
        *,
        prompt_version: str,
        alias: str | None = None,
    ):
        self.inner = inner
        self.cache = cache
        self.prompt_version = prompt_version
        self.alias = alias or inner.alias
        self.url = inner.url

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
    ) -> ChatResult:
        request, context = request_text(messages), context_hash(messages)
        cacheable = not tools and self.cache.cacheable(request)
        if cacheable:
            hit = self.cache.lookup(self.alias, self.prompt_version, request, context)
            if hit is not None:
                return ChatResult(
                    hit.response, Usage(), "cache", "stop", alias=self.alias, url="cache"
                )
        result = self.inner.chat(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            response_format=response_format,
            tools=tools,
            stop=stop,
        )
        if cacheable and result.content and not result.tool_calls:
            self.cache.put(self.alias, self.prompt_version, request, result.content, context)
        return result

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        request, context = request_text(messages), context_hash(messages)
        hit = (
            self.cache.lookup(self.alias, self.prompt_version, request, context)
            if self.cache.cacheable(request)
            else None
        )
        if hit is not None:
            text = hit.response

            def cached() -> Iterator[str]:
                yield text

            return ChatStream(
                cached(),
                lambda: ChatResult(text, Usage(), "cache", "stop", alias=self.alias, url="cache"),
            )
        inner = self.inner.stream(messages, max_tokens=max_tokens, temperature=temperature)

        def chunks() -> Iterator[str]:
            yield from inner

        def finish() -> ChatResult:
            assert inner.result is not None
            if inner.result.content:
                self.cache.put(
                    self.alias, self.prompt_version, request, inner.result.content, context
                )
            return inner.result

        return ChatStream(chunks(), finish)

"""The Letta memory backend: the four tiers on a Letta server (0.16), through ``letta-client``.

- **working**: one core-memory block per run, labelled ``<namespace>-working-<run_id>``, whose
  value is the JSON of the run's key -> value dict. A block has a character limit (Letta's
  default, or ``working_char_limit``); a write that would pass it raises
  :class:`MemoryInputError`. Letta does not enforce the limit on blocks outside an agent, so the
  backend does, before writing.
- **episodic** / **semantic**: archival passages, one archive per tier (``<namespace>-episodic``,
  ``<namespace>-semantic``), created on first use with an embedding config that points Letta at
  ``embedding_endpoint`` (an OpenAI-compatible ``/embeddings``, e.g. Typhon's
  :class:`~typhon.memory._embed_server.EmbeddingServer`). A record's fields (crew, run_id, kind,
  tags, meta) are kept in the passage's metadata under ``"typhon"``, its tags also as the
  passage's tags; its id and ``created_at`` are the passage's.
- **performance**: one block (``<namespace>-model-performance``) holding JSON running totals per
  model alias and category, updated read-modify-write by :meth:`record` (serialised within this
  process; two processes recording at the same moment can lose one update).

What Letta 0.16's REST API offers shapes the rest:

- Search is ``POST /v1/passages/search`` on the archive: Letta embeds the query through the
  archive's endpoint and orders by cosine distance (pgvector), but answers ``score`` 0.0, filters
  tags after its limit and cannot page. So the backend asks for ``k`` passages (100, Letta's most,
  when crew/tags/kind filters apply), filters here, and computes each score itself: the cosine
  between the query's embedding (from the same endpoint) and the passage's stored embedding,
  which Letta returns (padded with zeros to 4096 dimensions).
- There is no listing of an archive's passages nor a lookup by id without an agent: ``get``,
  ``list``, ``count`` and ``compact`` read the whole archive through that search without a
  query (oldest first, 100 a page, paged by ``created_at``). Each passage comes with its
  embedding, so a scan costs about 20 KB a record: fine for thousands of records, not millions.
- An archive's embedding config cannot be changed: an archive made for another model, dimension
  or endpoint is refused with :class:`MemoryBackendError` rather than mixing vector spaces or
  embedding through an endpoint that may be gone; use another ``namespace``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import httpx

from typhon.memory._shared import as_utc, fold_episodes, now, perf_increments, perf_row
from typhon.memory._types import (
    EpisodicMemory,
    MemoryBackendError,
    MemoryInputError,
    MemoryRecord,
    ModelPerformanceMemory,
    SearchableMemory,
    Tier,
    WorkingMemory,
)

if TYPE_CHECKING:
    from letta_client import Letta
    from letta_client.types import BlockResponse, Passage

__all__ = ["LettaBackend"]

PAGE = 100  # Letta's most passages per search request
_PASSAGE_ID = re.compile(
    r"^passage-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
_PERF_BLOCK_LIMIT = 1_000_000


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and body.get("detail"):
        return _one_line(str(body["detail"]), 200)
    return _one_line(str(getattr(exc, "message", exc)), 200)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(0.0, min(1.0, dot / (na * nb)))


_LABEL_MAX = 50  # Letta 0.16 refuses longer block labels


class LettaBackend:
    """The four memory tiers on the Letta server at ``url``.

    ``embedding_endpoint`` is the OpenAI-compatible embeddings base URL (ending in ``/v1``) that
    Letta calls to embed passages and queries, serving ``embedding_model`` with
    ``embedding_dim`` dimensions; this backend calls it too, for the query's vector behind each
    score. ``token`` is Letta's API key, if the server wants one. ``namespace`` prefixes every
    block label and archive name (default ``typhon``: ``typhon-episodic``, ...);
    ``working_char_limit`` is the character limit of new working-memory blocks (None: Letta's
    default, 100 000 in 0.16).
    """

    name = "letta"

    def __init__(
        self,
        url: str,
        *,
        embedding_endpoint: str,
        embedding_model: str,
        embedding_dim: int,
        token: str | None = None,
        timeout: float = 30,
        namespace: str = "typhon",
        working_char_limit: int | None = None,
        max_record_chars: int = 20_000,
        max_records: dict[str, int] | None = None,
    ):
        from letta_client import Letta

        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, not {embedding_dim}")
        if not namespace or not re.fullmatch(r"[A-Za-z0-9_.-]+", namespace):
            raise ValueError(f"namespace must be letters, digits, '_', '.' or '-': {namespace!r}")
        self.url = url.rstrip("/")
        self.backend_name = f"letta at {self.url}"
        self.embedding_endpoint = embedding_endpoint.rstrip("/")
        self.embedding_model = embedding_model
        self.embedding_dim = embedding_dim
        self.namespace = namespace
        self.working_char_limit = working_char_limit
        self.max_record_chars = max_record_chars
        self.max_records = dict(max_records or {})
        self.timeout = timeout
        # One retry: a keep-alive connection the server dropped; more would only slow errors.
        self.client: Letta = Letta(base_url=self.url, api_key=token, timeout=timeout, max_retries=1)
        # Creations are not retried: a retry after a lost answer could write twice.
        self.client_once: Letta = self.client.with_options(max_retries=0)
        self._http = httpx.Client(timeout=timeout)
        self._lock = threading.Lock()
        self._archives: dict[str, str] = {}
        self._blocks: dict[str, str] = {}
        self.working: WorkingMemory = _Working(self)
        self.episodic: EpisodicMemory = _Episodic(self, "episodic")
        self.semantic: SearchableMemory = _Searchable(self, "semantic")
        self.performance: ModelPerformanceMemory = _Performance(self)

    def close(self) -> None:
        self.client.close()
        self._http.close()

    def __enter__(self) -> LettaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors ----------------------------------------------------------------------------------
    def error(self, tier: str, message: str) -> MemoryBackendError:
        return MemoryBackendError(_one_line(message), tier=tier, backend=self.backend_name)

    def input_error(self, tier: str, message: str) -> MemoryInputError:
        return MemoryInputError(message, tier=tier, backend=self.backend_name)

    @contextmanager
    def calling(self, tier: str, what: str) -> Iterator[None]:
        """Letta's client errors as :class:`MemoryBackendError` naming ``tier`` and the server;
        NotFoundError passes through for the callers that expect it."""
        import letta_client

        try:
            yield
        except letta_client.NotFoundError:
            raise
        except letta_client.APITimeoutError:
            raise self.error(
                tier, f"{what}: Letta did not answer within {self.timeout:g}s"
            ) from None
        except letta_client.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise self.error(tier, f"{what}: cannot reach Letta ({cause})") from None
        except letta_client.APIStatusError as exc:
            raise self.error(
                tier, f"{what}: Letta answered {exc.status_code}: {_status_detail(exc)}"
            ) from None
        except letta_client.LettaError as exc:
            raise self.error(tier, f"{what}: {exc}") from None

    # -- blocks ----------------------------------------------------------------------------------
    def label(self, suffix: str) -> str:
        """``<namespace>-<suffix>``; Letta caps labels at 50 characters, so a longer one keeps
        its start and ends in a hash of the whole."""
        label = f"{self.namespace}-{suffix}"
        if len(label) <= _LABEL_MAX:
            return label
        digest = hashlib.sha256(label.encode()).hexdigest()[:16]
        return f"{label[: _LABEL_MAX - 17]}_{digest}"

    def find_block(self, tier: str, label: str) -> BlockResponse | None:
        """The block labelled ``label`` (the oldest, if several were made at once), or None."""
        import letta_client

        block_id = self._blocks.get(label)
        if block_id is not None:
            try:
                with self.calling(tier, f"reading block {label}"):
                    return self.client.blocks.retrieve(block_id)
            except letta_client.NotFoundError:
                self._blocks.pop(label, None)  # deleted elsewhere: look it up again
        with self.calling(tier, f"looking up block {label}"):
            found = self.client.blocks.list(label=label, order="asc", limit=10).items
        found = [b for b in found if b.label == label]
        if not found:
            return None
        self._blocks[label] = found[0].id
        return found[0]

    def create_block(self, tier: str, label: str, value: str, limit: int | None) -> BlockResponse:
        extra: dict[str, Any] = {} if limit is None else {"limit": limit}
        with self.calling(tier, f"creating block {label}"):
            block = self.client_once.blocks.create(
                label=label, value=value, description=f"Typhon {tier} memory", **extra
            )
        self._blocks[label] = block.id
        return block

    def write_block(self, tier: str, block: BlockResponse, value: str) -> None:
        with self.calling(tier, f"writing block {block.label}"):
            self.client.blocks.update(block.id, value=value)

    def delete_blocks(self, tier: str, label: str) -> None:
        import letta_client

        self._blocks.pop(label, None)
        with self.calling(tier, f"looking up block {label}"):
            found = self.client.blocks.list(label=label, limit=50).items
        for block in found:
            if block.label != label:
                continue
            try:
                with self.calling(tier, f"deleting block {label}"):
                    self.client.blocks.delete(block.id)
            except letta_client.NotFoundError:
                pass

    # -- archives --------------------------------------------------------------------------------
    def embedding_config(self) -> dict[str, Any]:
        return {
            "embedding_endpoint_type": "openai",
            "embedding_endpoint": self.embedding_endpoint,
            "embedding_model": self.embedding_model,
            "embedding_dim": self.embedding_dim,
        }

    def archive_id(self, tier: Tier) -> str:
        """The tier's archive, created on first use; refused if made for other embeddings."""
        name = self.label(tier)
        with self._lock:
            known = self._archives.get(name)
            if known is not None:
                return known
            with self.calling(tier, f"looking up archive {name}"):
                found = [
                    a
                    for a in self.client.archives.list(name=name, order="asc", limit=10).items
                    if a.name == name
                ]
            if found:
                archive = found[0]
                cfg = archive.embedding_config
                have = (
                    (
                        cfg.embedding_model,
                        cfg.embedding_dim,
                        (cfg.embedding_endpoint or "").rstrip("/"),
                    )
                    if cfg is not None
                    else None
                )
                want = (self.embedding_model, self.embedding_dim, self.embedding_endpoint)
                if have != want:
                    what = (
                        "no embeddings"
                        if have is None
                        else f"{have[0]} ({have[1]} dims) at {have[2]}"
                    )
                    raise self.error(
                        tier,
                        f"archive '{name}' embeds with {what}, not {want[0]} ({want[1]} dims) at"
                        f" {want[2]}; Letta cannot change an archive's embeddings: use that"
                        " endpoint or another namespace",
                    )
            else:
                with self.calling(tier, f"creating archive {name}"):
                    archive = self.client_once.archives.create(
                        name=name,
                        description=f"Typhon {tier} memory",
                        embedding_config=self.embedding_config(),  # type: ignore[arg-type]
                    )
            self._archives[name] = archive.id
            return archive.id

    def embed_query(self, tier: str, text: str) -> list[float]:
        """The query's vector from the embeddings endpoint Letta uses (for the scores)."""
        url = f"{self.embedding_endpoint}/embeddings"
        try:
            resp = self._http.post(url, json={"model": self.embedding_model, "input": [text]})
            resp.raise_for_status()
            raw = resp.json()["data"][0]["embedding"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise self.error(tier, f"the embeddings endpoint {url} failed: {exc}") from None
        if isinstance(raw, str):
            data = base64.b64decode(raw)
            vector = list(struct.unpack(f"<{len(data) // 4}f", data))
        else:
            vector = [float(x) for x in raw]
        if len(vector) != self.embedding_dim:
            raise self.error(
                tier,
                f"the embeddings endpoint {url} returned {len(vector)} dimensions, expected"
                f" {self.embedding_dim}",
            )
        return vector


class _Searchable:
    """Episodic or semantic memory: passages of one Letta archive."""

    def __init__(self, backend: LettaBackend, tier: Tier):
        self.backend = backend
        self.tier: Tier = tier

    def _error(self, message: str) -> MemoryBackendError:
        return self.backend.error(self.tier, message)

    def _input(self, message: str) -> NoReturn:
        raise self.backend.input_error(self.tier, message)

    def _record(self, passage: Passage, score: float | None = None) -> MemoryRecord:
        md = dict(passage.metadata or {})
        ours = md.get("typhon")
        created = as_utc(passage.created_at) if passage.created_at else now()
        if isinstance(ours, dict):
            return MemoryRecord(
                id=str(passage.id), tier=self.tier, text=passage.text, created_at=created,
                crew=ours.get("crew"), run_id=ours.get("run_id"),
                tags=tuple(ours.get("tags") or passage.tags or ()),
                kind=str(ours.get("kind") or "note"), meta=dict(ours.get("meta") or {}),
                score=score,
            )  # fmt: skip
        # a passage written by something else: what Letta has
        return MemoryRecord(
            id=str(passage.id), tier=self.tier, text=passage.text, created_at=created,
            tags=tuple(passage.tags or ()), meta=md, score=score,
        )  # fmt: skip

    def _search(
        self, *, query: str | None = None, limit: int = PAGE, start: datetime | None = None
    ) -> list[Passage]:
        archive = self.backend.archive_id(self.tier)
        extra: dict[str, Any] = {}
        if query is not None:
            extra["query"] = query
        if start is not None:
            extra["start_date"] = start
        with self.backend.calling(self.tier, "searching passages"):
            found = self.backend.client.passages.search(archive_id=archive, limit=limit, **extra)
        return [hit.passage for hit in found]

    def _scan(self, since: datetime | None = None) -> list[Passage]:
        """Every passage of the archive (from ``since``), oldest first."""
        seen: dict[str, Passage] = {}
        start = as_utc(since) if since is not None else None
        while True:
            page = self._search(limit=PAGE, start=start)
            fresh = [p for p in page if p.id is not None and p.id not in seen]
            for p in fresh:
                seen[str(p.id)] = p
            if len(page) < PAGE or not fresh or page[-1].created_at is None:
                # (not fresh: a whole page shares one created_at; nothing pages past it)
                break
            start = page[-1].created_at  # Letta's start_date is inclusive: overlaps are skipped
        return list(seen.values())

    @staticmethod
    def _matches(
        rec: MemoryRecord,
        crew: str | None,
        tags: Sequence[str],
        kind: str | None,
        since: datetime | None,
    ) -> bool:
        return (
            (crew is None or rec.crew == crew)
            and (kind is None or rec.kind == kind)
            and all(t in rec.tags for t in tags)
            and (since is None or rec.created_at >= as_utc(since))
        )

    # -- writes ----------------------------------------------------------------------------------
    def add(
        self,
        text: str,
        *,
        crew: str | None = None,
        run_id: str | None = None,
        tags: Sequence[str] = (),
        kind: str = "note",
        meta: dict[str, Any] | None = None,
        created_at: datetime | None = None,
    ) -> MemoryRecord:
        if not text.strip():
            self._input("nothing to remember: the text is empty")
        limit = self.backend.max_record_chars
        if len(text) > limit:
            self._input(
                f"a record of {len(text)} characters is over the limit of {limit}"
                " (memory.max_record_chars); shorten or split it"
            )
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            self._input(f"tags must be a list of strings, not {tags!r}")
        tag_list = list(dict.fromkeys(tags))
        ours = {"crew": crew, "run_id": run_id, "kind": kind, "tags": tag_list, "meta": meta or {}}
        try:
            json.dumps(ours)
        except (TypeError, ValueError) as exc:
            self._input(f"meta must be JSON: {exc}")
        archive = self.backend.archive_id(self.tier)
        extra: dict[str, Any] = {}
        if created_at is not None:
            extra["created_at"] = as_utc(created_at).isoformat()
        with self.backend.calling(self.tier, "adding a passage"):
            passage = self.backend.client_once.archives.passages.create(
                archive, text=text, tags=tag_list, metadata={"typhon": ours}, **extra
            )
        dim = self.backend.embedding_dim
        if any(x != 0.0 for x in (passage.embedding or [])[dim:]):
            # Letta pads every vector to 4096 without checking: a longer one is another model's
            self.forget(str(passage.id))
            raise self._error(
                f"the embeddings endpoint gives vectors longer than {dim} dimensions"
                f" ({self.backend.embedding_model}?); the passage was not kept"
            )
        self._enforce_budget()
        return self._record(passage)

    def _enforce_budget(self) -> None:
        """Past the tier's budget (``memory.max_records``) the oldest records go first."""
        budget = self.backend.max_records.get(self.tier)
        if budget is None:
            return
        passages = self._scan()
        over = len(passages) - budget
        if over <= 0:
            return
        passages.sort(key=lambda p: (as_utc(p.created_at) if p.created_at else now(), str(p.id)))
        for passage in passages[:over]:
            self.forget(str(passage.id))

    def forget(self, record_id: str) -> bool:
        import letta_client

        if not _PASSAGE_ID.match(record_id):
            return False  # not a Letta passage id: nothing of ours
        archive = self.backend.archive_id(self.tier)
        try:
            with self.backend.calling(self.tier, f"deleting passage {record_id}"):
                try:
                    self.backend.client.archives.passages.delete(record_id, archive_id=archive)
                except letta_client.BadRequestError as exc:
                    if "does not belong" in _status_detail(exc):
                        return False  # another tier's (or another namespace's) passage
                    raise
        except letta_client.NotFoundError:
            return False
        return True

    # -- reads -----------------------------------------------------------------------------------
    def get(self, record_id: str) -> MemoryRecord | None:
        if not _PASSAGE_ID.match(record_id):
            return None
        for passage in self._scan():
            if passage.id == record_id:
                return self._record(passage)
        return None

    def search(
        self,
        query: str,
        *,
        k: int = 5,
        crew: str | None = None,
        tags: Sequence[str] = (),
        kind: str | None = None,
        since: datetime | None = None,
        min_score: float = 0.0,
    ) -> list[MemoryRecord]:
        if not query.strip():
            self._input("the search query is empty; say what to look for")
        if k <= 0:
            return []
        filtered = crew is not None or bool(tags) or kind is not None
        passages = self._search(
            query=query,
            limit=PAGE if filtered else min(k, PAGE),
            start=as_utc(since) if since is not None else None,
        )
        if not passages:
            return []
        vector = self.backend.embed_query(self.tier, query)
        dim = len(vector)
        out = []
        for passage in passages:
            score = _cosine(vector, (passage.embedding or [])[:dim])
            rec = self._record(passage, score)
            if score >= min_score and self._matches(rec, crew, tags, kind, since):
                out.append(rec)
        out.sort(key=lambda r: r.score or 0.0, reverse=True)
        return out[:k]

    def list(
        self,
        *,
        limit: int = 50,
        crew: str | None = None,
        tags: Sequence[str] = (),
        kind: str | None = None,
        since: datetime | None = None,
    ) -> list[MemoryRecord]:
        if limit <= 0:
            return []
        records = [self._record(p) for p in self._scan(since)]
        records = [r for r in records if self._matches(r, crew, tags, kind, since)]
        records.sort(key=lambda r: r.id)
        records.sort(key=lambda r: r.created_at, reverse=True)  # newest first, ties by id
        return records[:limit]

    def count(self) -> int:
        return len(self._scan())


class _Episodic(_Searchable):
    def compact(self, older_than: timedelta, summarize: Callable[[list[MemoryRecord]], str]) -> int:
        """Episodes older than ``older_than`` (summaries excepted) become one summary per crew
        (kind ``summary``, tag ``summary``, ``meta["replaces"]`` their ids, dated as the newest
        one); the summaries are written before the episodes are deleted."""
        cutoff = now() - older_than
        old = [self._record(p) for p in self._scan()]
        old = [r for r in old if r.created_at < cutoff and r.kind != "summary"]
        old.sort(key=lambda r: (r.created_at, r.id))
        return fold_episodes(self, old, summarize, self.backend.max_record_chars)


class _Working:
    """A run's scratch pad: the JSON of its dict in one core-memory block."""

    tier = "working"

    def __init__(self, backend: LettaBackend):
        self.backend = backend

    def _label(self, run_id: str) -> str:
        if not run_id:
            raise self.backend.input_error(self.tier, "run_id is empty")
        return self.backend.label(f"working-{run_id}")

    def _load(self, block: BlockResponse | None) -> dict[str, Any]:
        if block is None or not block.value:
            return {}
        try:
            data = json.loads(block.value)
        except ValueError:
            raise self.backend.error(
                self.tier, f"block {block.label} does not hold JSON (written by something else?)"
            ) from None
        if not isinstance(data, dict):
            raise self.backend.error(self.tier, f"block {block.label} does not hold a JSON object")
        return data

    def put(self, run_id: str, key: str, value: Any) -> None:
        label = self._label(run_id)
        if not isinstance(key, str) or not key:
            raise self.backend.input_error(
                self.tier, f"the key must be a non-empty string: {key!r}"
            )
        with self.backend._lock:
            block = self.backend.find_block(self.tier, label)
            data = self._load(block)
            data[key] = value
            try:
                text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise self.backend.input_error(
                    self.tier, f"the value of {key!r} is not JSON: {exc}"
                ) from None
            limit = block.limit if block is not None else self.backend.working_char_limit
            if limit is not None and len(text) > limit:
                raise self.backend.input_error(
                    self.tier,
                    f"{key!r} would make run {run_id}'s working memory {len(text)} characters,"
                    f" over the block's limit of {limit}",
                )
            if block is None:
                block = self.backend.create_block(
                    self.tier, label, text, self.backend.working_char_limit
                )
                if block.limit is not None and len(text) > block.limit:
                    self.backend.delete_blocks(self.tier, label)
                    raise self.backend.input_error(
                        self.tier,
                        f"{key!r} would make run {run_id}'s working memory {len(text)}"
                        f" characters, over the block's limit of {block.limit}",
                    )
            else:
                self.backend.write_block(self.tier, block, text)

    def get(self, run_id: str, key: str, default: Any = None) -> Any:
        return self.items(run_id).get(key, default)

    def items(self, run_id: str) -> dict[str, Any]:
        return self._load(self.backend.find_block(self.tier, self._label(run_id)))

    def clear(self, run_id: str) -> int:
        label = self._label(run_id)
        with self.backend._lock:
            block = self.backend.find_block(self.tier, label)
            if block is None:
                return 0
            try:
                count = len(self._load(block))
            except MemoryBackendError:
                count = 0
            self.backend.delete_blocks(self.tier, label)
            return count


class _Performance:
    """Running totals per model alias and category, as JSON in one block."""

    tier = "performance"

    def __init__(self, backend: LettaBackend):
        self.backend = backend

    @property
    def _label(self) -> str:
        return self.backend.label("model-performance")

    def _load(self, block: BlockResponse | None) -> dict[str, Any]:
        if block is None or not block.value:
            return {}
        try:
            data = json.loads(block.value)
        except ValueError:
            raise self.backend.error(self.tier, f"block {block.label} does not hold JSON") from None
        totals = data.get("totals") if isinstance(data, dict) else None
        if not isinstance(totals, dict):
            raise self.backend.error(self.tier, f"block {block.label} holds no totals")
        return totals

    def record(
        self,
        alias: str,
        category: str | None,
        *,
        calls: int = 0,
        failures: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_s: float = 0.0,
        gpu_s: float = 0.0,
        runs: int = 0,
        runs_ok: int = 0,
        qa_score: float | None = None,
    ) -> None:
        if not alias:
            raise self.backend.input_error(self.tier, "the model alias is empty")
        add = perf_increments(
            calls=calls, failures=failures, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, latency_s=latency_s, gpu_s=gpu_s, runs=runs,
            runs_ok=runs_ok, qa_score=qa_score,
        )  # fmt: skip
        with self.backend._lock:
            block = self.backend.find_block(self.tier, self._label)
            totals = self._load(block)
            row = totals.setdefault(alias, {}).setdefault(category or "", {})
            for k, v in add.items():
                row[k] = row.get(k, 0) + v
            row["updated_at"] = now().isoformat()
            text = json.dumps({"version": 1, "totals": totals}, separators=(",", ":"))
            limit = block.limit if block is not None else _PERF_BLOCK_LIMIT
            if limit is not None and len(text) > limit:
                raise self.backend.error(
                    self.tier,
                    f"the totals ({len(text)} characters) outgrew block {self._label}"
                    f"'s limit of {limit}",
                )
            if block is None:
                self.backend.create_block(self.tier, self._label, text, _PERF_BLOCK_LIMIT)
            else:
                self.backend.write_block(self.tier, block, text)

    def stats(self, alias: str | None = None, category: str | None = None) -> list[dict[str, Any]]:
        totals = self._load(self.backend.find_block(self.tier, self._label))
        out = []
        for a in sorted(totals):
            if alias is not None and a != alias:
                continue
            for c in sorted(totals[a]):
                if category is not None and c != category:
                    continue
                out.append(perf_row(a, c, totals[a][c]))
        return out

"""Memory recall: ``BuiltinBackend.semantic.search`` at 10k and 100k records, embedding excluded.

The backend is the built-in one as Typhon runs it: records and their vectors in a SQLite run
store, searched by this process's HNSW graph (faiss). ``--base`` sentences (default 2,000, from a
fixed seed) and ``--queries`` questions are embedded with all-MiniLM-L6-v2 once; the collection's
other vectors are small random perturbations of the base vectors (re-normalised; cosine about 0.9
to their base), so that building 100k records takes a minute instead of the model's eight. Rows
go into ``memory_records`` and ``memory_vectors`` by SQLAlchemy bulk inserts with the payload the
backend writes (crew, run_id, tags, kind, created_at); ``--crews`` crews (default 10) take turns,
so a crew filter keeps a tenth of the records. The graph catches up with the table on the first
search after each size step (timed and printed).

The backend searches through an embedder that returns the precomputed vector of a known text (a
dict look-up, timed and printed), so the figures are what ``search()`` costs after embedding: the
index query (including its check for rows other processes wrote), the row fetch from the
database and the rest. Each size is timed over the query texts (``--queries``, default 50; with a
crew filter ``--filtered``, default 20) after three warm-up calls, split into the index query and
the row fetch by timing wrappers around both. For comparison, the same queries as one numpy
matmul over the same float32 vectors (exact top-k, argpartition), with the crew filter as a mask,
with and without the row fetch, how many of the index's top-k ids it returns (the HNSW graph's
recall), and the same rows fetched by primary key alone. The load averages are printed at the
start and the end: other work on the machine skews every figure.

Ingest: ``semantic.add()`` one record at a time into a fresh backend (``--add`` records, default
100), with MiniLM and with precomputed vectors (the store and index part); the bulk inserts of
the build; and what a new process pays for its first search at the largest size, from the
graph's snapshot and building the graph from the table.

Usage::

    .venv/bin/python benchmarks/memory_recall.py [--sizes 10000,100000] [--queries 50]
        [--filtered 20] [--base 2000] [--add 100] [--k 5] [--crews 10]

Target: p50 of ``search()`` at 100k records <= 5 ms, embedding excluded. Exit status 0 whatever
the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from typhon.memory._builtin import BuiltinBackend  # noqa: E402
from typhon.memory._embed import MINILM_DIM, MINILM_MODEL_ID, MiniLMEmbedder  # noqa: E402
from typhon.store import RunStore, memory_records, memory_vectors  # noqa: E402

TARGET_P50_MS = 5.0
SEED = 20240611
BATCH = 5000
NOISE = 0.45  # norm of the perturbation added to a base vector (cosine to the base ~0.9)

PEOPLE = [
    "Alice", "Bob", "the user", "Priya", "Marco", "Chen", "the admin", "Fatima", "Jonas", "Lea",
    "the research crew", "the on-call engineer",
]  # fmt: skip
LIKES = [
    "short answers", "answers in French", "Markdown tables", "dark mode dashboards",
    "the 70B model for code review", "citations with every claim", "metric units",
    "bullet points over prose", "Rust examples", "answers without emoji", "a weekly summary",
    "local models only", "PostgreSQL over MySQL", "Grafana alerts by email", "24-hour times",
    "tabs over spaces", "long explanations", "the small model for quick questions",
]  # fmt: skip
CONTEXTS = [
    "when reviewing pull requests", "for research briefs", "in the morning report",
    "when planning the garden", "for cooking questions", "when debugging the cluster",
    "for travel plans", "in emails to the landlord", "when reading papers", "for tax questions",
    "on weekends", "for the book club notes",
]  # fmt: skip
SERVICES = [
    "Jellyfin", "Home Assistant", "Nextcloud", "Gitea", "Pi-hole", "Grafana", "Prometheus",
    "Vaultwarden", "Immich", "Paperless", "Syncthing", "Redis", "PostgreSQL", "Qdrant",
    "llama-server", "Ollama", "Traefik", "WireGuard", "Frigate", "Mosquitto",
]  # fmt: skip
HOSTS = [
    "the NAS", "node one", "node two", "the GPU box", "the Raspberry Pi in the hallway",
    "the old ThinkPad", "the Proxmox host", "the mini PC under the desk", "the VPS in Frankfurt",
]  # fmt: skip
EVENTS = [
    "ran out of disk space", "lost power for an hour", "was upgraded to the new kernel",
    "started swapping under load", "had its certificate renewed", "was moved to the new rack",
    "failed its nightly backup", "got a new SSD", "was rebooted after a kernel panic",
    "had its fans replaced", "was added to the VLAN for cameras", "slowed down after an update",
]  # fmt: skip
WHEN = [
    "last Monday", "in March", "two weeks ago", "yesterday night", "during the heat wave",
    "after the firmware update", "on the first of the month", "before the holidays",
]  # fmt: skip
TOPICS = [
    "sourdough starters", "heat pumps", "solar panel payback", "sleep and caffeine",
    "ZFS record sizes", "quantised 70B models", "Kubernetes at home", "the Roman economy",
    "electric bikes", "vitamin D", "mechanical keyboards", "trail running shoes",
]  # fmt: skip
FINDINGS = [
    "the sources disagree", "most studies are small", "the effect is modest",
    "the cost depends on the tariff", "the newest paper contradicts the review",
    "the evidence is strong", "nobody measured it at home scale", "the forum advice is outdated",
]  # fmt: skip


def make_sentences(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct memory-like sentences (preferences, service facts, events, findings)."""
    out: dict[str, None] = {}
    while len(out) < n:
        family = rng.randrange(4)
        if family == 0:
            text = f"{rng.choice(PEOPLE)} prefers {rng.choice(LIKES)} {rng.choice(CONTEXTS)}."
        elif family == 1:
            port = rng.choice([80, 443, 3000, 5432, 6333, 6379, 8080, 8096, 8123, 9090, 11434])
            text = f"{rng.choice(SERVICES)} runs on {rng.choice(HOSTS)} and listens on port {port}."
        elif family == 2:
            text = f"{rng.choice(HOSTS).capitalize()} {rng.choice(EVENTS)} {rng.choice(WHEN)}."
        else:
            text = f"Research on {rng.choice(TOPICS)}: {rng.choice(FINDINGS)}."
        out[text] = None
    return list(out)


def make_queries(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct questions in the sentences' vocabulary."""
    out: dict[str, None] = {}
    while len(out) < n:
        family = rng.randrange(4)
        if family == 0:
            text = f"What does {rng.choice(PEOPLE)} like {rng.choice(CONTEXTS)}?"
        elif family == 1:
            text = f"Which port does {rng.choice(SERVICES)} use, and on which machine?"
        elif family == 2:
            text = f"What happened to {rng.choice(HOSTS)} {rng.choice(WHEN)}?"
        else:
            text = f"What did we find out about {rng.choice(TOPICS)}?"
        out[text] = None
    return list(out)


class PrecomputedEmbedder:
    """The MiniLM vector space from a table: ``embed()`` is a dict look-up of known texts."""

    model = MINILM_MODEL_ID
    dim = MINILM_DIM

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.ns: list[int] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        t0 = time.perf_counter_ns()
        out = [self.table[t] for t in texts]
        self.ns.append(time.perf_counter_ns() - t0)
        return out


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes): other work skews the figures."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(sorted_ns: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted nanosecond samples, in milliseconds."""
    rank = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e6


def row(label: str, size: int, ns: list[int], extra: str = "") -> float:
    """Print a row (ms) and return the p50 in milliseconds."""
    ns = sorted(ns)
    p50, p99 = percentile(ns, 0.50), percentile(ns, 0.99)
    print(
        f"{label:<40}{size:>8}{len(ns):>7}{p50:>10.2f}{p99:>10.2f}"
        f"{statistics.fmean(ns) / 1e6:>10.2f}  {extra}"
    )
    return p50


class Timed:
    """Wraps a callable and keeps the nanoseconds of each call."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.ns: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.ns.append(time.perf_counter_ns() - t0)


def payload(crew: str, created: datetime) -> dict[str, Any]:
    """What ``_Searchable._payload`` writes for a record without run or tags."""
    return {
        "crew": crew,
        "run_id": None,
        "tags": [],
        "kind": "fact",
        "created_at": created.timestamp(),
    }


class Corpus:
    """The records of the main backend: rows, their vectors, and the same vectors in numpy."""

    def __init__(
        self, backend: BuiltinBackend, base_texts: list[str], base: np.ndarray, crews: int
    ):
        self.backend = backend
        self.base_texts = base_texts
        self.base = base
        self.crews = crews
        self.rng = np.random.default_rng(SEED)
        self.matrix = np.empty((0, MINILM_DIM), dtype=np.float32)
        self.crew_codes = np.empty(0, dtype=np.int16)
        self.ids: list[str] = []
        self.t0 = datetime.now(UTC)
        self.insert_s = [0.0, 0]

    def grow(self, size: int) -> None:
        """Add records until there are ``size``, in batches of BATCH rows with their vectors
        (as ``semantic.add()`` writes them, in bulk)."""
        name = self.backend.semantic._name  # type: ignore[attr-defined]
        parts = [self.matrix]
        codes = [self.crew_codes]
        while len(self.ids) < size:
            start = len(self.ids)
            count = min(BATCH, size - start)
            which = np.arange(start, start + count) % len(self.base_texts)
            noise = self.rng.standard_normal((count, MINILM_DIM)).astype(np.float32)
            noise *= NOISE / np.sqrt(MINILM_DIM)
            vectors = self.base[which] + noise
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            crew_codes = (np.arange(start, start + count) % self.crews).astype(np.int16)
            ids = [str(uuid.uuid4()) for _ in range(count)]
            rows = []
            points = []
            for j, record_id in enumerate(ids):
                i = start + j
                crew = f"crew-{crew_codes[j]}"
                created = self.t0 - timedelta(seconds=i)
                rows.append(
                    {
                        "id": record_id, "tier": "semantic", "created_at": created, "crew": crew,
                        "text": f"{self.base_texts[which[j]]} (note {i})", "run_id": None,
                        "tags": [], "kind": "fact", "meta": {}, "embed_model": MINILM_MODEL_ID,
                    }
                )  # fmt: skip
                points.append(
                    {
                        "collection": name, "point_id": record_id, "op": "add", "at": time.time(),
                        "vector": vectors[j].tobytes(), "payload": payload(crew, created),
                    }
                )  # fmt: skip
            t0 = time.perf_counter()
            with self.backend.store.engine.begin() as conn:
                conn.execute(memory_records.insert(), rows)
                conn.execute(memory_vectors.insert(), points)
            self.insert_s[0] += time.perf_counter() - t0
            self.insert_s[1] += count
            self.ids.extend(ids)
            parts.append(vectors)
            codes.append(crew_codes)
        self.matrix = np.concatenate(parts)
        self.crew_codes = np.concatenate(codes)


def time_add(tmp: Path, embedder: Any, texts: list[str], label: str) -> None:
    """``semantic.add()`` one record at a time into a fresh backend."""
    store = RunStore(f"sqlite:///{tmp / f'add-{label}.db'}")
    backend = BuiltinBackend(store, embedder)
    try:
        backend.semantic.add("warm-up record", crew="crew-0", kind="fact")
        samples = []
        t_all = time.perf_counter()
        for i, text in enumerate(texts):
            t0 = time.perf_counter_ns()
            backend.semantic.add(text, crew=f"crew-{i % 10}", kind="fact")
            samples.append(time.perf_counter_ns() - t0)
        took = time.perf_counter() - t_all
        samples.sort()
        print(
            f"  add() one by one, {label:<22}{len(texts):>6} records {len(texts) / took:>8.0f}"
            f" records/s  (p50 {percentile(samples, 0.5):.2f} ms, p99"
            f" {percentile(samples, 0.99):.2f} ms)"
        )
    finally:
        backend.close()
        store.close()


def measure(
    corpus: Corpus, queries: list[str], qvecs: np.ndarray, args: argparse.Namespace
) -> dict[str, float]:
    """Time search() and the numpy flat search at the corpus's current size."""
    backend, semantic = corpus.backend, corpus.backend.semantic
    size = len(corpus.ids)
    index = backend.index
    timed_query = Timed(index.query)
    timed_rows = Timed(semantic._rows)  # type: ignore[attr-defined]
    index.query = timed_query  # type: ignore[method-assign]
    semantic._rows = timed_rows  # type: ignore[attr-defined]
    embed_ns = backend.embedder.ns  # type: ignore[attr-defined]
    results: dict[str, float] = {}
    index_top: dict[tuple[str, str | None], list[str]] = {}
    try:
        for crew, n in ((None, args.queries), ("crew-3", args.filtered)):
            picked = queries[:n]
            for q in picked[:3]:  # warm-up
                semantic.search(q, k=args.k, crew=crew)
            timed_query.ns.clear()
            timed_rows.ns.clear()
            embed_ns.clear()
            total = []
            for q in picked:
                t0 = time.perf_counter_ns()
                found = semantic.search(q, k=args.k, crew=crew)
                total.append(time.perf_counter_ns() - t0)
                index_top[(q, crew)] = [r.id for r in found]
                assert len(found) == args.k
                assert crew is None or all(r.crew == crew for r in found)
            label = "search()" if crew is None else f"search(crew=) 1/{args.crews}"
            results[label] = row(label, size, total)
            row("  index query (HNSW)", size, timed_query.ns)
            row("  row fetch (database)", size, timed_rows.ns)
            rest = [
                t - a - b - e
                for t, a, b, e in zip(total, timed_query.ns, timed_rows.ns, embed_ns, strict=True)
            ]
            row(
                "  rest (filter, records, embed)",
                size,
                rest,
                f"embed look-up p50 {np.median(embed_ns) / 1e3:.1f} µs",
            )
    finally:
        del index.query
        del semantic._rows  # type: ignore[attr-defined]

    matrix, codes = corpus.matrix, corpus.crew_codes
    ids = corpus.ids
    qindex = {q: i for i, q in enumerate(queries)}
    # _rows() asks for `id IN (...) AND tier = ?`; the same rows by primary key alone:
    by_id_query = sa.select(memory_records).where(
        memory_records.c.id.in_(sa.bindparam("ids", expanding=True))
    )
    for crew, n in ((None, args.queries), ("crew-3", args.filtered)):
        picked = queries[:n]
        code = None if crew is None else int(crew.split("-")[1])
        flat_ns: list[int] = []
        with_rows_ns: list[int] = []
        by_id_ns: list[int] = []
        overlap = []
        for rnd in range(4):  # one warm-up round, three timed
            for q in picked:
                qv = qvecs[qindex[q]]
                t0 = time.perf_counter_ns()
                scores = matrix @ qv
                if code is not None:
                    scores = np.where(codes == code, scores, -np.inf)
                top = np.argpartition(-scores, args.k)[: args.k]
                top = top[np.argsort(-scores[top])]
                top_ids = [ids[i] for i in top]
                t1 = time.perf_counter_ns()
                fetched = semantic._rows(top_ids)
                t2 = time.perf_counter_ns()
                with backend.store.engine.connect() as conn:
                    by_id = list(conn.execute(by_id_query, {"ids": top_ids}).mappings())
                t3 = time.perf_counter_ns()
                assert len(by_id) == args.k
                if rnd:
                    by_id_ns.append(t3 - t2)
                    flat_ns.append(t1 - t0)
                    with_rows_ns.append(t2 - t0)
                    want = set(index_top[(q, crew)])
                    overlap.append(len(want & set(top_ids)) / args.k)
                assert len(fetched) == args.k
        suffix = "" if crew is None else ", crew mask"
        agree = f"top-{args.k} ids shared with the index {statistics.fmean(overlap):.0%}"
        results[f"numpy{suffix}"] = row(
            f"numpy exact (matmul + top-k){suffix}", size, flat_ns, agree
        )
        row(f"numpy exact + row fetch{suffix}", size, with_rows_ns)
        row("  rows by id alone (no tier term)", size, by_id_ns)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Time memory recall (semantic search) at 10k and 100k records."
    )
    p.add_argument("--sizes", default="10000,100000", help="collection sizes, ascending")
    p.add_argument("--queries", type=int, default=50, help="timed queries without a filter")
    p.add_argument("--filtered", type=int, default=20, help="timed queries with a crew filter")
    p.add_argument("--base", type=int, default=2000, help="sentences embedded with MiniLM")
    p.add_argument("--add", type=int, default=100, help="records for the add() ingest rate")
    p.add_argument("--k", type=int, default=5, help="results per search")
    p.add_argument("--crews", type=int, default=10, help="crews taking turns over the records")
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    rng = random.Random(SEED)
    base_texts = make_sentences(args.base, rng)
    queries = make_queries(max(args.queries, args.filtered), rng)
    add_texts = make_sentences(args.base + 2 * args.add, random.Random(SEED + 1))[-2 * args.add :]
    embedder = MiniLMEmbedder()
    t0 = time.perf_counter()
    embedder.load()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = np.asarray(embedder.embed(base_texts), dtype=np.float32)
    embed_s = time.perf_counter() - t0
    qvecs = np.asarray(embedder.embed(queries), dtype=np.float32)
    table = {
        t: v.tolist()
        for t, v in zip(base_texts + queries, np.concatenate([base, qvecs]), strict=True)
    }
    table.update(zip(add_texts, embedder.embed(add_texts), strict=True))
    table["warm-up record"] = base[0].tolist()

    from importlib.metadata import version

    print(
        f"memory recall: BuiltinBackend.semantic.search(k={args.k}), embedding excluded;"
        f" SQLite run store + HNSW (faiss-cpu {version('faiss-cpu')}, M 32, efSearch 64),"
        f" Python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"vectors: {len(base_texts)} sentences embedded with MiniLM"
        f" ({len(base_texts) / embed_s:.0f} texts/s, model loaded in {load_s:.1f} s), the rest"
        f" perturbed copies (noise norm {NOISE}); {len(queries)} query texts;"
        f" {args.crews} crews take turns"
    )

    with tempfile.TemporaryDirectory(prefix="typhon-recall-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"load average {load()}")
        print("\ningest")
        time_add(tmp, embedder, add_texts[: args.add], "MiniLM")
        time_add(tmp, PrecomputedEmbedder(table), add_texts[args.add :], "precomputed vectors")

        store = RunStore(f"sqlite:///{tmp / 'memory.db'}")
        snapshots = tmp / "vectors"
        backend = BuiltinBackend(store, PrecomputedEmbedder(table), snapshot_dir=snapshots)
        semantic = backend.semantic
        semantic._ready()  # type: ignore[attr-defined]
        name = semantic._name  # type: ignore[attr-defined]
        corpus = Corpus(backend, base_texts, base, args.crews)
        cos = np.sum(corpus.base[:200] * corpus.base[:200], axis=1)  # sanity: unit vectors
        assert np.allclose(cos, 1.0, atol=1e-3)
        header = f"{'[ms]':<40}{'records':>8}{'calls':>7}{'p50':>10}{'p99':>10}{'mean':>10}"
        by_size: dict[int, dict[str, float]] = {}
        for size in sizes:
            t0 = time.perf_counter()
            corpus.grow(size)
            insert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert backend.index.count(name, MINILM_DIM) == size  # type: ignore[attr-defined]
            graph_s = time.perf_counter() - t0
            assert semantic.count() == size
            print(
                f"\n{size} records (rows and vectors inserted in {insert_s:.0f} s; this process's"
                f" graph caught up with the table in {graph_s:.1f} s)"
            )
            print(header)
            print("-" * len(header))
            by_size[size] = measure(corpus, queries, qvecs, args)

        print("\nbuild")
        secs, count = corpus.insert_s
        print(
            f"  {'database bulk insert (records + vectors), batches of 5000':<58}{count:>7} rows"
            f"   {count / secs:>8.0f} rows/s"
        )
        t0 = time.perf_counter()
        backend.close()  # writes the snapshot
        save_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in snapshots.iterdir()) / 1e6
        other = BuiltinBackend(store, PrecomputedEmbedder(table), snapshot_dir=snapshots)
        t0 = time.perf_counter()
        other.semantic.search(queries[0], k=args.k)
        load_snap_s = time.perf_counter() - t0
        other.index.close()
        shutil.rmtree(snapshots)
        other = BuiltinBackend(store, PrecomputedEmbedder(table), snapshot_dir=None)
        t0 = time.perf_counter()
        other.semantic.search(queries[0], k=args.k)
        cold_s = time.perf_counter() - t0
        other.close()
        print(
            f"  a new process's first search at {len(corpus.ids)} records: {load_snap_s:.1f} s"
            f" from the snapshot ({size_mb:.0f} MB, written in {save_s:.1f} s),"
            f" {cold_s:.1f} s building the graph from the table"
        )
        store.close()

    with open("/proc/self/status") as f:
        hwm = next((line.split()[1] for line in f if line.startswith("VmHWM")), "0")
    print(f"\npeak RSS {int(hwm) / 1024:.0f} MB; load average {load()}")
    top = sizes[-1]
    got = by_size[top]
    verdict = "PASS" if got["search()"] <= TARGET_P50_MS else "MISS"
    print(
        f"\nsearch() at {top} records, embedding excluded: p50 {got['search()']:.2f} ms"
        f" (with a crew filter {got[f'search(crew=) 1/{args.crews}']:.2f} ms); numpy exact top-k"
        f" {got['numpy']:.2f} ms (crew mask {got['numpy, crew mask']:.2f} ms);"
        f" target p50 <= {TARGET_P50_MS:g} ms: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

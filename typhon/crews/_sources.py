"""Where the Research crew's facts come from: a SearXNG JSON API and a folder of local documents.

Both record every source they return in a :class:`SourceBook`, so the brief's Sources section is
built from what was actually read, not from what a model claims to have read.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["DocumentIndex", "SearchError", "Source", "SourceBook", "searxng_search"]

_WORD = re.compile(r"[a-z0-9]{2,}")
_TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".text", ".html", ".htm"}
_CHUNK_CHARS = 1200
_MAX_FILE_BYTES = 5_000_000


class SearchError(Exception):
    """The search service failed; the message names its URL."""


@dataclass(frozen=True)
class Source:
    title: str
    location: str  # URL or file path
    snippet: str


class SourceBook:
    """The numbered list of sources a run has read. Thread-safe; a location is listed once."""

    def __init__(self) -> None:
        self._items: list[Source] = []
        self._lock = threading.Lock()

    def add(self, source: Source) -> int:
        with self._lock:
            for i, known in enumerate(self._items, 1):
                if known.location == source.location:
                    return i
            self._items.append(source)
            return len(self._items)

    @property
    def items(self) -> list[Source]:
        with self._lock:
            return list(self._items)

    def markdown(self) -> str:
        items = self.items
        if not items:
            return (
                "## Sources\n\nNone: no search service is configured (`search_url`) and no"
                " documents folder was given (`--docs`), so this brief rests on the model alone."
            )
        lines = [
            f"{i}. [{s.title}]({s.location})"
            if "://" in s.location
            else f"{i}. {s.title}: `{s.location}`"
            for i, s in enumerate(items, 1)
        ]
        return "## Sources\n\n" + "\n".join(lines)


def _format(results: list[tuple[int, Source]]) -> str:
    if not results:
        return "No results."
    return "\n\n".join(f"[{n}] {s.title} ({s.location})\n{s.snippet}" for n, s in results)


def searxng_search(
    search_url: str, query: str, book: SourceBook, *, limit: int = 5, timeout: float = 15.0
) -> str:
    """Query SearXNG's JSON API (``GET /search?format=json``); the results as numbered text."""
    url = search_url.rstrip("/") + "/search"
    try:
        response = httpx.get(url, params={"q": query, "format": "json"}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise SearchError(f"search at {search_url} unreachable: {exc}") from None
    if response.status_code != 200:
        raise SearchError(
            f"search at {search_url} answered {response.status_code}"
            " (SearXNG needs `json` under search.formats in settings.yml)"
        )
    try:
        raw = response.json().get("results", [])
    except ValueError:
        raise SearchError(f"search at {search_url} did not answer JSON") from None
    found: list[tuple[int, Source]] = []
    for item in raw[:limit]:
        if not isinstance(item, dict) or not item.get("url"):
            continue
        source = Source(
            title=str(item.get("title") or item["url"])[:200],
            location=str(item["url"]),
            snippet=str(item.get("content") or "")[:600],
        )
        found.append((book.add(source), source))
    return _format(found)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _read(path: Path) -> str:
    if path.suffix.lower() == ".pdf":
        try:
            import pdfplumber
        except ImportError:
            return ""
        with pdfplumber.open(path) as pdf:
            return "\n\n".join(page.extract_text() or "" for page in pdf.pages[:200])
    return path.read_text(encoding="utf-8", errors="replace")


def _chunks(text: str) -> list[str]:
    out: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if current and len(current) + len(para) > _CHUNK_CHARS:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


class DocumentIndex:
    """A BM25 index over the text, Markdown and PDF files of a folder (read once)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._chunks: list[tuple[Path, str, Counter[str]]] = []
        for path in sorted(folder.rglob("*")):
            suffix = path.suffix.lower()
            if not path.is_file() or path.stat().st_size > _MAX_FILE_BYTES:
                continue
            if suffix not in _TEXT_SUFFIXES and suffix != ".pdf":
                continue
            for chunk in _chunks(_read(path)):
                self._chunks.append((path, chunk, Counter(_words(chunk))))
        self._df: Counter[str] = Counter()
        for _, _, counts in self._chunks:
            self._df.update(counts.keys())
        total = sum(sum(c.values()) for _, _, c in self._chunks)
        self._avg_len = total / len(self._chunks) if self._chunks else 1.0

    def __len__(self) -> int:
        return len(self._chunks)

    def search(self, query: str, book: SourceBook, *, limit: int = 3) -> str:
        """The best-matching passages as numbered text; each file read becomes a source."""
        terms = set(_words(query))
        n = len(self._chunks)
        scored: list[tuple[float, int]] = []
        for i, (_, _, counts) in enumerate(self._chunks):
            length = sum(counts.values()) or 1
            score = 0.0
            for term in terms:
                tf = counts.get(term, 0)
                if not tf:
                    continue
                idf = math.log(1 + (n - self._df[term] + 0.5) / (self._df[term] + 0.5))
                score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / self._avg_len))
            if score > 0:
                scored.append((score, i))
        scored.sort(reverse=True)
        found: list[tuple[int, Source]] = []
        for _, i in scored[:limit]:
            path, chunk, _ = self._chunks[i]
            rel = path.relative_to(self.folder)
            source = Source(
                title=rel.stem.replace("_", " ").replace("-", " "),
                location=str(path),
                snippet=chunk[:800],
            )
            found.append((book.add(source), source))
        return _format(found)

"""The Research crew's own logic: sources, documents, the brief; CrewAI with a scripted model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from typhon import RunStatus, Typhon
from typhon.config import TyphonConfig
from typhon.crews._sources import DocumentIndex, SearchError, SourceBook, searxng_search
from typhon.crews.research import compose_brief
from typhon.testing import ScriptedModel, ScriptedModels

RESULTS = [
    {"title": "RISC-V history", "url": "https://example.org/riscv", "content": "Berkeley, 2010."},
    {"title": "ISA specs", "url": "https://example.org/spec", "content": "Ratified in 2019."},
]


class _SearxHandler(BaseHTTPRequestHandler):
    queries: list[str] = []  # noqa: RUF012 - shared by the test server's threads

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path != "/search" or query.get("format") != ["json"]:
            self.send_response(403)
            self.end_headers()
            return
        type(self).queries.append(query["q"][0])
        body = json.dumps({"query": query["q"][0], "results": RESULTS}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def searx() -> Iterator[str]:
    """A SearXNG-shaped JSON endpoint on loopback (the real service cannot run here)."""
    _SearxHandler.queries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SearxHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "vector_extension.md").write_text(
        "# The vector extension\n\nRISC-V vector registers are length-agnostic.\n\n"
        "Unrelated paragraph about cooking pasta."
    )
    (folder / "notes.txt").write_text("Cache coherence protocols such as MESI.")
    (folder / "image.png").write_bytes(b"\x89PNG")
    return folder


def test_source_book_numbers_each_location_once() -> None:
    from typhon.crews._sources import Source

    book = SourceBook()
    assert book.add(Source("a", "https://a", "")) == 1
    assert book.add(Source("b", "/tmp/b.md", "")) == 2
    assert book.add(Source("a again", "https://a", "")) == 1
    assert book.markdown() == "## Sources\n\n1. [a](https://a)\n2. b: `/tmp/b.md`"


def test_document_index_finds_the_relevant_passage(docs: Path) -> None:
    index = DocumentIndex(docs)
    book = SourceBook()
    text = index.search("vector registers", book)
    assert "length-agnostic" in text
    assert [s.location for s in book.items] == [str(docs / "vector_extension.md")]
    assert index.search("zebra", book) == "No results."


def test_searxng_search_records_sources(searx: str) -> None:
    book = SourceBook()
    text = searxng_search(searx, "riscv", book)
    assert "[1] RISC-V history (https://example.org/riscv)" in text
    assert [s.location for s in book.items] == [
        "https://example.org/riscv",
        "https://example.org/spec",
    ]
    assert _SearxHandler.queries == ["riscv"]


def test_searxng_down_names_the_url() -> None:
    with pytest.raises(SearchError, match=r"http://127\.0\.0\.1:9"):
        searxng_search("http://127.0.0.1:9", "x", SourceBook(), timeout=2)


def test_compose_brief_titles_and_replaces_model_sources() -> None:
    from typhon.crews._sources import Source

    book = SourceBook()
    book.add(Source("Doc", "https://d", ""))
    brief = compose_brief("Topic", "Findings here.\n\n## Sources\n1. made up", book)
    assert brief.startswith("# Research brief: Topic\n\nFindings here.")
    assert "made up" not in brief
    assert brief.endswith("## Sources\n\n1. [Doc](https://d)\n")
    assert "None: no search service" in compose_brief("T", "", SourceBook())


def test_research_crew_with_scripted_model(home: Path, docs: Path, searx: str) -> None:
    config = TyphonConfig(home=home, search_url=searx)
    model = ScriptedModel(
        "- RISC-V began at Berkeley [1]",
        "Theme: open ISA.",
        "# RISC-V\n\nAn open ISA.\n\n## Key findings\n- Berkeley [1]",
    )
    with Typhon(config, models=ScriptedModels(config, model)) as typhon:
        handle = typhon.submit("research", "RISC-V vector registers", docs=str(docs))
        record = handle.wait(120)
        steps = [e.data.get("name") for e in typhon.store.events(handle.run_id) if e.kind == "step"]
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert record.output is not None
    assert record.output.startswith("# RISC-V\n\nAn open ISA.")
    assert "1. [RISC-V history](https://example.org/riscv)" in record.output
    assert f"`{docs / 'vector_extension.md'}`" in record.output
    assert steps == ["gathering sources", "researcher", "analyst", "writer"]
    assert len(model.calls) == 3
    first_prompt = json.dumps(model.calls[0]["messages"])
    assert "length-agnostic" in first_prompt and "Berkeley, 2010." in first_prompt
    brief = home / "artifacts" / record.id / "brief.md"
    assert record.artifacts == [str(brief)]
    assert brief.read_text() == record.output


def test_research_docs_folder_without_documents_fails_clearly(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = TyphonConfig(home=home)
    with Typhon(config, models=ScriptedModels(config, ScriptedModel("x"))) as typhon:
        record = typhon.submit("research", "topic", docs=str(empty)).wait(60)
    assert record.status is RunStatus.FAILED
    assert record.error is not None and "holds no readable" in record.error

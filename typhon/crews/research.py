"""The Research crew (CrewAI): researcher -> analyst -> writer, a Markdown brief with sources.

Before the agents start, the crew searches (SearXNG, when ``search_url`` is set) and reads the
``--docs`` folder for the topic, so even a small model starts from real material; the researcher
keeps both tools for follow-up queries. The Sources section is built from what the tools returned.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from typhon.config import Category
from typhon.crews._base import Crew, CrewOutput
from typhon.crews._sources import DocumentIndex, SearchError, SourceBook, searxng_search
from typhon.errors import CrewError

if TYPE_CHECKING:
    from typhon.context import RunContext

__all__ = ["PROMPTS", "ResearchCrew", "compose_brief"]

# Agent and task texts. Kept as data: the improve loop versions them.
PROMPTS: dict[str, dict[str, str]] = {
    "researcher": {
        "role": "Researcher",
        "goal": "Collect the most relevant facts about {topic}, each tied to its source number.",
        "backstory": "A careful researcher who reads sources before making claims.",
        "task": (
            "Topic: {topic}\n\nMaterial found so far:\n{material}\n\n"
            "List the key facts about the topic as short bullet points. End each fact with the "
            "number of its source in brackets, like [1]. Use the tools for more material if needed."
        ),
        "expected_output": "Bullet points of facts, each citing a source number like [1].",
    },
    "analyst": {
        "role": "Analyst",
        "goal": "Find what the facts about {topic} add up to.",
        "backstory": "An analyst who separates what is established from what is open.",
        "task": (
            "From the researcher's facts on {topic}, name the main themes, where the sources "
            "agree, where they disagree, and what remains open. Keep the source numbers."
        ),
        "expected_output": "Themes, agreements, disagreements and open questions, with sources.",
    },
    "writer": {
        "role": "Writer",
        "goal": "Write a clear research brief on {topic}.",
        "backstory": "A technical writer who writes short, well-organised Markdown.",
        "task": (
            "Write a research brief on {topic} in Markdown: a title line starting with '# ', a "
            "two-sentence summary, '## Key findings' as bullet points citing sources like [1], "
            "and '## Open questions'. Do not write a Sources section."
        ),
        "expected_output": "A Markdown research brief.",
    },
}

_SOURCES_HEADING = re.compile(r"^#{1,6}\s*(sources|references)\b.*", re.IGNORECASE | re.MULTILINE)


def compose_brief(topic: str, text: str, book: SourceBook) -> str:
    """The writer's text with a title, and the Sources section from what was actually read."""
    body = text.strip()
    match = _SOURCES_HEADING.search(body)
    if match:
        body = body[: match.start()].rstrip()
    if not body:
        body = "_The writer returned no text._"
    if not body.startswith("# "):
        body = f"# Research brief: {topic}\n\n{body}"
    return f"{body}\n\n{book.markdown()}\n"


def gather(ctx: RunContext, book: SourceBook, index: DocumentIndex | None) -> str:
    """Search and read for the topic before the agents start; the material as numbered text."""
    parts: list[str] = []
    search_url = ctx.config.search_url
    if search_url:
        try:
            parts.append(searxng_search(search_url, ctx.input, book))
        except SearchError as exc:
            ctx.log.warning("search failed", error=str(exc))
            parts.append(f"(web search failed: {exc})")
    if index is not None:
        parts.append(index.search(ctx.input, book))
    return "\n\n".join(p for p in parts if p) or "(none: answer from general knowledge)"


def _docs_index(ctx: RunContext) -> DocumentIndex | None:
    folder = ctx.options.get("docs")
    if not folder:
        return None
    path = Path(str(folder))
    if not path.is_dir():
        raise CrewError(f"documents folder {path} does not exist")
    index = DocumentIndex(path)
    if not len(index):
        raise CrewError(f"documents folder {path} holds no readable .md, .txt or .pdf files")
    return index


def _tools(ctx: RunContext, book: SourceBook, index: DocumentIndex | None) -> list[Any]:
    from crewai.tools import BaseTool

    tools: list[Any] = []
    if ctx.config.search_url:
        search_url: str = ctx.config.search_url

        class WebSearch(BaseTool):  # type: ignore[misc]
            name: str = "web_search"
            description: str = "Search the web. Input: a search query."

            def _run(self, query: str) -> str:
                try:
                    return searxng_search(search_url, query, book)
                except SearchError as exc:
                    return f"search failed: {exc}"

        tools.append(WebSearch())
    if index is not None:
        docs = index

        class SearchDocuments(BaseTool):  # type: ignore[misc]
            name: str = "search_documents"
            description: str = "Search the local documents (papers, notes). Input: a query."

            def _run(self, query: str) -> str:
                return docs.search(query, book)

        tools.append(SearchDocuments())
    return tools


class ResearchCrew(Crew):
    name = "research"
    description = "Web research and paper analysis: a Markdown brief with sources."
    pool = "research"
    category: ClassVar[Category | None] = None  # routed by what is asked

    def run(self, ctx: RunContext) -> CrewOutput:
        book = SourceBook()
        index = _docs_index(ctx)
        ctx.step("gathering sources")
        material = gather(ctx, book, index)
        remembered = ctx.recall()
        if remembered:
            from typhon.memory import recall_text

            ctx.step("recalled memories", count=len(remembered))
            material += "\n\nWhat earlier runs and stored knowledge say:\n" + recall_text(
                remembered
            )

        from crewai import Agent, Crew, Process, Task

        from typhon.crews._crewai import TyphonLLM, prepare_crewai

        prepare_crewai(ctx.config.home)
        llm = TyphonLLM.wrap(
            ctx.model,
            max_tokens=ctx.settings.max_tokens,
            temperature=ctx.settings.temperature,
            on_agent=ctx.step,
        )
        texts = {key: {**PROMPTS[key], **ctx.prompts.get(key, {})} for key in PROMPTS}
        agents = {
            key: Agent(
                role=texts[key]["role"],
                goal=texts[key]["goal"],
                backstory=texts[key]["backstory"],
                llm=llm,
                max_iter=3,
                allow_delegation=False,
                tools=_tools(ctx, book, index) if key == "researcher" else [],
                verbose=False,
            )
            for key in ("researcher", "analyst", "writer")
        }
        tasks: list[Any] = []
        for key, agent in agents.items():
            tasks.append(
                Task(
                    description=(ctx.demo_text() if key == "writer" else "") + texts[key]["task"],
                    expected_output=texts[key]["expected_output"],
                    agent=agent,
                    context=list(tasks[-1:]),
                )
            )
        crew = Crew(
            agents=list(agents.values()),
            tasks=tasks,
            process=Process.sequential,
            verbose=False,
            memory=False,
        )
        try:
            result = crew.kickoff(inputs={"topic": ctx.input, "material": material})
        except Exception:
            ctx.check_cancelled()
            if llm.model_errors:
                raise llm.model_errors[-1] from None
            raise
        ctx.check_cancelled()
        text = str(getattr(result, "raw", "") or "")
        if llm.model_errors and not text.strip():
            raise llm.model_errors[-1]
        brief = compose_brief(ctx.input, text, book)
        return CrewOutput(brief, {"brief.md": brief})

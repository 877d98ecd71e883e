"""A custom crew: list this module under `crew_modules` in typhon.yaml, then
`typhon run haiku "autumn rain"` (the module must be importable: PYTHONPATH=examples)."""

from typhon import CrewOutput, RunContext, crew

EXAMPLE = (
    "Grey waves fold and break\nsalt wind combs the dune grass flat\nthe gulls hang, then fall"
)


@crew("haiku", pool="research", category="creative")
def haiku(ctx: RunContext) -> CrewOutput:
    """Write a haiku about the input."""
    ctx.step("drafting")
    answer = ctx.model.chat(
        [
            {"role": "user", "content": "Write a haiku about the sea."},
            {"role": "assistant", "content": EXAMPLE},
            {"role": "user", "content": f"Write a haiku about {ctx.input}."},
        ],
        max_tokens=60,
    )
    return CrewOutput(answer.content.strip(), {"haiku.txt": answer.content})

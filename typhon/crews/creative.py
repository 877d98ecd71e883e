"""The Creative crew (CrewAI + ComfyUI + speech): images, and a spoken line where asked.

An art-director agent turns the request into image prompts (and a spoken line when the request
asks for voice or narration, or the run has ``speech=True``). Each prompt is rendered through a
ComfyUI workflow template (option ``template``; "portrait" or "character" in the request picks
``character_portrait``, else ``text_to_image``), and the line is spoken by an OpenAI-compatible
TTS server. Images are stored as ``image-1.png``…, speech as ``speech.<format>``.

The art director's answer is parsed leniently: whatever it writes, a usable prompt is built from
the request itself, so a weak model makes plainer images, never a failed run.

Options: ``template``, ``images`` (1-4), ``seed``, ``width``, ``height``, ``steps``, ``speech``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from typhon.config import Category
from typhon.crews._base import Crew, CrewOutput
from typhon.crews._comfyui import ComfyUIClient, Progress, Template, load_template
from typhon.errors import CrewError

if TYPE_CHECKING:
    from typhon.config import CreativeConfig
    from typhon.context import RunContext

__all__ = ["PROMPTS", "CreativeCrew", "Direction", "parse_direction"]

# Agent and task texts. Kept as data: the improve loop versions them.
PROMPTS: dict[str, dict[str, str]] = {
    "art_director": {
        "role": "Art director",
        "goal": "Turn a creative request into precise prompts for an image generator.",
        "backstory": (
            "An art director who writes short, concrete Stable Diffusion prompts: subject, "
            "setting, style, lighting and camera, comma separated."
        ),
        "task": (
            "Request: {request}\n\n"
            "Write {count} image prompt(s) for a Stable Diffusion image generator. Answer with "
            "these lines and nothing else:\n"
            "PROMPT 1: <subject, setting, style, lighting, camera>\n"
            "NEGATIVE: <what to avoid>\n"
            "{speech_format}\n"
            "Example answer:\n"
            "PROMPT 1: an old fisherman mending nets on a pier at dawn, oil painting, warm rim "
            "light, 85mm\n"
            "NEGATIVE: blurry, extra fingers, watermark, text\n"
            "{speech_example}"
        ),
        "expected_output": "PROMPT lines, a NEGATIVE line{speech_expected}.",
        "speech_format": "SPOKEN LINE: <one short sentence to be spoken aloud>",
        "speech_example": "SPOKEN LINE: The sea gives, and the sea takes.",
    },
}

_EXAMPLE_PROMPT = "an old fisherman mending nets on a pier at dawn"
_EXAMPLE_LINE = "the sea gives, and the sea takes"
_WANTS_SPEECH = re.compile(
    r"\b(voice[ds]?|voice-?over|narrat\w*|spoken|speak\w*|says?|saying|read (?:it )?aloud|"
    r"audio|speech|dialogue)\b",
    re.IGNORECASE,
)
_WANTS_PORTRAIT = re.compile(r"\b(portrait|character)s?\b", re.IGNORECASE)
_SPEECH_PHRASE = re.compile(
    r"[,;]?\s*(?:and|with|plus)?\s*(?:a|an)?\s*(?:short\s+)?(?:spoken|voice|voiced|narrated)\s+"
    r"(?:line|over|narration|clip)s?\b|[,;]?\s*(?:and|with)\s+(?:a\s+)?narration\b",
    re.IGNORECASE,
)
_LINE_START = r"^[ \t>*#\-]*(?:\d+[.)]\s*)?"
_PROMPT_LINE = re.compile(
    _LINE_START + r"(?:image\s+)?prompt\s*#?\s*\d*\s*[:=\-–]\s*(.+)$", re.IGNORECASE | re.MULTILINE
)
_NEGATIVE_LINE = re.compile(
    _LINE_START + r"negative(?:\s+prompt)?\s*[:=\-–]\s*(.+)$", re.IGNORECASE | re.MULTILINE
)
_SPOKEN_LINE = re.compile(
    _LINE_START + r"(?:spoken\s+line|voice\s+line|line|narration)\s*[:=\-–]\s*(.+)$",
    re.IGNORECASE | re.MULTILINE,
)
_QUOTED = re.compile(r"[\"“]([^\"”]{3,300})[\"”]")
_AUDIO_EXT = {
    "mp3": "mp3",
    "wav": "wav",
    "opus": "opus",
    "flac": "flac",
    "aac": "aac",
    "pcm": "pcm",
}
_MAX_IMAGES = 4


@dataclass(frozen=True)
class Direction:
    """What the art director decided: prompts, an optional negative prompt and spoken line,
    and whether each came from the model (False: built from the request)."""

    prompts: list[str]
    negative: str | None
    spoken_line: str | None
    from_model: bool


def _clean(text: str) -> str:
    text = " ".join(text.split()).strip(" \"'`*<>[]")
    return text.rstrip(" ,;")


def _usable(text: str, example: str) -> bool:
    """A line worth sending on: a few real words, not a placeholder or the example echoed."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    lowered = text.lower()
    return (
        8 <= len(text) <= 600
        and len(words) >= 3
        and example not in lowered
        and "subject, setting, style" not in lowered
        and not re.search(r"[{}<>]|\bPROMPT\b|SPOKEN LINE|NEGATIVE", text)
    )


def subject_of(request: str) -> str:
    """The request without its ask for speech: what the images should show."""
    subject = _SPEECH_PHRASE.sub("", request)
    return _clean(subject) or _clean(request) or "an evocative scene"


def fallback_prompts(request: str, count: int) -> list[str]:
    """Prompts built from the request itself, for when the model's answer is unusable."""
    base = f"{subject_of(request)}, highly detailed, dramatic lighting, sharp focus"
    variants = ["", ", wide shot", ", close-up", ", from a low angle"]
    return [base + variants[i % len(variants)] for i in range(count)]


def fallback_line(request: str) -> str:
    """A line to speak when the model wrote none: quoted words in the request, else the
    subject as a sentence."""
    quoted = _QUOTED.search(request)
    if quoted:
        return _clean(quoted.group(1))
    subject = subject_of(request)
    return f"This is {subject[0].lower()}{subject[1:]}." if subject else "Hello."


def parse_direction(text: str, request: str, *, count: int, speech: bool) -> Direction:
    """The art director's answer as prompts (exactly ``count``), negative and spoken line;
    whatever is missing or unusable comes from the request."""
    found = _PROMPT_LINE.findall(text)
    prompts = [_clean(p) for p in found if _usable(p.strip(), _EXAMPLE_PROMPT)][:count]
    from_model = bool(prompts)
    fallback = fallback_prompts(request, count)
    prompts += fallback[len(prompts) : count]
    negatives = [_clean(m) for m in _NEGATIVE_LINE.findall(text)]
    negative = next((n for n in negatives if 3 <= len(n) <= 400 and "<" not in n), None)
    line: str | None = None
    if speech:
        spoken = [_clean(s) for s in _SPOKEN_LINE.findall(text) if _usable(s, _EXAMPLE_LINE)]
        line = next((s for s in spoken if len(s) <= 400), None)
        line = line or fallback_line(request)
    return Direction(prompts, negative, line, from_model)


def _template_name(ctx: RunContext) -> str:
    chosen = ctx.options.get("template")
    if chosen:
        return str(chosen)
    return "character_portrait" if _WANTS_PORTRAIT.search(ctx.input) else "text_to_image"


def _wants_speech(ctx: RunContext) -> bool:
    option = ctx.options.get("speech")
    if option is not None:
        return bool(option) and str(option).lower() not in ("0", "false", "no")
    return bool(_WANTS_SPEECH.search(ctx.input))


def _image_count(ctx: RunContext) -> int:
    raw = ctx.options.get("images", 1)
    try:
        count = int(raw)
    except (TypeError, ValueError):
        count = 0
    if not 1 <= count <= _MAX_IMAGES:
        raise CrewError(f"option images={raw!r}: give a whole number from 1 to {_MAX_IMAGES}")
    return count


def _seed(ctx: RunContext, index: int) -> int:
    """The option's seed (plus the image's index), else one derived from the run id, so a run
    can be repeated exactly from what it recorded."""
    if ctx.options.get("seed") is not None:
        try:
            return int(ctx.options["seed"]) + index
        except (TypeError, ValueError):
            raise CrewError(f"option seed={ctx.options['seed']!r} is not a whole number") from None
    digest = hashlib.sha256(f"{ctx.run_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _config(ctx: RunContext, speech: bool) -> CreativeConfig:
    cfg = ctx.config.creative
    if not cfg.comfyui_url:
        raise CrewError(
            "the creative crew renders through ComfyUI: set creative.comfyui_url "
            "(env TYPHON_CREATIVE__COMFYUI_URL), e.g. http://127.0.0.1:8188"
        )
    if speech and not cfg.tts_url:
        raise CrewError(
            "this request asks for speech: set creative.tts_url (env TYPHON_CREATIVE__TTS_URL), "
            "e.g. http://127.0.0.1:8880 for Kokoro, or run with speech=False"
        )
    return cfg


class _Reporter:
    """ComfyUI's progress as the run's steps: one when a node starts, and one each tenth of a
    node's steps, not one per sampler tick."""

    def __init__(self, ctx: RunContext, name: str):
        self.ctx = ctx
        self.name = name
        self.last: tuple[str | None, int] | None = None

    def __call__(self, p: Progress) -> None:
        if p.kind == "executing":
            self.ctx.step(self.name, node=p.node, node_type=p.node_type)
        elif p.kind == "progress" and p.value is not None and p.max:
            mark = (p.node, int(10 * p.value / p.max))
            if mark != self.last:
                self.last = mark
                self.ctx.step(
                    self.name, node=p.node, node_type=p.node_type, value=p.value, max=p.max
                )


class CreativeCrew(Crew):
    name = "creative"
    description = "Image generation, character art and voice: ComfyUI renders, TTS speaks."
    pool = "creative"
    category: ClassVar[Category | None] = "creative"

    def run(self, ctx: RunContext) -> CrewOutput:
        speech = _wants_speech(ctx)
        cfg = _config(ctx, speech)
        count = _image_count(ctx)
        template = load_template(_template_name(ctx), cfg.templates_dir)
        assert cfg.comfyui_url is not None
        client = ComfyUIClient(
            cfg.comfyui_url, timeout_s=cfg.timeout_s, poll_interval_s=cfg.poll_interval_s
        )
        with client:
            info = client.object_info()  # fails fast, naming the URL, when ComfyUI is down
            if info is not None:
                template.check_nodes(info, client.url)
            ctx.step("art direction", template=template.name, images=count, speech=speech)
            direction = self._direct(ctx, count, speech)
            rendered = self._render(ctx, client, template, direction, cfg)
        spoken = self._speak(ctx, cfg, direction.spoken_line) if direction.spoken_line else None
        return CrewOutput(_report(ctx.input, template, direction, rendered, spoken))

    def _direct(self, ctx: RunContext, count: int, speech: bool) -> Direction:
        text = _art_director(ctx, count, speech)
        direction = parse_direction(text, ctx.input, count=count, speech=speech)
        if not direction.from_model:
            ctx.log.info(
                "art director's answer unusable; prompts built from the request",
                answer=" ".join(text.split())[:300],
            )
        return direction

    def _render(
        self,
        ctx: RunContext,
        client: ComfyUIClient,
        template: Template,
        direction: Direction,
        cfg: CreativeConfig,
    ) -> list[tuple[str, int, int]]:
        """Each prompt through ComfyUI; (artifact name, prompt number, seed) per image."""
        rendered: list[tuple[str, int, int]] = []
        total = len(direction.prompts)
        for i, prompt in enumerate(direction.prompts):
            name = f"rendering image {i + 1}/{total}"
            seed = _seed(ctx, i)
            ctx.step(name, template=template.name, seed=seed)
            workflow = template.build(_values(ctx, template, prompt, direction, seed, cfg))
            images = client.render(
                workflow, on_progress=_Reporter(ctx, name), check=ctx.check_cancelled
            )
            for image in images:
                suffix = image.filename.rsplit(".", 1)[-1].lower() if "." in image.filename else ""
                artifact = f"image-{len(rendered) + 1}.{suffix if suffix.isalnum() else 'png'}"
                ctx.add_artifact(artifact, image.data)
                rendered.append((artifact, i + 1, seed))
        return rendered

    def _speak(self, ctx: RunContext, cfg: CreativeConfig, line: str) -> str:
        from typhon.crews._speech import synthesize

        assert cfg.tts_url is not None
        ctx.step("speech", voice=cfg.tts_voice, model=cfg.tts_model, format=cfg.tts_format)
        audio = synthesize(
            cfg.tts_url, line, model=cfg.tts_model, voice=cfg.tts_voice,
            response_format=cfg.tts_format, timeout_s=min(cfg.timeout_s, 300.0),
        )  # fmt: skip
        name = f"speech.{cfg.tts_format}"  # the response_format names the file type
        ctx.add_artifact(name, audio)
        return name


def _values(
    ctx: RunContext,
    template: Template,
    prompt: str,
    direction: Direction,
    seed: int,
    cfg: CreativeConfig,
) -> dict[str, Any]:
    """Parameters for one render. The crew's own (negative prompt, seed, checkpoint) go only to
    templates that have them; what the run's options ask for must fit the template."""
    values: dict[str, Any] = {"prompt": prompt}
    own = {"negative_prompt": direction.negative, "seed": seed, "checkpoint": cfg.checkpoint}
    values.update({k: v for k, v in own.items() if k in template.params and v is not None})
    for key in ("width", "height", "steps"):
        if ctx.options.get(key) is not None:
            values[key] = ctx.options[key]
    return values


def _art_director(ctx: RunContext, count: int, speech: bool) -> str:
    """One CrewAI agent and task through Typhon's model client; its raw answer."""
    from crewai import Agent, Crew, Process, Task

    from typhon.crews._crewai import TyphonLLM, prepare_crewai

    prepare_crewai(ctx.config.home)
    texts = {**PROMPTS["art_director"], **ctx.prompts.get("art_director", {})}
    llm = TyphonLLM.wrap(
        ctx.model, max_tokens=ctx.settings.max_tokens, temperature=ctx.settings.temperature
    )
    agent = Agent(
        role=texts["role"], goal=texts["goal"], backstory=texts["backstory"], llm=llm,
        max_iter=2, allow_delegation=False, tools=[], verbose=False,
    )  # fmt: skip
    task = Task(
        description=ctx.demo_text() + texts["task"],
        expected_output=texts["expected_output"],
        agent=agent,
    )
    crew = Crew(
        agents=[agent], tasks=[task], process=Process.sequential, verbose=False, memory=False
    )
    inputs = {
        "request": ctx.input,
        "count": str(count),
        "speech_format": texts["speech_format"] if speech else "",
        "speech_example": texts["speech_example"] if speech else "",
        "speech_expected": " and a SPOKEN LINE" if speech else "",
    }
    try:
        result = crew.kickoff(inputs=inputs)
    except Exception:
        ctx.check_cancelled()
        if llm.model_errors:
            raise llm.model_errors[-1] from None
        raise
    ctx.check_cancelled()
    text = str(getattr(result, "raw", "") or "")
    if llm.model_errors and not text.strip():
        raise llm.model_errors[-1]
    return text


def _report(
    request: str,
    template: Template,
    direction: Direction,
    rendered: list[tuple[str, int, int]],
    spoken: str | None,
) -> str:
    """The run's output: the prompts, the spoken line, the artifacts and the template."""
    source = "art director" if direction.from_model else "built from the request"
    about = f" ({template.description})" if template.description else ""
    lines = [
        f"# Creative: {request}",
        "",
        f"Template: `{template.name}`{about}",
        "",
        f"## Prompts ({source})",
        "",
    ]  # fmt: skip
    for i, prompt in enumerate(direction.prompts, start=1):
        lines.append(f"{i}. {prompt}")
    if direction.negative:
        lines += ["", f"Negative: {direction.negative}"]
    if direction.spoken_line:
        lines += ["", "## Spoken line", "", f"> {direction.spoken_line}"]
    lines += ["", "## Artifacts", ""]
    for name, number, seed in rendered:
        lines.append(f"- `{name}`: prompt {number}, seed {seed}")
    if spoken:
        lines.append(f"- `{spoken}`: the spoken line")
    return "\n".join(lines) + "\n"

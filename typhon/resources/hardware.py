"""Hardware discovery: this host's CPU, memory, disks and NVIDIA GPUs, and the cluster's nodes.

``local_summary()`` is the JSON object that ``GET /hardware/summary`` answers and that
``typhon hardware --json`` prints for this host::

    {"host": "gpu-a",
     "cpu": {"model": "AMD EPYC 9354", "cores": 32, "threads": 64, "affinity": "0-63"},
     "memory": {"total_bytes": ..., "available_bytes": ..., "total_gib": 251.5, ...},
     "disks": [{"device": "/dev/nvme0n1p2", "mount": "/", "total_bytes": ..., "used_bytes": ...,
                "free_bytes": ..., "percent": 41.2}],
     "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 5090", "uuid": "GPU-...",
               "vram_total_bytes": ..., "vram_used_bytes": ..., "vram_total_gib": 31.84,
               "vram_used_gib": 0.45, "temperature_c": 41, "utilization_percent": 0,
               "compute_capability": "12.0", "driver": "575.57.08"}],
     "gpu_note": null}

GPUs come from NVML (``nvidia-ml-py``); a host without a driver or GPU has ``"gpus": []`` and a
``gpu_note`` that says why, never an error. A value one GPU cannot report (temperature on some
boards, utilisation under MIG) is ``null``.

``cluster_summary(config)`` adds every configured node: its summary when ``{url}/hardware/summary``
answers, ``reachable: false`` and a one-line error when not. Nodes are asked concurrently, so dead
nodes cost one timeout together.

This module needs only the standard library at import (``pynvml`` and ``httpx`` load on use), so
``scripts/gpu-check`` can run it on a bare GPU machine.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import shutil
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from typhon.resources._cpuset import format_cpuset

if TYPE_CHECKING:
    import httpx

    from typhon.config import NodeConfig, TyphonConfig

__all__ = [
    "CpuInfo",
    "DiskInfo",
    "GpuInfo",
    "HostSummary",
    "MemoryInfo",
    "cluster_summary",
    "cpu_info",
    "disks",
    "gpus",
    "host_summary",
    "local_summary",
    "memory_info",
    "render_text",
]

GIB = 1024**3
SUMMARY_PATH = "/hardware/summary"

# Filesystems that hold no user data: kernel interfaces, RAM-backed, container plumbing.
# fmt: off
_PSEUDO_FS = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
    "devtmpfs", "efivarfs", "fuse.gvfsd-fuse", "fuse.lxcfs", "fuse.portal", "fuse.snapfuse",
    "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay", "proc", "pstore", "ramfs", "rpc_pipefs",
    "securityfs", "selinuxfs", "squashfs", "sysfs", "tmpfs", "tracefs",
})
# fmt: on

_T = TypeVar("_T")


def _gib(n: int) -> float:
    return round(n / GIB, 2)


# -- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str | None
    uuid: str | None
    vram_total_bytes: int | None
    vram_used_bytes: int | None
    temperature_c: int | None
    utilization_percent: int | None
    compute_capability: str | None
    driver: str | None

    def to_json(self) -> dict[str, Any]:
        total, used = self.vram_total_bytes, self.vram_used_bytes
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "vram_total_bytes": total,
            "vram_used_bytes": used,
            "vram_total_gib": None if total is None else _gib(total),
            "vram_used_gib": None if used is None else _gib(used),
            "temperature_c": self.temperature_c,
            "utilization_percent": self.utilization_percent,
            "compute_capability": self.compute_capability,
            "driver": self.driver,
        }


@dataclass(frozen=True)
class DiskInfo:
    device: str
    mount: str
    total_bytes: int
    used_bytes: int
    free_bytes: int

    @property
    def percent(self) -> float:
        """Used share of the space a user can have, as ``df`` and psutil count it."""
        usable = self.used_bytes + self.free_bytes
        return round(100 * self.used_bytes / usable, 1) if usable else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "mount": self.mount,
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "percent": self.percent,
        }


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    threads: int
    affinity: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "cores": self.cores,
            "threads": self.threads,
            "affinity": self.affinity,
        }


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "total_gib": _gib(self.total_bytes),
            "available_gib": _gib(self.available_bytes),
        }


@dataclass(frozen=True)
class HostSummary:
    host: str
    cpu: CpuInfo
    memory: MemoryInfo
    disks: tuple[DiskInfo, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    gpu_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "cpu": self.cpu.to_json(),
            "memory": self.memory.to_json(),
            "disks": [d.to_json() for d in self.disks],
            "gpus": [g.to_json() for g in self.gpus],
            "gpu_note": self.gpu_note,
        }


# -- CPU, memory, disks -----------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _parse_cpuinfo(text: str) -> tuple[str | None, int]:
    """The CPU model and the number of physical cores (0 when the file does not say)."""
    model: str | None = None
    cores: set[tuple[str, str]] = set()
    physical = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not key:  # a blank line ends one logical CPU's block
            if physical is not None and core is not None:
                cores.add((physical, core))
            physical = core = None
    return model, len(cores)


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """CPU model, physical cores, logical CPUs, and the CPUs this process may run on."""
    model, cores = _parse_cpuinfo(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
    threads = os.cpu_count() or 1
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        allowed = set(range(threads))
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown",
        cores=cores or threads,
        threads=threads,
        affinity=format_cpuset(allowed),
    )


def _parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` values in bytes (the file writes kB, meaning KiB)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            unit = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[key.strip()] = int(parts[0]) * unit
    return out


def memory_info(meminfo: str | None = None) -> MemoryInfo:
    values = _parse_meminfo(_read("/proc/meminfo") if meminfo is None else meminfo)
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return MemoryInfo(total_bytes=total, available_bytes=available)


def _unescape(field_: str) -> str:
    r"""``/proc/mounts`` writes space, tab, newline and backslash as ``\040`` and so on."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_ = field_.replace(code, char)
    return field_


def _parse_mounts(text: str) -> list[tuple[str, str]]:
    """``(device, mount)`` of the mounts that hold data: one per device, at its shortest path."""
    best: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        device, mount, fstype = _unescape(parts[0]), _unescape(parts[1]), parts[2]
        if fstype in _PSEUDO_FS and not (fstype == "overlay" and mount == "/"):
            continue
        known = best.get(device)
        if known is None or (len(mount), mount) < (len(known), known):
            best[device] = mount
    return sorted(((d, m) for d, m in best.items()), key=lambda dm: (dm[1] != "/", dm[1]))


def disks(mounts: str | None = None) -> list[DiskInfo]:
    """Mounted filesystems that hold data, one per device, root first."""
    out: list[DiskInfo] = []
    for device, mount in _parse_mounts(_read("/proc/mounts") if mounts is None else mounts):
        if not os.path.isdir(mount):  # a bind-mounted file such as /etc/hosts
            continue
        try:
            usage = shutil.disk_usage(mount)
        except OSError:
            continue
        if usage.total == 0:
            continue
        out.append(DiskInfo(device, mount, usage.total, usage.used, usage.free))
    return out


# -- GPUs -------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _gpu(nvml: Any, index: int, driver: str | None) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def ask(query: Callable[[], _T]) -> _T | None:
        try:
            return query()
        except nvml.NVMLError:
            return None

    memory = ask(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    capability = ask(lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    name = ask(lambda: nvml.nvmlDeviceGetName(handle))
    uuid = ask(lambda: nvml.nvmlDeviceGetUUID(handle))
    return GpuInfo(
        index=index,
        name=None if name is None else _text(name),
        uuid=None if uuid is None else _text(uuid),
        vram_total_bytes=None if memory is None else int(memory.total),
        vram_used_bytes=None if memory is None else int(memory.used),
        temperature_c=ask(
            lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        ),
        utilization_percent=ask(lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
        compute_capability=None if capability is None else f"{capability[0]}.{capability[1]}",
        driver=driver,
    )


def _no_gpu(reason: object) -> str:
    return f"no NVIDIA driver/GPU found ({reason}); GPU list is empty"


def gpus() -> tuple[list[GpuInfo], str | None]:
    """The NVIDIA GPUs NVML sees, and a note when there are none (or some could not be read)."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError as exc:
        return [], _no_gpu(f"nvidia-ml-py is not installed: {exc}")
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:
        return [], _no_gpu(f"NVML: {_text(exc) or type(exc).__name__}")
    try:
        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = None
        found: list[GpuInfo] = []
        problems: list[str] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                found.append(_gpu(nvml, index, driver))
            except nvml.NVMLError as exc:  # the handle itself: GPU lost or inaccessible
                problems.append(f"GPU {index} could not be read: {_text(exc)}")
    except nvml.NVMLError as exc:
        return [], _no_gpu(f"NVML: {_text(exc)}")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    if not found and not problems:
        problems.append(f"NVIDIA driver {driver or '(version unknown)'} reports no GPU")
    return found, "; ".join(problems) or None


# -- summaries --------------------------------------------------------------------------------


def host_summary() -> HostSummary:
    found, note = gpus()
    return HostSummary(
        host=socket.gethostname(),
        cpu=cpu_info(),
        memory=memory_info(),
        disks=tuple(disks()),
        gpus=tuple(found),
        gpu_note=note,
    )


def local_summary() -> dict[str, Any]:
    """This host's summary as JSON: what ``GET /hardware/summary`` answers."""
    return host_summary().to_json()


@dataclass(frozen=True)
class _NodeResult:
    reachable: bool | None
    error: str | None = None
    summary: dict[str, Any] | None = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _fetch(client: httpx.Client, base: str, token: str | None = None) -> _NodeResult:
    url = base.rstrip("/") + SUMMARY_PATH
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = client.get(url, headers=headers)
        response.raise_for_status()
        data = response.json()
    except Exception as exc:  # any failure means "not reachable", never a crash
        return _NodeResult(False, f"{url}: {_one_line(exc)}")
    if isinstance(data, dict) and isinstance(data.get("local"), dict):
        data = data["local"]  # a node that answers with its own cluster summary
    if not isinstance(data, dict) or "host" not in data:
        return _NodeResult(False, f"{url}: answered, but not with a hardware summary")
    return _NodeResult(True, None, data)


def _node_json(node: NodeConfig, result: _NodeResult) -> dict[str, Any]:
    return {
        "name": node.name,
        "url": node.url,
        "reachable": result.reachable,
        "error": result.error,
        "summary": result.summary,
        "gpus_configured": [gpu.model_dump() for gpu in node.gpus],
    }


def cluster_summary(
    config: TyphonConfig,
    *,
    timeout: float = 3.0,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """This host's summary and every configured node's, asked concurrently."""
    import httpx

    nodes: Iterable[NodeConfig] = config.nodes
    asked = [node for node in nodes if node.url]
    results: dict[str, _NodeResult] = {}
    if asked:
        http = httpx.Client(timeout=timeout, transport=transport)
        with http as client, ThreadPoolExecutor(max_workers=min(16, len(asked))) as pool:
            futures = {n.name: pool.submit(_fetch, client, str(n.url), n.token) for n in asked}
            results = {name: future.result() for name, future in futures.items()}
    no_url = _NodeResult(None, "no url configured")
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "local": local_summary(),
        "nodes": [_node_json(n, results.get(n.name, no_url)) for n in config.nodes],
    }


# -- text -------------------------------------------------------------------------------------


def _gib_of(n: Any) -> float | None:
    return n / GIB if isinstance(n, (int, float)) else None


def _num(value: Any, fmt: str = "{}", missing: str = "?") -> str:
    return missing if value is None else fmt.format(value)


def _host_lines(s: dict[str, Any], indent: str = "") -> list[str]:
    cpu, mem = s.get("cpu") or {}, s.get("memory") or {}
    lines = [
        f"{indent}host    {s.get('host', '?')}",
        f"{indent}cpu     {cpu.get('model', '?')}: {_num(cpu.get('cores'))} cores,"
        f" {_num(cpu.get('threads'))} threads, affinity {cpu.get('affinity', '?')}",
        f"{indent}memory  {_num(mem.get('total_gib'), '{:.1f}')} GiB total,"
        f" {_num(mem.get('available_gib'), '{:.1f}')} GiB available",
    ]
    for d in s.get("disks") or []:
        lines.append(
            f"{indent}disk    {d.get('mount')} ({d.get('device')}):"
            f" {_num(_gib_of(d.get('total_bytes')), '{:.1f}')} GiB,"
            f" {_num(d.get('percent'), '{:.0f}')}% used"
        )
    for g in s.get("gpus") or []:
        lines.append(
            f"{indent}gpu {g.get('index')}   {g.get('name') or '?'}:"
            f" {_num(g.get('vram_used_gib'), '{:.1f}')}/{_num(g.get('vram_total_gib'), '{:.1f}')}"
            f" GiB, {_num(g.get('temperature_c'), '{} °C')},"
            f" {_num(g.get('utilization_percent'), '{}% busy')},"
            f" cc {g.get('compute_capability') or '?'}, driver {g.get('driver') or '?'}"
        )
    if s.get("gpu_note"):
        lines.append(f"{indent}gpus    none: {s['gpu_note']}")
    return lines


def _node_lines(node: dict[str, Any]) -> list[str]:
    reachable = node.get("reachable")
    state = "reachable" if reachable else "unreachable" if reachable is False else "not asked"
    lines = [f"node {node.get('name')} ({node.get('url') or 'no url configured'}): {state}"]
    if reachable is False:
        lines.append(f"  error   {node.get('error')}")
    if node.get("summary"):
        lines.extend(_host_lines(node["summary"], "  "))
    else:
        for gpu in node.get("gpus_configured") or []:
            cc = f", cc {gpu['compute_capability']}" if gpu.get("compute_capability") else ""
            lines.append(f"  gpu     {gpu.get('name')}: {gpu.get('vram_gb')} GB (configured{cc})")
    return lines


def render_text(summary: dict[str, Any]) -> str:
    """A compact human view of a host summary or of a cluster summary."""
    if "local" not in summary:
        return "\n".join(_host_lines(summary))
    lines = _host_lines(summary["local"])
    for node in summary.get("nodes") or []:
        lines.append("")
        lines.extend(_node_lines(node))
    return "\n".join(lines)

"""typhon.resources.hardware: this host's real summary, NVML through a fake pynvml, remote nodes
over real HTTP on 127.0.0.1."""

from __future__ import annotations

import ctypes.util
import json
import os
import socket
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from typhon.config import TyphonConfig
from typhon.resources import parse_cpuset
from typhon.resources.hardware import (
    GIB,
    _parse_cpuinfo,
    _parse_meminfo,
    _parse_mounts,
    cluster_summary,
    cpu_info,
    gpus,
    local_summary,
    memory_info,
    render_text,
)

MIB = 1024**2

# -- this machine ---------------------------------------------------------------------------------


def _nvml_library_present() -> bool:
    if ctypes.util.find_library("nvidia-ml"):
        return True
    return any(Path(d, "libnvidia-ml.so.1").exists() for d in ("/usr/lib64", "/usr/lib"))


def test_local_summary_describes_this_machine() -> None:
    summary = local_summary()
    json.loads(json.dumps(summary))  # plain JSON all the way down
    assert set(summary) == {"host", "cpu", "memory", "disks", "gpus", "gpu_note"}
    assert summary["host"] == socket.gethostname()

    cpu = summary["cpu"]
    assert cpu["threads"] == os.cpu_count()
    assert 1 <= cpu["cores"] <= cpu["threads"]
    assert cpu["model"]
    assert parse_cpuset(cpu["affinity"]) == frozenset(os.sched_getaffinity(0))

    mem = summary["memory"]
    assert mem["total_bytes"] > 0
    assert 0 < mem["available_bytes"] <= mem["total_bytes"]
    assert mem["total_gib"] == round(mem["total_bytes"] / GIB, 2)

    mounts = [d["mount"] for d in summary["disks"]]
    assert "/" in mounts
    assert len({d["device"] for d in summary["disks"]}) == len(summary["disks"])
    root = next(d for d in summary["disks"] if d["mount"] == "/")
    assert root["total_bytes"] > 0
    assert root["used_bytes"] + root["free_bytes"] <= root["total_bytes"]
    assert 0 <= root["percent"] <= 100

    if _nvml_library_present():
        assert summary["gpus"] or summary["gpu_note"]
    else:  # this machine: no driver, so no GPU, and a note rather than an error
        assert summary["gpus"] == []
        assert "no NVIDIA driver/GPU found" in summary["gpu_note"]


# -- parsing /proc -------------------------------------------------------------------------------

CPUINFO_2_SOCKETS_HT = "".join(
    f"processor\t: {n}\nmodel name\t: AMD EPYC 9354 32-Core Processor\n"
    f"physical id\t: {phys}\ncore id\t\t: {core}\n\n"
    for n, (phys, core) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0)])
)


def test_physical_cores_are_unique_socket_core_pairs() -> None:
    assert _parse_cpuinfo(CPUINFO_2_SOCKETS_HT) == ("AMD EPYC 9354 32-Core Processor", 4)
    info = cpu_info(CPUINFO_2_SOCKETS_HT)
    assert info.cores == 4
    assert info.threads == os.cpu_count()


def test_cpuinfo_without_topology_falls_back_to_cpu_count() -> None:
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n"
    info = cpu_info(arm)
    assert info.cores == os.cpu_count()
    assert info.model  # platform's answer rather than nothing


def test_meminfo_kib_become_bytes() -> None:
    text = "MemTotal:  16384 kB\nMemFree:  1024 kB\nMemAvailable:  8192 kB\nHugePages_Total: 0\n"
    assert _parse_meminfo(text)["MemTotal"] == 16384 * 1024
    assert _parse_meminfo(text)["HugePages_Total"] == 0
    mem = memory_info(text)
    assert (mem.total_bytes, mem.available_bytes) == (16 * MIB, 8 * MIB)
    assert mem.to_json()["available_gib"] == round(8 * MIB / GIB, 2)


def test_mounts_keep_real_filesystems_once_each() -> None:
    text = "\n".join(
        [
            "proc /proc proc rw 0 0",
            "sysfs /sys sysfs rw 0 0",
            "overlay / overlay rw,lowerdir=/a 0 0",
            "tmpfs /dev/shm tmpfs rw 0 0",
            "/dev/nvme0n1p2 /etc/hosts ext4 rw 0 0",
            "/dev/nvme0n1p2 /data ext4 rw 0 0",
            "/dev/nvme0n1p2 /etc/hostname ext4 rw 0 0",
            "/dev/sdb1 /mnt/big\\040disk xfs rw 0 0",
            "overlay /var/lib/docker/overlay2/x/merged overlay rw 0 0",
            "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0",
            "nas:/export /mnt/nas nfs4 rw 0 0",
        ]
    )
    assert _parse_mounts(text) == [
        ("overlay", "/"),
        ("/dev/nvme0n1p2", "/data"),
        ("/dev/sdb1", "/mnt/big disk"),
        ("nas:/export", "/mnt/nas"),
    ]


# -- NVML through a fake pynvml -------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class _Memory:
    def __init__(self, total: int, used: int):
        self.total, self.used, self.free = total, used, total - used


class _Util:
    def __init__(self, gpu: int):
        self.gpu, self.memory = gpu, 0


def fake_nvml(
    boards: list[dict[str, Any]], *, init_error: str | None = None, count_error: bool = False
) -> types.ModuleType:
    """A pynvml with ``boards``; a board's ``fail`` names queries that raise NVMLError."""
    nvml = types.ModuleType("pynvml")
    calls: dict[str, int] = {"init": 0, "shutdown": 0}

    def board(handle: int, query: str) -> dict[str, Any]:
        if query in boards[handle].get("fail", ()):
            raise FakeNVMLError("Not Supported")
        return boards[handle]

    def init() -> None:
        if init_error:
            raise FakeNVMLError(init_error)
        calls["init"] += 1

    def shutdown() -> None:
        calls["shutdown"] += 1

    def count() -> int:
        if count_error:
            raise FakeNVMLError("GPU is lost")
        return len(boards)

    def temperature(h: int, sensor: int) -> int:
        assert sensor == 0
        return int(board(h, "temperature")["temp"])

    attrs: dict[str, Any] = {
        "NVMLError": FakeNVMLError,
        "NVML_TEMPERATURE_GPU": 0,
        "calls": calls,
        "nvmlInit": init,
        "nvmlShutdown": shutdown,
        "nvmlSystemGetDriverVersion": lambda: "575.57.08",
        "nvmlDeviceGetCount": count,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: board(h, "name")["name"],
        "nvmlDeviceGetUUID": lambda h: board(h, "uuid")["uuid"],
        "nvmlDeviceGetMemoryInfo": lambda h: _Memory(*board(h, "memory")["mem"]),
        "nvmlDeviceGetTemperature": temperature,
        "nvmlDeviceGetUtilizationRates": lambda h: _Util(board(h, "utilization")["util"]),
        "nvmlDeviceGetCudaComputeCapability": lambda h: board(h, "capability")["cc"],
    }
    for name, value in attrs.items():
        setattr(nvml, name, value)
    return nvml


BOARDS: list[dict[str, Any]] = [
    {
        "name": b"NVIDIA GeForce RTX 5090",  # older bindings answer bytes
        "uuid": "GPU-5090",
        "mem": (32607 * MIB, 1024 * MIB),
        "temp": 41,
        "util": 7,
        "cc": (12, 0),
    },
    {
        "name": "NVIDIA GeForce RTX 4090",
        "uuid": "GPU-4090",
        "mem": (24564 * MIB, 0),
        "temp": 38,
        "util": 0,
        "cc": (8, 9),
    },
]


def test_two_gpus_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(BOARDS)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    found, note = gpus()
    assert note is None
    assert [g.to_json() for g in found] == [
        {
            "index": 0,
            "name": "NVIDIA GeForce RTX 5090",
            "uuid": "GPU-5090",
            "vram_total_bytes": 32607 * MIB,
            "vram_used_bytes": 1024 * MIB,
            "vram_total_gib": 31.84,
            "vram_used_gib": 1.0,
            "temperature_c": 41,
            "utilization_percent": 7,
            "compute_capability": "12.0",
            "driver": "575.57.08",
        },
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 4090",
            "uuid": "GPU-4090",
            "vram_total_bytes": 24564 * MIB,
            "vram_used_bytes": 0,
            "vram_total_gib": 23.99,
            "vram_used_gib": 0.0,
            "temperature_c": 38,
            "utilization_percent": 0,
            "compute_capability": "8.9",
            "driver": "575.57.08",
        },
    ]
    assert nvml.calls == {"init": 1, "shutdown": 1}

    summary = local_summary()
    assert [g["name"] for g in summary["gpus"]] == [
        "NVIDIA GeForce RTX 5090",
        "NVIDIA GeForce RTX 4090",
    ]
    assert summary["gpu_note"] is None
    text = render_text(summary)
    assert "NVIDIA GeForce RTX 5090" in text
    assert "cc 12.0" in text


def test_nvml_init_failure_is_an_empty_list_and_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(BOARDS, init_error="Driver Not Loaded")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    found, note = gpus()
    assert found == []
    assert note is not None
    assert "no NVIDIA driver/GPU found" in note
    assert "Driver Not Loaded" in note
    assert nvml.calls["shutdown"] == 0  # nothing to shut down


def test_missing_bindings_are_an_empty_list_and_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    found, note = gpus()
    assert found == []
    assert note is not None
    assert "nvidia-ml-py" in note


def test_a_failure_after_init_still_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(BOARDS, count_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    found, note = gpus()
    assert found == []
    assert note is not None
    assert "GPU is lost" in note
    assert nvml.calls == {"init": 1, "shutdown": 1}


def test_driver_without_gpus_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([]))
    found, note = gpus()
    assert found == []
    assert note is not None
    assert "575.57.08" in note


def test_an_unsupported_query_is_null_and_the_gpu_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    boards = [BOARDS[0], {**BOARDS[1], "fail": ("temperature", "utilization")}]
    nvml = fake_nvml(boards)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    found, note = gpus()
    assert note is None
    assert [g.name for g in found] == ["NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 4090"]
    assert found[0].temperature_c == 41
    assert (found[1].temperature_c, found[1].utilization_percent) == (None, None)
    assert found[1].vram_total_bytes == 24564 * MIB
    assert found[1].compute_capability == "8.9"
    assert nvml.calls["shutdown"] == 1


# -- remote nodes ---------------------------------------------------------------------------------

REMOTE = {
    "host": "gpu-a",
    "cpu": {"model": "AMD Ryzen 9 7950X", "cores": 16, "threads": 32, "affinity": "0-31"},
    "memory": {"total_bytes": 64 * GIB, "available_bytes": 60 * GIB},
    "disks": [],
    "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 5090", "vram_total_gib": 31.84}],
    "gpu_note": None,
}


@pytest.fixture
def summary_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering ``/hardware/summary`` with REMOTE."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/hardware/summary":
                self.send_error(404)
                return
            body = json.dumps(REMOTE).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_cluster_merges_reachable_unreachable_and_unasked_nodes(summary_server: str) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    config = TyphonConfig(
        nodes=[
            {"name": "gpu-a", "url": summary_server + "/"},
            {"name": "dead", "url": dead},
            {"name": "wrong-path", "url": summary_server + "/nope"},
            {
                "name": "cpu-big",
                "gpus": [{"name": "RTX 4090", "vram_gb": 24, "compute_capability": "8.9"}],
            },
        ]
    )
    summary = cluster_summary(config, timeout=5)
    json.loads(json.dumps(summary))
    assert summary["generated_at"]
    assert summary["local"]["host"] == socket.gethostname()
    nodes = {n["name"]: n for n in summary["nodes"]}
    assert list(nodes) == ["gpu-a", "dead", "wrong-path", "cpu-big"]

    assert nodes["gpu-a"]["reachable"] is True
    assert nodes["gpu-a"]["error"] is None
    assert nodes["gpu-a"]["summary"] == REMOTE

    assert nodes["dead"]["reachable"] is False
    assert nodes["dead"]["summary"] is None
    assert f"{dead}/hardware/summary" in nodes["dead"]["error"]
    assert "\n" not in nodes["dead"]["error"]

    assert nodes["wrong-path"]["reachable"] is False
    assert f"{summary_server}/nope/hardware/summary" in nodes["wrong-path"]["error"]
    assert "404" in nodes["wrong-path"]["error"]

    assert nodes["cpu-big"]["reachable"] is None
    assert nodes["cpu-big"]["error"] == "no url configured"
    assert nodes["cpu-big"]["gpus_configured"] == [
        {"name": "RTX 4090", "vram_gb": 24.0, "compute_capability": "8.9"}
    ]

    text = render_text(summary)
    assert "gpu-a" in text
    assert "NVIDIA GeForce RTX 5090" in text
    assert "unreachable" in text
    assert "RTX 4090" in text


def test_an_answer_that_is_not_a_summary_is_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=["not", "a", "summary"])

    config = TyphonConfig(nodes=[{"name": "odd", "url": "http://127.0.0.1:1"}])
    node = cluster_summary(config, transport=httpx.MockTransport(handler))["nodes"][0]
    assert node["reachable"] is False
    assert "http://127.0.0.1:1/hardware/summary" in node["error"]


def test_nodes_are_asked_concurrently() -> None:
    """Both requests must be in flight together to pass the barrier; asked one after the other,
    the first would wait at the barrier until it breaks and its node would be unreachable."""
    barrier = threading.Barrier(2, timeout=10)

    def handler(request: httpx.Request) -> httpx.Response:
        barrier.wait()
        return httpx.Response(200, json={**REMOTE, "host": request.url.host})

    config = TyphonConfig(
        nodes=[
            {"name": "a", "url": "http://127.0.0.2:8700"},
            {"name": "b", "url": "http://127.0.0.3:8700"},
        ]
    )
    nodes = cluster_summary(config, transport=httpx.MockTransport(handler))["nodes"]
    assert [(n["reachable"], n["summary"]["host"]) for n in nodes] == [
        (True, "127.0.0.2"),
        (True, "127.0.0.3"),
    ]


def test_a_node_s_token_is_sent_and_its_absence_is_an_unreachable_node() -> None:
    """A node's `typhon serve` answers /hardware/summary only with a read token."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != "Bearer typhon_abc_secret":
            return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "no"}})
        return httpx.Response(200, json={**REMOTE, "host": "gpu-a"})

    config = TyphonConfig(
        nodes=[
            {"name": "with", "url": "http://127.0.0.2:8700", "token": "typhon_abc_secret"},
            {"name": "without", "url": "http://127.0.0.3:8700"},
        ]
    )
    nodes = cluster_summary(config, transport=httpx.MockTransport(handler))["nodes"]
    assert [n["reachable"] for n in nodes] == [True, False]
    assert "401" in nodes[1]["error"]

"""The sandbox's launcher: isolates itself, then executes the command.

Run as ``python -I -S _jail.py SPEC_JSON -- ARGV...`` by :mod:`typhon.graphs._sandbox`; it needs
only the standard library, so it starts in a few tens of milliseconds and never imports Typhon.

In order, before ``execvp``:

1. new namespaces: network (the process sees only a loopback that is down, so no socket reaches
   anything) and mount; as an unprivileged user, inside a new user namespace that maps only the
   caller's own uid and gid;
2. the work directory is bind-mounted at an empty directory under /tmp (reachable by ``nobody``
   wherever the real one lives), then every other mount except ``/proc``, ``/sys`` and ``/dev``
   is remounted read-only, so the bind mount is the only writable place;
3. no capability survives the execve (as root, the bounding set is emptied; as a user, a non-root
   uid in the user namespace has none after execve), and no-new-privileges is set, so nothing in
   the sandbox can undo the mounts or gain privileges through a setuid program;
4. resource limits: CPU seconds, address space, file size, open files, processes, no core dumps.

Any failure is printed as one line on stderr and ends with exit status 125, before the command
runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
KEEP_WRITABLE = ("/proc", "/sys", "/dev")

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(message: str) -> None:
    sys.stderr.write(f"sandbox: {message}\n")
    sys.stderr.flush()
    os._exit(125)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        _fail(f"{what} failed: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> int:
    return int(
        _libc.mount(
            source.encode() if source else None, target.encode(), None, ctypes.c_ulong(flags), None
        )
    )


def _mounts() -> list[tuple[str, str]]:
    """(mount point, options) of this namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")
            out.append((point, parts[5]))
    return out


def _isolate(workdir: str, target: str) -> None:
    uid, gid = os.getuid(), os.getgid()
    root = uid == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        how = (
            "as root"
            if root
            else "without root (unprivileged user namespaces may be disabled:"
            " sysctl kernel.unprivileged_userns_clone=1, or run the worker as root)"
        )
        _fail(f"cannot create network and mount namespaces {how}: {os.strerror(err)}")
    if not root:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    _check(_mount(None, "/", MS_REC | MS_PRIVATE), "making mounts private")
    _check(_mount(workdir, target, MS_BIND | MS_REC), "binding the work directory")
    for point, options in reversed(_mounts()):
        if point == target or point.startswith(target + "/"):
            continue
        if any(point == keep or point.startswith(keep + "/") for keep in KEEP_WRITABLE):
            continue
        if "ro" in options.split(","):
            continue
        # keep the flags a user namespace may not clear (nosuid, nodev) as they are
        keep = (MS_NOSUID if "nosuid" in options else 0) | (MS_NODEV if "nodev" in options else 0)
        rc = _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        if rc != 0 and point == "/":
            _check(rc, "making / read-only")
    for cap in range(64):  # EINVAL past the last capability this kernel knows
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no-new-privileges")


def _limits(spec: dict[str, int]) -> None:
    memory = spec["memory_bytes"]
    cpu = spec["cpu_s"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_bytes"], spec["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = spec["processes"]
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        _fail("usage: _jail.py SPEC_JSON -- ARGV...")
    spec = json.loads(sys.argv[1])
    argv = sys.argv[3:]
    target = os.path.realpath(spec["mountpoint"])
    _isolate(os.path.realpath(spec["workdir"]), target)
    os.chdir(target)
    _limits(spec)
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        _fail(f"cannot run {argv[0]}: {exc.strerror}")


if __name__ == "__main__":
    main()

"""CPU set strings as Linux and Docker write them: ``"0-7,12,20-27"``."""

from __future__ import annotations


def parse_cpuset(text: str) -> frozenset[int]:
    """Parse ``"28-35,44"`` into ``{28, ..., 35, 44}``; raise ValueError on anything else."""
    cpus: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise ValueError(f"empty element in cpuset '{text}'")
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ValueError(f"'{part}' in cpuset '{text}' is not a CPU number or range") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"'{part}' in cpuset '{text}' is not a valid range")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def format_cpuset(cpus: frozenset[int] | set[int]) -> str:
    """The shortest ``"a-b,c"`` form of a set of CPUs."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)

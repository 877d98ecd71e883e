"""Start-up cost: ``import typhon`` and ``typhon --help``, net of the bare interpreter start.

Each case runs in a fresh subprocess, timed with ``time.perf_counter()`` around it; the cases take
turns (baseline, import, --help, baseline, ...) for ``--runs`` rounds after one discarded warm-up
round (which also leaves the ``.pyc`` files written). Net = the case's statistic minus the same
statistic of the baseline ``python -c pass`` measured in the same rounds. Then
``python -X importtime`` lists the modules that cost most under ``import typhon``, under
``import typhon.cli`` (the module behind the console script) and in the whole ``--help`` command
(which imports more while it renders the help).

Usage::

    .venv/bin/python benchmarks/import_cost.py [--runs 10]

Targets (net median): ``import typhon`` <= 0.3 s, ``typhon --help`` <= 0.8 s. Exit status 0
whatever the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
BIN = VENV_BIN if (VENV_BIN / "python").exists() else Path(sys.executable).parent
PYTHON = str(BIN / "python")
TYPHON = str(BIN / "typhon")

TARGETS_S = {"import typhon": 0.3, "typhon --help": 0.8}


def clean_env() -> dict[str, str]:
    """This environment without TYPHON_* settings or anything that changes how Python starts."""
    drop = ("PYTHONPROFILEIMPORTTIME", "PYTHONDONTWRITEBYTECODE", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if not k.startswith("TYPHON_") and k not in drop}


def time_once(argv: list[str], env: dict[str, str], cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - t0


def measure(cases: dict[str, list[str]], runs: int, cwd: str) -> dict[str, list[float]]:
    env = clean_env()
    for argv in cases.values():  # warm-up: page cache, .pyc files
        time_once(argv, env, cwd)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, argv in cases.items():
            times[name].append(time_once(argv, env, cwd))
    return times


def report_times(times: dict[str, list[float]]) -> None:
    base = times["baseline"]
    base_min, base_med = min(base), statistics.median(base)
    header = f"{'[s]':<34}{'min':>8}{'median':>8}{'net min':>9}{'net med':>9}{'target':>8}  verdict"
    print(header)
    print("-" * len(header))
    for name, values in times.items():
        lo, med = min(values), statistics.median(values)
        label = name if name != "baseline" else "baseline: python -c pass"
        if name == "baseline":
            print(f"{label:<34}{lo:>8.3f}{med:>8.3f}")
            continue
        target = TARGETS_S[name]
        net_med = med - base_med
        verdict = "PASS" if net_med <= target else "MISS"
        print(
            f"{label:<34}{lo:>8.3f}{med:>8.3f}{lo - base_min:>9.3f}{net_med:>9.3f}"
            f"{target:>8.1f}  {verdict}"
        )
    print("(net = the statistic minus the baseline's; the verdict compares net median with target)")


@dataclass
class ImportLine:
    name: str
    depth: int
    self_us: int
    cumulative_us: int


def parse_importtime(stderr: str) -> list[ImportLine]:
    lines = []
    for raw in stderr.splitlines():
        if not raw.startswith("import time:"):
            continue
        parts = raw[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        field = parts[2].rstrip()
        depth = (len(field) - len(field.lstrip()) - 1) // 2
        lines.append(ImportLine(field.strip(), depth, int(parts[0]), int(parts[1])))
    return lines


def subtree(lines: list[ImportLine], module: str) -> list[ImportLine]:
    """The top-level import of ``module`` and everything it pulled in (printed before it)."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].depth == 0 and lines[i].name == module:
            j = i
            while j > 0 and lines[j - 1].depth > 0:
                j -= 1
            return lines[j : i + 1]
    return []


def after(lines: list[ImportLine], module: str) -> list[ImportLine]:
    """Everything imported from the top-level import of ``module`` on (a whole command's cost)."""
    tree = subtree(lines, module)
    return lines[lines.index(tree[0]) :] if tree else []


def importtime(code: str, module: str, whole: bool, cwd: str, rounds: int = 3) -> list[ImportLine]:
    """-X importtime for ``code``: the modules under ``module`` (or from it on, when ``whole``),
    each with its median over ``rounds`` runs."""
    samples: dict[str, list[ImportLine]] = {}
    for _ in range(rounds):
        proc = subprocess.run(
            [PYTHON, "-X", "importtime", "-c", code],
            env=clean_env(),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
        )
        lines = parse_importtime(proc.stderr)
        for line in after(lines, module) if whole else subtree(lines, module):
            samples.setdefault(line.name, []).append(line)
    return [
        ImportLine(
            name,
            seen[0].depth,
            int(statistics.median(s.self_us for s in seen)),
            int(statistics.median(s.cumulative_us for s in seen)),
        )
        for name, seen in samples.items()
    ]


HELP_CODE = "import sys; sys.argv = ['typhon', '--help']; from typhon.cli import main; main()"


def report_imports(title: str, code: str, module: str, whole: bool, cwd: str, top: int) -> None:
    lines = importtime(code, module, whole, cwd)
    roots = [x for x in lines if x.depth == 0]
    if not roots:
        print(f"\n-X importtime: no top-level line for {module}")
        return
    total = sum(x.cumulative_us for x in roots)
    print(
        f"\n{title}: {total / 1000:.1f} ms of imports, {len(lines)} modules"
        " (-X importtime, median of 3 runs)"
    )
    others = lines if whole else [x for x in lines if x not in roots]
    for rank, key in (("cumulative", "cumulative_us"), ("self", "self_us")):
        print(f"  top {top} by {rank} [ms]")
        for x in sorted(others, key=lambda x: getattr(x, key), reverse=True)[:top]:
            indent = "  " * (x.depth if whole else x.depth - 1)
            cum, own = x.cumulative_us / 1000, x.self_us / 1000
            print(f"    {cum:8.1f} cum {own:7.1f} self   {indent}{x.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time `import typhon` and `typhon --help`.")
    p.add_argument("--runs", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--top", type=int, default=5, help="modules listed per ranking (default 5)")
    args = p.parse_args(argv)
    cases = {
        "baseline": [PYTHON, "-c", "pass"],
        "import typhon": [PYTHON, "-c", "import typhon"],
        "typhon --help": [TYPHON, "--help"],
    }
    print(f"start-up cost: {args.runs} rounds + 1 warm-up, {PYTHON} ({sys.version.split()[0]})")
    with tempfile.TemporaryDirectory(prefix="typhon-import-") as cwd:  # no ./typhon.yaml
        report_times(measure(cases, args.runs, cwd))
        for title, code, module, whole in (
            ("`import typhon`", "import typhon", "typhon", False),
            ("`import typhon.cli`", "import typhon.cli", "typhon.cli", False),
            ("`typhon --help` (the whole command, in-process)", HELP_CODE, "typhon.cli", True),
        ):
            report_imports(title, code, module, whole, cwd, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

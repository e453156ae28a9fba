"""Benchmark: the stages' heavy imports with Python's garbage collector on, and as the stages import.

    python -m benchmarks.imports [--reps 8]

A stage imports torch (with torch._dynamo, which torch.optim imports), MLflow with its SQL stores,
scikit-learn's metrics and matplotlib inside `stages.importing()`: the collector off meanwhile and
what loaded frozen after. Each rep runs the same imports in two fresh interpreters, plainly and
inside `importing()`, alternating which goes first, and times them from inside the interpreter.
Writes the "Imports" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.host import Others, cpu_name, cpu_probe
from benchmarks.results import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Imports: the garbage collector off while the stages import"
MODULES = (
    "torch",
    "torch._dynamo",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "sklearn.metrics",
    "matplotlib.pyplot",
)
TIMED = """
import contextlib, sys, time
from stages import importing
start = time.perf_counter()
with importing() if sys.argv[1] == "importing" else contextlib.nullcontext():
    {imports}
print(time.perf_counter() - start)
""".format(imports="; ".join(f"import {m}" for m in MODULES))


def seconds(way: str) -> float:
    proc = subprocess.run([sys.executable, "-c", TIMED, way], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(proc.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"plain": [], "importing": []}
    probes = [cpu_probe()]
    with Others() as others:
        for rep in range(args.reps):
            for way in ("plain", "importing") if rep % 2 == 0 else ("importing", "plain"):
                times[way].append(seconds(way))
    probes.append(cpu_probe())
    ratios = [a / b for a, b in zip(times["importing"], times["plain"], strict=True)]

    def row(way: str) -> str:
        t = times[way]
        return f"{statistics.median(t):.2f} s ({min(t):.2f}-{max(t):.2f})"

    text = f"""{SECTION}

`python -m benchmarks.imports --reps {args.reps}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()},
{os.cpu_count()} cores, Python {platform.python_version()}. `{"`, `".join(MODULES)}` in a fresh
interpreter, timed from inside it, median (min-max) over {args.reps} reps, the two ways alternating. CPU
probe (10 million additions in Python): {probes[0]:.2f} s at the start, {probes[1]:.2f} s at the end;
meanwhile {others}.

| imports | seconds |
| --- | --- |
| plainly (the garbage collector on) | {row("plain")} |
| inside `stages.importing()` (off, then frozen) | {row("importing")} |

Inside `importing()` against plainly, rep by rep: **{statistics.median(ratios):.2f}x** (min-max
{min(ratios):.2f}-{max(ratios):.2f}). As modules load, the collector walks everything loaded so far,
again and again; the stages' imports skip that, and what they loaded is never walked again.
"""
    write_section(text, args.out)
    print(text)


if __name__ == "__main__":
    main()

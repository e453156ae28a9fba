"""Benchmark: the turnaround of one experiment, `dvc exp run -S lr=0.05`, at several commits side by side.

    python -m benchmarks.turnaround --base <commit> [--base <commit> ...] [--head HEAD] [--reps 3]

Each commit gets a temporary clone of this repository with data/fashion-mnist hardlinked in and
one `dvc repro` first (the store exists, the data is in DVC's cache: a user's state after `make
pipeline`). Then, rep by rep and in alternating order, each clone runs the experiment with the
committed params and no run-cache, so it trains. Its wall time splits into training compute, the
epochs' own time (from the moments dvc prints each epoch line: first to last, plus one mean epoch
for the first), and the fixed rest: imports, MLflow, the model's logging, the reports, dvc itself.
The head runs twice per rep: as shipped, and with its warm start off (`FMNIST_WARM=0`: evaluate in
a fresh process, stages/warm.py), so the table shows what the warm start itself gives. Writes the
"Experiment turnaround" section of benchmarks/RESULTS.md (other sections are left as they are).

The benchmark adopts the processes its experiments leave behind (the warm process outlives the
train stage that forked it), so their CPU time counts as the benchmark's own, not another tenant's.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.host import Others, adopt_orphans, cpu_name, cpu_probe, load, reap_orphans
from benchmarks.results import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Experiment turnaround"
COMMAND = ["dvc", "exp", "run", "-S", "lr=0.05"]
STAGE_LINE = re.compile(r"^(?:Running stage|Stage) '(\w+)'")
EPOCH_LINE = re.compile(r"^epoch +\d+ ")


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def clone(commit: str, where: Path, data: Path, env: dict) -> Path:
    run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(where)], ROOT, env)
    run(["git", "checkout", "--quiet", commit], where, env)
    (where / "data").mkdir(exist_ok=True)
    shutil.copytree(data, where / "data" / "fashion-mnist", copy_function=os.link)
    run(["dvc", "repro"], where, env)  # the user's state before an experiment: a store, a cache
    return where


def timed_experiment(project: Path, env: dict) -> dict:
    """One `dvc exp run -S lr=0.05` that trains: wall, training compute, each stage's time."""
    run(["git", "checkout", "--quiet", "--", "params.yaml", "dvc.lock"], project, env)
    run(["dvc", "checkout", "--quiet"], project, env)
    shutil.rmtree(project / ".dvc" / "cache" / "runs", ignore_errors=True)  # no restore: it trains
    start = time.perf_counter()
    proc = subprocess.Popen(
        COMMAND, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
    wall = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(COMMAND)} in {project} failed:\n" + "\n".join(text for _, text in lines[-40:]))
    reap_orphans()
    epochs = [t for t, text in lines if EPOCH_LINE.match(text)]
    if len(epochs) < 2:
        raise SystemExit(f"{project}: fewer than two epoch lines; did it train?")
    compute = (epochs[-1] - epochs[0]) * len(epochs) / (len(epochs) - 1)
    marks = [(t, m.group(1)) for t, text in lines if (m := STAGE_LINE.match(text))] + [(wall, "")]
    stages = {name: later - t for (t, name), (later, _) in zip(marks, marks[1:], strict=False)}
    return {"wall": wall, "compute": compute, "fixed": wall - compute, **{f"stage {k}": v for k, v in stages.items()}}


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: dict[str, list[dict]], labels: dict[str, str]) -> str:
    columns = ["wall", "compute", "fixed", "stage check_params", "stage train", "stage evaluate"]
    names = {"wall": "wall", "compute": "training compute", "fixed": "fixed rest"}
    head = "| run | " + " | ".join(names.get(c, c.replace("stage ", "") + " stage") for c in columns) + " |"
    rows = [head, "|" + " --- |" * (len(columns) + 1)]
    for key, reps in results.items():
        cells = [spread([r.get(c, 0.0) for r in reps]) for c in columns]
        rows.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratios(results: dict[str, list[dict]], key: str, base: str, column: str = "fixed") -> str:
    """`key` against `base` in `column`: the ratio of medians, and the spread of the rep-by-rep ratios."""
    by_rep = [k[column] / b[column] for k, b in zip(results[key], results[base], strict=True)]
    median = statistics.median(r[column] for r in results[key]) / statistics.median(r[column] for r in results[base])
    return f"**{median:.2f}x** (rep by rep {min(by_rep):.2f}-{max(by_rep):.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="append", required=True, help="a commit to compare against (repeatable)")
    parser.add_argument("--head", default="HEAD", help="the commit measured (default HEAD; commit your edits)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "fashion-mnist")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "FMNIST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python and dvc
    revisions = {**{f"base{i}": rev for i, rev in enumerate(args.base)}, "head": args.head}
    commits = {key: run(["git", "rev-parse", "--short", rev], ROOT, env).strip() for key, rev in revisions.items()}
    labels = {key: f"`{commit}`" for key, commit in commits.items()}
    labels["head"] = f"head `{commits['head']}`, as shipped"
    labels["cold"] = f"head `{commits['head']}`, warm start off"
    environments = {key: env for key in labels}
    environments["cold"] = {**env, "FMNIST_WARM": "0"}
    if run(["git", "status", "--porcelain", "--untracked-files=no"], ROOT, env).strip():
        print("note: uncommitted edits are not measured: the clones are of commits", file=sys.stderr)
    adopt_orphans()
    results: dict[str, list[dict]] = {key: [] for key in labels}
    probes = [cpu_probe()]
    with tempfile.TemporaryDirectory(prefix="turnaround-") as tmp:
        projects = {}
        for key, commit in commits.items():
            print(f"cloning {commit} and running dvc repro once", file=sys.stderr)
            projects[key] = clone(commit, Path(tmp) / key, args.data, env)
        projects["cold"] = projects["head"]
        with Others() as others:
            for rep in range(args.reps):
                order = list(labels) if rep % 2 == 0 else list(reversed(labels))  # interleaved
                for key in order:
                    result = timed_experiment(projects[key], environments[key])
                    results[key].append(result)
                    shown = f"wall {result['wall']:.1f} s, compute {result['compute']:.1f} s"
                    print(f"rep {rep + 1} {key}: {shown}", file=sys.stderr)
    probes.append(cpu_probe())
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    bases = [key for key in commits if key.startswith("base")]
    against = "\n".join(
        f"- against `{commits[b]}`: fixed rest {ratios(results, 'head', b)}, wall {ratios(results, 'head', b, 'wall')};"
        for b in bases
    )
    warm_saves = statistics.median(r["stage evaluate"] for r in results["cold"]) - statistics.median(
        r["stage evaluate"] for r in results["head"]
    )
    text = f"""{SECTION}

`python -m benchmarks.turnaround {" ".join(f"--base {b}" for b in args.base)} --reps {args.reps}`, {when},
{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}. Seconds for one
`dvc exp run -S lr=0.05` that trains (no run-cache), median (min-max) over {args.reps} rep(s), every row
interleaved with the others in the same run. Training compute is the epochs' own time (dvc's epoch
lines, first to last, plus one mean epoch); the fixed rest is everything else. A stage's time runs
from dvc's line announcing it to the next one (dvc's own bookkeeping included).

{table(results, labels)}

The head as shipped:
{against}
- its warm start (stages/warm.py) against the same commit with it off: wall {ratios(results, "head", "cold", "wall")},
  evaluate stage {warm_saves:.1f} s shorter; fixed rest {ratios(results, "head", "cold")}; training compute,
  while the warm process imports beside the epochs, {ratios(results, "head", "cold", "compute")}.

Load average at the end: {load()} (1, 5, 15 min); CPU probe (10 million additions in Python):
{probes[0]:.2f} s at the start, {probes[1]:.2f} s at the end; while the experiments ran: {others}
(the warm processes included in this benchmark's own).
"""
    write_section(text, args.out)
    print(text)


if __name__ == "__main__":
    main()

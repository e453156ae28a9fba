"""Benchmark: the turnaround of one experiment, `dvc exp run -S lr=0.05`, at two commits side by side.

    python -m benchmarks.turnaround --base <commit> [--head HEAD] [--reps 3]

Each commit gets a temporary clone of this repository with data/fashion-mnist hardlinked in and
one `dvc repro` first (the store exists, the data is in DVC's cache: a user's state after `make
pipeline`). Then, rep by rep and alternating which commit goes first, each clone runs the
experiment with the committed params and no run-cache, so it trains. Its wall time splits into
training compute, the epochs' own time (from the moments dvc prints each epoch line: first to
last, plus one mean epoch for the first), and the fixed rest: imports, MLflow, the model's
logging, the reports, dvc itself. Writes the "Experiment turnaround" section of
benchmarks/RESULTS.md (other sections are left as they are).

A third clone, the floor, is the head with train's and evaluate's commands replaced by a stand-in
that imports MLflow, opens the store and copies the stage's outputs from the real run: what the
same experiment costs when its stages do nothing else, dvc's own bookkeeping included.

Last, in the head's clone, each tracked stage runs alone, alternately as dvc runs it (a fresh
process) and warm: its main() in a process that imported torch, MLflow with its SQL store, scikit-learn
and matplotlib beforehand. Their difference is what a process that stayed resident between stages,
or between experiments, would save; no such process is built, and its own hand-over is not counted.
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks.host import Others, cpu_probe, load
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


# The floor's stand-in for a tracked stage: MLflow imported and its store opened, as the stage's first
# step, then the stage's outputs (saved from the real run) put in place, so that dvc finds them.
STAND_IN = (
    "import mlflow, shutil, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments(); "
    "shutil.copytree(sys.argv[2], '.', dirs_exist_ok=True)"
)


def floor_clone(project: Path, env: dict) -> Path:
    """Turn a reproduced clone into the floor: train and evaluate only import MLflow and copy."""
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    store = f"sqlite:///{project / 'mlflow.db'}"
    for stage in ("train", "evaluate"):
        saved = project.parent / f"floor-outputs-{stage}"
        for out in lock[stage]["outs"]:
            (saved / out["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / out["path"], saved / out["path"])
        pipeline["stages"][stage]["cmd"] = f'python -c "{STAND_IN}" {store} {saved}'
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run(["git", "-c", "user.name=benchmark", "-c", "user.email=benchmark@localhost", "commit", "--quiet", "-am",
         "floor: stand-in stages"], project, env)  # fmt: skip
    return project


# A warm stage: the modules a resident process would hold are imported first (with portable's
# settings applied before torch, as the stage itself does), then only main() is timed.
WARM = """
import json, sys, time
loading = time.perf_counter()
from stages import config, determinism
determinism.apply(config.load_params().determinism)
import matplotlib.pyplot, sklearn.metrics, torch, torch._dynamo, torch.optim  # noqa
from stages import evaluate, reports, run_stage, tracking, train, training  # noqa
tracking.preload()
determinism.apply = lambda mode: None  # applied above, before torch: the check would refuse a second call
stage, result, *args = sys.argv[1:]
stage = {"train": train, "evaluate": evaluate}[stage]
sys.argv = [stage.__file__, *args]
start = time.perf_counter()
run_stage(stage.main)
open(result, "w").write(json.dumps({"imports": start - loading, "main": time.perf_counter() - start}))
"""


def warm_and_cold(project: Path, env: dict, reps: int) -> dict[str, dict[str, list[float]]]:
    """Each tracked stage alone in the head's clone: a fresh process's wall, and main() when warm."""
    import shlex

    import yaml

    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    times: dict[str, dict[str, list[float]]] = {}
    for stage in ("train", "evaluate"):
        argv = shlex.split(pipeline[stage]["cmd"])[3:]  # after `python -m stages.<stage>`
        times[stage] = {"cold": [], "warm": [], "imports": []}
        for _ in range(reps):
            start = time.perf_counter()
            run([sys.executable, "-m", f"stages.{stage}", *argv], project, env)
            times[stage]["cold"].append(time.perf_counter() - start)
            result = project.parent / "warm-seconds"
            run([sys.executable, "-c", WARM, stage, str(result), *argv], project, env)
            warm = json.loads(result.read_text())
            times[stage]["warm"].append(warm["main"])
            times[stage]["imports"].append(warm["imports"])
    return times


def timed_experiment(project: Path, env: dict, stand_in: bool = False) -> dict:
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
    epochs = [t for t, text in lines if EPOCH_LINE.match(text)]
    if len(epochs) < 2 and not stand_in:
        raise SystemExit(f"{project}: fewer than two epoch lines; did it train?")
    compute = (epochs[-1] - epochs[0]) * len(epochs) / (len(epochs) - 1) if epochs else 0.0
    marks = [(t, m.group(1)) for t, text in lines if (m := STAGE_LINE.match(text))] + [(wall, "")]
    stages = {name: later - t for (t, name), (later, _) in zip(marks, marks[1:], strict=False)}
    return {"wall": wall, "compute": compute, "fixed": wall - compute, **{f"stage {k}": v for k, v in stages.items()}}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(results: dict[str, list[dict]], labels: dict[str, str]) -> str:
    columns = ["wall", "compute", "fixed", "stage check_params", "stage train", "stage evaluate"]
    names = {"wall": "wall", "compute": "training compute", "fixed": "fixed rest"}
    head = "| commit | " + " | ".join(names.get(c, c.replace("stage ", "") + " stage") for c in columns) + " |"
    rows = [head, "|" + " --- |" * (len(columns) + 1)]
    for key, reps in results.items():
        cells = [spread([r.get(c, 0.0) for r in reps]) for c in columns]
        rows.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against (e.g. main~3)")
    parser.add_argument("--head", default="HEAD", help="the commit measured (default HEAD; commit your edits)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "fashion-mnist")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python and dvc
    commits = {
        key: run(["git", "rev-parse", "--short", rev], ROOT, env).strip()
        for key, rev in (("base", args.base), ("head", args.head))
    }
    labels = {"base": f"base `{commits['base']}`", "head": f"head `{commits['head']}`",
              "floor": "floor (stages only import MLflow)"}  # fmt: skip
    if run(["git", "status", "--porcelain", "--untracked-files=no"], ROOT, env).strip():
        print("note: uncommitted edits are not measured: the clones are of commits", file=sys.stderr)
    results: dict[str, list[dict]] = {"base": [], "head": [], "floor": []}
    probes = [cpu_probe()]
    with tempfile.TemporaryDirectory(prefix="turnaround-") as tmp:
        projects = {}
        for key, commit in commits.items():
            print(f"cloning {commit} and running dvc repro once", file=sys.stderr)
            projects[key] = clone(commit, Path(tmp) / key, args.data, env)
        projects["floor"] = floor_clone(clone(commits["head"], Path(tmp) / "floor", args.data, env), env)
        with Others() as others:
            for rep in range(args.reps):
                order = ("base", "head", "floor") if rep % 2 == 0 else ("floor", "head", "base")  # interleaved
                for key in order:
                    result = timed_experiment(projects[key], env, stand_in=key == "floor")
                    results[key].append(result)
                    shown = f"wall {result['wall']:.1f} s, compute {result['compute']:.1f} s"
                    print(f"rep {rep + 1} {key}: {shown}", file=sys.stderr)
        print("each tracked stage alone, fresh and warm", file=sys.stderr)
        stage_times = warm_and_cold(projects["head"], env, args.reps)
    probes.append(cpu_probe())
    base_fixed = statistics.median(r["fixed"] for r in results["base"])
    head_fixed = statistics.median(r["fixed"] for r in results["head"])
    floor = statistics.median(r["fixed"] for r in results["floor"])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    half = base_fixed / 2
    reach = (
        f"Half the base is {half:.1f} s, under the floor: the goal of 0.5x is out of reach in this run"
        if floor > half
        else f"Half the base is {half:.1f} s, {half - floor:.1f} s over the floor: the goal of 0.5x leaves the head "
        f"that much for its own work"
    )
    saved = {stage: statistics.median(t["cold"]) - statistics.median(t["warm"]) for stage, t in stage_times.items()}
    warm_rows = "\n".join(
        f"| {stage} | {spread(t['cold'])} | {spread(t['warm'])} | {saved[stage]:.1f} |"
        for stage, t in stage_times.items()
    )
    imports = statistics.median([seconds for t in stage_times.values() for seconds in t["imports"]])
    epochs = statistics.median(r["compute"] for r in results["head"])
    between_stages = head_fixed - saved["evaluate"]
    across_experiments = head_fixed - saved["evaluate"] - saved["train"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    text = f"""{SECTION}

`python -m benchmarks.turnaround --base {args.base} --reps {args.reps}`, {when}, {cpu}, {os.cpu_count()} cores,
Python {platform.python_version()}. Seconds for one `dvc exp run -S lr=0.05` that trains (no run-cache),
median (min-max) over {args.reps} rep(s), the two commits interleaved in the same run. Training compute
is the epochs' own time (dvc's epoch lines, first to last, plus one mean epoch); the fixed rest is
everything else. A stage's time runs from dvc's line announcing it to the next one (dvc's own
bookkeeping included).

{table(results, labels)}

Fixed rest, head against base: **{head_fixed / base_fixed:.2f}x** ({head_fixed:.1f} s against {base_fixed:.1f} s).
The floor, {floor:.1f} s, is {floor / base_fixed:.2f}x the base: dvc's own bookkeeping for the four stages
and one MLflow import and store open in each of the two tracked stages, with no other work. While each
tracked stage is a fresh Python process that logs to MLflow, the fixed rest cannot go below it.
{reach}; the head's {head_fixed - floor:.1f} s over the floor are torch's import, the data, the model's logging
and the reports, mostly beside the MLflow import already.

Each tracked stage alone in the head's clone, {args.reps} time(s) each, alternately as dvc runs it (a fresh
process) and warm (its main() in a process that had imported torch, MLflow with its SQL store,
scikit-learn and matplotlib beforehand):

| stage | fresh process | warm main() | saved |
| --- | --- | --- | --- |
{warm_rows}

A process that stayed resident with those modules would save that much, less its own hand-over
(not built, not measured). Its imports took {imports:.1f} s of one core here (median over both stages'
warm runs), and they have to happen somewhere:
- kept from one experiment to the next, such a process pays them once and could serve both stages:
  fixed rest about {across_experiments:.1f} s, **{across_experiments / base_fixed:.2f}x** the base;
- started afresh for each experiment, it can serve evaluate only, and only if its imports fit beside
  train's epochs ({epochs:.1f} s here) on the core that training leaves: at best about {between_stages:.1f} s,
  {between_stages / base_fixed:.2f}x, and it saves less where the epochs are shorter than its imports.
"""
    text += f"""
Load average at the end: {load()} (1, 5, 15 min); CPU probe (10 million additions in Python):
{probes[0]:.2f} s at the start, {probes[1]:.2f} s at the end; while the experiments ran: {others}.
The fixed rest relies on two idle cores: train and evaluate import torch in a forked child while
they import MLflow, so a busy machine hides that gain.
"""
    write_section(text, args.out)
    print(text)


if __name__ == "__main__":
    main()

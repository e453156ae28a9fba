"""`fmnist-sweep`: a grid or an Optuna search, every point a real DVC experiment, run on Dask.

fmnist-sweep -S 'lr=0.01,0.05,0.1' -S 'batch_size=64,256'                     # a grid: every combination
fmnist-sweep --trials 20 -S 'lr=tag(log, interval(0.001, 1))' -S 'batch_size=choice(64,128,256)'
fmnist-sweep --scheduler tcp://host:8786 -S 'lr=0.05,0.2'                      # on a Dask cluster

Each point is `dvc exp run -n <name> -S ...` in a clone of its own at the commit the sweep started
from (see stages/sweep_point.py), named after its params (`lr0.05-bs64`) or its trial
(`<study>-<n>`); its results come back as DVC experiments (`dvc exp show`) and MLflow runs tagged
`sweep.name` and `sweep.trial`. With no scheduler (`--scheduler` or DASK_SCHEDULER_ADDRESS), a
LocalCluster of `--workers` processes runs them on this machine. At the end the champion rule is
applied once to the best point's model version.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

from stages import ArgumentParser, PipelineError, check_interrupt, project_root, run_stage
from stages.git import GitError, git, git_or_none
from stages.sweep_point import STARTED_TOPIC, Point, Result, run_point
from stages.sweep_space import Space, SpaceError, format_value, grid, parse_space, point_name, validate

RETRIES = 1  # a point whose task raised (not a failed training: that is a result) runs once more
POLL_S = 0.5


class SweepError(PipelineError):
    """A sweep that cannot start or was stopped; the message names the culprit."""


def _dvc(project: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def check_committed(project: Path) -> str:
    """The commit every point runs; uncommitted edits to tracked files would not be in it."""
    changed = git("diff", "--name-only", "HEAD", cwd=project)
    if changed:
        paths = ", ".join(changed.splitlines())
        raise SweepError(f"uncommitted changes in {paths}: every point runs the commit HEAD; commit or stash them")
    return git("rev-parse", "HEAD", cwd=project)


def check_git_remote(project: Path, remote: str, commit: str) -> str:
    """The remote's URL, after checking it answers and holds the commit."""
    url = git_or_none("remote", "get-url", remote, cwd=project) if remote else None
    if not url:
        raise SweepError(f"no git remote {remote!r}: workers clone the project from it")
    try:
        tips = git("ls-remote", remote, cwd=project, timeout=15)
    except GitError as e:
        raise SweepError(f"git remote {remote} ({url}) is unreachable: {e}") from None
    for line in tips.splitlines():
        tip = line.split()[0]
        if git_or_none("merge-base", "--is-ancestor", commit, tip, cwd=project) is not None:
            return url
    raise SweepError(f"commit {commit[:7]} is not on git remote {remote} ({url}): git push it first")


def check_dvc_remote(project: Path, name: str) -> str:
    """The DVC remote's name, after checking it can be reached (a directory exists; a host answers)."""
    name = name or _dvc(project, "remote", "default")
    if not name:
        raise SweepError("no default DVC remote: workers push their outputs there (README, Working as a team)")
    url = _dvc(project, "config", f"remote.{name}.url")
    if not url:
        raise SweepError(f"no DVC remote {name!r}")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else url)
        path = path if path.is_absolute() else project / ".dvc" / path
        if not path.is_dir():
            raise SweepError(f"DVC remote {name} ({url}) is unreachable: no such directory")
        return name
    endpoint = _dvc(project, "config", f"remote.{name}.endpointurl") or ""
    target = urllib.parse.urlparse(endpoint) if endpoint else parsed
    port = target.port or {"ssh": 22, "http": 80, "https": 443}.get(target.scheme)
    if target.hostname and port:
        try:
            socket.create_connection((target.hostname, port), timeout=5).close()
        except OSError as e:
            raise SweepError(f"DVC remote {name} ({endpoint or url}) is unreachable: {e}") from None
    return name


# --- the cluster --------------------------------------------------------------------------------


def connect(scheduler: str, workers: int):
    """A client of the team's scheduler, or of a LocalCluster on this machine; and whether local."""
    from distributed import Client, LocalCluster

    for name in ("distributed", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if scheduler:
        try:
            return Client(scheduler, timeout="5s"), False
        except OSError as e:
            raise SweepError(f"Dask scheduler {scheduler} is unreachable: {str(e).splitlines()[0][:200]}") from None
    gpus = _local_gpus()
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        resources={"GPU": 1} if gpus else None,
        silence_logs=logging.CRITICAL,
    )
    return Client(cluster), True


def _local_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def needs_gpu(values: dict, project_params: dict) -> bool:
    return str(values.get("device", project_params.get("device", "auto"))).startswith("cuda")


# --- the sweep ----------------------------------------------------------------------------------


@dataclass
class Tally:
    done: int = 0
    restored: int = 0
    failed: int = 0


class Progress:
    """A tqdm bar of points, with done / restored / failed / running counts."""

    def __init__(self, total: int, client):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="point", dynamic_ncols=True)
        self.client, self.tally, self.last = client, Tally(), 0.0

    def update(self, pending: int, finished: Result | None = None) -> None:
        if finished is not None:
            setattr(self.tally, finished.status, getattr(self.tally, finished.status) + 1)
            line = f"{finished.status}: {finished.name}"
            if finished.status == "restored":
                line += " (from the run-cache: no training, no new MLflow run)"
            line += f" on {finished.worker or '-'}" + (f": {finished.message}" if finished.message else "")
            self.bar.write(line)
        if finished is not None or time.monotonic() - self.last > 2:
            self.last = time.monotonic()
            try:
                running = sum(len(keys) for keys in self.client.processing().values())
            except Exception:  # the scheduler is busy or gone; the count is cosmetic
                running = 0
            t = self.tally
            self.bar.set_postfix_str(f"done {t.done}, restored {t.restored}, failed {t.failed}, running {running}")
            self.bar.update(1 if finished is not None else 0)
        _ = pending

    def close(self) -> None:
        self.bar.close()


def submit(client, point: Point, gpu: bool):
    return client.submit(
        run_point, point, key=f"point-{point.name}-{uuid.uuid4().hex[:6]}", pure=False,
        retries=RETRIES, resources={"GPU": 1} if gpu else None,
    )  # fmt: skip


def objective_key(project_params: dict, fixed_or_values: dict) -> str:
    val_size = fixed_or_values.get("val_size", project_params.get("val_size", 0))
    return "val_acc" if int(val_size or 0) > 0 else "test_acc"


class Runner:
    """Keeps at most `slots` points in flight; on Ctrl-C cancels the rest and waits for none."""

    def __init__(self, client, total: int):
        self.client, self.futures, self.results = client, {}, []
        self.progress = Progress(total, client)
        self.started: dict[str, str] = {}  # point -> the worker that last started it
        self.news: list[str] = []  # lines from Dask's event thread, printed by the main one
        client.subscribe_topic(STARTED_TOPIC, self._on_start)

    def _on_start(self, event) -> None:
        _, started = event
        before = self.started.get(started["point"])
        if before is not None:  # Dask reran it: its worker died (or lost the scheduler) mid-point
            self.news.append(f"rerun: {started['point']} on {started['on']}: {before} went away mid-point")
        self.started[started["point"]] = started["on"]

    def add(self, future, tag) -> None:
        self.futures[future] = tag

    def wait_one(self) -> tuple[Result, object]:
        while True:
            try:
                check_interrupt()
            except PipelineError:
                raise KeyboardInterrupt from None
            while self.news:
                self.progress.bar.write(self.news.pop(0))
            for future in list(self.futures):
                if future.done():
                    tag = self.futures.pop(future)
                    try:
                        result = future.result()
                    except Exception as e:  # the task itself failed, on every try
                        result = Result(tag[0], "failed", f"{type(e).__name__}: {str(e)[:200]}")
                    self.results.append(result)
                    self.progress.update(len(self.futures), result)
                    return result, tag
            self.progress.update(len(self.futures))
            time.sleep(POLL_S)

    def cancel(self) -> int:
        pending = list(self.futures)
        self.client.cancel(pending, force=True)
        return len(pending)


def run_grid(runner: Runner, points: list[tuple[Point, bool]]) -> None:
    for point, gpu in points:
        runner.add(submit(runner.client, point, gpu), (point.name, None))
    while runner.futures:
        runner.wait_one()


def run_search(runner: Runner, args, space: Space, make_point, objective: str, project_params: dict, slots: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=args.seed)
    try:
        study = optuna.create_study(
            study_name=args.study, storage=args.storage, sampler=sampler, direction="maximize", load_if_exists=True
        )
    except Exception as e:
        raise SweepError(f"Optuna storage {_redact(args.storage)}: {str(e).splitlines()[0][:200]}") from None
    states = optuna.trial.TrialState
    for old in study.get_trials(deepcopy=False, states=(states.RUNNING, states.WAITING)):
        if old.state == states.RUNNING:  # a stopped sweep's: run those params again first
            study.tell(old.number, state=states.FAIL)
            study.enqueue_trial(old.params, skip_if_exists=True)
    finished = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL)))
    finished -= len(study.get_trials(deepcopy=False, states=(states.WAITING,)))
    left = max(args.trials - max(finished, 0), 0)
    if left < args.trials:
        print(f"study {args.study}: resuming, {args.trials - left} of {args.trials} trials already run")
    runner.progress.bar.reset(total=left)
    asked = 0
    while asked < left:  # in rounds of `slots` points: each round's suggestions see the same
        round_ = []  # finished trials whatever order the last round's points finished in
        while asked < left and len(round_) < slots:
            trial = study.ask(space.sweeps)
            values = {**space.fixed, **trial.params}
            name = f"{args.study}-{trial.number}"
            asked += 1
            try:
                validate(values, Path(args.project) / "params.yaml")
            except SpaceError as e:  # a suggestion the pipeline refuses: a failed trial, not a stop
                study.tell(trial, state=states.FAIL)
                runner.results.append(Result(name, "failed", str(e)))
                runner.progress.update(len(runner.futures), runner.results[-1])
                continue
            point = make_point(name, values, str(trial.number))
            runner.add(submit(runner.client, point, needs_gpu(values, project_params)), (point.name, trial))
            round_.append(trial)
        results = {}
        while runner.futures:
            result, (_, trial) = runner.wait_one()
            results[trial.number] = result
        for trial in sorted(round_, key=lambda t: t.number):
            value = results[trial.number].metrics.get(objective)
            if results[trial.number].status == "failed" or value is None:
                study.tell(trial, state=states.FAIL)
            else:
                study.tell(trial, value)


def _redact(text: str) -> str:
    from stages.tracking.store import redacted

    return redacted(text or "")


def settle_champion(project: Path, best: Result) -> str:
    """The champion rule, once, for the best point's model version: points evaluated at the same
    moment each moved the alias by the same rule, and this makes the end state certain."""
    from stages.config import load_params
    from stages.tracking.champion import consider_champion
    from stages.tracking.runs import MODEL_MD5_TAG
    from stages.tracking.store import import_mlflow, one_line_errors, redacted

    params = load_params(project / "params.yaml")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project / 'mlflow.db'}"
    mlflow = import_mlflow()
    with one_line_errors(uri, "failed settling the champion"):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        if experiment is None:
            where = f"{redacted(uri)} has no experiment {params.tracking.experiment}"
            return f"champion: not settled: {where} (set MLFLOW_TRACKING_URI to the workers' server)"
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{MODEL_MD5_TAG}` = '{best.metrics['model_md5']}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        versions = [v for run in found for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")]
        if not versions:
            return f"champion: unchanged (no registered version holds {best.name}'s model)"
        version = max(versions, key=lambda v: int(v.version))
        return consider_champion(client, version, best.metrics["test_acc"])


def report(results: list[Result], objective: str, names_to_values: dict) -> Result | None:
    scored = sorted(
        results, key=lambda r: (r.status == "failed", -(r.metrics.get(objective) or 0.0), r.name)
    )  # fmt: skip
    keys = sorted({k for values in names_to_values.values() for k in values})
    header = ["point", "status", objective, *([] if objective == "test_acc" else ["test_acc"]), *keys, "worker", "s"]
    rows = []
    for r in scored:
        value = r.metrics.get(objective)
        row = [r.name, r.status, f"{value:.4f}" if value is not None else "-"]
        if objective != "test_acc":
            row.append(f"{r.metrics['test_acc']:.4f}" if "test_acc" in r.metrics else "-")
        values = names_to_values.get(r.name, {})
        row += [format_value(values[k]) if k in values else "-" for k in keys] + [r.worker or "-", f"{r.seconds:.0f}"]
        rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    for r in scored:
        if r.status == "failed":
            print(f"failed: {r.name}: {r.message}")
    best = next((r for r in scored if r.status != "failed"), None)
    return best


def sweep(args) -> None:
    project = project_root()
    args.project = str(project)
    commit = check_committed(project)
    search = args.trials is not None
    if not args.set:
        raise SweepError("nothing to sweep: give at least one -S key=values")
    space = parse_space(args.set, project / "params.yaml", search)
    import yaml

    project_params = yaml.safe_load((project / "params.yaml").read_text())
    objective = objective_key(project_params, space.fixed)
    scheduler = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS", "")
    if scheduler:
        git_url = check_git_remote(project, args.git_remote, commit)
        dvc_remote = check_dvc_remote(project, args.dvc_remote)
    else:
        git_url, dvc_remote = str(project), ""
    sweep_name = args.study if search else "grid-" + hashlib.sha256(" ".join(args.set).encode()).hexdigest()[:6]

    def make_point(name: str, values: dict, trial: str) -> Point:
        settings = [f"{k}={format_value(v)}" for k, v in values.items()]
        return Point(name, settings, commit, git_url, sweep_name, trial, "" if scheduler else str(project), dvc_remote)

    points, names_to_values = [], {}
    if not search:
        for values in grid(space):
            validate(values, project / "params.yaml")
            name = point_name(space, values)
            names_to_values[name] = values
            points.append((make_point(name, values, name), needs_gpu(values, project_params)))
    client, local = connect(scheduler, args.workers)
    where = f"a LocalCluster of {args.workers} worker(s) on this machine" if local else f"the Dask cluster {scheduler}"
    try:
        gpu_workers = [w for w in client.scheduler_info()["workers"].values() if w.get("resources", {}).get("GPU")]
        if any(gpu for _, gpu in points) and not gpu_workers:
            raise SweepError("points with device cuda need a worker started with --resources GPU=1; there is none")
        slots = max(sum(client.nthreads().values()), 1)
        what = f"{len(points)} points" if not search else f"{args.trials} trials of study {args.study}"
        print(f"sweep {sweep_name}: {what} at commit {commit[:7]} on {where}; maximizing {objective}")
        runner = Runner(client, len(points) or args.trials)
        interrupted = None
        try:
            if search:
                run_search(runner, args, space, make_point, objective, project_params, slots)
            else:
                run_grid(runner, points)
        except KeyboardInterrupt:
            interrupted = runner.cancel()
        runner.progress.close()
    finally:
        cluster = client.cluster if local else None
        client.close()
        if cluster is not None:
            cluster.close()
    if interrupted is not None:
        if local:  # the points' processes stop with their workers: wait for them to remove their clones
            _wait_for_clones(project, [p.name for p, _ in points] or [f"{args.study}-"])
        raise SweepError(
            f"interrupted by Ctrl-C: {interrupted} point(s) cancelled, {len(runner.results)} finished; "
            "no point was published half, and their clones are removed"
        )
    results = runner.results
    if search:
        names_to_values = {r.name: _trial_values(args, r.name, space) for r in results}
    published = [r.name for r in results if r.status != "failed"]
    if published and not local:
        _pull_experiments(project, args.git_remote, published)
    best = report(results, objective, names_to_values)
    if best is None:
        raise SweepError(f"every point failed ({len(results)}); see the lines above")
    print(f"best: {best.name} ({objective} {best.metrics[objective]:.4f})")
    print(settle_champion(project, best))
    print(f"take it: dvc exp apply {best.name}")
    failed = sum(r.status == "failed" for r in results)
    if failed:  # the sweep still found its best point: a warning, not a failure
        print(f"warning: {failed} of {len(results)} points failed (see above)")


def _wait_for_clones(project: Path, prefixes: list[str], seconds: float = 60) -> None:
    parent = project / ".dvc" / "tmp" / "sweep"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(p.is_dir() and p.name.startswith(tuple(prefixes)) for p in parent.glob("*")):
            return
        time.sleep(0.5)


def _trial_values(args, name: str, space: Space) -> dict:
    import optuna

    number = int(name.rsplit("-", 1)[1])
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    return {**space.fixed, **study.trials[number].params}


def _pull_experiments(project: Path, remote: str, names: list[str]) -> None:
    cmd = ["dvc", "exp", "pull", "--force", remote, *names]
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["failed"]
        raise SweepError(f"dvc exp pull {remote}: {lines[-1]}")
    print(f"pulled {len(names)} experiment(s) from {remote}: dvc exp show lists them")


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="fmnist-sweep", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-S",
        "--set-param",
        dest="set",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="as `dvc exp run -S`, Hydra sweeps too: 'lr=0.01,0.05', 'lr=tag(log, interval(0.001, 1))'",
    )
    parser.add_argument("--trials", type=int, help="an Optuna search of this many trials (default: the grid)")
    parser.add_argument("--seed", type=int, default=0, help="the search's seed: the same seed suggests the same points")
    parser.add_argument("--study", default="search", help="the Optuna study; a stopped search of it resumes")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in .dvc/tmp/sweep/, this project's)")
    parser.add_argument("--scheduler", default="", help="a Dask scheduler (tcp://host:8786); or DASK_SCHEDULER_ADDRESS")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="local workers when no scheduler is given (default: the cores)",
    )
    parser.add_argument("--git-remote", default="origin", help="with a scheduler: where workers clone and push refs")
    parser.add_argument("--dvc-remote", default="", help="with a scheduler: the DVC remote (default: the default one)")
    args = parser.parse_args(argv)  # fmt: skip
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.storage is None:
        store = project_root() / ".dvc" / "tmp" / "sweep"
        store.mkdir(parents=True, exist_ok=True)
        args.storage = f"sqlite:///{store / 'optuna.db'}"
    sweep(args)


def cli() -> None:
    run_stage(main, entry_point=True)


if __name__ == "__main__":
    cli()

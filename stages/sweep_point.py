"""One point of a sweep, on whichever Dask worker runs it: a fresh clone at the sweep's commit, a real
`dvc exp run -n <name> -S ...` (all stages, run-cache included), then `dvc exp push` of its results.

The Dask task (`run_point`) starts `python -m stages.sweep_point` as a child that dies with its
worker (PR_SET_PDEATHSIG): a worker killed mid-point stops its training, whose MLflow run is marked
KILLED, and Dask reruns the point elsewhere. The child ignores SIGTERM while it publishes, so a point
is pushed whole or not at all: outputs and run-cache to the DVC remote first, the git ref last.

Two ways to publish:
- local (the sweep's LocalCluster): clones live under <project>/.dvc/tmp/sweep/ and use the
  project's own DVC cache, so outputs and run-cache land in it directly, MLflow runs land in the
  project's store (as for DVC's own queue), and the ref is pushed into the project itself;
- remote (`--scheduler`): the clone comes from the git remote, pulls what it needs from the DVC
  remote (a per-machine cache is kept between points), and pushes back to both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stages import die_with_parent

STARTED_TOPIC = "fmnist-sweep-point-started"  # a Dask event each time a worker starts a point
SWEEP_ENV, TRIAL_ENV = "FMNIST_SWEEP", "FMNIST_TRIAL"  # read by the tracking tags


@dataclass
class Point:
    name: str
    settings: list[str]  # `key=value` for `dvc exp run -S`
    commit: str
    git_url: str  # where the clone comes from, and where its ref goes
    sweep: str
    trial: str
    project: str = ""  # local mode: the project itself (its cache, store and refs)
    dvc_remote: str = ""  # remote mode: the DVC remote's name ("" = the default)


@dataclass
class Result:
    name: str
    status: str  # done, restored or failed
    message: str = ""
    metrics: dict = field(default_factory=dict)
    host: str = ""
    worker: str = ""
    seconds: float = 0.0


# --- in the Dask worker -------------------------------------------------------------------------


def run_point(point: Point) -> Result:
    """The Dask task: run the point in a child process and return what it reports."""
    from distributed import get_worker

    worker = get_worker()
    worker_name = worker.name if isinstance(worker.name, str) else worker.address
    worker.log_event(STARTED_TOPIC, {"point": point.name, "on": worker_name})  # a second start: a rerun
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "stages.sweep_point"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tempfile.gettempdir(),  # import the installed project, not a clone's copy
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
            start_new_session=True,  # Ctrl-C at the sweep's terminal reaches it only through the sweep
        )
        child.communicate(json.dumps(asdict(point)))
        out.seek(0)
        lines = out.read().strip().splitlines()
    try:
        result = Result(**json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        tail = lines[-1] if lines else "no output"
        result = Result(point.name, "failed", f"point process exited {child.returncode}: {tail}")
    result.worker = worker_name
    return result


# --- the child process --------------------------------------------------------------------------


class _Signals:
    """SIGTERM stops the running command (its whole process group) unless publishing is under way."""

    def __init__(self):
        self.received = False
        self.publishing = False
        self.child: subprocess.Popen | None = None
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)

    def _on_term(self, signum, frame):
        self.received = True
        if not self.publishing and self.child and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGTERM)


class PointFailed(Exception):
    pass


def _bin() -> Path:
    return Path(sys.executable).parent


def _command(signals: _Signals, cmd: list[str], cwd: Path, env: dict, what: str) -> str:
    if signals.received and not signals.publishing:
        raise PointFailed("interrupted before it finished; nothing published")
    signals.child = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output, _ = signals.child.communicate()
    if signals.received and not signals.publishing:
        raise PointFailed("interrupted before it finished; nothing published")
    if signals.child.returncode != 0:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith(("error:", "ERROR:"))), lines[-1] if lines else "")
        raise PointFailed(f"{what} failed: {reason.strip()[:300]}")
    return output


def _metrics(clone: Path) -> dict:
    metrics = json.loads((clone / "reports/eval/metrics.json").read_text())
    run_info = json.loads((clone / "reports/train/run.json").read_text())
    history = json.loads((clone / "reports/train/history.json").read_text())
    kept = next((row for row in history if row["epoch"] == run_info.get("kept_epoch")), history[-1])
    if kept.get("val_acc") is not None:
        metrics["val_acc"] = kept["val_acc"]
    metrics["model_md5"] = run_info["model_md5"]
    return metrics


def _was_restored(output: str) -> bool:
    """No training, no new MLflow run: DVC restored the train stage from its run-cache ("is cached")
    or, for the commit's own params, checked out the outputs dvc.lock names ("didn't change")."""
    return "Running stage 'train'" not in output and (
        "Stage 'train' is cached" in output or "Stage 'train' didn't change" in output
    )


def execute(point: Point, signals: _Signals) -> Result:
    started = time.monotonic()
    env = {**os.environ, SWEEP_ENV: point.sweep, TRIAL_ENV: point.trial, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{_bin()}{os.pathsep}{env.get('PATH', '')}"
    for who in ("AUTHOR", "COMMITTER"):  # `dvc exp run` commits; a worker may have no git identity
        env.setdefault(f"GIT_{who}_NAME", "fmnist-sweep")
        env.setdefault(f"GIT_{who}_EMAIL", "fmnist-sweep@localhost")
    if point.project:
        parent = Path(point.project) / ".dvc" / "tmp" / "sweep"
    else:
        if not env.get("MLFLOW_TRACKING_URI"):
            raise PointFailed(f"worker {socket.gethostname()} has no MLFLOW_TRACKING_URI: its runs would be lost")
        parent = Path(tempfile.gettempdir()) / "fmnist-sweep"
    parent.mkdir(parents=True, exist_ok=True)
    clone = Path(tempfile.mkdtemp(prefix=f"{point.name}-", dir=parent))
    dvc = str(_bin() / "dvc")
    try:
        _command(signals, ["git", "clone", "-q", point.git_url, str(clone)], parent, env, "git clone")
        _command(signals, ["git", "checkout", "-q", "--detach", point.commit], clone, env, "git checkout")
        if point.project:
            cache = _command(signals, [dvc, "cache", "dir"], Path(point.project), env, "dvc cache dir").strip()
        else:
            cache = str(parent / "cache")  # kept between this machine's points: data is pulled once
        _command(signals, [dvc, "cache", "dir", "--local", cache], clone, env, "dvc cache dir")
        run = [dvc, "exp", "run", "-n", point.name, *(a for s in point.settings for a in ("-S", s))]
        output = _command(signals, run if point.project else [*run, "--pull"], clone, env, "dvc exp run")
        metrics = _metrics(clone)
        signals.publishing = True  # from here on the point is published whole: SIGTERM waits
        remote = ["-r", point.dvc_remote] if point.dvc_remote else []
        if not point.project:
            _command(signals, [dvc, "push", "--run-cache", *remote], clone, env, "dvc push")
        _command(
            signals, [dvc, "exp", "push", "--force", "--no-cache", "origin", point.name], clone, env, "dvc exp push"
        )
        status = "restored" if _was_restored(output) else "done"
        seconds = time.monotonic() - started
        return Result(point.name, status, metrics=metrics, host=socket.gethostname(), seconds=seconds)
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def main() -> None:
    signals = _Signals()
    point = Point(**json.loads(sys.stdin.read()))
    try:
        result = execute(point, signals)
    except PointFailed as e:
        result = Result(point.name, "failed", str(e), host=socket.gethostname())
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()

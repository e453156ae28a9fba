"""`fmnist-sweep` on real processes on loopback, as a team runs it: `dask scheduler` and two
`dask worker`s (one started with `--resources GPU=1`), a bare git origin, a DVC remote directory
and an `mlflow server`; plus the embedded default (a LocalCluster, results straight in the project).
One project, cluster and server for the whole module; tiny data, one epoch per point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import (
    BIN,
    DVC,
    all_runs,
    cli_env,
    client_for,
    free_port,
    git_commit_all,
    make_project,
    mlflow_server,
    run,
    run_git,
    runs,
    shrunk_params,
)

pytestmark = pytest.mark.slow
SWEEP = str(BIN / "fmnist-sweep")
REGISTERED = "fashion-mnist-softmax"


def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    with open(log, "w") as out:  # a session of its own: stopped, with its children, by its PID
        return subprocess.Popen(cmd, env=cli_env(**env), stdout=out, stderr=out, start_new_session=True)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)


def wait_for_workers(scheduler: str, count: int, seconds: float = 60) -> None:
    from distributed import Client

    with Client(scheduler, timeout="10s") as client:
        client.wait_for_workers(count, timeout=seconds)


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_source):
    """A pushed project (git origin + DVC remote), an MLflow server and a two-worker cluster."""
    home = tmp_path_factory.mktemp("sweep-team")
    source, sums = tiny_source
    origin, storage = home / "origin.git", home / "dvc-storage"
    storage.mkdir()
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], home)
    # A weak baseline (tiny lr) is the first champion, so the sweep's best must take it over.
    project = make_project(home / "project", shrunk_params(source, lr=0.0001), sums)
    run(["git", "remote", "add", "origin", str(origin)], project)
    run([DVC, "remote", "add", "-d", "storage", str(storage)], project)
    with mlflow_server(f"sqlite:///{home / 'mlflow.db'}", home / "artifacts") as url:
        run([DVC, "repro"], project, MLFLOW_TRACKING_URI=url)
        git_commit_all(project, "pipeline run, team storage")
        run(["git", "push", "-q", "origin", "main"], project)
        run([DVC, "push", "--run-cache"], project)
        port = free_port()
        scheduler = f"tcp://127.0.0.1:{port}"
        procs = [start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                        "--no-dashboard"], home / "scheduler.log")]  # fmt: skip
        workers = {}
        for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
            tmp = home / f"worker-{name}"
            tmp.mkdir()
            cmd = [str(BIN / "dask"), "worker", scheduler, "--nthreads", "1", "--name", name, "--no-dashboard", *extra]
            workers[name] = start(cmd, home / f"{name}.log", MLFLOW_TRACKING_URI=url, TMPDIR=str(tmp))
        procs += workers.values()
        try:
            wait_for_workers(scheduler, 2)
            yield SimpleNamespace(home=home, project=project, origin=origin, url=url, scheduler=scheduler,
                                  workers=workers)  # fmt: skip
        finally:
            for proc in reversed(procs):
                stop(proc)


def sweep(project: Path, *args: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = run([SWEEP, *args], project, check=check, timeout=300, **env)
    return proc


def table(output: str) -> dict[str, dict]:
    """The final table: point name -> its row."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("point "))
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith(("best:", "failed:")):
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(header, cells, strict=False))
    return rows


def fresh_clone_experiments(team, dest: Path) -> dict[str, dict]:
    """What a teammate sees: a new clone, `dvc exp pull`, `dvc exp show`."""
    run(["git", "clone", "-q", str(team.origin), str(dest)], dest.parent)
    run([DVC, "exp", "pull", "origin"], dest)
    shown = json.loads(run([DVC, "exp", "show", "--json"], dest).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            metrics = rev["data"]["metrics"]["reports/eval/metrics.json"]["data"]
            found[exp["name"]] = {"params": rev["data"]["params"]["params.yaml"]["data"], **metrics}
    return found


def test_grid_on_cluster_lands_in_a_fresh_clone_and_mlflow(team, tmp_path):
    # Two keys, one point per worker (the grid's product itself is test_sweep_space's).
    proc = sweep(team.project, "--scheduler", team.scheduler, "-S", "lr=0.02,0.5", "-S", "batch_size=32",
                 MLFLOW_TRACKING_URI=team.url)  # fmt: skip
    rows = table(proc.stdout)
    names = {"lr0.02-bs32", "lr0.5-bs32"}
    assert set(rows) == names and {r["status"] for r in rows.values()} == {"done"}, proc.stdout
    best = max(names, key=lambda n: float(rows[n]["test_acc"]))
    assert f"take it: dvc exp apply {next(iter(rows))}" in proc.stdout
    assert float(rows[next(iter(rows))]["test_acc"]) == float(rows[best]["test_acc"])  # best first

    found = fresh_clone_experiments(team, tmp_path / "teammate")
    assert names <= set(found)
    assert found["lr0.5-bs32"]["params"]["lr"] == 0.5 and found["lr0.5-bs32"]["params"]["batch_size"] == 32
    assert abs(found[best]["test_acc"] - float(rows[best]["test_acc"])) < 1e-4
    listed = run([DVC, "exp", "ls", "--name-only"], team.project).stdout.split()  # pulled into the workspace
    assert names <= set(listed)

    client = client_for(team.url)
    swept = [r for r in all_runs(client) if r.data.tags.get("sweep.trial") in names]
    assert sorted(r.info.run_name for r in swept) == sorted(names)
    assert {r.info.status for r in swept} == {"FINISHED"}
    assert len({r.data.tags["sweep.name"] for r in swept}) == 1
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    baseline = next(r for r in all_runs(client) if r.info.run_name.startswith("repro-"))
    assert baseline.data.metrics["test_acc"] < float(rows[best]["test_acc"])
    assert champion.run_id in {r.info.run_id for r in swept}
    assert client.get_run(champion.run_id).data.metrics["test_acc"] == max(r.data.metrics["test_acc"] for r in swept)
    assert "champion: " in proc.stdout


def test_cuda_point_goes_to_the_gpu_worker(team):
    proc = sweep(team.project, "--scheduler", team.scheduler, "-S", "device=cuda", "-S", "lr=0.03,0.04", check=False,
                 MLFLOW_TRACKING_URI=team.url)  # fmt: skip
    rows = table(proc.stdout)
    # No CUDA on this machine, so the point fails in training; what matters is where it ran.
    assert {r["worker"] for r in rows.values()} == {"gpu"}, proc.stdout
    assert proc.returncode != 0 and "failed" in proc.stderr


def test_search_is_seeded_and_resumes(team):
    space = ["-S", "lr=tag(log, interval(0.01, 1))", "-S", "batch_size=choice(32,64)"]
    storage = f"sqlite:///{team.home / 'optuna.db'}"
    common = ["--scheduler", team.scheduler, "--trials", "2", "--seed", "7", "--storage", storage, *space]
    first = sweep(team.project, *common, "--study", "first", MLFLOW_TRACKING_URI=team.url)
    second = sweep(team.project, *common, "--study", "second", MLFLOW_TRACKING_URI=team.url)
    assert "maximizing test_acc" in first.stdout

    import optuna

    def suggested(study):
        return [t.params for t in sorted(optuna.load_study(study_name=study, storage=storage).trials,
                                         key=lambda t: t.number)]  # fmt: skip

    assert suggested("first") == suggested("second") and len(suggested("first")) == 2
    assert set(table(first.stdout)) == {"first-0", "first-1"}
    # The same params again: every point restored from the run-cache, no training.
    assert {r["status"] for r in table(second.stdout).values()} == {"restored"}, second.stdout
    again = sweep(team.project, *common, "--study", "first", MLFLOW_TRACKING_URI=team.url, check=False)
    assert "resuming, 2 of 2 trials already run" in again.stdout


def test_unreachable_scheduler_and_uncommitted_changes_fail_fast(team):
    started = time.monotonic()
    proc = sweep(team.project, "--scheduler", f"tcp://127.0.0.1:{free_port()}", "-S", "lr=0.1", check=False)
    assert proc.returncode != 0 and "error: Dask scheduler tcp://127.0.0.1:" in proc.stderr
    assert "unreachable" in proc.stderr.splitlines()[-1] and time.monotonic() - started < 30
    nowhere = team.home / "nowhere"
    run(["git", "remote", "set-url", "origin", str(nowhere)], team.project)
    try:
        proc = sweep(team.project, "--scheduler", team.scheduler, "-S", "lr=0.1", check=False)
        assert proc.stderr.splitlines()[-1].startswith(f"error: git remote origin ({nowhere}) is unreachable")
    finally:
        run(["git", "remote", "set-url", "origin", str(team.origin)], team.project)
    run([DVC, "remote", "modify", "--local", "storage", "url", str(nowhere)], team.project)
    try:
        proc = sweep(team.project, "--scheduler", team.scheduler, "-S", "lr=0.1", check=False)
        expected = f"error: DVC remote storage ({nowhere}) is unreachable: no such directory"
        assert proc.stderr.splitlines()[-1] == expected
    finally:
        (team.project / ".dvc" / "config.local").unlink()
    proc = sweep(team.project, "-S", "lr=abc", check=False)
    assert proc.stderr.splitlines()[-1].startswith("error: point lr=abc: params.yaml: lr: 'abc' is not allowed")
    params = team.project / "params.yaml"
    params.write_text(params.read_text() + "\n")
    try:
        proc = sweep(team.project, "-S", "lr=0.1", check=False)
        assert proc.stderr.splitlines()[-1].startswith("error: uncommitted changes in params.yaml")
    finally:
        run(["git", "checkout", "params.yaml"], team.project)


def test_local_default_lands_in_the_project(team):
    """No scheduler: a LocalCluster; results in this project's experiments and MLflow store. The
    commit's own params (lr 0.0001, 1 epoch, run by the fixture's `dvc repro`) are not trained again."""
    proc = sweep(team.project, "-S", "lr=0.05,0.2,0.0001", "-S", "num_epochs=1", "--workers", "2")
    assert "LocalCluster of 2 worker(s)" in proc.stdout
    statuses = {name: r["status"] for name, r in table(proc.stdout).items()}
    assert statuses["lr0.0001-ep1"] == "restored", proc.stdout
    assert set(statuses.values()) == {"done", "restored"}, proc.stdout
    listed = run([DVC, "exp", "ls", "--name-only"], team.project).stdout.split()
    assert {"lr0.05-ep1", "lr0.2-ep1"} <= set(listed)
    local = {r.info.run_name: r.info.status for r in runs(team.project)}
    trained = [name for name, status in statuses.items() if status == "done"]
    assert local == dict.fromkeys(trained, "FINISHED")
    assert not list((team.project / ".dvc" / "tmp" / "sweep").glob("lr*"))  # clones removed


def test_killed_worker_has_its_point_rerun_elsewhere(team):
    args = [SWEEP, "--scheduler", team.scheduler, "-S", "lr=0.011,0.012", "-S", "num_epochs=2"]
    with open(team.home / "killed-sweep.log", "w") as log:
        proc = subprocess.Popen(args, cwd=team.project, env=cli_env(MLFLOW_TRACKING_URI=team.url), stdout=log,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    clones = team.home / "worker-cpu" / "fmnist-sweep"
    deadline = time.monotonic() + 120
    while not any(p.is_dir() and p.name.startswith("lr") for p in clones.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # mid-point: cloned, `dvc exp run` under way
    stop(team.workers["cpu"], signal.SIGKILL)
    proc.wait(timeout=240)
    output = (team.home / "killed-sweep.log").read_text()
    rows = table(output)
    assert proc.returncode == 0, output
    assert set(rows) == {"lr0.011-ep2", "lr0.012-ep2"} and {r["worker"] for r in rows.values()} == {"gpu"}
    assert re.search(r"rerun: lr0\.01[12]-ep2 on gpu: cpu went away mid-point", output), output
    time.sleep(2)
    client = client_for(team.url)
    assert not [r.info.run_name for r in all_runs(client) if r.info.status == "RUNNING"]
    assert sys.executable  # the sweep ran from this venv's console script
    shown = run_git(team.project, "for-each-ref", "refs/exps")
    assert "lr0.011-ep2" in shown and "lr0.012-ep2" in shown

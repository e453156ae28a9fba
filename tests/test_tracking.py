"""MLflow tracking end to end: real `dvc` runs, a real SQLite store, real `mlflow server`s."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    DVC,
    TRAIN,
    all_runs,
    artifact_paths,
    client_for,
    free_port,
    mlflow_server,
    postgres,
    run,
    run_git,
)

pytestmark = pytest.mark.slow
ARTIFACTS = {
    "history.json",
    "evaluation/metrics.json",
    "evaluation/classification_report.txt",
    "evaluation/classification_report.json",
    "evaluation/confusion.json",
    "evaluation/curves.png",
    "evaluation/confusion.png",
    "evaluation/misclassified.png",
}


def check_complete_run(client, project: Path, run, lr: float):
    assert run.info.status == "FINISHED"
    assert float(run.data.params["lr"]) == lr and run.data.params["batch_size"] == "64"
    assert run.data.tags["git.commit"] == run_git(project, "rev-parse", "HEAD")
    assert len(run.data.tags["data.sha256"]) == 64
    assert {"test_acc", "test_loss", "f1_macro", "f1_weighted", "epoch/train_loss", "epoch/train_acc"} <= set(
        run.data.metrics
    )
    curve = client.get_metric_history(run.info.run_id, "epoch/train_loss")
    assert [m.step for m in curve] == list(range(1, int(run.data.params["num_epochs"]) + 1))
    assert artifact_paths(client, run.info.run_id) >= ARTIFACTS


def test_a_run_holds_params_curves_reports_and_a_loadable_model(tiny_project):
    import mlflow
    import torch

    from stages.data import load_split
    from stages.model import load_checkpoint

    (tiny_project / "params.yaml").write_text(
        (tiny_project / "params.yaml").read_text().replace("num_epochs: 1", "num_epochs: 2")
    )
    run([DVC, "repro"], tiny_project)
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    client = client_for(uri)
    (only,) = all_runs(client)
    check_complete_run(client, tiny_project, only, lr=0.1)
    model_md5 = json.loads((tiny_project / "reports/train/run.json").read_text())["model_md5"]
    assert only.data.tags["dvc.model_md5"] == model_md5
    assert only.data.tags["git.dirty"] == "true"  # params.yaml was edited above

    (version,) = client.search_model_versions("name='fashion-mnist-softmax'")
    assert version.run_id == only.info.run_id
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/fashion-mnist-softmax@champion")
    images, _ = load_split(tiny_project / "data/fashion-mnist", "test")
    batch = images[:5].astype(np.float32) / 255
    probabilities = served.predict(batch)
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    model, _ = load_checkpoint(tiny_project / "models/model.pt")
    with torch.no_grad():
        ours = model(torch.from_numpy(batch)).argmax(1).numpy()
    np.testing.assert_array_equal(probabilities.argmax(1), ours)


def test_queued_grid_sweep_with_two_workers_and_temp_runs_land_in_the_root_store(tiny_project):
    """The README's grid search, shrunk: 2 x 2 points on DVC's queue with two workers."""
    run([DVC, "exp", "run", "--queue", "-S", "lr=0.01,0.05", "-S", "batch_size=32,64"], tiny_project)
    run([DVC, "queue", "start", "-j", "2"], tiny_project)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run([DVC, "queue", "status"], tiny_project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 4, status
    run([DVC, "exp", "run", "--temp", "-S", "lr=0.2"], tiny_project)

    client = client_for(f"sqlite:///{tiny_project / 'mlflow.db'}")
    runs = all_runs(client)
    points = sorted((float(r.data.params["lr"]), int(r.data.params["batch_size"])) for r in runs)
    assert points == [(0.01, 32), (0.01, 64), (0.05, 32), (0.05, 64), (0.2, 64)]
    shown = json.loads(run([DVC, "exp", "show", "--json"], tiny_project).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {e["name"] for e in experiments}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.info.run_name in names and r.data.tags["dvc.exp_name"] == r.info.run_name
        assert artifact_paths(client, r.info.run_id) >= ARTIFACTS
        assert r.info.artifact_uri.startswith((tiny_project / "mlruns").as_uri())
        assert "test_acc" in r.data.metrics
    shutil.rmtree(tiny_project / ".dvc" / "tmp", ignore_errors=True)  # the copies are gone; the runs stay
    assert len(list((tiny_project / "mlruns").rglob("artifacts/evaluation/metrics.json"))) == 5

    # Compare: sorted by test accuracy, and the training curves of two points overlaid.
    table = run([DVC, "exp", "show", "--csv", "--sort-by", "test_acc", "--sort-order", "desc"], tiny_project).stdout
    assert "test_acc" in table.splitlines()[0] and len(table.splitlines()) >= 6
    first, second = sorted(names)[:2]
    plots = json.loads(run([DVC, "plots", "diff", first, second, "--json"], tiny_project).stdout)
    curves = plots["data"]["Training curves"]
    revisions = {rev for item in curves for rev in item["revisions"]}
    assert {first, second} <= revisions


def test_dvc_from_a_subdirectory_uses_the_same_store(tiny_project):
    (tiny_project / "reports").mkdir()
    run([DVC, "repro", "../dvc.yaml"], tiny_project / "reports")
    assert len(all_runs(client_for(f"sqlite:///{tiny_project / 'mlflow.db'}"))) == 1
    assert not (tiny_project / "reports" / "mlflow.db").exists()


def test_tracking_server_with_sqlite_backend_and_proxied_artifacts(tiny_project, tmp_path):
    artifacts = tmp_path / "server-artifacts"
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", artifacts) as url:
        run([DVC, "repro"], tiny_project, MLFLOW_TRACKING_URI=url)
        client = client_for(url)
        (only,) = all_runs(client)
        check_complete_run(client, tiny_project, only, lr=0.1)
        assert only.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (tiny_project / "mlflow.db").exists() and not (tiny_project / "mlruns").exists()
    assert list(artifacts.rglob("classification_report.txt"))


def test_tracking_server_with_postgresql_backend(tiny_project, tmp_path):
    with postgres() as backend, mlflow_server(backend, tmp_path / "artifacts") as url:
        run([DVC, "repro"], tiny_project, MLFLOW_TRACKING_URI=url)
        client = client_for(url)
        (only,) = all_runs(client)
        check_complete_run(client, tiny_project, only, lr=0.1)


def test_unreachable_server_fails_within_seconds_and_touches_nothing(tiny_project):
    run([DVC, "repro", "download"], tiny_project)
    model = tiny_project / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"previous model")
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run(TRAIN, tiny_project, check=False, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: MLflow tracking store {uri} is not usable")
    assert time.monotonic() - start < 60  # imports included; MLflow's own retries would take minutes
    assert model.read_bytes() == b"previous model"
    assert not (tiny_project / "reports" / "train" / "history.json").exists()


# --- what the UI shows: honest curves, provenance, names, model metrics, the champion -----------


def test_a_plain_repro_in_a_clean_clone_is_clean_named_sourced_and_honest(tiny_project, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(tiny_project), str(clone)], tmp_path)
    run([DVC, "repro"], clone)
    client = client_for(f"sqlite:///{clone / 'mlflow.db'}")
    (first,) = all_runs(client)
    commit = run_git(clone, "rev-parse", "HEAD")
    tags = first.data.tags
    assert tags["git.dirty"] == "false"  # DVC deleted and rewrote the outputs; the code is the commit's
    assert re.fullmatch(rf"repro-{commit[:7]}-lr0\.1-bs64-ep1-[0-9a-f]{{6}}", first.info.run_name)
    assert tags["mlflow.source.git.commit"] == commit and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "stages/train.py" and tags["mlflow.user"]

    # Curves at steps 1..N when each was logged; the final evaluation under metrics.json's keys.
    start, end = first.info.start_time, first.info.end_time
    for key in ("epoch/train_loss", "epoch/train_acc", "epoch/test_acc"):
        history = client.get_metric_history(first.info.run_id, key)
        assert [m.step for m in history] == [1] and all(start <= m.timestamp <= end for m in history)
    final = json.loads((clone / "reports/eval/metrics.json").read_text())
    assert set(final) <= set(first.data.metrics) and "train_loss" not in first.data.metrics
    (test_acc,) = client.get_metric_history(first.info.run_id, "test_acc")
    assert test_acc.value == pytest.approx(final["test_acc"]) and test_acc.timestamp >= start

    # The Models tab and the registered version show the test metrics.
    (logged,) = client.search_logged_models([first.info.experiment_id])
    assert {m.key: m.value for m in logged.metrics}["test_acc"] == pytest.approx(final["test_acc"])
    (version,) = client.search_model_versions("name='fashion-mnist-softmax'")
    assert float(version.tags["test_acc"]) == pytest.approx(final["test_acc"], abs=1e-4)

    experiment = client.get_experiment(first.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    assert "README" in experiment.tags["mlflow.note.content"]

    train_py = clone / "stages" / "train.py"
    train_py.write_text(train_py.read_text() + "# an uncommitted edit\n")
    run([DVC, "repro"], clone)
    second = next(r for r in all_runs(client) if r.info.run_id != first.info.run_id)
    assert second.data.tags["git.dirty"] == "true" and f"{commit[:7]}+dirty" in second.info.run_name


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias("fashion-mnist-softmax", "champion").version)


def test_the_champion_moves_only_on_improvement_and_by_hand(tiny_project):
    client = client_for(f"sqlite:///{tiny_project / 'mlflow.db'}")
    lines = {}
    for name, lr in (("weak", "0.001"), ("strong", "0.1"), ("weak-again", "0.0011")):
        out = run([DVC, "exp", "run", "-n", name, "-S", f"lr={lr}"], tiny_project).stdout
        (lines[name],) = [line for line in out.splitlines() if line.startswith("champion:")]
        lines[name] += f"  -> @champion is version {champion_version(client)}"
    accuracy = {r.info.run_name: r.data.metrics["test_acc"] for r in all_runs(client)}
    assert accuracy["weak"] < accuracy["strong"] and accuracy["weak-again"] < accuracy["strong"], accuracy
    assert "version 1" in lines["weak"] and "is the first champion" in lines["weak"]
    assert "version 2" in lines["strong"] and "champion moved to version 2" in lines["strong"]
    assert "version 3" in lines["weak-again"] and "champion stays version 2" in lines["weak-again"]
    assert [line.rsplit(" ", 1)[1] for line in lines.values()] == ["1", "2", "2"], lines

    promote = ["python", "-m", "stages.promote"]
    out = run([*promote, "weak"], tiny_project).stdout  # roll back, by DVC experiment name
    assert champion_version(client) == "1" and "version 1 (run weak" in out and "was version 2" in out
    strong_id = next(r.info.run_id for r in all_runs(client) if r.info.run_name == "strong")
    run([*promote, strong_id], tiny_project)  # promote, by MLflow run id
    assert champion_version(client) == "2"
    proc = run([*promote, "no-such-exp"], tiny_project, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: 'no-such-exp': neither an MLflow run id nor a DVC experiment name in "
        f"sqlite:///{tiny_project / 'mlflow.db'}"
    ]
    assert champion_version(client) == "2"


def test_a_run_left_running_by_a_killed_process_is_marked_failed_by_the_next_stage(tiny_project):
    client = client_for(f"sqlite:///{tiny_project / 'mlflow.db'}")
    experiment_id = client.create_experiment("fashion-mnist-softmax", (tiny_project / "mlruns").as_uri())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = {"process.host": socket.gethostname()}
    # What SIGKILL leaves behind: a RUNNING run whose process no longer exists.
    zombie = client.create_run(experiment_id, run_name="killed", tags={**here, "process.pid": gone.stdout.strip()})
    alive = client.create_run(experiment_id, run_name="alive", tags={**here, "process.pid": str(os.getpid())})
    out = run([DVC, "repro"], tiny_project).stdout
    assert (
        f"marked MLflow run killed ({zombie.info.run_id}) FAILED: its process {gone.stdout.strip()} "
        f"on {socket.gethostname()} is gone"
    ) in out.splitlines()
    assert client.get_run(zombie.info.run_id).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"

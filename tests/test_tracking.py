"""MLflow tracking end to end: real `dvc` runs, a real SQLite store, real `mlflow server`s."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from stages.data import CLASSES
from tests.helpers import (
    DVC,
    all_runs,
    artifact_paths,
    client_for,
    free_port,
    mlflow_server,
    postgres,
    run,
    run_git,
    stage_command,
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
    (tiny_project / "reports").mkdir()  # run from a subdirectory: the store is still the project's
    run([DVC, "repro", "../dvc.yaml"], tiny_project / "reports")
    assert not (tiny_project / "reports" / "mlflow.db").exists()
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
    answer = served.predict(batch)  # a row per image, a column per class by name
    assert list(answer.columns) == list(CLASSES)
    probabilities = answer.to_numpy()
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    model, _ = load_checkpoint(tiny_project / "models/model.pt")
    with torch.no_grad():
        ours = model(torch.from_numpy(batch)).argmax(1).numpy()
    np.testing.assert_array_equal(probabilities.argmax(1), ours)


def test_queued_grid_sweep_with_two_workers_and_temp_runs_land_in_the_root_store(tiny_project):
    """The README's grid search, shrunk: 2 x 1 points on DVC's queue with two workers."""
    run([DVC, "exp", "run", "--queue", "-S", "lr=0.01,0.05", "-S", "batch_size=32"], tiny_project)
    run([DVC, "queue", "start", "-j", "2"], tiny_project)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run([DVC, "queue", "status"], tiny_project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    run([DVC, "exp", "run", "--temp", "-S", "lr=0.2"], tiny_project)

    client = client_for(f"sqlite:///{tiny_project / 'mlflow.db'}")
    runs = all_runs(client)
    points = sorted((float(r.data.params["lr"]), int(r.data.params["batch_size"])) for r in runs)
    assert points == [(0.01, 32), (0.05, 32), (0.2, 64)]
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
    assert len(list((tiny_project / "mlruns").rglob("artifacts/evaluation/metrics.json"))) == 3

    # Compare: sorted by test accuracy, and the training curves of two points overlaid.
    table = run([DVC, "exp", "show", "--csv", "--sort-by", "test_acc", "--sort-order", "desc"], tiny_project).stdout
    assert "test_acc" in table.splitlines()[0] and len(table.splitlines()) >= 5
    first, second = sorted(names)[:2]
    plots = json.loads(run([DVC, "plots", "diff", first, second, "--json"], tiny_project).stdout)
    curves = plots["data"]["Training curves"]
    revisions = {rev for item in curves for rev in item["revisions"]}
    assert {first, second} <= revisions


def test_tracking_server_with_postgresql_backend_and_proxied_artifacts(tiny_project, tmp_path):
    artifacts = tmp_path / "server-artifacts"
    with postgres() as backend, mlflow_server(backend, artifacts) as url:
        run([DVC, "repro"], tiny_project, MLFLOW_TRACKING_URI=url)
        client = client_for(url)
        (only,) = all_runs(client)
        check_complete_run(client, tiny_project, only, lr=0.1)
        assert only.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (tiny_project / "mlflow.db").exists() and not (tiny_project / "mlruns").exists()
    assert list(artifacts.rglob("classification_report.txt"))


def test_unreachable_server_fails_within_seconds_and_touches_nothing(tiny_project):
    run([DVC, "repro", "download"], tiny_project)
    model = tiny_project / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"previous model")
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run(stage_command("train"), tiny_project, check=False, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: MLflow tracking store {uri} is not usable")
    assert time.monotonic() - start < 60  # imports included; MLflow's own retries would take minutes
    assert model.read_bytes() == b"previous model"
    assert not (tiny_project / "reports" / "train" / "history.json").exists()

"""What a run says in the MLflow UI is true: its name, source, curves and model metrics, the
champion alias, and runs left RUNNING by a killed process. Real `dvc` runs, a real SQLite store."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.helpers import DVC, all_runs, client_for, run, run_git

pytestmark = pytest.mark.slow


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
        f"error: 'no-such-exp': no model by that name: not a DVC experiment in {tiny_project}, nor a registered "
        f"version or alias of fashion-mnist-softmax, an MLflow run id or a model md5 in "
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

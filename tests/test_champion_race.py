"""The champion rule under evaluations at once: several processes, each the end of an evaluation
(its version tagged with its test_acc, then the rule), race on one real `mlflow server`. Whatever
the interleaving, the alias must end on the best version."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

from tests.helpers import client_for, mlflow_server

pytestmark = pytest.mark.slow
MODEL = "fashion-mnist-softmax"
RACERS = 3
ROUNDS = 4

# One evaluation's last step, as stages/tracking/runs.py does it: the version is tagged already;
# wait for the common start time so that the processes meet the server together, then the rule.
RACER = """
import sys, time
import mlflow
from stages.tracking.champion import consider_champion
url, version, accuracy, start = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
client = mlflow.MlflowClient(url)
v = client.get_model_version("fashion-mnist-softmax", version)
time.sleep(max(0.0, start - time.time()))
print(consider_champion(client, v, accuracy))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("race-server")
    with mlflow_server(f"sqlite:///{home / 'mlflow.db'}", home / "artifacts") as url:
        yield url


def evaluated_version(client, experiment_id: str, accuracy: float) -> str:
    """A registered version whose run holds `accuracy` as test_acc, tagged as evaluate tags it."""
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "test_acc", accuracy)
    client.set_terminated(run_id, "FINISHED")
    version = client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id=run_id).version
    client.set_model_version_tag(MODEL, version, "test_acc", f"{accuracy:.4f}")
    return str(version)


def test_concurrent_evaluations_leave_the_champion_on_the_best_version(server):
    client = client_for(server)
    client.create_registered_model(MODEL)
    experiment_id = client.create_experiment("race")
    rng = random.Random(0)
    best_so_far = -1.0
    for round_ in range(ROUNDS):
        # Distinct accuracies, in a random order of registration; some rounds below the champion.
        accuracies = rng.sample([0.70, 0.75, 0.80, 0.85, 0.90, 0.95][: RACERS + 3], RACERS)
        versions = {evaluated_version(client, experiment_id, acc): acc for acc in accuracies}
        start = time.time() + 8  # time for every racer to import mlflow first
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, server, v, str(acc), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for v, acc in versions.items()
        ]
        outputs = [proc.communicate(timeout=180) for proc in racers]
        failed = [err[-2000:] for proc, (_, err) in zip(racers, outputs, strict=True) if proc.returncode != 0]
        assert not failed, failed
        best_so_far = max(best_so_far, *accuracies)
        champion = client.get_model_version_by_alias(MODEL, "champion")
        accuracy = float(champion.tags["test_acc"])
        assert accuracy == pytest.approx(best_so_far), (round_, versions, [out for out, _ in outputs])
        lines = [out.strip() for out, _ in outputs]
        assert all(line.startswith("champion: ") for line in lines), lines

"""End to end: the real `dvc` CLI on a copy of the project in a temporary git repo."""

import json

import pytest

from tests.helpers import DVC, REAL_DATA, lock_md5, make_project, ran, restored, run, shrunk_params, skipped

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_source):
    """One project through `dvc repro`, shared by the tests that go on from there with experiments
    (each leaves the workspace as `dvc exp run` does: up to date with its own params)."""
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project", shrunk_params(source), sums)
    return project, run([DVC, "repro"], project).stdout


def test_repro_experiment_and_nothing_to_do(reproduced):
    tiny_project, first = reproduced
    assert ran(first) == {"check_params", "download", "train", "evaluate"}
    metrics = json.loads((tiny_project / "reports/eval/metrics.json").read_text())
    assert {"test_loss", "test_acc", "f1_macro", "f1_weighted", "precision_macro", "recall_weighted"} <= set(metrics)
    report = json.loads((tiny_project / "reports/eval/classification_report.json").read_text())
    assert "Ankle boot" in report and "T-shirt/top" in report
    model_md5 = lock_md5(tiny_project, "train", "models/model.pt")

    experiment = run([DVC, "exp", "run", "-S", "lr=0.05"], tiny_project).stdout
    assert "download" in skipped(experiment)
    assert {"train", "evaluate"} <= ran(experiment) and "download" not in ran(experiment)

    again = run([DVC, "repro"], tiny_project).stdout
    assert ran(again) == set(), again

    shown = json.loads(run([DVC, "exp", "show", "--json"], tiny_project).stdout)
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    lrs = {e["revs"][0]["data"]["params"]["params.yaml"]["data"]["lr"] for e in experiments}
    assert 0.05 in lrs
    accs = [e["revs"][0]["data"]["metrics"]["reports/eval/metrics.json"]["data"]["test_acc"] for e in experiments]
    assert all(0 <= acc <= 1 for acc in accs)

    # Back to a param set already run: restored from DVC's run-cache, nothing trains.
    back = run([DVC, "exp", "run", "-S", "lr=0.1"], tiny_project).stdout
    assert restored(back) == {"train", "evaluate"} and ran(back) == {"check_params"}, back
    assert lock_md5(tiny_project, "train", "models/model.pt") == model_md5
    assert json.loads((tiny_project / "reports/train/run.json").read_text())["model_md5"] == model_md5
    # Training again with the same params leaves dvc.lock as it was: test_determinism's contract test.


def test_each_key_reruns_only_what_reads_it(reproduced):
    tiny_project, _ = reproduced
    evaluation_only = run([DVC, "exp", "run", "-S", "evaluate.misclassified_grid=6"], tiny_project).stdout
    assert ran(evaluation_only) == {"check_params", "evaluate"}
    # A data-source key reruns download; the same bytes come out, so nothing downstream reruns.
    data_source = run([DVC, "exp", "run", "-S", "data.timeout_s=10"], tiny_project).stdout
    assert ran(data_source) == {"check_params", "download"}
    assert {"train", "evaluate"} <= skipped(data_source)


def test_misspelt_key_fails_the_pipeline(tiny_project):
    proc = run([DVC, "exp", "run", "-S", "+lrr=0.05"], tiny_project, check=False)
    assert proc.returncode != 0
    assert "unknown key 'lrr' (did you mean 'lr'?)" in proc.stdout + proc.stderr
    assert not (tiny_project / "models" / "model.pt").exists()


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_real_fashion_mnist_one_epoch(tmp_path):
    project = make_project(tmp_path / "project", shrunk_params(REAL_DATA, batch_size=256))
    run([DVC, "repro"], project)
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    history = json.loads((project / "reports/train/history.json").read_text())
    assert len(history) == 1
    assert 0.70 < metrics["test_acc"] < 0.85  # the book's first epoch lands near 0.75-0.79
    assert metrics["test_acc"] == pytest.approx(history[0]["test_acc"])


def test_early_stopping_experiment_keeps_its_best_epoch_and_plots(reproduced):
    tiny_project, _ = reproduced
    overrides = ["val_size=100", "patience=2", "num_epochs=40", "lr=3"]
    run([DVC, "exp", "run", *[arg for o in overrides for arg in ("-S", o)]], tiny_project)
    info = json.loads((tiny_project / "reports/train/run.json").read_text())
    history = json.loads((tiny_project / "reports/train/history.json").read_text())
    val = [row["val_acc"] for row in history]
    assert info["epochs_run"] == len(history) < 40
    assert info["kept_epoch"] == val.index(max(val)) + 1
    assert all(row["test_acc"] is None for row in history)  # the test set waits for evaluate
    plots = json.loads(run([DVC, "plots", "show", "--json"], tiny_project).stdout)
    assert not plots.get("errors") and plots["data"]["Training curves"]

"""From any name of a model back to its making, and a rebuild that proves it: `fmnist-lineage` and
`fmnist-reproduce` on one shared project with real `dvc` runs: a plain repro, a clean experiment,
one restored from the run-cache, and one made with uncommitted code."""

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import DVC, client_for, lock_md5, make_project, run, run_git, runs, shrunk_params, store_uri

pytestmark = pytest.mark.slow
LINEAGE = ["python", "-m", "stages.lineage"]
REPRODUCE = ["python", "-m", "stages.reproduce"]
MODEL = "fashion-mnist-softmax"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_source) -> Path:
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("lineage") / "project", shrunk_params(source), sums)
    run([DVC, "repro"], project)  # version 1: a plain repro of the commit
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "Record the book's run"], project)
    run([DVC, "exp", "run", "-n", "bigger", "-S", "lr=0.05"], project)  # version 2: a clean experiment
    out = run([DVC, "exp", "run", "-n", "withy-chum", "-S", "lr=0.1"], project).stdout  # version 1's params again
    assert "Stage 'train' is cached - skipping run" in out  # restored: no command ran, no MLflow run of its own
    train_py = project / "stages" / "train.py"
    train_py.write_text(train_py.read_text() + "# an uncommitted edit\n")
    run([DVC, "exp", "run", "-n", "edited", "-S", "lr=0.07"], project)  # version 3: code differs from the baseline
    run(["git", "checkout", "--", "."], project)
    return project


def lineage(project: Path, name: str) -> str:
    return run([*LINEAGE, name], project).stdout


def test_every_name_leads_to_the_chain(project):
    commit = run_git(project, "rev-parse", "HEAD~1")  # what the plain repro ran on
    baseline = run_git(project, "rev-parse", "HEAD")
    md5 = lock_md5(project, "train", "models/model.pt")
    plain = lineage(project, "1")
    assert f"registered  {MODEL} version 1 @champion" in plain
    assert f"git commit  {commit} (clean)" in plain and "a plain `dvc repro`" in plain
    assert f"params      as in params.yaml at {commit[:7]}" in plain and f"model       md5 {md5}" in plain
    assert "metrics     test_acc " in plain and "data        sha256 " in plain
    run_id = next(r.info.run_id for r in runs(project) if r.data.tags["dvc.model_md5"] == md5)
    for name in ("champion", f"models:/{MODEL}@champion", f"models:/{MODEL}/1", run_id, md5):
        assert lineage(project, name) == plain, name

    bigger = lineage(project, "bigger")
    assert f"registered  {MODEL} version 2" in bigger and "MLflow run  bigger (" in bigger
    assert f"git commit  {baseline} (clean)" in bigger  # params differ from the baseline by design: not dirty
    assert "DVC         experiment bigger (" in bigger and f"on baseline {baseline[:7]}" in bigger
    assert f"params      lr=0.05 (was 0.1); the rest as in params.yaml at {baseline[:7]}" in bigger

    restored = lineage(project, "withy-chum")
    assert f"registered  {MODEL} version 1 @champion" in restored and f"model       md5 {md5}" in restored
    assert "experiment withy-chum (" in restored and "restored from DVC's run-cache: trained by run repro-" in restored

    edited = lineage(project, "edited")
    assert f"git commit  {baseline} (dirty: code differed from it)" in edited

    out = run(["python", "-m", "stages.promote", "withy-chum"], project).stdout
    assert out.startswith(f"champion: {MODEL} version 1 (run repro-") and "withy-chum was restored" in out
    proc = run([*LINEAGE, "no-such-model"], project, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: 'no-such-model': no model by that name")


def reproduce(project: Path, name: str, *args: str):
    status, count = run_git(project, "status", "--porcelain"), len(runs(project))
    proc = run([*REPRODUCE, name, *args], project, check=False)
    assert run_git(project, "status", "--porcelain") == status and len(runs(project)) == count  # nothing logged
    return proc


def test_the_champion_by_its_alias_reproduces_bit_for_bit(project):
    """The README's `fmnist-reproduce champion`. Version 1 is also the restored experiment
    withy-chum, and every name of it resolves to the same chain (test_every_name_leads_to_the_chain),
    so this one rebuild stands for them all."""
    md5 = lock_md5(project, "train", "models/model.pt")
    clones = set(Path(tempfile.gettempdir()).glob("fmnist-reproduce-*"))
    proc = reproduce(project, "champion", "--log")
    assert proc.returncode == 0, proc.stderr
    first, *_, verdict = proc.stdout.strip().splitlines()
    assert first.startswith(f"rebuilding {MODEL} version 1 from commit {run_git(project, 'rev-parse', 'HEAD~1')[:7]} ")
    assert verdict.startswith(f"reproduced: {MODEL} version 1 is bit-identical (md5 {md5}), test_acc ")
    assert verdict.endswith(" equal")
    version = client_for(store_uri(project)).get_model_version(MODEL, "1")
    assert version.tags["reproduced"]  # --log: the date
    assert set(Path(tempfile.gettempdir()).glob("fmnist-reproduce-*")) <= clones  # its clone is gone


def test_an_experiment_rebuilds_bit_identical_and_a_model_altered_in_the_store_is_caught(project):
    client = client_for(store_uri(project))
    version = client.get_model_version(MODEL, "2")  # the experiment `bigger`
    experiment_id = client.get_run(version.run_id).info.experiment_id
    (logged,) = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{version.run_id}'")
    weights = Path(logged.artifact_location.removeprefix("file://")) / "artifacts" / "model.pt"
    altered = bytearray(weights.read_bytes())
    altered[len(altered) // 2] ^= 1  # one bit of the weights file changed after registration
    weights.write_bytes(altered)
    proc = reproduce(project, "bigger")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    md5 = client.get_run(version.run_id).data.tags["dvc.model_md5"]
    assert line.startswith(f"error: not reproduced: {MODEL} version 2: the rebuilt model is bit-identical to "
                           f"dvc.model_md5 {md5}, but the model file the MLflow store holds differs")  # fmt: skip


def test_a_run_made_with_uncommitted_code_is_refused_with_its_reason(project):
    proc = reproduce(project, "edited")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot reproduce {MODEL} version 3 exactly: run edited was made from a dirty tree: its code "
        f"differed from commit {run_git(project, 'rev-parse', 'HEAD')[:7]}, and that code is recorded nowhere"
    ]


def test_a_commit_missing_from_the_team_remote_is_refused(project, tmp_path):
    remote = tmp_path / "elsewhere.git"
    run(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    proc = reproduce(project, "1", "--git-remote", str(remote))
    commit = run_git(project, "rev-parse", "HEAD~1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: the recorded commit {commit[:7]} is not in {remote}"]


def test_a_rebuild_that_differs_from_the_record_is_not_reproduced_and_shows_both_md5s(project, tmp_path):
    """Version 1 by its number, in a copy whose store records another md5 for its model (as if the
    training had not been deterministic): the rebuild's bytes differ from the record, exit 1."""
    copy = Path(shutil.copytree(project, tmp_path / "project", symlinks=True))
    client = client_for(store_uri(copy))
    recorded = "0" * 32
    client.set_tag(client.get_model_version(MODEL, "1").run_id, "dvc.model_md5", recorded)
    proc = reproduce(copy, "1")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    rebuilt = lock_md5(project, "train", "models/model.pt")
    assert line.startswith(f"error: not reproduced: {MODEL} version 1: rebuilt md5 {rebuilt}, recorded {recorded}; ")
    assert " equal" in line  # the accuracy matches; the bytes do not

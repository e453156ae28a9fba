"""Evaluate's warm start (stages/warm.py): in a dvc run it runs in the process train forked, with a
fresh process's outputs, MLflow content and messages; anything that changed since train started
sends it to a fresh process; signals reach it; it never outlives its dvc run."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    DVC,
    alive,
    artifact_paths,
    cli_env,
    client_for,
    make_project,
    run,
    runs,
    shrunk_params,
    stage_command,
    store_uri,
)

pytestmark = pytest.mark.slow

GETS_READY = re.compile(r"^warm: process (\d+) gets ready to run evaluate$", re.M)
RUNS_WARM = re.compile(r"^warm: evaluate runs in process (\d+), its modules imported while train trained", re.M)
RUNS_FRESH = re.compile(r"^warm: evaluate runs in a fresh process, not in process (\d+): (.*)$", re.M)
STOPPED = {
    "error: interrupted by SIGTERM; outputs stay the previous complete ones",
    "error: interrupted by SIGTERM after the outputs were written",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_source) -> Path:
    source, sums = tiny_source
    return make_project(tmp_path_factory.mktemp("warm") / "project", shrunk_params(source), sums)


def eval_files(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / "reports/eval").iterdir()) if not p.name.startswith(".")}


def gone_soon(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def as_dvc_would(project: Path, stage: str, **env) -> subprocess.CompletedProcess:
    """A stage's command with dvc's DVC_STAGE, as dvc runs it, this test being the program that started it."""
    return run(stage_command(stage), project, DVC_STAGE=stage, FMNIST_WARM="verbose", **env)


def report_lines(stdout: str) -> list[str]:
    """The classification report and the test_acc line, as evaluate prints them."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["precision", "recall", "f1-score", "support"])
    end = next(i for i, line in enumerate(lines) if line.startswith("test_acc "))
    return lines[start : end + 1]


def test_a_dvc_run_evaluates_warm_with_the_outputs_and_run_of_a_fresh_process(project):
    warm = run([DVC, "repro"], project, FMNIST_WARM="verbose", SHELL="/bin/bash")
    (offered,) = GETS_READY.findall(warm.stderr)
    (pid,) = RUNS_WARM.findall(warm.stderr)
    assert pid == offered and gone_soon(int(pid)), "the warm process outlived its stage"
    files = eval_files(project)
    metrics = json.loads(files["metrics.json"])
    client = client_for(store_uri(project))
    (trained,) = client.search_runs([client.get_experiment_by_name("fashion-mnist-softmax").experiment_id])
    assert {k: trained.data.metrics[k] for k in metrics} == metrics
    assert trained.data.tags["evaluation.status"] == "complete"
    logged = artifact_paths(client, trained.info.run_id, "evaluation")
    assert logged == {f"evaluation/{name}" for name in files}
    for name in ("metrics.json", "classification_report.txt", "misclassified.png"):
        assert Path(client.download_artifacts(trained.info.run_id, f"evaluation/{name}")).read_bytes() == files[name]

    # The same stage in a fresh process (no train before it in this dvc run): the same bytes.
    fresh = run([DVC, "repro", "--single-item", "--force", "evaluate"], project, FMNIST_WARM="verbose")
    assert "warm: evaluate runs in a fresh process: no warm process in this dvc run" in fresh.stderr
    assert eval_files(project) == files
    assert report_lines(fresh.stdout) == report_lines(warm.stdout)


def refusal(project: Path, edited: str = "", edit=None, **env) -> str:
    """Train as dvc would, edit the file `edited` meanwhile, then evaluate with `env`: why evaluate
    ran in a fresh process, not in the warm one (which has ended)."""
    path = project / edited
    before = path.read_text() if edited else ""
    as_dvc_would(project, "train")
    try:
        if edited:
            path.write_text(edit(before))
        evaluated = as_dvc_would(project, "evaluate", **env)
    finally:
        if edited:
            path.write_text(before)
    (pid, why) = RUNS_FRESH.search(evaluated.stderr).groups()
    assert gone_soon(int(pid))
    return why


def test_anything_changed_since_train_started_sends_evaluate_to_a_fresh_process(project):
    code_edited = refusal(project, "stages/reports.py", lambda code: code + "\n# edited while train trained\n")
    assert code_edited == "the code changed since train started (reports.py)"
    assert refusal(project, FMNIST_SOMETHING_NEW="1") == "the environment differs (FMNIST_SOMETHING_NEW)"
    fast = refusal(project, "params.yaml", lambda params: params.replace("determinism: portable", "determinism: fast"))
    assert fast == "determinism is fast, torch was loaded for portable"

    trained = as_dvc_would(project, "train")  # and the same run again: warm
    (offered,) = GETS_READY.findall(trained.stderr)
    evaluated = as_dvc_would(project, "evaluate")
    assert RUNS_WARM.findall(evaluated.stderr) == [offered]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signal_to_evaluates_command_stops_the_warm_stage(project, signum):
    """SIGTERM is passed on: the stage stops at its next safe point with the usual line. SIGKILL
    leaves nothing to pass it on: the stage stops all the same, as a stage stops when dvc goes."""
    as_dvc_would(project, "train")
    proc = subprocess.Popen(
        stage_command("evaluate"), cwd=project, env=cli_env(DVC_STAGE="evaluate", FMNIST_WARM="verbose"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stderr:
        if match := RUNS_WARM.match(line):
            break
    else:
        pytest.fail(f"evaluate did not run warm: {proc.communicate()}")
    pid = int(match.group(1))
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert gone_soon(pid), "the warm stage outlived its command"
    temporary = [p.name for p in (project / "reports/eval").iterdir() if p.name.endswith(".tmp")]
    assert temporary == [], "a half-written output was left"
    assert "RUNNING" not in {r.info.status for r in runs(project)}
    if signum == signal.SIGTERM:
        assert proc.returncode == 1 and stderr.strip().splitlines()[-1] in STOPPED, stderr
        assert "Traceback" not in stderr


def test_a_dvc_run_without_evaluate_leaves_no_warm_process(project):
    # dvc runs the stage through `$SHELL -c`; dash (/bin/sh, when SHELL is unset) stays between them.
    trained = run([DVC, "repro", "--single-item", "--force", "train"], project, FMNIST_WARM="verbose", SHELL="/bin/sh")
    (pid,) = GETS_READY.findall(trained.stderr)
    assert gone_soon(int(pid), seconds=10), "the warm process outlived dvc"
    off = run([DVC, "repro", "--force"], project, FMNIST_WARM="0")
    assert "warm:" not in off.stderr

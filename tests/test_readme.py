"""README.md's command blocks, in the order written: each ```sh block is listed below, either run
as written (in a fresh copy of the project on tiny data, offline) or excluded with the reason and
the test that covers it instead. A new block fails the test until it is listed."""

import re

import pytest

from tests.helpers import DVC, ROOT, git_commit_all, make_project, run, shrunk_params

pytestmark = pytest.mark.slow

# First line of each block -> None (run it here) or why it is not run here.
BLOCKS = {
    "make pipeline": "sets up .venv from the registry (minutes); `dvc repro` stands in, as in test_pipeline",
    "source .venv/bin/activate": None,
    "dvc exp run -S lr=0.05": None,
    "dvc exp run -S lr=0.1": None,
    "dvc exp run --queue": "8 trainings with two workers (minutes); test_tracking runs a two-point queue sweep",
    "fmnist-sweep -S 'lr=0.01": "8 trainings and a search (minutes); test_sweep: grids, a search, the local default",
    "tuned=$(git log": "needs this repository's history (the tuned commit); a copy has one commit",
    "dvc exp run -n tuned": "60 epochs on the real data (minutes); test_pipeline runs early stopping",
    "make ui": "a server until Ctrl-C; test_ui starts it the same way and drives it",
    "fmnist-promote tuned": "needs the tuned experiment and a run id; test_provenance covers promote",
    "make serve": "a server until Ctrl-C; test_serving serves the champion",
    'python -c "import json': "talks to `make serve`; test_serving sends the same body",
    "MLFLOW_TRACKING_URI=http://mlflow.example.internal": "needs a team's tracking server; test_team_mlflow",
    "dvc remote add -d storage": "needs a team's storage; test_remotes runs it on directory, SSH and S3 remotes",
    "cat > basic_auth.ini": "a team's tracking server (PostgreSQL, S3); test_team_mlflow runs one",
    "git clone <repository>": "a team's git, storage and server; test_remotes and test_team_mlflow",
    "dask scheduler --host": "a team's machines; test_sweep starts a scheduler and two workers this way on loopback",
    "fmnist-sweep --scheduler": "a team's cluster; test_sweep runs the same command against its loopback cluster",
    "fmnist-lineage champion": "needs a champion; test_lineage prints the chain for every kind of name",
    "fmnist-reproduce champion": "a rebuild (a training) per call; test_lineage reproduces each kind of run",
    "fmnist-predict --test-index": "photos (shirt.jpg) the user brings; test_predict runs each form",
}


def readme_blocks() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    return [block.strip().splitlines() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def listed(first_line: str) -> str:
    (key,) = [key for key in BLOCKS if first_line.startswith(key)] or [f"unlisted: {first_line}"]
    return key


def test_every_block_is_listed_in_readme_order():
    assert [listed(block[0]) for block in readme_blocks()] == list(BLOCKS)


def test_the_offline_blocks_run_as_written_in_order(tmp_path, tiny_source):
    source, sums = tiny_source
    project = make_project(tmp_path / "project", shrunk_params(source), sums)
    run([DVC, "repro"], project)  # what `make pipeline` ends with
    git_commit_all(project, "Run the pipeline")
    outputs = []
    for block in readme_blocks():
        if BLOCKS[listed(block[0])] is not None:
            continue
        for line in block:
            command = line.split("  #")[0].strip()
            if command == "source .venv/bin/activate":  # the suite's venv is on PATH already
                continue
            if "<name>" in command:
                name = run([DVC, "exp", "ls", "--name-only"], project).stdout.split()[0]
                command = command.replace("<name>", name)
            proc = run(["bash", "-c", command], project, check=False, COLUMNS="160")
            assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
            outputs.append((command, proc.stdout + proc.stderr))
    said = dict(outputs)
    assert "test_acc" in said["dvc metrics show"]
    assert "test_acc" in said["make exps"] and "lr" in said["make exps"]
    assert "dvc_plots/index.html" in said["dvc plots show"]
    assert "Stage 'train' is cached - skipping run" in said["dvc exp run -S lr=0.1"]

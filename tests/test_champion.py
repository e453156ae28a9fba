"""The champion on a team's shared server (a real `mlflow server` with basic auth, reached with the
password in MLFLOW_TRACKING_URI): a version never evaluated cannot be made champion."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from tests.helpers import (
    all_runs,
    basic_auth_mlflow_server,
    client_for,
    make_project,
    run,
    shrunk_params,
    stage_command,
)

pytestmark = pytest.mark.slow
MODEL = "fashion-mnist-softmax"
ADMIN, ADMIN_PASSWORD = "admin", f"admin-{secrets.token_hex(12)}"
USER, PASSWORD = "alice", f"alice-{secrets.token_hex(12)}"
OUTPUT: list[str] = []  # everything the stages printed, searched for the password
SERVER_FILES: list[Path] = []  # the server's store and artifact folder, searched too


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("champion-server")
    SERVER_FILES.append(home)
    backend = f"sqlite:///{home / 'mlflow.db'}"
    with basic_auth_mlflow_server(home, backend, home / "artifacts", (ADMIN, ADMIN_PASSWORD), {USER: PASSWORD}) as url:
        yield url


def credentialed(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{PASSWORD}@")


def stage(project: Path, name: str, url: str, *args: str, check: bool = True):
    proc = run(stage_command(name) if not args else ["python", "-m", f"stages.{name}", *args], project, check=check,
               MLFLOW_TRACKING_URI=credentialed(url))  # fmt: skip
    OUTPUT.append(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory, tiny_source):
    """A model trained against the server: a registered version, never evaluated."""
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("champion") / "project", shrunk_params(source), sums)
    stage(project, "download", server)
    stage(project, "train", server)
    return project


def user_client(url: str):
    return client_for(credentialed(url))


def test_promote_refuses_a_version_never_evaluated(server, trained):
    project = trained
    client = user_client(server)
    run_id = all_runs(client)[0].info.run_id
    proc = stage(project, "promote", server, run_id, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: '{run_id}': version ") and "was never evaluated" in line, line
    assert not client.get_registered_model(MODEL).aliases


def test_the_password_in_the_tracking_uri_reaches_no_output(server, trained):
    """Stages run with MLFLOW_TRACKING_URI=http://alice:<password>@...: the password is in no stage
    output, no param or tag of any run, and no file the server stored (runs, artifacts, models)."""
    project = trained
    assert len(OUTPUT) >= 2  # download and training
    assert not [out for out in OUTPUT if PASSWORD in out]
    for found in all_runs(user_client(server)):
        assert PASSWORD not in json.dumps([found.data.params, found.data.tags])
    stored = [path for home in SERVER_FILES for path in home.rglob("*") if path.is_file() and path.name != "auth.db"]
    assert stored and not [path for path in stored if PASSWORD.encode() in path.read_bytes()]
    assert PASSWORD not in "".join(path.read_text(errors="replace") for path in project.rglob("*.json"))

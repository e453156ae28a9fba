"""MLflow for a team: one tracking server (PostgreSQL backend, basic auth, artifacts proxied into an
S3 bucket) that the pipeline reaches with a user name and password and no storage keys."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import (
    DVC,
    all_runs,
    basic_auth_mlflow_server,
    cli_env,
    client_for,
    git_commit_all,
    make_project,
    postgres,
    run,
    run_git,
    s3_server,
    shrunk_params,
)

pytestmark = pytest.mark.slow
BUCKET = "team-mlflow"
ADMIN, ADMIN_PASSWORD = "admin", f"admin-{secrets.token_hex(12)}"
USER, PASSWORD = "alice", f"alice-{secrets.token_hex(12)}"
LOGS: list[str] = []  # what every command printed, searched for secrets at the end


def dvc(project: Path, *args: str, check: bool = True, **env):
    proc = run([DVC, *args], project, check=check, **env)
    LOGS.append(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The administrator's server. Only this process holds the S3 keys."""
    home = tmp_path_factory.mktemp("team-mlflow")
    with s3_server() as s3, postgres() as backend:
        s3.client().create_bucket(Bucket=BUCKET)
        with basic_auth_mlflow_server(
            home,
            backend,
            f"s3://{BUCKET}/artifacts",
            (ADMIN, ADMIN_PASSWORD),
            {USER: PASSWORD},
            MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
            AWS_ACCESS_KEY_ID=s3.access_key_id,
            AWS_SECRET_ACCESS_KEY=s3.secret_access_key,
        ) as url:
            yield SimpleNamespace(url=url, s3=s3)


def as_user(server, password: str | None = PASSWORD) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": USER}
    return {**env, "MLFLOW_TRACKING_PASSWORD": password} if password is not None else env


@contextlib.contextmanager
def admin_client(server):
    """The administrator's MLflow client: credentials come from the environment, as for everyone."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        env.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        yield client_for(server.url)


def run_count(server) -> int:
    with admin_client(server) as client:
        return len(all_runs(client))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_source):
    """A teammate's project; it has its data, and no model yet."""
    source, sums = tiny_source
    project = make_project(tmp_path_factory.mktemp("team-mlflow-project") / "project", shrunk_params(source), sums)
    dvc(project, "repro", "download")
    return project


@pytest.mark.parametrize("password", ["wrong-password", None], ids=["wrong-password", "no-credentials"])
def test_wrong_or_missing_credentials_fail_within_seconds_and_write_nothing(server, project, password):
    runs_before = run_count(server)
    start = time.monotonic()
    proc = dvc(project, "repro", check=False, **as_user(server, password))
    elapsed = time.monotonic() - start

    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow tracking store {server.url} is not usable"), errors
    assert "wrong-password" not in proc.stdout + proc.stderr
    assert elapsed < 90  # dvc's own start and the imports included; no minutes of retries
    for output in ("models/model.pt", "reports/train/history.json", "reports/train/run.json"):
        assert not (project / output).exists(), output
    assert run_count(server) == runs_before


def test_a_run_lands_with_its_artifacts_in_the_bucket_and_loads_without_storage_keys(server, project, tmp_path):
    dvc(project, "repro", **as_user(server))

    with admin_client(server) as client:
        (only,) = all_runs(client)
        assert only.info.status == "FINISHED" and only.info.artifact_uri.startswith("mlflow-artifacts:")
        assert float(only.data.metrics["test_acc"]) > 0.5
    keys = [item["Key"] for item in server.s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(key.endswith(f"{only.info.run_id}/artifacts/evaluation/classification_report.txt") for key in keys)
    assert any(key.endswith("/MLmodel") for key in keys) and any(key.endswith("history.json") for key in keys)

    # A second client: tracking credentials only; no storage keys in its environment or home. It
    # streams the files through the server: MLflow would otherwise hand it presigned S3 URLs, which
    # moto refuses once it checks signatures (and which a client outside the storage network cannot reach).
    env = cli_env(**as_user(server), HOME=str(tmp_path), MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD="false")
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    load = (
        "import json, mlflow, numpy as np\n"
        "model = mlflow.pyfunc.load_model('models:/fashion-mnist-softmax/latest')\n"
        "print(json.dumps(np.asarray(model.predict(np.zeros((3, 28, 28), dtype=np.float32))).tolist()))\n"
    )
    proc = subprocess.run(["python", "-c", load], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    LOGS.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr
    probabilities = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(probabilities) == 3 and all(len(row) == 10 and abs(sum(row) - 1) < 1e-4 for row in probabilities)


def test_no_password_or_storage_key_reaches_git_mlflow_or_any_output(server, project):
    used = {"MLflow password": PASSWORD, "S3 secret key": server.s3.secret_access_key}
    git_commit_all(project, "Results")
    revs = run_git(project, "rev-list", "--all").split()
    with admin_client(server) as client:
        logged = json.dumps([[r.data.params, r.data.tags] for r in all_runs(client)])
    assert LOGS
    for name, secret in used.items():
        found = run(["git", "grep", "-I", "-l", "-F", secret, *revs], project, check=False)
        assert found.returncode == 1 and found.stdout == "", f"{name} committed: {found.stdout}"
        assert secret not in logged, f"{name} in an MLflow run"
        assert not [log for log in LOGS if secret in log], f"{name} in a command's output"

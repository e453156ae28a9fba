"""Real servers on loopback (`mlflow server`, PostgreSQL, moto's S3), each started and stopped by PID."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.helpers.projects import BIN, cli_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path | str, *extra_args: str, **env):
    """A real `mlflow server` on a free loopback port; yields its URL and stops it by PID."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra_args]
    log_dir = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
    with open(log_dir / "server.log", "w") as log:
        # No job workers: MLflow would start seven per server, and they outlive a killed test run.
        env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
        proc = subprocess.Popen(cmd, env=cli_env(**env), stdout=log, stderr=log)
        try:
            wait_for(f"http://127.0.0.1:{port}/health", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextlib.contextmanager
def basic_auth_mlflow_server(home: Path, backend_uri: str, artifacts: Path | str, admin: tuple[str, str],
                             users: dict[str, str], **env):  # fmt: skip
    """A team's `mlflow server --app-name basic-auth` (mlflow[auth]): the admin account of the
    config file, then one account per user, made as an administrator does (the REST API)."""
    auth_config = home / "basic_auth.ini"
    auth_config.write_text(
        "[mlflow]\ndefault_permission = EDIT\n"
        f"database_uri = sqlite:///{home / 'auth.db'}\n"
        f"admin_username = {admin[0]}\nadmin_password = {admin[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(auth_config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), **env}
    with mlflow_server(backend_uri, artifacts, "--app-name", "basic-auth", **env) as url:
        token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
        for username, password in users.items():
            request = urllib.request.Request(
                f"{url}/api/2.0/mlflow/users/create",
                data=json.dumps({"username": username, "password": password}).encode(),
                headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, timeout=30)
        yield url


@contextlib.contextmanager
def postgres():
    """A throwaway PostgreSQL server on a free loopback port; yields its SQLAlchemy URI."""
    import pytest

    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed")
    bindir, port = bins[-1].parent, free_port()
    # initdb refuses to run as root; the Debian package provides the postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pg-"))
    if as_user:
        shutil.chown(home, "postgres")
    datadir = home / "data"
    try:
        subprocess.run(
            [*as_user, bindir / "initdb", "-D", datadir, "-U", "mlflow", "--auth=trust"],
            check=True,
            capture_output=True,
        )
        opts = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [*as_user, bindir / "pg_ctl", "-D", datadir, "-o", opts, "-w", "-l", home / "log", "start"],
            check=True,
            capture_output=True,
        )
        subprocess.run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"], check=True)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", datadir, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


# Team storage: an S3-compatible server on loopback, shared by tests/test_remotes.py (DVC's S3
# remote) and tests/test_team_mlflow.py (MLflow's proxied artifact store).


class S3Server:
    def __init__(self, endpoint: str, access_key_id: str, secret_access_key: str):
        self.endpoint, self.access_key_id, self.secret_access_key = endpoint, access_key_id, secret_access_key

    def client(self, secret_access_key: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
        )


@contextlib.contextmanager
def s3_server():
    """moto's standalone S3 server, a separate process on a free loopback port, that checks every
    request's signature against its IAM users as AWS does; yields the endpoint and the keys of a
    user allowed s3:*, and stops the server by PID."""
    import json

    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_dir = Path(tempfile.mkdtemp(prefix="s3-server-"))
    with open(log_dir / "server.log", "w") as log:
        cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=log)
        try:
            wait_for(f"{endpoint}/moto-api/", proc)
            throwaway = secrets.token_hex(8)  # until auth is enforced below, moto takes any key
            iam = boto3.client(
                "iam", endpoint_url=endpoint, region_name="us-east-1",
                aws_access_key_id=throwaway, aws_secret_access_key=throwaway,
            )  # fmt: skip
            iam.create_user(UserName="team")
            key = iam.create_access_key(UserName="team")["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(policy))
            # From here on moto refuses unsigned requests and unknown or wrong keys, like AWS.
            enforce = urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}
            )
            urllib.request.urlopen(enforce, timeout=10)
            yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)

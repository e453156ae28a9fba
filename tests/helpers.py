"""Helpers shared by the tests (and the benchmark): tiny synthetic Fashion-MNIST in real IDX format,
throwaway copies of the project in their own git repos, the real `dvc` and stage commands, and
real servers on loopback (`mlflow server`, PostgreSQL), each started and stopped by PID."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
TINY_TRAIN, TINY_TEST = 600, 200
EXPERIMENT = "fashion-mnist-softmax"
TRAIN = ["python", "-m", "stages.train", "--data", "data/fashion-mnist", "--model", "models/model.pt",
         "--history", "reports/train/history.json", "--run-info", "reports/train/run.json"]  # fmt: skip
EVALUATE = ["python", "-m", "stages.evaluate", *TRAIN[3:9], "--out", "reports/eval"]


# --- data -----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake clothing: each class lights up its own band of rows, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 7, 4:24] += 180
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_dataset(directory: Path, train=(TINY_TRAIN, 1), test=(TINY_TEST, 2), gz: bool = True) -> dict[str, str]:
    """Write the four IDX files (gzipped like the real ones); return file -> SHA-256 of raw bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for prefix, (n, seed) in (("train", train), ("t10k", test)):
        images, labels = synthetic_split(n, seed)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(array)
            sums[name] = hashlib.sha256(raw).hexdigest()
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
            else:
                (directory / name).write_bytes(raw)
    return sums


def checksum_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sums.items())


# --- projects and commands ------------------------------------------------------------------


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def shrunk_params(source_dir: Path, **overrides) -> dict:
    """The real params.yaml, pointed at a local source only, for one epoch."""
    params = default_params()
    params["data"]["local_dirs"] = [str(source_dir)]
    params["data"]["mirrors"] = []
    params["num_epochs"] = 1
    params["batch_size"] = 64
    params.update(overrides)
    return params


def cli_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    # `dvc exp run` commits; a fresh CI machine has no git identity.
    for who in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{who}_NAME", "pipeline tests")
        env.setdefault(f"GIT_{who}_EMAIL", "tests@localhost")
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_git(project: Path, *args: str) -> str:
    return run(["git", *args], project).stdout.strip()


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines, proc.stdout
    return lines[-1]


def ran(output: str) -> set[str]:
    """The stages `dvc repro`/`dvc exp run` executed, from their output."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def skipped(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.endswith("didn't change, skipping")}


def restored(output: str) -> set[str]:
    """The stages DVC restored from its run-cache instead of running."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Stage '") and "is cached" in line}


def lock_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def copy_project(dest: Path, skip: tuple[str, ...] = ("tests/", "reports/", "benchmarks/", "dvc.lock")) -> Path:
    """The project's own files (as git sees them, uncommitted edits included), without outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if rel.startswith(skip) or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def git_commit_all(project: Path, message: str) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "add", "-A"], project)
    run([*git, "commit", "-qm", message], project)


def make_project(dest: Path, params: dict, checksums: dict[str, str] | None = None) -> Path:
    """A git repo holding a copy of the project with these params, committed, ready for `dvc`."""
    copy_project(dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if checksums is not None:  # the tiny dataset is not Fashion-MNIST: pin its own hashes
        (dest / "stages" / "fashion-mnist.sha256").write_text(checksum_text(checksums))
    run(["git", "init", "-q", "-b", "main"], dest)
    git_commit_all(dest, "project copy")
    return dest


# --- MLflow ---------------------------------------------------------------------------------


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def store_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def all_runs(client) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def runs(project: Path) -> list:
    """Every MLflow run in a project's own store."""
    return all_runs(client_for(store_uri(project)))


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# --- servers on loopback --------------------------------------------------------------------


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


# --- team storage: an S3-compatible server on loopback ----------------------------------------
# Shared by tests/test_remotes.py (DVC's S3 remote) and tests/test_team_mlflow.py (MLflow's
# proxied artifact store).


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

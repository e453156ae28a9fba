"""Shared fixtures: a tiny synthetic Fashion-MNIST in real IDX format, and a throwaway copy of
the project (its own git repo, its own MLflow store) to run the real `dvc` CLI in."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
TINY_TRAIN, TINY_TEST = 600, 200


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


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("tiny-fmnist")
    return directory, write_dataset(directory)


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


def copy_project(dest: Path) -> Path:
    """The project's own files (as git sees them, uncommitted edits included), without outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    skip = ("tests/", "reports/", "benchmarks/", "dvc.lock")
    for rel in filter(None, listed):
        if rel.startswith(skip) or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def make_project(dest: Path, params: dict, checksums: dict[str, str] | None = None) -> Path:
    """A git repo holding a copy of the project with these params, committed, ready for `dvc`."""
    copy_project(dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if checksums is not None:  # the tiny dataset is not Fashion-MNIST: pin its own hashes
        (dest / "stages" / "fashion-mnist.sha256").write_text(checksum_text(checksums))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run([*git, "commit", "-qm", "project copy"], dest)
    return dest


@pytest.fixture
def tiny_project(tmp_path, tiny_source) -> Path:
    source, sums = tiny_source
    return make_project(tmp_path / "project", shrunk_params(source), sums)

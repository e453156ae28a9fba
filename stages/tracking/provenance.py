"""Where a run comes from: the code (git), the DVC experiment, the data, the person and the process.

Plain reads of git, dvc.yaml and the environment: no tracking store is needed to test them."""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path

import yaml

from stages import CODE_ROOT
from stages.git import git_or_none

HOST_TAG, PID_TAG = "process.host", "process.pid"


def _git(*args: str) -> str:
    """git's answer in this checkout, or "" where there is none (no git, not a repo): tags stay optional."""
    return git_or_none(*args, cwd=CODE_ROOT, timeout=10) or ""


def dvc_outputs(project: Path = CODE_ROOT) -> list[str]:
    """Every path a stage in dvc.yaml writes: DVC deletes them before the stage runs."""
    try:
        stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            paths += [next(iter(out)) if isinstance(out, dict) else out for out in stage.get(kind, [])]
    return paths


def git_dirty() -> bool:
    """Whether the code or params differ from the commit. dvc.lock and the stages' own outputs
    do not count: DVC deletes a stage's outputs before running it, and writes dvc.lock after.

    In a DVC experiment params.yaml does not count either: the experiment's params differ from
    its baseline by design and are logged, so `git.dirty` says whether the code differed."""
    ignored = ["dvc.lock", *dvc_outputs(), *(["params.yaml"] if os.environ.get("DVC_EXP_NAME") else [])]
    excluded = [f":(exclude){path}" for path in ignored]
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid())


def source_tags(data_sha256: str, stage_script: str) -> dict[str, str]:
    """Tags that lead from an MLflow run back to the code, data, DVC experiment, person and process
    that made it; the `mlflow.*` ones fill the UI's "Created by" and "Source" columns."""
    commit = _git("rev-parse", "HEAD")
    tags = {
        "mlflow.user": _user(),
        "mlflow.source.name": stage_script,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "git.commit": commit,
        "git.dirty": str(git_dirty()).lower(),
        "data.sha256": data_sha256,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "sweep.name": os.environ.get("FMNIST_SWEEP", ""),  # set by fmnist-sweep for its points
        "sweep.trial": os.environ.get("FMNIST_TRIAL", ""),
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }
    return {k: v for k, v in tags.items() if v}

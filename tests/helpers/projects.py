"""Throwaway copies of the project in their own git repos, and the real `dvc` and stage commands."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.data import checksum_text

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def stage_command(stage: str, *python: str) -> list[str]:
    """A stage's command exactly as dvc.yaml runs it; `python` may be replaced (sys.executable, -X ...)."""
    interpreter, *module_and_args = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    assert interpreter == "python" and module_and_args[0] == "-m", module_and_args
    return [*(python or [interpreter]), *module_and_args]


def stage_argv(stage: str) -> list[str]:
    """`sys.argv` as the stage's script sees it under `python -m`: its module name, then its arguments."""
    _, _, *argv = stage_command(stage)
    return argv


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


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False

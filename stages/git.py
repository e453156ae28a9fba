"""git as a subprocess, for the commands that read or clone checkouts (lineage, reproduce, sweep)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from stages import PipelineError


class GitError(PipelineError):
    """A git command that failed or hung; the message is its command and git's last line."""


def git(*args: str, cwd: Path, timeout: float = 30) -> str:
    """git's stdout, stripped; a failure or a hang (a remote that does not answer) is a `GitError`."""
    command = f"git {' '.join(args)}"
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GitError(f"{command}: no answer within {timeout:.0f} s") from None
    except OSError as e:
        raise GitError(f"{command}: {e.strerror}") from None
    if proc.returncode != 0:
        raise GitError(f"{command}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return proc.stdout.strip()


def git_or_none(*args: str, cwd: Path, timeout: float = 30) -> str | None:
    """git's stdout, or None where a failure is an answer (no such ref, commit or file)."""
    try:
        return git(*args, cwd=cwd, timeout=timeout)
    except GitError:
        return None

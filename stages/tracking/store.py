"""The tracking store: where it is, how to reach it, and its failures as one `error:` line.

Default store: `mlflow.db` (SQLite) at the project root, artifacts in `mlruns/` beside it.
`MLFLOW_TRACKING_URI`, when set, wins (a team's shared `mlflow server`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from stages import PipelineError, importing, project_root

# Offline by default, and fail fast: MLflow's HTTP client otherwise retries for minutes.
_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a model logged or loaded is not news
}
# MLflow prints `View run <name> at: <server URL>` when a run on a server ends, password included
# when MLFLOW_TRACKING_URI carries one; the stage prints what a user needs, so this is always off.
_ENV_FORCED = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class TrackingError(PipelineError):
    """The tracking store failed; the message names the store (password redacted) and the reason."""


def store_root(project: Path | None = None) -> Path:
    """The project whose store this run belongs to (by default the one `project_root()` names).

    Queued and --temp experiments run in a copy under <project>/.dvc/tmp/exps/ that DVC deletes
    afterwards; their runs must land in <project>'s store, not the copy's."""
    project = project or project_root()
    parts = project.parts
    return Path(*parts[: parts.index(".dvc")]) if ".dvc" in parts else project


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


def redacted(text: str) -> str:
    """The text with any password in a URI (`https://user:secret@host`) replaced by ***."""
    return re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", text)


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:")


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise SQLite writers across processes (parallel queue workers): SQLite allows one
    writer, and MLflow's first-use schema migration must not run twice at once."""
    if not is_local_store(uri):
        yield
        return
    lock_path = store_root() / ".mlflow.db.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_local_store(uri: str) -> None:
    """Open a local store with sqlite3 first: MLflow retries one it cannot open for ~100 s."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not is_local_store(uri) or not path.exists():
        return  # MLflow creates a missing store
    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        if "locked" not in str(e):  # a busy store is MLflow's to report, and it does so at once
            reason = f"(sqlite3.{type(e).__name__}) {e}"
            raise TrackingError(redacted(f"MLflow tracking store {uri} is not usable: {reason}")) from None


def _set_environment() -> None:
    """Before MLflow loads: offline (its telemetry client starts at import) and failing fast."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.update(_ENV_FORCED)


def import_mlflow():
    """MLflow, set up offline (no telemetry) and to fail fast instead of retrying for minutes."""
    _set_environment()
    import mlflow

    # Stage output stays what a user needs; MLflow's failures reach them as one `error:` line.
    logging.getLogger("mlflow").setLevel(logging.CRITICAL)
    return mlflow


def preload() -> None:
    """Import MLflow and its SQL stores' modules (SQLAlchemy, alembic: ~3 s) without opening a
    store: what a stage does while its torch half computes in another process (stages/forked.py)."""
    _set_environment()
    with importing():
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


@contextlib.contextmanager
def one_line_errors(uri: str, doing: str):
    """MLflow's errors as the one line a user needs: which store, doing what, and why."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:  # MLflow, SQLAlchemy, requests, OS: each reaches the user the same way
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # SQLAlchemy puts the database's own words on a line of their own: "(sqlite3.X) why".
        reason = next((line for line in lines if re.match(r"\([\w.]+(Error|Exception)\) ", line)), lines[0])
        raise TrackingError(redacted(f"MLflow tracking store {uri} {doing}: {reason[:300]}")) from None


@dataclass(frozen=True)
class Store:
    """A connected tracking store: `mlflow` (set up), its `client`, and the `uri` messages name."""

    mlflow: object
    client: object
    uri: str

    @property
    def is_local(self) -> bool:
        """A SQLite store (the project's own by default), not a server."""
        return is_local_store(self.uri)

    @contextlib.contextmanager
    def operation(self, doing: str):
        """One guarded store operation: MLflow's errors as one line, SQLite writers one at a time.
        `doing` completes "MLflow tracking store <uri> ...": "failed logging an epoch"."""
        with one_line_errors(self.uri, doing), store_lock(self.uri):
            yield self.client


def connect() -> Store:
    """The project's tracking store (or MLFLOW_TRACKING_URI's), checked and ready."""
    uri = tracking_uri()
    _check_local_store(uri)
    mlflow = import_mlflow()
    with one_line_errors(uri, "is not usable"), store_lock(uri):
        mlflow.set_tracking_uri(uri)
        return Store(mlflow, mlflow.MlflowClient(), uri)

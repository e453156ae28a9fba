"""MLflow tracking: where runs go and what each run holds.

Default store: `mlflow.db` (SQLite) at the project root, artifacts in `mlruns/` beside it.
`MLFLOW_TRACKING_URI`, when set, wins (a team's shared `mlflow server`).

DVC and MLflow are linked by the model's md5 (the one `dvc.lock` records for models/model.pt),
not by a run id: train tags its run `dvc.model_md5`, evaluate finds the run by that tag. A run id
in a DVC output would change `dvc.lock` on every rerun of the same params and data, and a run
restored from DVC's run-cache (no command runs) still leads to the run that trained it.

What a run holds: every training param; the per-epoch curves under `epoch/<name>` at steps 1..N;
the final evaluation under the same keys as reports/eval/metrics.json (`test_acc`, ...), also on
the logged model; provenance tags (git, DVC, data, user, host and pid). The registered model's
`champion` alias moves to a new version only when its test accuracy beats the champion's.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages import Interrupted, PipelineError, project_root
from stages.config import Params, as_flat_dict
from stages.data import IMAGE_SHAPE, NUM_CLASSES

ROOT = Path(__file__).resolve().parents[1]
MODEL_MD5_TAG = "dvc.model_md5"
HOST_TAG, PID_TAG = "process.host", "process.pid"
CHAMPION = "champion"
CURVE_PREFIX = "epoch/"  # per-epoch curves; the final evaluation keeps metrics.json's keys
EXPERIMENT_DESCRIPTION = """\
Softmax regression on Fashion-MNIST (Dive into Deep Learning 3.7) as a DVC pipeline:
download -> train -> evaluate. One run per trained model: its params, per-epoch curves
(`epoch/train_loss`, `epoch/train_acc`, `epoch/test_acc` or `epoch/val_acc`), the final test
metrics (`test_acc`, `test_loss`, `f1_macro`, ...), reports and the model, registered as a new
version; the alias `champion` marks the best version by test accuracy.

Run names: a DVC experiment's name (`dvc exp run`), else `repro-<commit>-lr<lr>-bs<batch>-ep<epochs>-<params hash>`
(`+dirty` after the commit when code or params differ from it). See README.md, "Browsing runs".
"""
# Offline by default, and fail fast: MLflow's HTTP client otherwise retries for minutes.
_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


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


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:")


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise SQLite writers across processes (parallel queue workers): SQLite allows one
    writer, and MLflow's first-use schema migration must not run twice at once."""
    if not _is_local_store(uri):
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
    if not _is_local_store(uri) or not path.exists():
        return  # MLflow creates a missing store
    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        if "locked" not in str(e):  # a busy store is MLflow's to report, and it does so at once
            reason = f"(sqlite3.{type(e).__name__}) {e}"
            raise TrackingError(redacted(f"MLflow tracking store {uri} is not usable: {reason}")) from None


def import_mlflow():
    """MLflow, set up offline (no telemetry) and to fail fast instead of retrying for minutes."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow

    # Stage output stays what a user needs; MLflow's failures reach them as one `error:` line.
    logging.getLogger("mlflow").setLevel(logging.CRITICAL)
    return mlflow


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def dvc_outputs(project: Path = ROOT) -> list[str]:
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
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }
    return {k: v for k, v in tags.items() if v}


def training_params(params: Params) -> dict:
    """Every param that shapes the model (all but `evaluate.*`): logged on the run, hashed in its name."""
    return {k: v for k, v in as_flat_dict(params).items() if not k.startswith("evaluate.")}


def run_name(params: Params, tags: dict[str, str]) -> str:
    """A DVC experiment's own name; for a plain `dvc repro`, a name that says what the run is:
    `repro-<commit>[+dirty]-lr0.1-bs256-ep10-<hash of every training param>`."""
    if tags.get("dvc.exp_name"):
        return tags["dvc.exp_name"]
    commit = tags.get("git.commit", "nogit")[:7] + ("+dirty" if tags.get("git.dirty") == "true" else "")
    digest = hashlib.sha256(json.dumps(training_params(params), sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"repro-{commit}-lr{params.lr:g}-bs{params.batch_size}-ep{params.num_epochs}-{digest}"


# MLflow's experiment kind says "model training, not GenAI". MLflow 3.17's UI still opens on its
# global GenAI / Model training toggle (README, "Browsing runs"); the kind serves its other views.
_EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development", "mlflow.note.content": EXPERIMENT_DESCRIPTION}


def _experiment_id(mlflow, name: str, uri: str) -> str:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts beside mlflow.db, as an absolute location, so runs from
        # DVC's temporary experiment copies keep their artifacts after the copy is deleted.
        location = (store_root() / "mlruns").as_uri() if _is_local_store(uri) else None
        experiment = client.get_experiment(client.create_experiment(name, artifact_location=location))
    for key, value in _EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def fail_abandoned_runs(client, experiment_id: str) -> None:
    """Runs left RUNNING by a process that is gone (SIGKILL, power loss) on this host become
    FAILED, each with one line saying so; other hosts' runs cannot be checked from here."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, "FAILED")
            print(
                f"marked MLflow run {run.info.run_name} ({run.info.run_id}) FAILED: its process {pid} on {host} is gone"
            )


class TrackingError(PipelineError):
    """The tracking store failed; the message names the store (password redacted) and the reason."""


@contextlib.contextmanager
def one_line_errors(uri: str, doing: str):
    """MLflow's errors as the one line a user needs: which store, doing what, and why."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # SQLAlchemy puts the database's own words on a line of their own: "(sqlite3.X) why".
        reason = next((line for line in lines if re.match(r"\([\w.]+(Error|Exception)\) ", line)), lines[0])
        raise TrackingError(redacted(f"MLflow tracking store {uri} {doing}: {reason[:300]}")) from None


class Run:
    """One MLflow run; train opens it, evaluate reopens it by id."""

    def __init__(self, mlflow, run_id: str, uri: str, registered_model: str | None = None):
        self.mlflow, self.run_id, self.uri = mlflow, run_id, uri
        self.registered_model = registered_model
        self.client = mlflow.MlflowClient()
        self.epochs_logged: set[int] = set()

    @staticmethod
    def _curve(row: dict, timestamp_ms: int) -> list:
        from mlflow.entities import Metric

        return [
            Metric(CURVE_PREFIX + key, float(value), timestamp_ms, row["epoch"])
            for key, value in row.items()
            if key != "epoch" and value is not None
        ]

    def log_epoch(self, row: dict) -> None:
        """One epoch's row of the history, as it ends: the UI's time axes show when it happened."""
        with one_line_errors(self.uri, "failed logging an epoch"), _store_lock(self.uri):
            self.client.log_batch(self.run_id, metrics=self._curve(row, int(time.time() * 1000)))
        self.epochs_logged.add(row["epoch"])

    def log_training(self, history: list[dict], kept_epoch: int, history_json: bytes) -> None:
        """The epochs not logged as they ended (steps 1..N, timestamped now), the kept epoch, the history."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [m for row in history if row["epoch"] not in self.epochs_logged for m in self._curve(row, now)]
        metrics.append(Metric("kept_epoch", float(kept_epoch), now, 0))
        with one_line_errors(self.uri, "failed logging the training"), _store_lock(self.uri):
            self.client.log_batch(self.run_id, metrics=metrics)
            self.log_files({"history.json": history_json})

    def log_files(self, files: dict[str, bytes], artifact_path: str | None = None) -> None:
        """Artifacts from memory: the stage publishes its outputs only after MLflow has them."""
        with tempfile.TemporaryDirectory(prefix="mlflow-artifacts-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def link_model(self, model_md5: str) -> None:
        """Tag the run with the md5 DVC records for the model file: evaluate finds the run by it."""
        with one_line_errors(self.uri, "failed tagging the run"), _store_lock(self.uri):
            self.client.set_tag(self.run_id, MODEL_MD5_TAG, model_md5)

    def log_model(self, model, example) -> None:
        """The model plus a softmax, so MLflow serves class probabilities for a batch of
        28x28 float images in [0, 1]; registered under `tracking.registered_model`."""
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        served = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).cpu().eval()
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
        )
        with (
            one_line_errors(self.uri, "failed logging the model"),
            _store_lock(self.uri),
            self.mlflow.start_run(run_id=self.run_id, nested=False),
        ):
            self.mlflow.pytorch.log_model(
                served,
                name="model",
                signature=signature,
                input_example=example.numpy(),
                registered_model_name=self.registered_model,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )

    def log_evaluation(self, metrics: dict, settings: dict, artifacts: dict[str, bytes]) -> None:
        """Evaluation settings go in as tags, not params: a training run may be evaluated again
        with other settings (`-S evaluate.batch_size=...`), and MLflow params cannot change.

        The metrics also go on the run's logged model (its Models tab and registered versions show
        them) and, as tags, on its registered version."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        with one_line_errors(self.uri, "failed logging the evaluation"), _store_lock(self.uri):
            model_id = self._logged_model_id()
            self.client.log_batch(
                self.run_id,
                metrics=[Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items()],
                tags=[RunTag(k, str(v)) for k, v in settings.items()],
            )
            self.log_files(artifacts, "evaluation")
            version = self.registered_version()
            for key, value in metrics.items():
                if version is not None:
                    self.client.set_model_version_tag(version.name, version.version, key, f"{value:.4f}")

    def _logged_model_id(self) -> str | None:
        run = self.client.get_run(self.run_id)
        found = self.client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{self.run_id}'", max_results=1
        )
        return found[0].model_id if found else None

    def registered_version(self):
        """The newest registered version of this run's model, or None (a model trained elsewhere)."""
        versions = self.client.search_model_versions(f"run_id = '{self.run_id}'")
        return max(versions, key=lambda v: int(v.version), default=None)

    def update_champion(self, test_acc: float) -> str:
        """Move the `champion` alias to this run's version if it beats the champion's test accuracy;
        returns the one line that says what happened."""
        with one_line_errors(self.uri, "failed updating the champion"), _store_lock(self.uri):
            version = self.registered_version()
            if version is None:
                return "champion: unchanged (this run has no registered model version)"
            return consider_champion(self.client, version, test_acc)


def mlflow_param(key: str, value):
    from mlflow.entities import Param

    return Param(key, json.dumps(value) if isinstance(value, list) else str(value))


@contextlib.contextmanager
def _ending(run: Run):
    """End the run FINISHED, FAILED on error, KILLED on Ctrl-C or SIGTERM: never left RUNNING."""
    status = "FINISHED"
    try:
        yield run
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            with _store_lock(run.uri):
                run.client.set_terminated(run.run_id, status)
        except Exception as e:  # the original error matters more than this one
            print(redacted(f"warning: could not mark MLflow run {run.run_id} {status}: {e}"), file=sys.stderr)


def champion_accuracy(client, version) -> float | None:
    """A version's test accuracy: its run's metric (exact), else its tag (4 digits, for versions
    whose run is gone); None when never evaluated."""
    accuracy = client.get_run(version.run_id).data.metrics.get("test_acc") if version.run_id else None
    if accuracy is None and "test_acc" in version.tags:
        accuracy = float(version.tags["test_acc"])
    return accuracy


def consider_champion(client, version, test_acc: float) -> str:
    """The compare-and-move step of the champion rule, for a version whose test accuracy is known."""
    name = version.name
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no champion yet; MLflow says so with an exception
        current = None
    if current is None:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return f"champion: {name} version {version.version} (test_acc {test_acc:.4f}) is the first champion"
    if str(current.version) == str(version.version):  # MLflow returns it as int or str, by call
        return f"champion: {name} version {version.version} (test_acc {test_acc:.4f}) stays champion"
    best = champion_accuracy(client, current)
    if best is not None and test_acc <= best:
        return (
            f"champion: {name} version {version.version} (test_acc {test_acc:.4f}) does not beat "
            f"version {current.version} ({best:.4f}); champion stays version {current.version}"
        )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    was = f"{best:.4f}" if best is not None else "never evaluated"
    return (
        f"champion: {name} version {version.version} (test_acc {test_acc:.4f}) beats "
        f"version {current.version} ({was}); champion moved to version {version.version}"
    )


@contextlib.contextmanager
def training_run(params: Params, data_sha256: str):
    """Start the run before training, so a bad store fails the stage within seconds."""
    uri = tracking_uri()
    _check_local_store(uri)
    mlflow = import_mlflow()
    with one_line_errors(uri, "is not usable"), _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        experiment_id = _experiment_id(mlflow, params.tracking.experiment, uri)
        client = mlflow.MlflowClient()
        fail_abandoned_runs(client, experiment_id)
        tags = source_tags(data_sha256, "stages/train.py")
        info = client.create_run(experiment_id, run_name=run_name(params, tags), tags=tags).info
        logged = [mlflow_param(k, v) for k, v in training_params(params).items()]
        client.log_batch(info.run_id, params=logged)
    run = Run(mlflow, info.run_id, uri, params.tracking.registered_model)
    with _ending(run):
        yield run


@contextlib.contextmanager
def evaluation_run(params: Params, model_md5: str):
    """The run that trained this model (found by its md5 tag), to log the evaluation beside the
    training curves. The run stays as it was (FINISHED): evaluating does not reopen it.

    A model trained elsewhere (pulled from a DVC remote, its run in another store) gets a run of
    its own here, holding the evaluation only."""
    uri = tracking_uri()
    _check_local_store(uri)
    mlflow = import_mlflow()
    with one_line_errors(uri, "is not usable"), _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        experiment_id = _experiment_id(mlflow, params.tracking.experiment, uri)
        fail_abandoned_runs(client, experiment_id)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{MODEL_MD5_TAG}` = '{model_md5}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            tags = {MODEL_MD5_TAG: model_md5, **source_tags("", "stages/evaluate.py")}
            new_run = client.create_run(experiment_id, run_name=f"evaluation-{model_md5[:8]}", tags=tags).info
    if found:
        yield Run(mlflow, found[0].info.run_id, uri)
        return
    print(f"no MLflow run in {redacted(uri)} trained this model (md5 {model_md5}); evaluation logged to a new run")
    run = Run(mlflow, new_run.run_id, uri)
    with _ending(run):
        yield run

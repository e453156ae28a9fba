"""MLflow tracking: where runs go and what each run holds.

Default store: `mlflow.db` (SQLite) at the project root, artifacts in `mlruns/` beside it.
`MLFLOW_TRACKING_URI`, when set, wins (a team's shared `mlflow server`).

DVC and MLflow are linked by the model's md5 (the one `dvc.lock` records for models/model.pt),
not by a run id: train tags its run `dvc.model_md5`, evaluate finds the run by that tag. A run id
in a DVC output would change `dvc.lock` on every rerun of the same params and data, and a run
restored from DVC's run-cache (no command runs) still leads to the run that trained it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from stages import Interrupted, PipelineError
from stages.config import Params, as_flat_dict

ROOT = Path(__file__).resolve().parents[1]
MODEL_MD5_TAG = "dvc.model_md5"
# Offline by default, and fail fast: MLflow's HTTP client otherwise retries for minutes.
_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def store_root(project_root: Path = ROOT) -> Path:
    """The project whose store this run belongs to.

    Queued and --temp experiments run in a copy under <project>/.dvc/tmp/exps/ that DVC deletes
    afterwards; their runs must land in <project>'s store, not the copy's."""
    parts = project_root.parts
    return Path(*parts[: parts.index(".dvc")]) if ".dvc" in parts else project_root


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


def source_tags(data_sha256: str) -> dict[str, str]:
    """Tags that lead from an MLflow run back to the code, data and DVC experiment that made it."""
    commit = _git("rev-parse", "HEAD")
    tags = {
        "mlflow.source.git.commit": commit,
        "git.commit": commit,
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data.sha256": data_sha256,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    return {k: v for k, v in tags.items() if v}


def _experiment_id(mlflow, name: str, uri: str) -> str:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts beside mlflow.db, as an absolute location, so runs from
    # DVC's temporary experiment copies keep their artifacts after the copy is deleted.
    location = (store_root() / "mlruns").as_uri() if _is_local_store(uri) else None
    return client.create_experiment(name, artifact_location=location)


class TrackingError(PipelineError):
    """The tracking store failed; the message names the store (password redacted) and the reason."""


@contextlib.contextmanager
def _one_line_errors(uri: str, doing: str):
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

    def log_training(self, history: list[dict], kept_epoch: int, history_json: bytes) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, float(value), 0, row["epoch"])
            for row in history
            for key, value in row.items()
            if key != "epoch" and value is not None
        ]
        metrics.append(Metric("kept_epoch", float(kept_epoch), 0, 0))
        with _one_line_errors(self.uri, "failed logging the training"), _store_lock(self.uri):
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
        with _one_line_errors(self.uri, "failed tagging the run"), _store_lock(self.uri):
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
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
        )
        with (
            _one_line_errors(self.uri, "failed logging the model"),
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
        with other settings (`-S evaluate.batch_size=...`), and MLflow params cannot change."""
        from mlflow.entities import RunTag

        with _one_line_errors(self.uri, "failed logging the evaluation"), _store_lock(self.uri):
            self.client.log_batch(
                self.run_id,
                metrics=[self._metric(k, v) for k, v in metrics.items()],
                tags=[RunTag(k, str(v)) for k, v in settings.items()],
            )
            self.log_files(artifacts, "evaluation")

    @staticmethod
    def _metric(key, value):
        from mlflow.entities import Metric

        return Metric(key, float(value), 0, 0)


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


@contextlib.contextmanager
def training_run(params: Params, data_sha256: str):
    """Start the run before training, so a bad store fails the stage within seconds."""
    uri = tracking_uri()
    mlflow = import_mlflow()
    with _one_line_errors(uri, "is not usable"), _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        experiment_id = _experiment_id(mlflow, params.tracking.experiment, uri)
        client = mlflow.MlflowClient()
        info = client.create_run(
            experiment_id,
            run_name=os.environ.get("DVC_EXP_NAME") or None,
            tags=source_tags(data_sha256),
        ).info
        train_keys = {k: v for k, v in as_flat_dict(params).items() if not k.startswith("evaluate.")}
        client.log_batch(info.run_id, params=[mlflow_param(k, v) for k, v in train_keys.items()])
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
    mlflow = import_mlflow()
    with _one_line_errors(uri, "is not usable"), _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        experiment_id = _experiment_id(mlflow, params.tracking.experiment, uri)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{MODEL_MD5_TAG}` = '{model_md5}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            tags = {MODEL_MD5_TAG: model_md5}
            new_run = client.create_run(experiment_id, run_name=f"evaluation-{model_md5[:8]}", tags=tags).info
    if found:
        yield Run(mlflow, found[0].info.run_id, uri)
        return
    print(f"no MLflow run in {redacted(uri)} trained this model (md5 {model_md5}); evaluation logged to a new run")
    run = Run(mlflow, new_run.run_id, uri)
    with _ending(run):
        yield run

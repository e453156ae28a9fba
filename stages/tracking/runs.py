"""MLflow runs: the experiment they belong to, what each run holds, and how it ends.

What a run holds: every training param; the per-epoch curves under `epoch/<name>` at steps 1..N;
the final evaluation under the same keys as reports/eval/metrics.json (`test_acc`, ...), also on
the logged model; provenance tags (git, DVC, data, user, host and pid).

Every call goes through MlflowClient with the run's id: no fluent (active) run is opened, so the
run's status is the stage's alone and MLflow prints nothing (its `View run ... at: <uri>` would
show a password in the URI).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from stages import Interrupted
from stages.config import Params, mlflow_value
from stages.data import CLASSES, IMAGE_SHAPE
from stages.tracking.champion import consider_champion, newest_version
from stages.tracking.provenance import HOST_TAG, PID_TAG, source_tags
from stages.tracking.store import Store, TrackingError, connect, redacted, store_root

log = logging.getLogger(__name__)

MODEL_MD5_TAG = "dvc.model_md5"
EVALUATION_TAG = "evaluation.status"  # incomplete while an evaluation is being logged, then complete
SERVED_REQUIREMENTS = ("torch", "numpy", "pandas")  # what stages/served_model.py imports, besides MLflow
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
# MLflow's experiment kind says "model training, not GenAI". MLflow 3.17's UI still opens on its
# global GenAI / Model training toggle (README, "Browsing runs"); the kind serves its other views.
_EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development", "mlflow.note.content": EXPERIMENT_DESCRIPTION}


def run_name(params: Params, tags: dict[str, str]) -> str:
    """A DVC experiment's own name; for a plain `dvc repro`, a name that says what the run is:
    `repro-<commit>[+dirty]-lr0.1-bs256-ep10-<hash of every training param>`."""
    if tags.get("dvc.exp_name"):
        return tags["dvc.exp_name"]
    commit = tags.get("git.commit", "nogit")[:7] + ("+dirty" if tags.get("git.dirty") == "true" else "")
    training = json.dumps(params.training_params(), sort_keys=True, default=str)
    digest = hashlib.sha256(training.encode()).hexdigest()[:6]
    return f"repro-{commit}-lr{params.lr:g}-bs{params.batch_size}-ep{params.num_epochs}-{digest}"


def _experiment_id(store: Store, name: str) -> str:
    client = store.client
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts beside mlflow.db, as an absolute location, so runs from
        # DVC's temporary experiment copies keep their artifacts after the copy is deleted.
        location = (store_root() / "mlruns").as_uri() if store.is_local else None
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
            name, run_id = run.info.run_name, run.info.run_id
            log.info("marked MLflow run %s (%s) FAILED: its process %s on %s is gone", name, run_id, pid, host)


class Run:
    """One MLflow run; train opens it, evaluate reopens it by id."""

    def __init__(self, store: Store, run_id: str, registered_model: str | None = None):
        self.store, self.run_id = store, run_id
        self.client = store.client
        self.registered_model = registered_model
        self.epochs_logged: set[int] = set()
        self.model_id: str | None = None

    @staticmethod
    def _curve(row: dict, timestamp_ms: int) -> list:
        from mlflow.entities import Metric

        return [
            Metric(CURVE_PREFIX + key, float(value), timestamp_ms, row["epoch"])
            for key, value in row.items()
            if key != "epoch" and value is not None
        ]

    def log_epoch(self, row: dict, ended_ms: int | None = None) -> None:
        """One epoch's row of the history, as it ends (or at `ended_ms`, when it did): the UI's time
        axes show when it happened."""
        ended_ms = int(time.time() * 1000) if ended_ms is None else ended_ms
        with self.store.operation("failed logging an epoch"):
            self.client.log_batch(self.run_id, metrics=self._curve(row, ended_ms))
        self.epochs_logged.add(row["epoch"])

    def log_training(self, history: list[dict], kept_epoch: int, history_json: bytes) -> None:
        """The epochs not logged as they ended (steps 1..N, timestamped now), the kept epoch, the history."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [m for row in history if row["epoch"] not in self.epochs_logged for m in self._curve(row, now)]
        metrics.append(Metric("kept_epoch", float(kept_epoch), now, 0))
        with self.store.operation("failed logging the training"):
            self.client.log_batch(self.run_id, metrics=metrics)
            self.log_files({"history.json": history_json})

    def log_files(self, files: dict[str, bytes], artifact_path: str | None = None) -> None:
        """Artifacts from memory: the same bytes the stage writes as its outputs."""
        with tempfile.TemporaryDirectory(prefix="mlflow-artifacts-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.client.log_artifacts(self.run_id, tmp, artifact_path)

    def tag_model_md5(self, model_md5: str) -> None:
        """Tag the run with the md5 DVC records for the model file: evaluate finds the run by it."""
        with self.store.operation("failed tagging the run"):
            self.client.set_tag(self.run_id, MODEL_MD5_TAG, model_md5)

    def log_model(self, served_model: Path, checkpoint: bytes, example) -> None:
        """The checkpoint as an MLflow model from code (`served_model`, stages/served_model.py):
        it serves class probabilities for a batch of 28x28 float images in [0, 1], one named column
        per class; `register_model` registers it once the stage's files are out.

        The logged model is created here, for this run, and handed to MLflow with the run's id:
        no active run is opened (see the module's docstring)."""
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema, TensorSpec
        from mlflow.utils import requirements_utils

        # MLflow checks the requirements against this environment after mapping every installed
        # package to its modules (~0.9 s: it reads each package's file list). The versions below
        # are read from this environment, and with an empty map the check still compares them.
        if requirements_utils._MODULES_TO_PACKAGES is None:
            requirements_utils._MODULES_TO_PACKAGES = {}

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
            outputs=Schema([ColSpec("float", name) for name in CLASSES]),
        )
        with self.store.operation("failed logging the model"), tempfile.TemporaryDirectory(prefix="model-") as tmp:
            weights, classes = Path(tmp) / "model.pt", Path(tmp) / "classes.json"
            weights.write_bytes(checkpoint)
            classes.write_text(json.dumps(CLASSES))
            run = self.client.get_run(self.run_id)
            logged = self.client.create_logged_model(
                run.info.experiment_id, name="model", source_run_id=self.run_id, params=run.data.params
            )
            self.model_id = logged.model_id
            mlflow = self.store.mlflow
            mlflow.models.Model.log(  # pyfunc.log_model without its active run: this run, by id
                artifact_path=None,
                name="model",
                flavor=mlflow.pyfunc,
                python_model=served_model,
                # The class names as an artifact, not model_config: MLflow would log that as run params.
                artifacts={"checkpoint": str(weights), "classes": str(classes)},
                model_id=logged.model_id,
                run_id=self.run_id,
                signature=signature,
                input_example=example,
                pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in SERVED_REQUIREMENTS],
            )

    def register_model(self) -> None:
        """A new version of `tracking.registered_model`: called after the stage has published its
        files, so a version never exists for a model that is not in models/ (MLflow follows DVC)."""
        with self.store.operation("failed registering the model"):
            self.store.mlflow.register_model(f"models:/{self.model_id}", self.registered_model)

    def log_evaluation(self, metrics: dict, settings: dict, artifacts: dict[str, bytes]) -> None:
        """Evaluation settings go in as tags, not params: a training run may be evaluated again
        with other settings (`-S evaluate.batch_size=...`), and MLflow params cannot change.

        The metrics also go on the run's logged model (its Models tab and registered versions show
        them) and, as tags, on its registered version."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        with self.store.operation("failed logging the evaluation"):
            # Marks the run until the champion step is done: an evaluation cut short says so.
            self.client.set_tag(self.run_id, EVALUATION_TAG, "incomplete")
            model_id = self._logged_model_id()
            self.client.log_batch(
                self.run_id,
                metrics=[Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items()],
                tags=[RunTag(k, mlflow_value(v)) for k, v in settings.items()],
            )
            self.log_files(artifacts, "evaluation")
            version = newest_version(self.client, self.run_id)
            for key, value in metrics.items():
                if version is not None:
                    self.client.set_model_version_tag(version.name, version.version, key, f"{value:.4f}")

    def _logged_model_id(self) -> str | None:
        run = self.client.get_run(self.run_id)
        found = self.client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{self.run_id}'", max_results=1
        )
        return found[0].model_id if found else None

    def update_champion(self, test_acc: float) -> str:
        """Move the `champion` alias to this run's version if it beats the champion's test accuracy;
        returns the one line that says what happened."""
        with self.store.operation("failed updating the champion"):
            version = newest_version(self.client, self.run_id)
            if version is None:
                line = "champion: unchanged (this run has no registered model version)"
            else:
                line = consider_champion(self.client, version, test_acc)
            self.client.set_tag(self.run_id, EVALUATION_TAG, "complete")
        return line


@contextlib.contextmanager
def _ended_with_the_stage(run: Run):
    """End the run FINISHED, FAILED on error, KILLED on Ctrl-C or SIGTERM: never left RUNNING while
    the store answers. When it does not (a server gone mid-stage), the stage's own error is the one
    line; the next stage on this host marks the run FAILED (`fail_abandoned_runs`)."""
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
            with run.store.operation(f"failed marking run {run.run_id} {status}"):
                run.client.set_terminated(run.run_id, status)
        except TrackingError:
            if status == "FINISHED":  # the stage's one error, then
                raise
            # else the original error matters more: it is the one line


@contextlib.contextmanager
def training_run(params: Params, data_sha256: str):
    """Start the run before training, so a bad store fails the stage within seconds."""
    store = connect()
    from mlflow.entities import Param

    with store.operation("is not usable") as client:
        experiment_id = _experiment_id(store, params.tracking.experiment)
        fail_abandoned_runs(client, experiment_id)
        tags = source_tags(data_sha256, "stages/train.py")
        info = client.create_run(experiment_id, run_name=run_name(params, tags), tags=tags).info
        logged = [Param(k, mlflow_value(v)) for k, v in params.training_params().items()]
        client.log_batch(info.run_id, params=logged)
    with _ended_with_the_stage(Run(store, info.run_id, params.tracking.registered_model)) as run:
        yield run


@contextlib.contextmanager
def evaluation_run(params: Params, model_md5: str):
    """The run that trained this model (found by its md5 tag), to log the evaluation beside the
    training curves. The run stays as it was (FINISHED): evaluating does not reopen it.

    A model trained elsewhere (pulled from a DVC remote, its run in another store) gets a run of
    its own here, holding the evaluation only."""
    store = connect()
    with store.operation("is not usable") as client:
        experiment_id = _experiment_id(store, params.tracking.experiment)
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
        yield Run(store, found[0].info.run_id)
        return
    where = redacted(store.uri)
    log.info("no MLflow run in %s trained this model (md5 %s); evaluation logged to a new run", where, model_md5)
    with _ended_with_the_stage(Run(store, new_run.run_id)) as run:
        yield run

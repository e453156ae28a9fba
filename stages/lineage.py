"""Lineage: from any name of a model back to the run, commit, experiment, params and data that made it.

A model has many names: a DVC experiment (`dvc exp ls`), a registered version or alias
(`models:/fashion-mnist-softmax@champion`, `models:/fashion-mnist-softmax/3`, `3`, `champion`),
the id of the MLflow run that trained it, or its md5 (the one `dvc.lock` records for
models/model.pt). `resolve()` turns any of them into one `Lineage`.

The link that never breaks is the md5: a DVC experiment's commit (a git ref under refs/exps)
holds the `dvc.lock` with its model's md5, and the run that trained that model carries it in its
`dvc.model_md5` tag. An experiment restored from DVC's run-cache ran no command, so it has no run
of its own: it resolves to the run that trained its model, and says so.

    fmnist-lineage withy-chum        # the chain in a few lines
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages import ArgumentParser, PipelineError, project_root, run_stage
from stages.config import ConfigError, as_flat_dict, load_params, parse_params
from stages.git import git_or_none
from stages.tracking.runs import MODEL_MD5_TAG
from stages.tracking.store import import_mlflow, one_line_errors, redacted, tracking_uri

MODEL_PATH = "models/model.pt"
HEX32 = re.compile(r"[0-9a-f]{32}")
METRICS_SHOWN = ("test_acc", "test_loss", "f1_macro")


class LineageError(PipelineError):
    """A name that leads to no model, or a chain with a missing link; the message says which."""


@dataclass
class Experiment:
    """A DVC experiment, as git holds it: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>."""

    name: str
    rev: str
    baseline: str
    model_md5: str | None


@dataclass
class Lineage:
    target: str  # what the user typed
    model_md5: str
    run: object | None  # the MLflow run that trained the model
    versions: list = field(default_factory=list)  # its registered versions, oldest first
    aliases: dict[str, list[str]] = field(default_factory=dict)  # version -> aliases
    experiment: Experiment | None = None
    registered_model: str = ""

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags if self.run else {}

    @property
    def commit(self) -> str:
        return self.tags.get("git.commit", "")

    @property
    def dirty(self) -> bool:
        return self.tags.get("git.dirty") == "true"

    @property
    def restored(self) -> bool:
        """A DVC experiment whose outputs DVC restored from its run-cache: another run trained them."""
        if self.experiment is None or self.run is None:
            return False
        return self.tags.get("dvc.exp_name") != self.experiment.name

    def title(self) -> str:
        """How the verdict names the model: its newest registered version, else the run or experiment."""
        if self.versions:
            return f"{self.registered_model} version {self.versions[-1].version}"
        if self.experiment:
            return f"DVC experiment {self.experiment.name}"
        return f"run {self.run.info.run_name}" if self.run else f"model {self.model_md5}"


def lock_model_md5(lock_text: str | None) -> str | None:
    """The md5 a dvc.lock records for the model file."""
    try:
        stages = (yaml.safe_load(lock_text or "") or {}).get("stages", {})
        return next(out["md5"] for out in stages["train"]["outs"] if out["path"] == MODEL_PATH)
    except (yaml.YAMLError, KeyError, TypeError, StopIteration, AttributeError):
        return None


def experiments(project: Path | None = None) -> list[Experiment]:
    """Every DVC experiment git holds in this project (what `dvc exp ls --all-commits` lists), newest first."""
    project = project or project_root()
    refs = ("for-each-ref", "--sort=-committerdate", "--format=%(objectname) %(refname)", "refs/exps")
    listed = git_or_none(*refs, cwd=project)
    found = []
    for line in (listed or "").splitlines():
        rev, ref = line.split(" ", 1)
        parts = ref.split("/")  # refs exps <2> <38> <name>; queue and exec refs have other shapes
        if len(parts) == 5 and len(parts[2]) == 2 and len(parts[3]) == 38:
            lock = git_or_none("show", f"{rev}:dvc.lock", cwd=project)
            found.append(Experiment(parts[4], rev, parts[2] + parts[3], lock_model_md5(lock)))
    return found


def params_at(commit: str, project: Path | None = None) -> dict | None:
    """params.yaml at a commit, flat as MLflow logs it (`lr`, `data.local_dirs`, ...); None if absent."""
    text = git_or_none("show", f"{commit}:params.yaml", cwd=project)
    if text is None:
        return None
    try:
        return as_flat_dict(parse_params(yaml.safe_load(text)))
    except (yaml.YAMLError, ConfigError):
        return None


def logged_value(value) -> str:
    """A param as MLflow holds it (tracking.mlflow_param): lists as JSON, the rest as str()."""
    import json

    return json.dumps(value) if isinstance(value, list) else str(value)


def params_differing(lineage: Lineage, project: Path | None = None) -> dict[str, tuple[str, str | None]] | None:
    """The run's params that differ from params.yaml at its commit: key -> (logged, at the commit)."""
    at_commit = params_at(lineage.commit, project) if lineage.commit else None
    if at_commit is None or lineage.run is None:
        return None
    logged = lineage.run.data.params
    return {
        key: (value, logged_value(at_commit[key]) if key in at_commit else None)
        for key, value in sorted(logged.items())
        if key not in at_commit or logged_value(at_commit[key]) != value
    }


class Resolver:
    """Finds models in one tracking store and one git repository."""

    def __init__(self, project: Path | None = None):
        project = project or project_root()
        params = load_params(project / "params.yaml")
        self.project = project
        self.uri = tracking_uri()
        self.mlflow = import_mlflow()
        self.mlflow.set_tracking_uri(self.uri)
        self.client = self.mlflow.MlflowClient()
        self.model_name = params.tracking.registered_model
        self.experiment_name = params.tracking.experiment

    def resolve(self, target: str) -> Lineage:
        with one_line_errors(self.uri, "is not usable"):
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = experiment.experiment_id if experiment else None
            lineage = self._resolve(target.strip())
        if lineage is None:
            raise LineageError(
                redacted(
                    f"{target!r}: no model by that name: not a DVC experiment in {self.project}, nor a registered "
                    f"version or alias of {self.model_name}, an MLflow run id or a model md5 in {self.uri}"
                )
            )
        return lineage

    def _resolve(self, target: str) -> Lineage | None:
        found = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", target)
        if found:
            name, alias, number = found.groups()
            if name != self.model_name:
                raise LineageError(f"{target}: this project registers {self.model_name}, not {name}")
            return self._from_version(target, self._version(target, alias, number))
        for experiment in experiments(self.project):
            if experiment.name == target:
                return self._from_experiment(target, experiment)
        if target.isdigit():
            return self._from_version(target, self._version(target, None, target))
        if HEX32.fullmatch(target):
            run = self._run_by_id(target)
            if run is not None:
                return self._from_run(target, run)
            if self._runs_by_md5(target):
                return self._from_md5(target, target)
        if self._alias_exists(target):
            return self._from_version(target, self._version(target, target, None))
        run = self._run_by_name(target)  # an experiment whose git refs are elsewhere (another clone)
        return self._from_run(target, run) if run is not None else None

    # --- registry ---

    def _version(self, target: str, alias: str | None, number: str | None):
        try:
            if alias is not None:
                return self.client.get_model_version_by_alias(self.model_name, alias)
            return self.client.get_model_version(self.model_name, number)
        except Exception:  # MLflow says "no such version or alias" with an exception
            from stages.predict import _known_versions  # the same words as `fmnist-predict --mlflow`

            uri = f"models:/{self.model_name}" + (f"@{alias}" if alias is not None else f"/{number}")
            known = _known_versions(self.mlflow, self.model_name)
            raise LineageError(f"{uri}: no such version or alias; {known}") from None

    def _alias_exists(self, alias: str) -> bool:
        try:
            self.client.get_model_version_by_alias(self.model_name, alias)
        except Exception:
            return False
        return True

    def _versions_of(self, run_id: str) -> tuple[list, dict[str, list[str]]]:
        versions = self.client.search_model_versions(f"name = '{self.model_name}' and run_id = '{run_id}'")
        versions = sorted(versions, key=lambda v: int(v.version))
        aliases: dict[str, list[str]] = {}
        if versions:
            model = self.client.get_registered_model(self.model_name)
            for alias, number in (model.aliases or {}).items():
                aliases.setdefault(str(number), []).append(alias)
        return versions, aliases

    # --- runs ---

    def _run_by_id(self, run_id: str):
        try:
            run = self.client.get_run(run_id)
        except Exception:  # not a run id: MLflow says so with an exception
            return None
        return run if run.info.experiment_id == self.experiment_id else None

    def _runs_by_md5(self, md5: str) -> list:
        if self.experiment_id is None:
            return []
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MODEL_MD5_TAG}` = '{md5}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )

    def _run_by_name(self, name: str):
        if self.experiment_id is None:
            return None
        for key in ("tags.`dvc.exp_name`", "attributes.run_name"):
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"{key} = '{name.replace(chr(39), '')}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                return found[0]
        return None

    def _training_run(self, md5: str):
        """The run that trained the model with this md5: the newest, as evaluate logs to the newest.
        Several runs carry one md5 when the same params and data were trained again (`dvc repro -f`)."""
        found = self._runs_by_md5(md5)
        return found[0] if found else None

    # --- lineages ---

    def _lineage(self, target: str, md5: str, run, experiment: Experiment | None = None) -> Lineage:
        versions, aliases = self._versions_of(run.info.run_id) if run else ([], {})
        return Lineage(target, md5, run, versions, aliases, experiment, self.model_name)

    def _from_run(self, target: str, run) -> Lineage:
        md5 = run.data.tags.get(MODEL_MD5_TAG)
        if not md5:
            raise LineageError(f"{target}: run {run.info.run_id} has no {MODEL_MD5_TAG} tag (it trained no model)")
        return self._lineage(target, md5, run, self._experiment_named(run.data.tags.get("dvc.exp_name"), md5))

    def _from_version(self, target: str, version) -> Lineage:
        run = self._run_by_id(version.run_id) if version.run_id else None
        if run is None:
            raise LineageError(f"{target}: version {version.version}'s run {version.run_id} is not in {self.uri}")
        return self._from_run(target, run)

    def _from_md5(self, target: str, md5: str) -> Lineage:
        run = self._training_run(md5)
        experiment = self._experiment_named(run.data.tags.get("dvc.exp_name"), md5) if run else None
        return self._lineage(target, md5, run, experiment)

    def _from_experiment(self, target: str, experiment: Experiment) -> Lineage:
        if experiment.model_md5 is None:
            raise LineageError(f"{target}: DVC experiment {experiment.rev[:7]} records no {MODEL_PATH} in its dvc.lock")
        return self._lineage(target, experiment.model_md5, self._training_run(experiment.model_md5), experiment)

    def _experiment_named(self, name: str | None, md5: str) -> Experiment | None:
        return next((e for e in experiments(self.project) if e.name == name and e.model_md5 == md5), None)


def resolve(target: str, project: Path | None = None) -> Lineage:
    return Resolver(project).resolve(target)


def chain(lineage: Lineage, project: Path | None = None) -> list[str]:
    """The lineage in a few lines, registry first, data last."""
    run, lines = lineage.run, []
    if lineage.versions:
        shown = []
        for v in lineage.versions:
            aliases = "".join(f" @{a}" for a in sorted(lineage.aliases.get(str(v.version), [])))
            shown.append(f"version {v.version}{aliases}")
        lines.append(f"registered  {lineage.registered_model} {', '.join(shown)}")
    else:
        lines.append(f"registered  no version of {lineage.registered_model}")
    if run is None:
        lines.append(f"MLflow run  none in this store trained md5 {lineage.model_md5}")
    else:
        lines.append(f"MLflow run  {run.info.run_name} ({run.info.run_id})")
        state = "dirty: code differed from it" if lineage.dirty else "clean"
        lines.append(f"git commit  {lineage.commit or 'not recorded'} ({state})")
    experiment = lineage.experiment
    if experiment is not None:
        how = (
            f"; restored from DVC's run-cache: trained by run {run.info.run_name}"
            if lineage.restored
            else "; restored from DVC's run-cache, and no run in this store trained it"
            if run is None
            else ""
        )
        where = f"({experiment.rev[:7]}) on baseline {experiment.baseline[:7]}"
        lines.append(f"DVC         experiment {experiment.name} {where}{how}")
    elif run is not None and lineage.tags.get("dvc.exp_name"):
        lines.append(f"DVC         experiment {lineage.tags['dvc.exp_name']} (its git ref is not in this repository)")
    elif run is not None:
        lines.append("DVC         a plain `dvc repro`, no experiment")
    if run is not None:
        differing = params_differing(lineage, project)
        if differing is None:
            lines.append(f"params      {len(run.data.params)} logged; params.yaml at {lineage.commit[:7]} is not here")
        elif not differing:
            lines.append(f"params      as in params.yaml at {lineage.commit[:7]}")
        else:
            shown = [f"{k}={logged} (was {was})" for k, (logged, was) in differing.items()]
            lines.append(f"params      {', '.join(shown)}; the rest as in params.yaml at {lineage.commit[:7]}")
        lines.append(f"data        sha256 {lineage.tags.get('data.sha256', 'not recorded')}")
    lines.append(f"model       md5 {lineage.model_md5}")
    if run is not None:
        metrics = [f"{k} {run.data.metrics[k]:.4f}" for k in METRICS_SHOWN if k in run.data.metrics]
        lines.append(f"metrics     {'  '.join(metrics) or 'not evaluated'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a DVC experiment, registered version or alias, MLflow run id or model md5")
    args = parser.parse_args(argv)
    lineage = resolve(args.name)
    print("\n".join(chain(lineage)))


def cli() -> None:
    run_stage(main, entry_point=True)


if __name__ == "__main__":  # `python -m stages.lineage`: the checkout this code lives in
    run_stage(main)

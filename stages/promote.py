"""Make a run's registered model the champion by hand: to promote it, or to roll back to it.

fmnist-promote tuned                              # a DVC experiment, by its name
fmnist-promote 3f2a9c0e5b7d4e1f8a6b2c9d0e3f4a5b   # an MLflow run, by its id

The alias `champion` on the registered model moves to the newest version that run registered;
`fmnist-predict --mlflow`, `make serve` and the README's snippet use that alias. The pipeline
itself moves the alias only when a new version's test accuracy beats the champion's.
"""

from __future__ import annotations

from stages import ArgumentParser, PipelineError, run_stage
from stages.config import load_params
from stages.tracking import CHAMPION, connect, redacted
from stages.tracking.champion import current_champion, newest_version


class PromoteError(PipelineError):
    """A run or experiment that cannot be made champion; the message says which and why."""


def find_run(client, experiment_id: str, target: str):
    """The run with this id, else the newest finished run of the DVC experiment with this name."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(target)
        if run.info.experiment_id == experiment_id:
            return run
    except MlflowException:  # not a run id
        pass
    for key in ("tags.`dvc.exp_name`", "attributes.run_name"):
        found = client.search_runs(
            [experiment_id],
            filter_string=f"{key} = '{target.replace(chr(39), '')}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            return found[0]
    return None


def promote(target: str) -> str:
    params = load_params()
    store = connect()
    name = params.tracking.registered_model
    with store.operation("is not usable") as client:
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        run = find_run(client, experiment.experiment_id, target) if experiment else None
        if run is None:
            raise PromoteError(
                redacted(f"{target!r}: neither an MLflow run id nor a DVC experiment name in {store.uri}")
            )
        version = newest_version(client, run.info.run_id)
        if version is None:
            raise PromoteError(f"{target!r}: run {run.info.run_id} registered no version of {name}")
        champion = current_champion(client, name)
        before = champion.version if champion else None
        client.set_registered_model_alias(name, CHAMPION, version.version)
    accuracy = version.tags.get("test_acc", "not evaluated")
    was = f"was version {before}" if before else "there was none"
    return f"champion: {name} version {version.version} (run {run.info.run_name}, test_acc {accuracy}); {was}"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a DVC experiment name or an MLflow run id")
    args = parser.parse_args(argv)
    print(promote(args.target))


def cli() -> None:
    run_stage(main, entry_point=True)


if __name__ == "__main__":  # `python -m stages.x`: the checkout this code lives in, as before
    run_stage(main)

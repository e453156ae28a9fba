"""Make a run's registered model the champion by hand: to promote it, or to roll back to it.

fmnist-promote tuned                              # a DVC experiment, by its name (restored ones too)
fmnist-promote 3f2a9c0e5b7d4e1f8a6b2c9d0e3f4a5b   # an MLflow run, by its id
fmnist-promote 3                                  # a registered version; also any name fmnist-lineage takes

The alias `champion` on the registered model moves to the newest version that run registered;
`fmnist-predict --mlflow`, `make serve` and the README's snippet use that alias. The pipeline
itself moves the alias only when a new version's test accuracy beats the champion's.
"""

from __future__ import annotations

from stages import ArgumentParser, PipelineError, run_stage
from stages.lineage import Resolver
from stages.tracking import CHAMPION
from stages.tracking.champion import CHOSEN_BY_HAND_TAG, current_champion
from stages.tracking.store import one_line_errors


class PromoteError(PipelineError):
    """A run or experiment that cannot be made champion; the message says which and why."""


def promote(target: str) -> str:
    resolver = Resolver()
    lineage = resolver.resolve(target)
    client, name = resolver.client, resolver.model_name
    if lineage.run is None:
        raise PromoteError(f"{target!r}: no MLflow run in this store trained its model (md5 {lineage.model_md5})")
    if not lineage.versions:
        raise PromoteError(f"{target!r}: run {lineage.run.info.run_id} registered no version of {name}")
    version = lineage.versions[-1]
    if "test_acc" not in version.tags:
        raise PromoteError(
            f"{target!r}: version {version.version} of {name} was never evaluated; "
            "run its evaluation first (dvc repro, or dvc exp apply then dvc repro evaluate)"
        )
    with one_line_errors(resolver.uri, "is not usable"):
        champion = current_champion(client, name)
        before = champion.version if champion else None
        newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        client.set_registered_model_tag(name, CHOSEN_BY_HAND_TAG, str(newest))
        client.set_registered_model_alias(name, CHAMPION, version.version)
    accuracy = version.tags["test_acc"]
    was = f"was version {before}" if before else "there was none"
    restored = (
        f"; experiment {lineage.experiment.name} was restored from DVC's run-cache, its model trained by that run"
        if lineage.restored
        else ""
    )
    run_name = lineage.run.info.run_name
    return f"champion: {name} version {version.version} (run {run_name}, test_acc {accuracy}); {was}{restored}"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a DVC experiment, registered version or alias, MLflow run id or model md5")
    args = parser.parse_args(argv)
    print(promote(args.target))


def cli() -> None:
    run_stage(main, entry_point=True)


if __name__ == "__main__":  # `python -m stages.x`: the checkout this code lives in, as before
    run_stage(main)

"""The champion rule, shared by evaluate and fmnist-promote: the alias `champion` on the registered
model marks the best version by test accuracy. The pipeline moves it only when a new version beats
the champion's; fmnist-promote moves it by hand."""

from __future__ import annotations

CHAMPION = "champion"


def newest_version(client, run_id: str):
    """The newest registered version of a run's model, or None (a model trained elsewhere)."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version), default=None)


def current_champion(client, name: str):
    """The version the alias marks, or None when there is no champion (or no registered model) yet."""
    from mlflow.exceptions import MlflowException  # imported by the caller's connect() already

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:  # RestException from a server, with the same codes
        # No registered model: RESOURCE_DOES_NOT_EXIST; a model without the alias: INVALID_PARAMETER_VALUE.
        if e.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def champion_accuracy(client, version) -> float | None:
    """A version's test accuracy: its run's metric (exact), else its tag (4 digits, for versions
    whose run is gone); None when never evaluated."""
    accuracy = client.get_run(version.run_id).data.metrics.get("test_acc") if version.run_id else None
    if accuracy is None and "test_acc" in version.tags:
        accuracy = float(version.tags["test_acc"])
    return accuracy


def consider_champion(client, version, test_acc: float) -> str:
    """The compare-and-move step of the champion rule, for a version whose test accuracy is known;
    returns the one line that says what happened."""
    name = version.name
    current = current_champion(client, name)
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

"""Reading MLflow stores as a user would: runs, artifacts."""

from __future__ import annotations

from pathlib import Path

EXPERIMENT = "fashion-mnist-softmax"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def store_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def all_runs(client) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def runs(project: Path) -> list:
    """Every MLflow run in a project's own store."""
    return all_runs(client_for(store_uri(project)))


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found

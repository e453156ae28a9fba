"""The champion rule, shared by evaluate and fmnist-promote: the alias `champion` on the registered
model marks the best version by test accuracy. The pipeline moves it only when a new version beats
the champion's; fmnist-promote moves it by hand."""

from __future__ import annotations

CHAMPION = "champion"
# A registered-model tag fmnist-promote sets: the newest version number when a person chose the
# champion. The pipeline's rule then weighs only versions after it (and the chosen champion), so a
# rollback holds until a new version beats it.
CHOSEN_BY_HAND_TAG = "champion.chosen_by_hand_at_version"
SETTLE_ROUNDS = 20  # each round moves the alias to a strictly better version: a few suffice


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


def _contenders(client, name: str, floor: int) -> list:
    """Every evaluated version registered after the last choice by hand (fmnist-promote)."""
    versions = client.search_model_versions(f"name = '{name}'")
    return [v for v in versions if "test_acc" in v.tags and int(v.version) > floor]


def _best(client, name: str, current, version, test_acc: float):
    """(best version, its accuracy) among the champion and the contenders: the higher test_acc; on a
    tie the champion, then the older version (a later equal version does not beat it)."""
    floor = int(client.get_registered_model(name).tags.get(CHOSEN_BY_HAND_TAG, 0))
    accuracy = {str(version.version): test_acc}
    candidates = {str(v.version): v for v in [*_contenders(client, name, floor), version]}
    if current is not None:
        candidates[str(current.version)] = current
    for key, v in candidates.items():
        if key not in accuracy:
            accuracy[key] = champion_accuracy(client, v)
    held = str(current.version) if current is not None else None

    def rank(key):
        acc = accuracy[key]
        return (acc if acc is not None else float("-inf"), key == held, -int(key))

    best = max(candidates, key=rank)
    return candidates[best], accuracy[best]


def _point_alias(client, name: str, version: str, current) -> None:
    """Point the alias, now on `current` (None: no champion yet), at `version`. Evaluations that make
    the first champion at once each insert the alias; MLflow's store reads, then inserts, so it
    refuses all but one with a unique-key error. The alias exists then, and the rule's next round
    reads it and moves it as a plain update. Any other failure is raised."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException:
        if current is not None or current_champion(client, name) is None:
            raise


def consider_champion(client, version, test_acc: float) -> str:
    """The champion rule, for a version whose test accuracy is known (and tagged): the alias ends on
    the best evaluated version since the last choice by hand, or on the champion it has.

    Safe with evaluations running at once on a shared server: after moving the alias, each one
    reads it again and settles on the best it can see; every evaluation tags its version before it
    looks, so the last one to move the alias sees every contender. Returns the one line that says
    what happened."""
    name = version.name
    before = current = current_champion(client, name)
    for _ in range(SETTLE_ROUNDS):
        best, best_acc = _best(client, name, current, version, test_acc)
        if current is not None and str(current.version) == str(best.version):
            break
        _point_alias(client, name, best.version, current)
        current = current_champion(client, name)
    mine = f"{name} version {version.version} (test_acc {test_acc:.4f})"
    if str(best.version) != str(version.version):
        shown = f"{best_acc:.4f}" if best_acc is not None else "never evaluated"
        return f"champion: {mine} does not beat version {best.version} ({shown}); champion stays version {best.version}"
    if before is None:
        return f"champion: {mine} is the first champion"
    if str(before.version) == str(version.version):
        return f"champion: {mine} stays champion"
    was = champion_accuracy(client, before)
    was = f"{was:.4f}" if was is not None else "never evaluated"
    return f"champion: {mine} beats version {before.version} ({was}); champion moved to version {version.version}"

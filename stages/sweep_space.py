"""A sweep's search space, from DVC's `-S` syntax parsed by Hydra's override grammar.

Grid: `-S 'lr=0.01,0.05' -S 'batch_size=64,256'` is every combination (choice and range sweeps).
Search: `-S 'lr=tag(log, interval(0.001, 1))' -S 'batch_size=choice(64,128)'` maps each sweep onto
an Optuna distribution the way Hydra's Optuna sweeper does (plugins/hydra_optuna_sweeper), except
that `range(a, b)` stays exclusive of `b` as in the grid. A plain `key=value` is the same for every
point. Each key must be a param of params.yaml, and every point's params are validated before
anything runs.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages import PipelineError
from stages.config import parse_params

# Short names for the keys that make a point's name: `lr0.05-bs64`.
ABBREVIATIONS = {"batch_size": "bs", "num_epochs": "ep", "momentum": "mom", "weight_decay": "wd", "init_std": "std"}


class SpaceError(PipelineError):
    """A `-S` value that does not parse, names no param, or gives a param a bad value."""


@dataclass(frozen=True)
class Space:
    fixed: dict  # key -> value, the same for every point
    sweeps: dict  # key -> list of values (grid) or an Optuna distribution (search)
    order: tuple = ()  # the keys as the `-S` options gave them


def format_value(value) -> str:
    """A value as `dvc exp run -S` and point names take it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise SpaceError(f"-S: {str(e).splitlines()[0]}") from None


def _check_key(key: str, raw: dict) -> None:
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SpaceError(f"-S {key}: no such param in params.yaml")
        node = node[part]


def _distribution(override):
    """Hydra's Optuna sweeper's mapping: choice -> categorical, range -> int/float steps,
    interval -> int/float, `tag(log, ...)` -> log scale."""
    import optuna.distributions as d

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return d.CategoricalDistribution(list(override.sweep_iterator()))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise SpaceError(f"-S {override.input_line}: an empty range")
        if all(isinstance(v, int) for v in values):
            return d.IntDistribution(values[0], values[-1], step=int(value.step))
        return d.FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    log = "log" in value.tags
    if value.start == int(value.start) and value.end == int(value.end) and "int" in value.tags:
        return d.IntDistribution(int(value.start), int(value.end), log=log)
    return d.FloatDistribution(float(value.start), float(value.end), log=log)


def parse_space(overrides: list[str], params_file: Path, search: bool) -> Space:
    raw = yaml.safe_load(params_file.read_text())
    fixed, sweeps = {}, {}
    for override in _parse(overrides):
        key = override.key_or_group
        _check_key(key, raw)
        if not override.is_sweep_override():
            fixed[key] = override.value()
        elif search:
            sweeps[key] = _distribution(override)
        elif override.is_interval_sweep():
            raise SpaceError(f"-S {override.input_line}: an interval has no grid; search it with --trials N")
        else:
            sweeps[key] = list(override.sweep_iterator())
    return Space(fixed, sweeps, tuple(o.key_or_group for o in _parse(overrides)))


def grid(space: Space) -> list[dict]:
    """Every combination, in the order the `-S` options were given."""
    keys = list(space.sweeps)
    combos = itertools.product(*space.sweeps.values())
    return [{**space.fixed, **dict(zip(keys, combo, strict=True))} for combo in combos]


def point_name(space: Space, values: dict) -> str:
    """`lr0.05-bs64`: every `-S` key, abbreviated, with its value, in the order given."""
    keys = [k for k in space.order if k in values] or list(values)
    parts = [f"{ABBREVIATIONS.get(k, k.replace('.', '_'))}{format_value(values[k])}" for k in keys]
    return "-".join(parts).replace("/", "_").replace(" ", "") or "baseline"


def validate(values: dict, params_file: Path) -> dict:
    """The project's params with this point's values applied, checked by the pipeline's own rules."""
    raw = copy.deepcopy(yaml.safe_load(params_file.read_text()))
    for key, value in values.items():
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    try:
        parse_params(raw)
    except PipelineError as e:
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
        raise SpaceError(f"point {shown}: {e}") from None
    return raw

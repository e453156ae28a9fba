"""The sweep's search space: DVC's `-S` syntax parsed by Hydra's grammar, onto grids and Optuna."""

from __future__ import annotations

import optuna.distributions as d
import pytest

from stages.sweep_space import SpaceError, grid, parse_space, point_name, validate
from tests.helpers import ROOT

PARAMS = ROOT / "params.yaml"


def test_grid_is_every_combination_named_after_its_params():
    space = parse_space(["lr=0.01,0.05", "batch_size=64,256", "num_epochs=2"], PARAMS, search=False)
    points = grid(space)
    assert [point_name(space, p) for p in points] == [
        "lr0.01-bs64-ep2", "lr0.01-bs256-ep2", "lr0.05-bs64-ep2", "lr0.05-bs256-ep2"
    ]  # fmt: skip
    assert points[1] == {"num_epochs": 2, "lr": 0.01, "batch_size": 256}


def test_search_maps_hydra_sweeps_onto_optuna_distributions():
    space = parse_space(
        ["lr=tag(log, interval(0.001, 1))", "batch_size=choice(64,128)", "momentum=interval(0, 0.95)",
         "num_epochs=range(1,4)"], PARAMS, search=True,
    )  # fmt: skip
    assert space.sweeps["lr"] == d.FloatDistribution(0.001, 1.0, log=True)
    assert space.sweeps["batch_size"] == d.CategoricalDistribution([64, 128])
    assert space.sweeps["momentum"] == d.FloatDistribution(0.0, 0.95)
    assert space.sweeps["num_epochs"] == d.IntDistribution(1, 3)


@pytest.mark.parametrize(
    ("setting", "search", "message"),
    [
        ("lrr=0.1,0.2", False, "-S lrr: no such param in params.yaml"),
        ("lr=interval(0, 1)", False, "-S lr=interval(0, 1): an interval has no grid; search it with --trials N"),
        ("lr=(", False, "-S: "),
    ],
)
def test_bad_settings_name_the_culprit(setting, search, message):
    with pytest.raises(SpaceError, match=None) as raised:
        parse_space([setting], PARAMS, search=search)
    assert str(raised.value).startswith(message)


def test_points_are_validated_by_the_pipelines_rules():
    with pytest.raises(SpaceError, match=r"point momentum=1.5: params.yaml: momentum: 1.5 is not allowed"):
        validate({"momentum": 1.5}, PARAMS)

import subprocess
import sys

import pytest
import yaml

from stages.config import ConfigError, load_params, parse_params
from tests.helpers import copy_project, default_params


def with_changes(**changes) -> dict:
    params = default_params()
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            params[section][sub] = value
        else:
            params[key] = value
    return params


def test_defaults_are_the_books():
    p = parse_params(default_params())
    assert (p.train.lr, p.train.batch_size, p.train.num_epochs, p.train.init_std) == (0.1, 256, 10, 0.01)
    assert "/usr/share/datasets/fashion-mnist" in p.data.local_dirs
    assert all(url.startswith("https://") for url in p.data.mirrors)


@pytest.mark.parametrize("text, expected", [("1e-3", 0.001), ("5E-2", 0.05), (".5", 0.5), (0.05, 0.05), (1, 1.0)])
def test_numbers_people_write_are_numbers(text, expected):
    # PyYAML reads 1e-3 (no dot) as a string.
    raw = yaml.safe_load(f"lr: {text}")["lr"]
    assert parse_params(with_changes(lr=raw)).train.lr == expected


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"lr": "abc"}, "lr: 'abc' is not allowed; expected a number > 0"),
        ({"lr": 0}, "lr: 0 is not allowed"),
        ({"lr": -1}, "lr: -1 is not allowed"),
        ({"lr": True}, "lr: True is not allowed"),
        ({"lr": ".nan"}, "lr: '.nan'"),
        ({"batch_size": 0}, "batch_size: 0 is not allowed; expected an integer >= 1"),
        ({"batch_size": 256.5}, "batch_size: 256.5 is not allowed"),
        ({"num_epochs": -3}, "num_epochs: -3 is not allowed"),
        ({"init_std": -0.01}, "init_std: -0.01 is not allowed; expected a number >= 0"),
        ({"momentum": 1.0}, "momentum: 1.0 is not allowed"),
        ({"device": "tpu"}, "device: 'tpu' is not allowed"),
        ({"patience": 2}, "patience: 2 needs a validation split"),
        ({"data__mirrors": ["http://example.com/"]}, "data.mirrors: 'http://example.com/' is not allowed"),
        ({"data__timeout_s": "soon"}, "data.timeout_s: 'soon' is not allowed"),
        ({"evaluate__batch_size": 0}, "evaluate.batch_size: 0 is not allowed"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(changes, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params(with_changes(**changes))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_is_rejected_with_a_suggestion():
    params = default_params()
    params["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        parse_params(params)
    params = default_params()
    params["lrr"] = 0.05
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\)"):
        parse_params(params)


def test_missing_key_and_section():
    params = default_params()
    del params["seed"]
    with pytest.raises(ConfigError, match="missing key 'seed'"):
        parse_params(params)
    params = default_params()
    del params["tracking"]
    with pytest.raises(ConfigError, match="missing section 'tracking'"):
        parse_params(params)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lr: 0.1\nbatch_size: [256\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line \d+, column \d+: malformed YAML"):
        load_params(path)


BAD_FILES = {
    "wrong type": ("lr: 0.1", "lr: abc", "error: params.yaml: lr: 'abc' is not allowed; expected a number > 0"),
    "out of range": ("num_epochs: 10", "num_epochs: -3", "error: params.yaml: num_epochs: -3 is not allowed"),
    "unknown key": ("lr: 0.1", "learning_rate: 0.1", "error: params.yaml: unknown key 'learning_rate'"),
    "malformed": ("lr: 0.1", "lr: [0.1", "error: params.yaml: line "),
}


@pytest.mark.parametrize("stage", ["download", "train", "evaluate"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_stage_stops_on_bad_params_before_importing_torch(tmp_path, stage, case):
    project = copy_project(tmp_path)
    good, bad, message = BAD_FILES[case]
    text = (project / "params.yaml").read_text()
    assert good in text
    (project / "params.yaml").write_text(text.replace(good, bad, 1))
    args = {"download": ["--out", "d"], "train": ["--data", "d", "--model", "m", "--history", "h", "--run-info", "r"]}
    args["evaluate"] = [*args["train"][:6], "--out", "o"]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"stages.{stage}", *args[stage]],
        cwd=project, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith(message)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "mlflow" not in imported
    assert sorted(p.name for p in project.iterdir() if p.name in {"d", "m", "h", "r", "o"}) == []

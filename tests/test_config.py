import re
import subprocess
import sys
import time

import pytest
import yaml

from stages.config import NAME_MAX, PARAM_MAX, ConfigError, as_flat_dict, load_params, parse_params
from tests.helpers import DVC, ROOT, copy_project, default_params, error_line, make_project, run, stage_command


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
    assert (p.lr, p.batch_size, p.num_epochs, p.init_std) == (0.1, 256, 10, 0.01)
    assert "/usr/share/datasets/fashion-mnist" in p.data.local_dirs
    assert all(url.startswith("https://") for url in p.data.mirrors)


@pytest.mark.parametrize("text, expected", [("1e-3", 0.001), ("5E-2", 0.05), (".5", 0.5), (0.05, 0.05), (1, 1.0)])
def test_numbers_people_write_are_numbers(text, expected):
    # PyYAML reads 1e-3 (no dot) as a string.
    raw = yaml.safe_load(f"lr: {text}")["lr"]
    assert parse_params(with_changes(lr=raw)).lr == expected


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
        ({"data__timeout_s": 1e12}, "data.timeout_s: 1000000000000.0 is not allowed; expected a number > 0 and <="),
        ({"data__deadline_s": "1e12"}, "data.deadline_s: '1e12' is not allowed; expected a number > 0 and <= 86400"),
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
    proc = subprocess.run(
        stage_command(stage, sys.executable, "-X", "importtime"), cwd=project, capture_output=True, text=True
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith(message)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "mlflow" not in imported
    assert sorted(p.name for p in project.iterdir() if p.name in {"d", "m", "h", "r", "o"}) == []


# --- hostile input: values that used to pass validation and fail later, or not fail at all ----


@pytest.mark.parametrize("key", ["seed", "val_seed"])
def test_seeds_stop_at_what_torch_accepts(key):
    import torch

    assert parse_params(with_changes(**{key: 2**64 - 1})).model_dump()[key] == 2**64 - 1
    torch.manual_seed(2**64 - 1)  # the largest seed we allow is one torch takes...
    with pytest.raises(ConfigError) as err:
        parse_params(with_changes(**{key: 2**64}))
    expected = f"params.yaml: {key}: 18446744073709551616 is not allowed; expected an integer >= 0 and <= {2**64 - 1}"
    assert str(err.value) == expected
    with pytest.raises(ValueError, match="Overflow"):  # ...and one more is what it would have crashed on
        torch.manual_seed(2**64)


def test_determinism_is_portable_or_fast():
    assert parse_params(with_changes(determinism="fast")).determinism == "fast"
    with pytest.raises(ConfigError, match="determinism: 'slow' is not allowed; expected one of 'portable', 'fast'$"):
        parse_params(with_changes(determinism="slow"))


def test_non_utf8_params_name_the_file_and_byte(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 0\nlr: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^params.yaml: byte offset 21: not UTF-8 text \(0xe9\)$"):
        load_params(path)


@pytest.mark.parametrize(
    "text, where, key, first",
    [
        ("lr: 0.1\nseed: 0\nlr: 0.5\n", "line 3, column 1", "lr", 1),
        ("data:\n  retries: 2\n  retries: 3\n", "line 3, column 3", "retries", 2),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text, where, key, first):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"params.yaml: {where}: malformed YAML: duplicate key {key!r} (first on line {first})"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(default_params(), sort_keys=False).replace("evaluate:\n", "evaluate: &ev\n")
    path.write_text(text + "other: {<<: *ev, batch_size: 5}\n")
    with pytest.raises(ConfigError, match="unknown key 'other'"):  # past the YAML reader: the merge was fine
        load_params(path)


def test_names_and_params_fit_mlflow():
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModel
    from mlflow.store.tracking.dbmodels.models import SqlExperiment
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    # Our limits are MLflow's own: a wider column or limit in a new MLflow shows up here.
    assert (SqlExperiment.name.type.length, SqlRegisteredModel.name.type.length) == (NAME_MAX, NAME_MAX)
    assert PARAM_MAX == MAX_PARAM_VAL_LENGTH
    assert parse_params(with_changes(tracking__experiment="e" * 256, tracking__registered_model="m" * 256))
    for key in ("experiment", "registered_model"):
        with pytest.raises(ConfigError, match=rf"^params.yaml: tracking.{key}: 'x{{59}}\.\.\. \(259 characters\) is"):
            parse_params(with_changes(**{f"tracking__{key}": "x" * 257}))
    with pytest.raises(ConfigError, match="tracking.registered_model: '..' is not allowed"):
        parse_params(with_changes(tracking__registered_model=".."))


def test_list_params_fit_one_mlflow_param():
    mirrors = [f"https://mirror{i}.example.com/fashion-mnist/" for i in range(200)]  # 8000+ characters as JSON
    with pytest.raises(ConfigError, match=r"^params.yaml: data.mirrors: \d{4} characters, more than MLflow keeps"):
        parse_params(with_changes(data__mirrors=mirrors))
    assert parse_params(with_changes(data__mirrors=mirrors[:100])).data.mirrors == mirrors[:100]


def test_mirror_credentials_are_refused_without_echoing_them():
    for url in ["https://user:s3cret@example.com/", "http://user:s3cret@example.com/"]:
        with pytest.raises(ConfigError) as err:
            parse_params(with_changes(data__mirrors=[url]))
        assert str(err.value) == "params.yaml: data.mirrors: example.com: credentials do not belong in params.yaml"


def test_config_objects_are_frozen_and_copyable():
    p = parse_params(default_params())
    with pytest.raises(ValueError, match="frozen"):
        p.lr = 0.5
    assert p.model_copy(update={"lr": 0.5}).lr == 0.5 and p.lr == 0.1
    flat = as_flat_dict(p)
    assert flat["lr"] == 0.1 and flat["tracking.experiment"] == "fashion-mnist-softmax"
    assert flat["data.mirrors"] == list(p.data.mirrors) and "train.lr" not in flat


CHECK_CASES = {
    "ok": ("lr: 0.1", "lr: 0.1", 0, "params.yaml: ok"),
    "duplicate": ("lr: 0.1", "lr: 0.1\nlr: 0.5", 1, "error: params.yaml: line "),
    "not utf-8": ("lr: 0.1", "lr: 0.1 # \udce9", 1, "error: params.yaml: byte offset "),
    "huge seed": ("seed: 0", f"seed: {2**64}", 1, "error: params.yaml: seed: 18446744073709551616 is not allowed"),
}


@pytest.mark.parametrize("case", CHECK_CASES)
def test_check_params_stage_says_ok_or_one_line(tmp_path, case):
    project = copy_project(tmp_path)
    good, bad, code, line = CHECK_CASES[case]
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_bytes(text.replace(good, bad, 1).encode("utf-8", "surrogateescape"))
    proc = subprocess.run([sys.executable, "-m", "stages.config"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == code
    output = (proc.stdout + proc.stderr).splitlines()
    assert len(output) == 1 and output[0].startswith(line)


@pytest.mark.slow
def test_dvc_and_the_stages_refuse_a_duplicate_key_alike(tmp_path):
    project = make_project(tmp_path / "project", default_params())
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("lr: 0.1", "lr: 0.1\nlr: 0.5", 1))
    dvc = run([DVC, "status", "check_params"], project, check=False)
    assert dvc.returncode != 0 and "duplicate key" in dvc.stderr + dvc.stdout
    stage = run([sys.executable, "-m", "stages.config"], project, check=False)
    assert stage.returncode == 1 and error_line(stage).startswith("error: params.yaml: line 5, column 1:")
    assert "duplicate key 'lr'" in error_line(stage)


BILLION_LAUGHS = "".join(  # 396 bytes; 9**9 strings once its aliases are expanded
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
)

HOSTILE_FILES = {  # what a hostile or broken params.yaml can be: one line, in well under a second
    "1000 deep": lambda text: text + "x: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
    "1000 deep in blocks": lambda text: text + "".join("  " * i + "k:\n" for i in range(1000)) + "  " * 1000 + "v\n",
    "alias bomb": lambda text: BILLION_LAUGHS,
    "50 MB value": lambda text: text.replace("lr: ", "lr: " + "x" * 50_000_000 + "\nold_lr: "),
}


@pytest.mark.parametrize(
    "case, message",
    [
        ("1000 deep", r"params.yaml: line \d+: nested more than 20 levels deep"),
        ("1000 deep in blocks", r"params.yaml: line \d+: nested more than 20 levels deep"),
        ("alias bomb", r"params.yaml: line 6: more than 100000 values once its aliases are expanded"),
        ("50 MB value", r"params.yaml: larger than 1 MB; params are a page of settings"),
    ],
)
def test_hostile_params_files_are_one_short_line_at_once(tmp_path, case, message):
    project = copy_project(tmp_path)
    path = project / "params.yaml"
    path.write_text(HOSTILE_FILES[case](path.read_text()))
    started = time.monotonic()
    proc = run([sys.executable, "-m", "stages.config"], project, check=False)
    assert time.monotonic() - started < 10
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and len(proc.stderr) < 200
    assert re.fullmatch(f"error: {message}", error_line(proc)), proc.stderr


def test_hostile_params_are_refused_by_the_loader_too(tmp_path):
    for case in HOSTILE_FILES:
        path = tmp_path / "params.yaml"
        path.write_text(HOSTILE_FILES[case]((ROOT / "params.yaml").read_text()))
        with pytest.raises(ConfigError):
            load_params(path)


def test_a_long_value_or_key_is_cut_in_the_message():
    params = default_params()
    params["k" * 100_000] = 1
    with pytest.raises(ConfigError) as refused:
        parse_params(params)
    assert len(str(refused.value)) < 400 and "characters)" in str(refused.value)

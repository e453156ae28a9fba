"""params.yaml -> typed, validated config. Validation happens once, here, before any heavy import."""

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin
from urllib.parse import urlparse

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from stages import PipelineError, project_root, run_stage

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
SEED_MAX = 2**64 - 1  # torch.manual_seed overflows above this
NAME_MAX = 256  # experiment and registered model names: String(256) columns in MLflow's SQL stores
MESSAGE_MAX = 300  # characters of a message about params.yaml
PARAM_MAX = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH; lists are logged as JSON


class ConfigError(PipelineError):
    """A bad value in params.yaml; the message names the key, the value and what is allowed."""


def _mirror_url(url: str) -> str:
    u = urlparse(url)
    if u.username or u.password:  # params are logged to MLflow and committed to git; checked first: never echo them
        raise ValueError(f"{u.hostname}: credentials do not belong in params.yaml")
    if not (u.scheme == "https" or (u.scheme == "http" and u.hostname in LOOPBACK_HOSTS)) or not u.hostname:
        raise ValueError(f"{url!r} is not allowed; expected an https:// URL (plain http:// only on localhost)")
    return url


# PyYAML reads `1e-3` (no dot) as a string; people write it meaning 0.001.
_DECIMAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
Number = Annotated[float, BeforeValidator(lambda v: float(v) if isinstance(v, str) and _DECIMAL.fullmatch(v) else v)]
Text = Annotated[str, Field(min_length=1)]
Name = Annotated[str, Field(max_length=NAME_MAX)]


class _Section(BaseModel):
    # strict: a bool is not a number, 256.5 is not an integer, "abc" is not a number.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class DataConfig(_Section):
    local_dirs: list[Text] = Field(description="a list of directories")
    mirrors: list[Annotated[Text, AfterValidator(_mirror_url)]] = Field(description="a list of https:// URLs")
    # A day at most: a socket timeout past ~1e9 s overflows (a traceback, once a mirror is tried).
    timeout_s: Number = Field(gt=0, le=86400)  # one network read
    deadline_s: Number = Field(gt=0, le=86400)  # one whole file, retries included
    retries: int = Field(ge=0)


class EvaluateConfig(_Section):
    batch_size: int = Field(ge=1)
    misclassified_grid: int = Field(ge=0, le=100)


class TrackingConfig(_Section):
    # MLflow's SQL stores keep names in String(256) columns; a model name must be a plain path segment.
    experiment: Name = Field(pattern=r"^\S", description=f"up to {NAME_MAX} characters, no leading space")
    registered_model: Name = Field(
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$", description=f"up to {NAME_MAX} of A-Za-z0-9_.-, no leading ."
    )


SECTIONS = ("data", "evaluate", "tracking")
EVALUATION = "evaluate"  # the section that does not shape the model


class Params(_Section):
    """params.yaml, key for key. Hyperparameters are top-level keys so `dvc exp run -S lr=0.05` works."""

    seed: int = Field(ge=0, le=SEED_MAX)
    batch_size: int = Field(ge=1)
    num_epochs: int = Field(ge=1)
    lr: Number = Field(gt=0)
    init_std: Number = Field(ge=0)
    weight_decay: Number = Field(ge=0)
    momentum: Number = Field(ge=0, lt=1)
    val_size: int = Field(ge=0)
    val_seed: int = Field(ge=0, le=SEED_MAX)
    patience: int = Field(ge=0)
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    determinism: Literal["portable", "fast"]
    data: DataConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig

    @model_validator(mode="after")
    def _relations(self):
        if self.patience and not self.val_size:
            raise ValueError(f"patience: {self.patience} needs a validation split; set val_size > 0")
        for key, value in as_flat_dict(self).items():
            logged = mlflow_value(value)
            if len(logged) > PARAM_MAX:
                raise ValueError(f"{key}: {len(logged)} characters, more than MLflow keeps for a param ({PARAM_MAX})")
        return self

    def hyperparameters(self) -> dict:
        """The top-level keys: what a checkpoint records as the config it was trained with."""
        return self.model_dump(exclude=set(SECTIONS))

    def training_params(self) -> dict:
        """Every param that shapes the model (all but the evaluation settings), flat: what a training
        run logs as its MLflow params and hashes into its name."""
        return self.hyperparameters() | _flat_sections(self, [s for s in SECTIONS if s != EVALUATION])

    def evaluation_settings(self) -> dict:
        """`evaluate.*`, flat: how a model was evaluated, which may change between evaluations."""
        return _flat_sections(self, [EVALUATION])


def mlflow_value(value) -> str:
    """A param's value as MLflow stores it: lists as JSON, everything else as str()."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def _expected(field) -> str:
    """What a field allows, in words: 'an integer >= 1', 'a number >= 0 and < 1', 'one of ...'."""
    if field.description or get_origin(field.annotation) is Literal:
        return field.description or "one of " + ", ".join(map(repr, get_args(field.annotation)))
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [f"{symbols[a]} {getattr(m, a)}" for m in field.metadata for a in symbols if hasattr(m, a)]
    return f"{'an integer' if field.annotation is int else 'a number'} {' and '.join(bounds)}"


def _message(error: dict, raw: dict) -> str:
    """One pydantic error -> the one line a user reads: the key, the value, what is allowed."""
    loc = error["loc"][:2]  # ("lr",), ("data", "timeout_s"), ("data",) or (); a list item: its list
    key, name = ".".join(map(str, loc)), loc[-1] if loc else None
    fields = Params.model_fields[loc[0]].annotation.model_fields if len(loc) == 2 else Params.model_fields
    if error["type"] == "missing":
        return f"missing {'section' if name in SECTIONS else 'key'} {key!r}"
    if error["type"] == "model_type":
        return f"{key or 'the top level'}: expected a mapping, got {error['input']!r}"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(name), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; allowed: {', '.join(sorted(fields))}"
    if error["type"] == "value_error":  # our validators' own words
        return ": ".join(filter(None, [key, str(error["ctx"]["error"])]))
    if name not in fields:
        return f"{key}: {error['msg']}"
    value = repr(raw[loc[0]][name] if len(loc) == 2 else raw[name])  # as written: '1e12', not 1e12
    value = value if len(value) <= 80 else f"{value[:60]}... ({len(value)} characters)"
    return f"{key}: {value} is not allowed; expected {_expected(fields[name])}"


def parse_params(raw) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        # An unknown key first: with `lrr` for `lr`, the typo is the news, not the missing `lr`.
        first = min(e.errors(), key=lambda error: error["type"] != "extra_forbidden")
        message = _message(first, raw)  # a key or value can be huge: the line stays readable
        message = message if len(message) <= MESSAGE_MAX else f"{message[:MESSAGE_MAX]}... ({len(message)} characters)"
        raise ConfigError(f"params.yaml: {message}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; DVC's parser refuses them, and so do we."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in lines:
                    problem = f"duplicate key {key!r} (first on line {lines[key]})"
                    raise yaml.MarkedYAMLError(problem=problem, problem_mark=key_node.start_mark)
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# params.yaml is a page of settings. These bounds refuse, in a fraction of a second, what would
# otherwise cost a RecursionError (1000 levels deep), minutes and a MemoryError (a 493-byte
# "billion laughs" of nested aliases) or an error line quoting a 50 MB value.
PARAMS_MAX_BYTES = 1 << 20
PARAMS_MAX_DEPTH = 20
PARAMS_MAX_NODES = 100_000  # scalars and collections, counted with every alias expanded


def _check_shape(text: str, name: str) -> None:
    """Walk the YAML events (no recursion, nothing built) and refuse too deep or too many nodes."""
    sizes: dict[str, int] = {}  # anchor -> its node count, aliases expanded
    open_nodes: list[list] = [[None, 0]]  # per open collection: its anchor, its nodes so far
    for event in yaml.parse(text, Loader=_UniqueKeyLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) - 1 > PARAMS_MAX_DEPTH:
                where = f"line {event.start_mark.line + 1}"
                raise ConfigError(f"{name}: {where}: nested more than {PARAMS_MAX_DEPTH} levels deep")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_nodes.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, count = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, count = None, sizes.get(event.anchor, 1)
        else:
            continue
        if anchor:
            sizes[anchor] = count
        open_nodes[-1][1] += count
        if open_nodes[-1][1] > PARAMS_MAX_NODES:
            where = f"line {event.start_mark.line + 1}"
            raise ConfigError(f"{name}: {where}: more than {PARAMS_MAX_NODES} values once its aliases are expanded")


def load_params(path: Path | None = None) -> Params:
    path = Path(path) if path else project_root() / "params.yaml"
    try:
        with open(path, "rb") as f:
            data = f.read(PARAMS_MAX_BYTES + 1)
        if len(data) > PARAMS_MAX_BYTES:
            raise ConfigError(f"{path.name}: larger than {PARAMS_MAX_BYTES >> 20} MB; params are a page of settings")
        text = data.decode()
        _check_shape(text, path.name)
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path.name}: byte offset {e.start}: not UTF-8 text ({e.object[e.start]:#04x})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path.name}:{where} malformed YAML: {problem[:200]}") from None
    return parse_params(raw)


def _flat_sections(params: Params, sections) -> dict:
    return {f"{s}.{key}": value for s in sections for key, value in getattr(params, s).model_dump().items()}


def as_flat_dict(params: Params) -> dict:
    """Params as MLflow wants them: top-level hyperparameters plus dotted section keys."""
    return params.hyperparameters() | _flat_sections(params, SECTIONS)


def main() -> None:
    """`python -m stages.config`: check params.yaml without running anything."""
    load_params()
    print("params.yaml: ok")


if __name__ == "__main__":
    run_stage(main)

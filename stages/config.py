"""params.yaml -> typed, validated config. Validation happens once, here, before any heavy import."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

import yaml

from stages import PipelineError

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"  # the project's own, wherever the stage is started from
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(PipelineError):
    """A bad value in params.yaml; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters: flat top-level keys so `dvc exp run -S lr=0.05` works as written."""

    seed: int = field(metadata={"min": 0})
    batch_size: int = field(metadata={"min": 1})
    num_epochs: int = field(metadata={"min": 1})
    lr: float = field(metadata={"gt": 0})
    init_std: float = field(metadata={"min": 0})
    weight_decay: float = field(metadata={"min": 0})
    momentum: float = field(metadata={"min": 0, "lt": 1})
    val_size: int = field(metadata={"min": 0})
    val_seed: int = field(metadata={"min": 0})
    patience: int = field(metadata={"min": 0})
    device: str = field(metadata={"pattern": r"auto|cpu|cuda(:\d+)?"})
    determinism: str = field(metadata={"pattern": r"portable|fast"})


@dataclass(frozen=True)
class DataConfig:
    local_dirs: list[str]
    mirrors: list[str]
    timeout_s: float = field(metadata={"gt": 0})
    deadline_s: float = field(metadata={"gt": 0})
    retries: int = field(metadata={"min": 0})


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = field(metadata={"min": 1})
    misclassified_grid: int = field(metadata={"min": 0, "max": 100})


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = field(metadata={"pattern": r"\S.*"})
    registered_model: str = field(metadata={"pattern": r"[A-Za-z0-9_.-]+"})


@dataclass(frozen=True)
class Params:
    train: TrainConfig
    data: DataConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig


SECTIONS = {"data": DataConfig, "evaluate": EvaluateConfig, "tracking": TrackingConfig}


def _describe(meta: dict, kind: str) -> str:
    parts = []
    if "gt" in meta:
        parts.append(f"> {meta['gt']}")
    if "min" in meta:
        parts.append(f">= {meta['min']}")
    if "lt" in meta:
        parts.append(f"< {meta['lt']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    if "pattern" in meta:
        return f"a string matching {meta['pattern']}"
    return f"{kind} {' and '.join(parts)}".strip()


_KINDS = {"int": (int, "an integer"), "float": (float, "a number"), "str": (str, "a string")}
_KINDS["list[str]"] = (list, "a list of strings")


def _coerce(key: str, raw, f: dataclasses.Field):
    typ, kind = _KINDS[f.type]
    meta = f.metadata
    error = ConfigError(f"params.yaml: {key}: {raw!r} is not allowed; expected {_describe(meta, kind)}")
    value = raw
    if typ is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads `1e-3` (no dot) as a string; people write it meaning 0.001
    if isinstance(value, bool):
        raise error
    if typ is float:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise error
        value = float(value)
    elif typ is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise error
        return list(value)
    elif not isinstance(value, typ):
        raise error
    if typ is str:
        if not re.fullmatch(meta.get("pattern", ".*"), value):
            raise error
        return value
    too_small = ("min" in meta and value < meta["min"]) or ("gt" in meta and not value > meta["gt"])
    too_big = ("max" in meta and value > meta["max"]) or ("lt" in meta and not value < meta["lt"])
    if too_small or too_big:
        raise error
    return value


def _build(cls, raw: dict, prefix: str = ""):
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            hint = f" (did you mean {_closest(key, names)!r}?)" if _closest(key, names) else ""
            raise ConfigError(f"params.yaml: unknown key {prefix}{key!r}{hint}; allowed: {', '.join(sorted(names))}")
    values = {}
    for f in fields(cls):
        if f.name not in raw:
            raise ConfigError(f"params.yaml: missing key {prefix}{f.name!r}")
        values[f.name] = _coerce(prefix + f.name, raw[f.name], f)
    return cls(**values)


def _closest(key: str, names: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    return match[0] if match else None


def parse_params(raw) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml: expected a mapping of keys to values at the top level")
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    sections = {}
    for name, cls in SECTIONS.items():
        if name not in raw:
            raise ConfigError(f"params.yaml: missing section {name!r}")
        if not isinstance(raw[name], dict):
            raise ConfigError(f"params.yaml: {name}: expected a mapping, got {raw[name]!r}")
        sections[name] = _build(cls, raw[name], prefix=f"{name}.")
    params = Params(train=_build(TrainConfig, top), **sections)
    _check_relations(params)
    return params


def _check_relations(p: Params) -> None:
    if p.train.patience and not p.train.val_size:
        raise ConfigError(f"params.yaml: patience: {p.train.patience} needs a validation split; set val_size > 0")
    for url in p.data.mirrors:
        u = urlparse(url)
        plain_http_ok = u.scheme == "http" and u.hostname in LOOPBACK_HOSTS
        if not (u.scheme == "https" or plain_http_ok) or not u.hostname:
            raise ConfigError(
                f"params.yaml: data.mirrors: {url!r} is not allowed; "
                "expected an https:// URL (plain http:// only on localhost)"
            )
        if u.username or u.password:  # params are logged to MLflow and committed to git
            raise ConfigError(f"params.yaml: data.mirrors: {u.hostname}: credentials do not belong in params.yaml")


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{Path(path).name}:{where}: malformed YAML: {problem}") from None
    return parse_params(raw)


def load_or_exit(path: Path = PARAMS_FILE) -> Params:
    """The edge every stage calls first: a bad params.yaml ends the stage with one line."""
    try:
        return load_params(path)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def as_flat_dict(params: Params) -> dict:
    """Params as MLflow wants them: top-level hyperparameters plus dotted section keys."""
    flat = dataclasses.asdict(params.train)
    for name in SECTIONS:
        for key, value in dataclasses.asdict(getattr(params, name)).items():
            flat[f"{name}.{key}"] = value
    return flat


def main() -> None:
    """`python -m stages.config`: check params.yaml without running anything."""
    load_or_exit()
    print("params.yaml: ok")


if __name__ == "__main__":
    main()

"""Configs: YAML defaults, `key=value` overrides, unknown keys and wrong types refused.

A run's config is `configs/base.yaml`, then `configs/data/<data>.yaml`, then
`configs/models/<model>.yaml`, then command-line overrides, each layer only naming what it
changes. Every key must exist in base.yaml and keep its type there (an int may stand for a
float; null in base.yaml accepts any scalar). The resolved config is saved beside the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
KINDS = {"models": "model", "data": "dataset", "ensembles": "ensemble"}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of key: value lines")
    return data


def available(kind: str) -> list[str]:
    """Names of the configs in configs/<kind>/ (models, data, ensembles)."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def _named(kind: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown {KINDS[kind]} {name!r} (no {path}); valid: {', '.join(available(kind))}"
        )
    return _read_yaml(path)


# Keys that may also say "auto", resolved when the run starts (batch_size: train/auto_batch.py).
AUTO_KEYS = {"batch_size"}


def _check_type(key: str, value: Any, default: Any, origin: str) -> Any:
    if default is None or value is None or (key in AUTO_KEYS and value == "auto"):
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(
            f"{origin}: {key}={value!r} is a {type(value).__name__}, "
            f"expected a {type(default).__name__} like {default!r}"
        )
    return value


def _merge(cfg: dict, layer: dict, origin: str) -> None:
    unknown = sorted(set(layer) - set(cfg))
    if unknown:
        raise UserError(
            f"{origin}: unknown config key {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(cfg))}"
        )
    for key, value in layer.items():
        cfg[key] = _check_type(key, value, cfg[key], origin)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`key=value` strings to a dict of raw text; `_coerce` types them against base.yaml."""
    out = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise UserError(f"override {arg!r} is not key=value (for example epochs=2)")
        out[key] = text
    return out


def _coerce(text: str, default: Any) -> Any:
    """Command-line text as YAML (`epochs=2`, `train_splits=[train,val]`), except that a
    string-typed key keeps its text: YAML 1.1 would read `mixed_precision=no` as false."""
    if text in ("", "null", "~"):
        return None
    if isinstance(default, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(model: str, overrides: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve the config of `model` (a name in configs/models/ or a path to a YAML file)."""
    base = _read_yaml(CONFIG_DIR / "base.yaml")
    overrides = overrides or {}
    if isinstance(overrides, list):
        raw = parse_overrides(overrides)
        overrides = {k: _coerce(v, base.get(k)) for k, v in raw.items()}
    model_path = Path(model)
    if model_path.suffix in (".yaml", ".yml") and model_path.is_file():
        model_layer, model_name = _read_yaml(model_path), model_path.stem
    else:
        model_layer, model_name = _named("models", model), model
    cfg = dict(base)
    data = overrides.get("data", model_layer.get("data", base["data"]))
    _merge(cfg, {"data": data, **_named("data", data)}, f"configs/data/{data}.yaml")
    _merge(cfg, model_layer, f"model config {model}")
    _merge(cfg, dict(overrides), "command line")
    if cfg["name"] is None:
        cfg["name"] = model_name
    return cfg


def save_config(cfg: dict[str, Any], path: Path) -> None:
    from common.fs import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))


def run_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["out_dir"]) / cfg["name"]


def logits_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["logits_dir"]) / cfg["name"]

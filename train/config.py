"""Configs: YAML defaults, `key=value` overrides, unknown keys and wrong types refused.

A run's config is `configs/base.yaml`, then `configs/data/<data>.yaml`, then
`configs/models/<model>.yaml`, then command-line overrides, each layer only naming what it
changes. Every key must exist in base.yaml and keep its type there (an int may stand for a
float; null in base.yaml accepts any scalar), and a numeric key must lie in its range (`RANGES`):
a bad value is refused naming the key and the layer that set it, before anything runs. The
resolved config is saved beside the run.
`python -m train.config MODEL [key=value ...]` prints it without training.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import yaml

from common import provenance
from common.cli import NAME_RULE, is_one_name
from common.errors import UserError, cli_main
from common.fs import write_text_atomic
from common.yamlio import dump_yaml, load_yaml
from data_prep.layout import Layout

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
KINDS = {"models": "model", "data": "dataset", "ensembles": "ensemble"}
# The values each numeric key may take: [ ] include the bound, ( ) exclude it. A key whose
# base.yaml default is null (ema_horizon, fusion_weight) may also be null.
RANGES = {
    "seed": "[0, 18446744073709551616)",  # torch's and numpy's seeds hold 64 bits (2^64 is exact)
    "num_classes": "[2, inf)",
    "holdout_per_class": "[0, inf)",
    "img_size": "[1, inf)",
    "test_size": "[1, inf)",
    "test_resize_ratio": "(0, 1]",
    "workers": "[0, inf)",
    "cpu_workers": "[0, inf)",
    "num_views": "[1, 2]",
    "hflip": "[0, 1]",
    "reprob": "[0, 1]",
    "mixup_alpha": "[0, inf)",
    "cutmix_alpha": "[0, inf)",
    "mix_prob": "[0, 1]",
    "switch_prob": "[0, 1]",
    "smoothing": "[0, 1)",
    "drop_rate": "[0, 1)",
    "drop_path_rate": "[0, 1)",
    "aux_weight": "[0, inf)",
    "aux_drop_rate": "[0, 1)",
    "fusion_weight": "[0, 1]",
    "rce_weight": "[0, inf)",
    "rce_log_min": "(-inf, 0)",
    "cr_weight": "[0, inf)",
    "cr_tau": "(0, inf)",
    "cr_delta": "[0, inf)",
    "mt_weight": "[0, inf)",
    "mt_rampup_epochs": "[0, inf)",
    "ema_decay": "[0, 1)",
    "ema_horizon": "(0, inf)",
    "lr": "(0, inf)",
    "lr_base_batch": "[1, inf)",
    "momentum": "[0, 1)",
    "opt_eps": "(0, inf)",
    "rmsprop_alpha": "(0, 1)",
    "weight_decay": "[0, inf)",
    "warmup_epochs": "[0, inf)",
    "warmup_lr": "[0, inf)",
    "min_lr": "[0, inf)",
    "epochs": "[1, inf)",
    "batch_size": "[1, inf)",
    "grad_accum": "[1, inf)",
    "grad_clip": "[0, inf)",
    "eval_every": "[1, inf)",
    "ckpt_every_steps": "[0, inf)",
    "ckpt_every_minutes": "[0, inf)",
    "keep_last": "[1, inf)",
    "max_nonfinite": "[1, inf)",
    "stop_timeout_s": "(0, inf)",
}
# Keys that take one of a few words: ours, and timm's names where timm reads the key (a
# misspelling would otherwise be a traceback from inside timm, after the run folder exists).
CHOICES = {
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "interpolation": ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos"),
    "remode": ("pixel", "rand", "const"),
    # timm's, less plateau, which steps on epochs where the loop steps on updates
    "sched": ("cosine", "tanh", "step", "multistep", "poly", "constant", "rsqrt"),
}
# Keys whose null means something although base.yaml gives a value: off (no AutoAugment, no
# trackers, no compile, no teacher warm-up, no config change) or empty (arch_kwargs), as the code
# reads them. Any other key whose default is not null needs a value (`data_dir=` from an unset
# shell variable).
NULLABLE = {
    "auto_augment",
    "log_with",
    "arch_kwargs",
    "compile",
    "ema_warmup",
    "allow_config_change",
}
# Pairs (low, high) with 0 < low <= high, and per-channel statistics.
PAIRS = ("rrc_scale", "rrc_ratio")
CHANNELS = {"mean": "(-inf, inf)", "std": "(0, inf)"}
INTERVAL = re.compile(r"^([\[(])(\S+), (\S+)([\])])$")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping; a syntax error is one line naming the file, line and column."""
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{_yaml_problem(path, err)}; fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of key: value lines")
    return data


def _yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """One line: the file, the line and column where the parser stopped, and its complaint."""
    mark = getattr(err, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{path}{where}: invalid YAML ({problem})"


def available(kind: str) -> list[str]:
    """Names of the configs in configs/<kind>/ (models, data, ensembles)."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def _is_yaml_path(value: str) -> bool:
    return Path(value).suffix.lower() in (".yaml", ".yml")


def config_name(value: str) -> str:
    """The name a config goes by: its file's stem when given as a path."""
    return Path(value).stem if _is_yaml_path(value) else value


def config_layer(kind: str, value: str) -> tuple[dict[str, Any], str]:
    """A config layer and where it comes from: `value` names configs/<kind>/<value>.yaml, or is
    the path of a YAML file (a run's saved config.yaml, a dataset config kept beside the data,
    an ensemble of one's own)."""
    path = config_path(kind, value)
    return read_yaml(path), value if _is_yaml_path(value) else f"configs/{kind}/{value}.yaml"


def config_path(kind: str, value: str) -> Path:
    """The existing file that `value` (a name in configs/<kind>/ or a .yaml path) stands for."""
    if not isinstance(value, str) or not (_is_yaml_path(value) or is_one_name(value)):
        raise UserError(
            f"{KINDS[kind]} {'(empty)' if value is None else repr(value)} is neither a name in "
            f"configs/{kind}/ nor a .yaml path; valid names: {', '.join(available(kind))}"
        )
    if _is_yaml_path(value):
        if not Path(value).is_file():
            raise UserError(f"{KINDS[kind]} config {value} does not exist; check the path")
        return Path(value)
    path = CONFIG_DIR / kind / f"{value}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown {KINDS[kind]} {value!r} (no {path}); valid: {', '.join(available(kind))}"
        )
    return path


# Keys that may also say "auto", resolved when the run starts (batch_size: train/auto_batch.py;
# workers: train/data.py loader_workers).
AUTO_KEYS = {"batch_size", "workers"}
# Words a key may say instead of a value of its type: "auto" above, and for `compile` a
# torch.compile mode (train/distributed.py dynamo_plugin).
WORDS = {**{key: ("auto",) for key in AUTO_KEYS}, "compile": ("reduce-overhead",)}
# Switches whose null default means "decide for the device": typed by value, not by base.yaml.
SWITCHES = {"channels_last"}


def _check_type(key: str, value: Any, default: Any, origin: str) -> Any:
    if default is None or value is None or value in WORDS.get(key, ()):
        return value
    if key in AUTO_KEYS:  # a count where it is not "auto", whatever base.yaml's default
        default = 0
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        words = "".join(f" or {word!r}" for word in WORDS.get(key, ()))
        raise UserError(
            f"{origin}: {key}={value!r} is a {type(value).__name__}, "
            f"expected a {type(default).__name__} like {default!r}{words}"
        )
    return value


def _merge(cfg: dict, layer: dict, origin: str, origins: dict[str, str]) -> None:
    unknown = sorted(set(layer) - set(cfg))
    if unknown:
        raise UserError(
            f"{origin}: unknown config key {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(cfg))}"
        )
    for key, value in layer.items():
        cfg[key] = _check_type(key, value, cfg[key], origin)
        origins[key] = origin


def _range_text(interval: str) -> str:
    low_bracket, low, high, high_bracket = INTERVAL.match(interval).groups()
    if high == "inf":
        return f"{'at least' if low_bracket == '[' else 'greater than'} {low}"
    if low == "-inf":
        return f"{'at most' if high_bracket == ']' else 'less than'} {high}"
    return f"in {interval}"


def _in_range(value: Any, interval: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    low_bracket, low, high, high_bracket = INTERVAL.match(interval).groups()
    low, high = float(low), float(high)
    above = value >= low if low_bracket == "[" else value > low
    below = value <= high if high_bracket == "]" else value < high
    finite = not isinstance(value, float) or math.isfinite(value)  # ints: exact, any size
    return finite and above and below


def _numbers(value: Any, count: int, interval: str) -> bool:
    """`value` is a list of `count` numbers, each in `interval`."""
    ok = isinstance(value, list) and len(value) == count
    return ok and all(_in_range(v, interval) for v in value)


def _problem(key: str, value: Any, base_value: Any) -> str | None:
    """Why `value` is not valid for `key` (None when it is)."""
    if value in WORDS.get(key, ()):
        return None
    if key in RANGES:
        if value is None:
            return None if base_value is None else f"needs a value {_range_text(RANGES[key])}"
        if not _in_range(value, RANGES[key]):
            kind = "" if isinstance(value, (int, float)) else "a number "
            return f"must be {kind}{_range_text(RANGES[key])}"
    if value is None and base_value is not None and key not in NULLABLE:
        return "needs a value (it is empty or null)"
    if key in SWITCHES and not (value is None or isinstance(value, bool)):
        return "must be true, false or null"
    if key in CHOICES and value not in CHOICES[key]:
        return f"must be one of {', '.join(CHOICES[key])}"
    if key == "name" and value is not None and not (isinstance(value, str) and is_one_name(value)):
        return f"must be {NAME_RULE}: the run's folder in out_dir"
    if key in PAIRS and not (_numbers(value, 2, "(0, inf)") and value[0] <= value[1]):
        return "must be two numbers [low, high] with 0 < low <= high"
    if key in CHANNELS and not _numbers(value, 3, CHANNELS[key]):
        return f"must be three numbers (R, G, B), each {_range_text(CHANNELS[key])}"
    return None


def validate(cfg: dict[str, Any], base: dict[str, Any], origins: dict[str, str]) -> None:
    """Refuse the first key whose value is out of its range, naming it and where it was set."""
    for key in cfg:
        problem = _problem(key, cfg[key], base.get(key))
        if problem:
            origin = origins.get(key, "configs/base.yaml")
            shown = "null" if cfg[key] is None else repr(cfg[key])
            raise UserError(f"{origin}: {key}={shown} {problem}")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`key=value` strings to a dict of raw text; `_coerce` types them against base.yaml."""
    out = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise UserError(f"override {arg!r} is not key=value (for example epochs=2)")
        out[key] = text
    return out


def _coerce(key: str, text: str, default: Any) -> Any:
    """Command-line text as YAML (`epochs=2`, `train_splits=[train,val]`), except that a
    string-typed key keeps its text: YAML 1.1 would read `mixed_precision=no` as false."""
    if text in ("", "null", "~"):
        return None
    if (isinstance(default, str) and key not in AUTO_KEYS) or key == "name":
        return text  # a name is text, even 2024 or 1e5
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def load_config(model: str, overrides: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve the config of `model` (a name in configs/models/ or a path to a YAML file); the
    `data` key, too, names configs/data/<name>.yaml or is a path."""
    base = read_yaml(CONFIG_DIR / "base.yaml")
    overrides = overrides or {}
    if isinstance(overrides, list):
        raw = parse_overrides(overrides)
        overrides = {k: _coerce(k, v, base.get(k)) for k, v in raw.items()}
    model_layer, _ = config_layer("models", model)
    # A run's saved config.yaml (its record popped: not a setting) holds every value already:
    # its dataset's config, perhaps a path moved since, is not read again.
    saved_run = model_layer.pop(provenance.KEY, None) is not None
    cfg, origins = dict(base), {}
    data = overrides.get("data", model_layer.get("data", base["data"]))
    data_layer, data_origin = (
        ({}, f"model config {model}") if saved_run else config_layer("data", data)
    )
    _merge(cfg, {"data": data, **data_layer}, data_origin, origins)
    _merge(cfg, model_layer, f"model config {model}", origins)
    _merge(cfg, dict(overrides), "command line", origins)
    validate(cfg, base, origins)
    if cfg["name"] is None:
        cfg["name"] = config_name(model)
    return cfg


def save_config(cfg: dict[str, Any], path: Path, resumed_step: int | None = None) -> dict[str, Any]:
    """The resolved config in use with its provenance. A resumed run keeps the record it started
    with and appends the step, commit and config hash it resumed with, so that a run spanning
    commits (or a change allowed by allow_config_change) names all of them.
    Returns the provenance record."""
    path = Path(path)
    if resumed_step is not None and path.is_file():
        record = read_yaml(path).get(provenance.KEY) or {}
        manifest = Layout(Path(cfg["data_dir"])).manifest
        record.setdefault("resumed", []).append(
            {
                "step": resumed_step,
                **provenance.code_state(),
                "config_sha256": provenance.config_hash(cfg),
                "dataset_checksum": provenance.dataset_checksum(manifest),
                "time": provenance.now(),
            }
        )
    else:
        manifest = Layout(Path(cfg["data_dir"])).manifest
        record = {**provenance.record(cfg, manifest), "time": provenance.now()}
    saved = {**cfg, provenance.KEY: record}
    write_text_atomic(path, dump_yaml(saved))
    return saved[provenance.KEY]


def read_provenance(path: Path) -> dict[str, Any]:
    """The provenance record of a saved run config ({} for a config saved without one)."""
    return read_yaml(Path(path)).get(provenance.KEY) or {}


def require_run_dataset(cfg: dict[str, Any], action: str) -> None:
    """data_dir may move (RESUME_NEUTRAL_KEYS); its images may not: the dataset's manifest
    checksum must be the one the run last trained on (a change once allowed by
    allow_config_change stands), unless allow_config_change. `action` names what would go
    wrong ("resume", "predict")."""
    saved = run_dir(cfg) / "config.yaml"
    record = read_provenance(saved) if saved.is_file() else {}
    trained_on = next(
        (
            r["dataset_checksum"]
            for r in reversed(record.get("resumed", []))
            if r.get("dataset_checksum")
        ),
        record.get("dataset_checksum"),
    )
    now = provenance.dataset_checksum(Layout(Path(cfg["data_dir"])).manifest)
    if trained_on and now and trained_on != now and not cfg["allow_config_change"]:
        raise UserError(
            f"{cfg['data_dir']} is not the dataset run {run_dir(cfg)} trained on (manifest "
            f"checksum {now[:12]}, the run's {trained_on[:12]}): cannot {action} on it; pass that "
            f"dataset's data_dir= or allow_config_change=true"
            + (", or train under another name=" if action == "resume" else "")
        )


def run_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["out_dir"]) / cfg["name"]


def logits_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["logits_dir"]) / cfg["name"]


def score_column(cfg: dict[str, Any]) -> str:
    """The held-out top-1 (a metrics.csv column) that picks the best checkpoint: the teacher's
    when the mean-teacher term trains one."""
    return "heldout_teacher" if cfg["mt_weight"] > 0 else "heldout_student"


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the resolved config of a model (base < data < model < overrides) as YAML."""
    parser = argparse.ArgumentParser(
        prog="python -m train.config",
        description="Print the resolved config of a model; configs/base.yaml says where each "
        "value comes from (the paper or ours).",
        epilog=f"models: {', '.join(available('models'))}",
    )
    parser.add_argument("model", help="a name in configs/models/ or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value settings (see configs/base.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.model, args.overrides)
    print(dump_yaml(cfg), end="")
    return cfg


if __name__ == "__main__":
    main()

"""`make status [ENSEMBLE=...]`: one table of every model of an ensemble config, from files only.

Per model: epochs done of total (metrics.csv, config.yaml), the best held-out top-1, the age of
the newest complete checkpoint, whether the run is running (train/heartbeat.py), whether its
logits exist and come from its best checkpoint, and the next command it needs. Then what
`make ensemble` would do with the logits as they are. It imports no torch and reads a handful of
small files per run, so 16 runs take well under a second.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import make_args, make_command
from common.errors import UserError, cli_main
from ensemble.blend import load_ensemble_config, logits_root
from ensemble.members import CHECKPOINTS, MARKER, check_provenance, logits_state, open_members
from train import heartbeat
from train.config import load_config, logits_dir, read_yaml, run_dir, score_column

# train/metrics.py's file, named here so that reading it does not import torch
# (tests/test_status.py checks it against a real run).
METRICS = "metrics.csv"


@dataclass
class ModelStatus:
    name: str
    epochs: str
    best: float | None
    checkpoint_age: float | None
    activity: str
    logits: str
    next: str


def read_metrics(run: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv as text ([] before its first epoch ends)."""
    try:
        with open(run / METRICS, newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def number(path: Path, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(
            f"{path}: {column} holds {text!r}, not a number; restore the file from the run's "
            "tracker logs or delete the row"
        ) from None


def newest_checkpoint_age(run: Path, now: float) -> float | None:
    markers = [p / MARKER for p in (run / CHECKPOINTS).glob("step_*") if not p.name.endswith("tmp")]
    times = [m.stat().st_mtime for m in markers if m.is_file()]
    return now - max(times) if times else None


def next_step(model: str, done: int, total: int, activity: str, logits: str) -> str:
    if activity == "running":
        return "(training)"
    if done < total:
        return f"make train MODEL={model}" + (" (resumes)" if done or activity != "-" else "")
    if logits != "fresh":
        return f"make logits MODEL={model}"
    return "-"


def model_status(model: str, overrides: list[str], now: float) -> ModelStatus:
    cfg = load_config(model, overrides)
    run = run_dir(cfg)
    saved = run / "config.yaml"
    trained = read_yaml(saved) if saved.is_file() else cfg  # a broken file: one line naming it
    if not trained:
        raise UserError(f"{saved} is empty; restore the run's config there or delete the run")
    rows = read_metrics(run)
    column = score_column(trained)
    scores = [number(run / METRICS, column, r[column]) for r in rows if r.get(column)]
    activity = heartbeat.activity(run, now)
    remake = make_command("logits", model, overrides)
    logits = logits_state(logits_dir(cfg) / "meta.json", run, remake)
    total = trained["epochs"]
    return ModelStatus(
        name=cfg["name"],
        epochs=f"{len(rows)}/{total}",
        best=max(scores) if scores else None,
        checkpoint_age=newest_checkpoint_age(run, now),
        activity=activity,
        logits=logits,
        next=next_step(model, len(rows), total, activity, logits),
    )


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_table(rows: list[ModelStatus]) -> str:
    header = ("model", "epochs", "best top-1", "newest ckpt", "run", "logits", "next")
    cells = [
        (
            r.name,
            r.epochs,
            "-" if r.best is None else f"{r.best:.2f}",
            age(r.checkpoint_age),
            r.activity,
            r.logits,
            r.next,
        )
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *cells]
    )


def ensemble_outlook(name: str, rows: list[ModelStatus], root: Path, overrides: list[str]) -> str:
    """What `make ensemble ENSEMBLE=<name>` would do with the logits on disk now."""
    missing = [r.name for r in rows if r.logits == "none"]
    if missing:
        return f"make ensemble ENSEMBLE={name}: would stop, no logits for {', '.join(missing)}"
    try:
        warnings = check_provenance(open_members(root, [r.name for r in rows], overrides))
    except UserError as err:
        return f"make ensemble ENSEMBLE={name}: would refuse: {err}"
    lines = [f"make ensemble ENSEMBLE={name}: would blend all {len(rows)} models"]
    lines += [f"  warning: {w}" for w in warnings]
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m scripts.ops.status", description=__doc__)
    parser.add_argument("--config", default="vipriors16", help="configs/ensembles name")
    parser.add_argument("overrides", nargs="*", help="key=value for every model (out_dir=...)")
    args = parser.parse_args(argv)
    now = time.time()
    models = load_ensemble_config(args.config)["models"]
    rows = [model_status(m, args.overrides, now) for m in models]
    root = logits_root(models, args.overrides)
    text = format_table(rows) + "\n\n" + ensemble_outlook(args.config, rows, root, args.overrides)
    if args.overrides:
        # The commands above find these runs and logits only with the same overrides.
        text += f"\n(each command above with {make_args(args.overrides)})"
    print(text)
    return text


if __name__ == "__main__":
    main()

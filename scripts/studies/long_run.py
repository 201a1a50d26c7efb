"""`make long-run`: does the full recipe beat the strong baseline trained as long, and does the
gap grow with training length? On the embedded benchmark, through the shared runner.

1. Equal epochs: configs/ablation.yaml's `baseline` and `full_recipe` rows at the recipe's
   epochs E (the ablation's own runs, when it has made them), on each of `long_run.splits`:
   train (scored on test, with per-epoch val curves) and train+val (as the demo's models).
2. Equal time: the full recipe's training epoch costs more (two views, the teacher's forward).
   The ratio of epoch times, full recipe over baseline, is measured from the equal-epoch
   train-split runs' own throughput (metrics.csv `img_per_s`, median over every epoch of every
   seed); the baseline then trains round(E x ratio) epochs, the full recipe's training time.
   The measurement is kept in results/long_run_budget.json, so that a rerun trains the same runs.
3. The long run: both rows at `factor` x E epochs on the train split.

Scores go to results/long_run.csv as each run finishes; results/long_run.md holds the table and
the gaps (full recipe minus baseline, at equal epochs, equal time and in the long run), and
results/long_run.png plots top-1 against epochs: each train-split run's held-out (val) top-1
per epoch, mean over seeds, and the final test top-1 (mean ± std) at its length.
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError, cli_main, warn
from common.fs import write_text_atomic
from scripts.studies import runner
from train.config import load_config

SPLITS = {"train": "train_splits=[train]", "train+val": "train_splits=[train,val]"}
REGIMES = ("equal_epochs", "equal_time", "long")


def epoch_time_ratio(baseline: list[pd.DataFrame], full: list[pd.DataFrame]) -> float:
    """Seconds per training epoch of the full recipe over the baseline's: the images are the
    same, so it is the baseline's median img_per_s over the full recipe's (all epochs pooled)."""
    return median_rate(baseline) / median_rate(full)


def median_rate(frames: list[pd.DataFrame]) -> float:
    return float(pd.concat(frames)["img_per_s"].median())  # an epoch redone at its end: NaN


def row(spec: dict, which: str, split: str, regime: str, epochs: int) -> dict:
    """A long-run row: the ablation row `which` on `split` for `epochs` epochs."""
    rows = {r["name"]: r for r in spec["rows"]}
    return {
        "name": f"{which}:{split}:{regime}",
        "eval": rows[which]["eval"],
        "overrides": [*runner.row_overrides(rows, which), SPLITS[split], f"epochs={epochs}"],
        "which": which,
        "split": split,
        "regime": regime,
    }


def metrics_of(frame: pd.DataFrame, name: str, results: Path) -> list[pd.DataFrame]:
    runs = frame.loc[frame["row"] == name, "run"]
    return [pd.read_csv(results / "runs" / run / "metrics.csv") for run in runs]


def budget(spec: dict, frame: pd.DataFrame, epochs: int, results: Path, extra: list[str]) -> dict:
    """The equal-time epochs of the baseline, measured once per recipe length and kept (with
    the overrides it was measured under: another set is named in a warning)."""
    path = results / "long_run_budget.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    key = str(epochs)
    if key in kept and kept[key].get("extra", list(extra)) != list(extra):
        warn(
            f"{path}: the {key}-epoch time ratio was measured with {kept[key]['extra']}, not "
            f"{list(extra)}: equal time held there; delete its entry to measure again"
        )
    if key not in kept:
        base = f"{spec['baseline']}:train:equal_epochs"
        full = f"{spec['full_recipe']}:train:equal_epochs"
        ratio = epoch_time_ratio(metrics_of(frame, base, results), metrics_of(frame, full, results))
        kept[key] = {
            "ratio": round(ratio, 3),
            "equal_time_epochs": max(epochs, round(epochs * ratio)),
            "measured_on": sorted(frame.loc[frame["row"].isin([base, full]), "run"]),
            "extra": list(extra),
        }
        write_text_atomic(path, json.dumps(kept, indent=1) + "\n")
    return kept[key]


# ---- the report ----------------------------------------------------------------------------
def gap_lines(frame: pd.DataFrame, spec: dict, splits: list[str]) -> list[str]:
    """Full recipe minus baseline at equal epochs, equal time and in the long run."""
    pairs = {
        "equal epochs": ("equal_epochs", "equal_epochs"),
        "equal time": ("equal_epochs", "equal_time"),
        "long run": ("long", "long"),
    }
    lines = [
        "| trained on | comparison | epochs (full / baseline) | full − baseline | verdict |",
        "|---|---|---|---|---|",
    ]
    for split in splits:
        for label, (full_regime, base_regime) in pairs.items():
            full = frame[frame["row"] == f"{spec['full_recipe']}:{split}:{full_regime}"]
            base = frame[frame["row"] == f"{spec['baseline']}:{split}:{base_regime}"]
            if full.empty or base.empty:
                continue
            delta, se = runner.difference(full["test_top1"], base["test_top1"])
            lines.append(
                f"| {split} | {label} | {full['epochs'].iloc[0]} / {base['epochs'].iloc[0]} "
                f"| {delta:+.2f} ± {'–' if math.isnan(se) else f'{se:.2f}'} "
                f"| {runner.verdict(delta, se, None)} |"
            )
    return lines


def table_lines(frame: pd.DataFrame, minutes_of: dict[str, float]) -> list[str]:
    """One line per row; the training time is the median over its runs trained in one go (by
    whichever stage trained them)."""
    lines = [
        "| row | trained on | regime | epochs | test top-1 (%) | seeds | train min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, group in frame.groupby("row", sort=False):
        which, split, regime = name.split(":")
        stat = runner.aggregate(group).iloc[0]
        times = [minutes_of[run] for run in group["run"] if run in minutes_of]
        minutes = f"{np.median(times):.1f}" if times else ""
        lines.append(
            f"| {which} | {split} | {regime} | {group['epochs'].iloc[0]} | {runner.mean_std(stat)} "
            f"| {int(stat['count'])} | {minutes} |"
        )
    return lines


def write_report(frame: pd.DataFrame, spec: dict, splits: list[str], results: Path) -> None:
    if frame.empty:
        return
    lines = [
        "# Equal compute and the long run on the embedded benchmark",
        "",
        f"`{spec['model']}`; test top-1 on the full test set (centre crop), mean ± sample standard"
        " deviation over seeds. Full recipe: `"
        + spec["full_recipe"]
        + "`; baseline: `"
        + spec["baseline"]
        + "`. Verdict: within noise when the gap is at most two standard"
        " errors.",
    ]
    path = results / "long_run_budget.json"
    for epochs, kept in (json.loads(path.read_text()) if path.is_file() else {}).items():
        lines += [
            "",
            f"Equal time at {epochs} epochs: a full-recipe training epoch takes"
            f" {kept['ratio']:.2f}x the baseline's (median img_per_s of"
            f" {len(kept['measured_on'])} runs), so the"
            f" baseline trains {kept['equal_time_epochs']} epochs in the full recipe's time.",
        ]
    minutes_of = runner.training_minutes(results)
    lines += ["", *table_lines(frame, minutes_of), "", *gap_lines(frame, spec, splits)]
    write_text_atomic(results / "long_run.md", "\n".join(lines) + "\n")
    plot(frame, results)


def curve(frame: pd.DataFrame, name: str, results: Path) -> pd.Series:
    """Mean over seeds of the row's held-out top-1 per epoch (its eval's metrics.csv column)."""
    column = runner.HELDOUT_COLUMN[frame.loc[frame["row"] == name, "eval"].iloc[0]]
    runs = [m.set_index("epoch")[column] for m in metrics_of(frame, name, results) if column in m]
    return pd.concat(runs, axis=1).mean(axis=1) if runs else pd.Series(dtype=float)


def plot(frame: pd.DataFrame, results: Path) -> None:
    """Held-out (val) curves of the train-split runs, and each row's final test top-1."""
    plt = runner.pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.8))
    colours = {}
    for name, group in frame[frame["row"].str.contains(":train:")].groupby("row", sort=False):
        which, _, regime = name.split(":")
        colour = colours.setdefault(which, f"C{len(colours)}")
        held = curve(frame, name, results)
        style = "-" if regime == "long" else ":"
        if len(held):
            ax.plot(
                held.index,
                held.values,
                style,
                color=colour,
                alpha=0.7,
                label=f"{which}, {regime} ({group['epochs'].iloc[0]} ep): val",
            )
        stat = runner.aggregate(group).iloc[0]
        ax.errorbar(
            [group["epochs"].iloc[0]],
            [stat["mean"]],
            yerr=[np.nan_to_num(stat["std"])],
            marker="o" if regime != "equal_time" else "s",
            color=colour,
            capsize=4,
            linestyle="none",
            label=f"{which}, {regime} ({group['epochs'].iloc[0]} ep): test",
        )
    ax.set(
        xlabel="epoch",
        ylabel="top-1 (%)",
        title="train split: val (held out) per epoch; test at the end (mean ± std over seeds)",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    runner.save_figure(fig, results / "long_run.png")


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--factor", type=int, help="the long run's multiple of the recipe epochs")
    parser.add_argument("--splits", nargs="*", choices=list(SPLITS), help="override the splits")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (epochs= sets E)")
    args = parser.parse_args(argv)
    spec = runner.load_spec()
    conf = spec["long_run"]
    seeds, splits = args.seeds or conf["seeds"], args.splits or conf["splits"]
    if "train" not in splits:
        raise UserError(
            f"--splits {' '.join(splits)}: add train; the equal-time epochs are measured on the "
            "train split's equal-epoch runs"
        )
    epochs = load_config(spec["model"], [*spec["common"], *args.overrides])["epochs"]
    extra = [o for o in args.overrides if not o.startswith("epochs=")]  # each row sets its own
    pair = (spec["baseline"], spec["full_recipe"])
    first = [row(spec, w, s, "equal_epochs", epochs) for s in splits for w in pair]
    long = [row(spec, w, "train", "long", epochs * (args.factor or conf["factor"])) for w in pair]
    jobs = partial(runner.row_jobs, spec, seeds=seeds, extra=extra)
    report = partial(write_report, spec=spec, splits=splits, results=args.results)
    # The equal-time runs last as long as the full recipe's equal-epoch runs, by construction.
    full_time = [r for r in first if r["which"] == spec["full_recipe"]]
    todo = runner.pending(
        "long_run", spec["model"], jobs([*first, *full_time, *long]), args.results
    )
    seconds, source = runner.estimate(spec["model"], todo, args.results, spec)
    print(f"long-run: estimated {runner.duration(seconds)} in all (from {source})", flush=True)
    done = runner.run_jobs("long_run", spec["model"], jobs(first), args.results, spec, report)
    equal = budget(spec, done, epochs, args.results, extra)["equal_time_epochs"]
    timed = [row(spec, spec["baseline"], s, "equal_time", equal) for s in splits]
    runner.run_jobs(
        "long_run", spec["model"], jobs([*first, *timed, *long]), args.results, spec, report
    )


if __name__ == "__main__":
    main()

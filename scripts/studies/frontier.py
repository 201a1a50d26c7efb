"""`make frontier`: at equal training time, which should a user with a fixed budget run, the full
recipe or the strong baseline? The paper compares them at equal epochs only.

For each budget E of `frontier.epochs` (configs/ablation.yaml, in its order: 48 first), the full
recipe trains E epochs on the train split and the strong baseline round(E x r) epochs, r being
the ratio of their epoch times measured on the machine that runs the study: before the first
budget, both train 2 epochs and the ratio of their median img_per_s is kept, with the date and
the CPU, in results/frontier_budget.json (a rerun on this machine keeps it; delete it to
re-measure). Every run is scored on the test images (centre crop) with per-epoch held-out val
curves; `frontier.seeds` seeds each. Then the train+val regime (the demo's and the paper's final
models) at `frontier.trainval_epochs`, equal time likewise.

results/frontier.csv holds one row per run (the shared runner: resumable, appended at once);
frontier.md the table per budget (minutes, top-1 mean ± std of each side, the gap ± its standard
error, who is ahead and whether beyond two standard errors); frontier.png test top-1 against
training minutes, each point labelled with its epochs, and beside it the best held-out val point
of each curve against the same minutes (would choosing by val pick the same side?).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import cli_main, warn
from common.fs import write_text_atomic
from scripts.stages import run_module
from scripts.studies import runner
from scripts.studies.long_run import metrics_of, row

STAGE = "frontier"
SIDES = ("full", "baseline")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def measure_ratio(spec: dict, extra: list[str], epochs: int = 2) -> float:
    """Seconds per training epoch of the full recipe over the baseline's, on this machine:
    `epochs` epochs of each on the train split, medians of their img_per_s."""
    rows = {r["name"]: r for r in spec["rows"]}
    rates = {}
    with tempfile.TemporaryDirectory(prefix="frontier-ratio-") as out:
        for which in (spec["baseline"], spec["full_recipe"]):
            overrides = [*spec["common"], *runner.row_overrides(rows, which), *extra]
            overrides.append(f"epochs={epochs}")
            run_module("train", spec["model"], *overrides, f"out_dir={out}", f"name={which}")
            metrics = pd.read_csv(Path(out) / which / "metrics.csv")
            rates[which] = float(metrics["img_per_s"].median())
    return rates[spec["baseline"]] / rates[spec["full_recipe"]]


def budget(spec: dict, extra: list[str], results: Path) -> dict:
    """The measured ratio, kept in results/frontier_budget.json (measured once per machine)."""
    path = results / "frontier_budget.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        here = {"cpu": cpu_name(), "extra": extra}
        if any(kept.get(key, value) != value for key, value in here.items()):  # absent: kept
            warn(
                f"{path}: the time ratio {kept['ratio']} was measured on {kept['cpu']} with "
                f"{kept.get('extra', [])} ({kept['measured']}), not on {here['cpu']} with {extra}: "
                "the baseline's time is equal there, not here; delete the file to measure here"
            )
        return kept
    print("frontier: measuring the epoch-time ratio on this machine (2 epochs each side)")
    kept = {
        "ratio": round(measure_ratio(spec, extra), 3),
        "measured": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "extra": extra,
    }
    write_text_atomic(path, json.dumps(kept, indent=1) + "\n")
    return kept


def budget_rows(spec: dict, split: str, epochs: int, ratio: float) -> list[dict]:
    """The full recipe at `epochs` and the baseline at the same wall-clock, on `split`."""
    regime = f"E{epochs}"
    return [
        row(spec, spec["full_recipe"], split, regime, epochs),
        row(spec, spec["baseline"], split, regime, max(epochs, round(epochs * ratio))),
    ]


def scored(results: Path, split: str) -> list[int]:
    """The budgets of `split` in <results>/frontier.csv (rows are `<row>:<split>:E<epochs>`)."""
    csv = results / f"{STAGE}.csv"
    names = pd.read_csv(csv)["row"].str.split(":") if csv.is_file() else []
    return sorted({int(n[2][1:]) for n in names if n[1] == split})


def frontier_rows(spec: dict, budgets: list[int], trainval: list[int], ratio: float) -> list[dict]:
    """Both sides at each budget on the train split, then at each train+val budget (0: none)."""
    rows = [r for e in dict.fromkeys(budgets) for r in budget_rows(spec, "train", e, ratio)]
    for epochs in dict.fromkeys(e for e in trainval if e):
        rows += budget_rows(spec, "train+val", epochs, ratio)
    return rows


# ---- the report ----------------------------------------------------------------------------
def side(name: str, spec: dict) -> str:
    return "full" if name.split(":")[0] == spec["full_recipe"] else "baseline"


def best_heldout(frame: pd.DataFrame, name: str, results: Path) -> float:
    """Mean over seeds of the best held-out (val) top-1 of each run's curve; NaN without one."""
    column = runner.HELDOUT_COLUMN[frame.loc[frame["row"] == name, "eval"].iloc[0]]
    best = [m[column].max() for m in metrics_of(frame, name, results) if column in m]
    return float(np.mean(best)) if best else math.nan


def points(frame: pd.DataFrame, spec: dict, results: Path) -> pd.DataFrame:
    """One line per (split, budget, side): epochs, minutes, test top-1 mean/std/n, best val."""
    minutes = runner.training_minutes(results)
    lines = []
    for name, group in frame.groupby("row", sort=False):
        _, split, regime = name.split(":")
        stat = runner.aggregate(group).iloc[0]
        times = [minutes[r] for r in group["run"] if r in minutes]
        lines.append(
            {
                "split": split,
                "budget": int(regime[1:]),
                "side": side(name, spec),
                "row": name,
                "epochs": int(group["epochs"].iloc[0]),
                "minutes": float(np.median(times)) if times else math.nan,
                "mean": stat["mean"],
                "std": stat["std"],
                "seeds": int(stat["count"]),
                "best_val": best_heldout(frame, name, results),
            }
        )
    return pd.DataFrame(lines)


def table_lines(frame: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    lines = [
        "| trained on | budget (full recipe's epochs) | full: epochs, min, test top-1 "
        "| baseline: epochs, min, test top-1 | full − baseline | ahead | beyond 2 SE |",
        "|---|--:|---|---|--:|---|---|",
    ]
    for (split, size), group in table.groupby(["split", "budget"]):  # train before train+val
        by_side = {r["side"]: r for _, r in group.iterrows()}
        if set(by_side) != set(SIDES):
            continue
        full, base = by_side["full"], by_side["baseline"]
        scores = {s: frame.loc[frame["row"] == by_side[s]["row"], "test_top1"] for s in SIDES}
        delta, se = runner.difference(scores["full"], scores["baseline"])
        ahead = "full recipe" if delta > 0 else "baseline"
        beyond = "–" if math.isnan(se) else ("yes" if abs(delta) > 2 * se else "no")
        cells = [
            f"{r['epochs']} ep, {r['minutes']:.1f} min, {runner.mean_std(r)} (n={r['seeds']})"
            for r in (full, base)
        ]
        se_text = "–" if math.isnan(se) else f"{se:.2f}"
        lines.append(
            f"| {split} | {size} | {cells[0]} | {cells[1]} | {delta:+.2f} ± {se_text} "
            f"| {ahead} | {beyond} |"
        )
    return lines


def write_report(frame: pd.DataFrame, spec: dict, results: Path) -> None:
    if frame.empty:
        return
    table = points(frame, spec, results)
    kept = json.loads((results / "frontier_budget.json").read_text())
    lines = [
        "# The compute frontier on the embedded benchmark",
        "",
        f"`{spec['model']}`. Full recipe: `{spec['full_recipe']}`; baseline: `{spec['baseline']}`,"
        f" trained {kept['ratio']:.2f}x the full recipe's epochs (the ratio of their epoch times,"
        f" measured {kept['measured']} on {kept['cpu']}), so both train for the same wall-clock."
        " Test top-1 on the 10,000 test images (centre crop), mean ± sample standard deviation"
        " over seeds; the gap's ± is its standard error. Minutes: median training time of a run"
        " (held-out passes included).",
        "",
        *table_lines(frame, table),
    ]
    write_text_atomic(results / "frontier.md", "\n".join(lines) + "\n")
    plot(table, results)


def plot(table: pd.DataFrame, results: Path) -> None:
    """Test top-1 against minutes (train split: filled, joined; train+val: hollow), and the best
    held-out val point of the train-split runs (train+val runs hold no val out)."""
    plt = runner.pyplot()
    fig, (ax_test, ax_val) = plt.subplots(1, 2, figsize=(12, 4.6))
    for split, marker in (("train", "o"), ("train+val", "D")):
        rows = table[table["split"] == split].sort_values("minutes")
        for colour, name in (("C1", "full"), ("C0", "baseline")):
            part = rows[rows["side"] == name]
            label = "full recipe" if name == "full" else "strong baseline (equal time)"
            label += "" if split == "train" else ", train+val"
            ax_test.errorbar(
                part["minutes"],
                part["mean"],
                yerr=np.nan_to_num(part["std"]),
                marker=marker,
                color=colour,
                mfc=colour if split == "train" else "none",
                linestyle="-" if split == "train" else "none",
                capsize=4,
                label=label,
            )
            for _, r in part.iterrows():
                ax_test.annotate(f"{r['epochs']} ep", (r["minutes"], r["mean"]), fontsize=7)
            if split == "train":
                ax_val.plot(part["minutes"], part["best_val"], "s-", color=colour, label=label)
    ax_test.set(xlabel="training minutes (as measured)", ylabel="test top-1 (%)")
    ax_test.set_title("test top-1 at equal time", fontsize=10)
    ax_val.set(xlabel="training minutes (as measured)", ylabel="best held-out val top-1 (%)")
    ax_val.set_title("the train-split runs chosen by val", fontsize=10)
    for ax in (ax_test, ax_val):
        ax.legend(fontsize=8)
    fig.tight_layout()
    runner.save_figure(fig, results / "frontier.png")


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="*", help="override the budgets")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--trainval-epochs", type=int, help="the train+val budget (0: none)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (not epochs)")
    args = parser.parse_args(argv)
    spec = runner.load_spec()
    conf = spec["frontier"]
    extra = [o for o in args.overrides if not o.startswith("epochs=")]  # each row sets its own
    ratio = budget(spec, extra, args.results)["ratio"]
    trainval = conf["trainval_epochs"] if args.trainval_epochs is None else args.trainval_epochs
    seeds = args.seeds or conf["seeds"]
    rows = frontier_rows(spec, args.epochs or conf["epochs"], [trainval], ratio)
    jobs = runner.row_jobs(spec, rows, seeds, extra)
    # The report shows every budget scored so far, not only this invocation's.
    budgets = [*(args.epochs or conf["epochs"]), *scored(args.results, "train")]
    every = frontier_rows(spec, budgets, [trainval, *scored(args.results, "train+val")], ratio)
    shown = runner.row_jobs(spec, every, sorted({*conf["seeds"], *seeds}), extra)
    report = partial(write_report, spec=spec, results=args.results)
    runner.run_jobs(STAGE, spec["model"], jobs, args.results, spec, report, shown)


if __name__ == "__main__":
    main()

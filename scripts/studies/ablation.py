"""`make ablation` / `make sweep`: the paper's Tables 2 and 3 and Figure 4, embedded benchmark.

Rows and sweeps come from configs/ablation.yaml; every (row, seed) is one job of the shared
runner (scripts/studies/runner.py: resumable runs, each score appended to results/ablation.csv or
sweep.csv as it finishes, a rerun does only what is missing). After every run the tables are
rewritten from the CSV: results/ablation.{md,png} (each row beside the paper's number, its
difference to the row it is compared to, and whether that reproduces the paper's), and for the
sweep results/sweep_<knob>.md and results/sweep.png (the paper's Figure 4: value on x, test
top-1 mean with standard-deviation error bars on y, one panel per knob).
`--epochs N` trains the rows (or the swept values) N epochs long, apart:
results/ablation_e<N>.{csv,md,png} (the augmentation claims at length: `make ablation
ARGS="--epochs 48 --rows ..."`), results/sweep_e<N>.csv, sweep_e<N>_<knob>.md, sweep_e<N>.png
(the recipe's choices confirmed at length).
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import cli_main
from common.fs import write_text_atomic
from scripts.studies import runner
from train.config import load_config

TABLES = {
    3: "Table 3: the components, cumulative",
    2: "Table 2: the Strong Baseline's augmentation",
    "variants": "Variants of the formulas, on the full recipe",
    1: "Table 1: architectures, under the Strong Baseline (ours)",
    "1-basic": "Table 1: architectures in the paper's setting (dropout; no erasing or mixing)",
}
HEADER = (
    "| row | paper's row | test top-1 (%) | seeds | epochs | compared to | Δ | Δ paper | verdict "
    "| paper |\n|---|---|---|---|---|---|---|---|---|---|"
)


def signed(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:+.2f}"


def delta_of(row: dict, frame: pd.DataFrame) -> tuple[float | None, float]:
    """(the row's mean minus its `compare_to` row's, the standard error); None without both."""
    ref = row.get("compare_to")
    names = set(frame["row"])
    if not ref or ref not in names or row["name"] not in names:
        return None, math.nan
    scores = frame.loc[frame["row"] == row["name"], "test_top1"]
    return runner.difference(scores, frame.loc[frame["row"] == ref, "test_top1"])


def ablation_line(
    row: dict, frame: pd.DataFrame, paper: dict, short: pd.DataFrame | None = None
) -> str:
    """One table line: the row's scores, and its difference to `compare_to` beside the paper's;
    with `short` (the rows at the default length), that length's difference and whether the
    sign moved."""
    stat = runner.aggregate(frame[frame["row"] == row["name"]]).iloc[0]
    epochs = "/".join(
        str(e) for e in sorted(frame.loc[frame["row"] == row["name"], "epochs"].unique())
    )
    ref = row.get("compare_to")
    delta, se = delta_of(row, frame)
    paper_delta = None
    judged = ""
    if delta is not None:
        if paper.get(row["name"]) is not None and paper.get(ref) is not None:
            paper_delta = paper[row["name"]] - paper[ref]
        judged = runner.verdict(delta, se, paper_delta)
    ref_paper = "" if paper.get(row["name"]) is None else f"{paper[row['name']]:.2f}"
    line = (
        f"| {row['name']} | {row['paper_row']} | {runner.mean_std(stat)} | {int(stat['count'])} "
        f"| {epochs} | {ref or ''} | {signed(delta)} | {signed(paper_delta)} | {judged} "
        f"| {ref_paper} |"
    )
    if short is None:
        return line
    before, _ = delta_of(row, short)
    moved = "" if delta is None or before is None else "yes" if delta * before < 0 else "no"
    return f"{line} {signed(before)} | {moved} |"


def at_default_length(rows: list[dict], spec: dict, results: Path) -> pd.DataFrame:
    """The rows' scores at the spec's own length (results/ablation.csv), to compare against."""
    jobs = runner.row_jobs(spec, rows, spec["seeds"], [])
    frame = runner.read_results(results / "ablation.csv")
    return runner.current(frame, runner.wanted(spec["model"], jobs, results))


def write_ablation(
    frame: pd.DataFrame,
    rows: list[dict],
    spec: dict,
    results: Path,
    epochs: int | None = None,
    short: pd.DataFrame | None = None,
) -> None:
    """results/ablation.md (grouped as the paper's tables) and ablation.png (bars, error bars);
    with `epochs`, ablation_e<epochs>.*, each difference beside the default length's (`short`)."""
    paper = {r["name"]: r.get("paper") for r in spec["rows"]}
    stage, length, header = "ablation", "", HEADER
    if epochs:
        stage, length = f"ablation_e{epochs}", f", every run {epochs} epochs long"
        default = load_config(spec["model"], spec["common"])["epochs"]
        header = HEADER.replace("| paper |\n", f"| paper | Δ at {default} ep | sign moved |\n")
        header += "---|---|"
    lines = [
        f"# The paper's Tables 2 and 3 on the embedded benchmark{length}",
        "",
        f"`{spec['model']}` trained on the train split, scored on the full test set (centre crop);"
        " mean ± sample standard deviation over seeds. Δ: the row minus the row it is compared to"
        " (Δ paper: the same in the paper, EfficientNet-b2 on the VIPriors ImageNet train split)."
        " Verdict: within noise when |Δ| is at most two standard errors, else whether Δ has the"
        " paper's sign (higher / lower where the paper gives no number).",
    ]
    present = [r for r in rows if (frame["row"] == r["name"]).any()]
    for table, title in TABLES.items():
        group = [r for r in present if r["table"] == table]
        if group:
            lines += ["", f"## {title}", "", header]
            lines += [ablation_line(r, frame, paper, short) for r in group]
    write_text_atomic(results / f"{stage}.md", "\n".join(lines) + "\n")
    if present:
        stats = runner.aggregate(frame).loc[[r["name"] for r in present]]
        plot_bars(stats, spec["rows"], results / f"{stage}.png")


def plot_bars(stats: pd.DataFrame, rows: list[dict], path: Path) -> None:
    """Bars (mean, std error bars) coloured by the paper's table; the paper's top-1 on a
    second axis (another dataset and model: compare the pattern, not the level)."""
    plt = runner.pyplot()
    tables = {r["name"]: r["table"] for r in rows}
    paper = [next(r.get("paper") for r in rows if r["name"] == n) for n in stats.index]
    colours = {t: f"C{i}" for i, t in enumerate(TABLES)}
    fig, ax = plt.subplots(figsize=(0.6 * len(stats) + 3, 5))
    ax.bar(
        range(len(stats)),
        stats["mean"],
        yerr=stats["std"].fillna(0),
        capsize=3,
        color=[colours[tables[n]] for n in stats.index],
    )
    ax.set_xticks(range(len(stats)), stats.index, rotation=45, ha="right")
    spread = stats["std"].fillna(0)
    ax.set_ylim(max(0.0, (stats["mean"] - spread).min() - 3), (stats["mean"] + spread).max() + 2)
    ax.set(ylabel="test top-1 (%), embedded benchmark", title="Tables 2 and 3 at small scale")
    other = ax.twinx()
    other.plot(range(len(stats)), [np.nan if p is None else p for p in paper], "kD", label="paper")
    other.set_ylabel("paper's top-1 (%), EfficientNet-b2 on ImageNet")
    other.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    runner.save_figure(fig, path)


# ---- the sweep (Figure 4) ------------------------------------------------------------------
def sweep_rows(spec: dict) -> list[dict]:
    """One row per swept value: the full recipe (`sweep_from`) with the sweep's own overrides
    (e.g. cr_space=features) and `knob=value`."""
    rows = {r["name"]: r for r in spec["rows"]}
    full = rows[spec["sweep_from"]]
    base = runner.row_overrides(rows, full["name"])
    recipe = load_config(spec["model"], [*spec["common"], *base])
    out = []
    for sweep in spec["sweeps"]:
        extra = list(sweep.get("overrides", []))
        for value in sweep["values"]:
            setting = f"{sweep['knob']}={value}"
            out.append(
                {
                    "name": ",".join([*extra, setting]),
                    "eval": full["eval"],
                    "overrides": [*base, *extra, setting],
                    "knob": sweep["knob"],
                    "panel": sweep["panel"],
                    "series": sweep.get("series", "full recipe"),
                    "value": value,
                    "recipe_point": not extra and value == recipe[sweep["knob"]],
                }
            )
    return out


def with_sweep_columns(frame: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    columns = ["knob", "panel", "series", "value", "recipe_point"]
    meta = pd.DataFrame([{"row": r["name"], **{c: r[c] for c in columns}} for r in rows])
    return frame.merge(meta, on="row", how="inner")


def write_sweep_table(frame: pd.DataFrame, knob: str, results: Path, stage: str) -> None:
    """results/<stage>_<knob>.md: each value's held-out val and test scores, and each value's
    difference to the recipe's point on both (a choice is made on val, never on test)."""
    part = frame[frame["knob"] == knob]
    centre = part[part["recipe_point"]]
    lines = [
        f"# Figure 4 {part['panel'].iloc[0]}: `{knob}` around the full recipe",
        "",
        "Top-1 (%) on the held-out val images and on the test set, mean ± sample standard"
        " deviation over seeds. Δ: minus the recipe's own point; within noise when |Δ| is at most"
        " two standard errors.",
        "",
        f"| {knob} | series | val top-1 (%) | test top-1 (%) | seeds | epochs | Δ val | verdict"
        " (val) | Δ test vs recipe | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (series, value), group in part.groupby(["series", "value"], sort=False):
        stat = {m: runner.aggregate(group, "knob", m).iloc[0] for m in ("val_top1", "test_top1")}
        mark = " (recipe)" if group["recipe_point"].iloc[0] else ""
        cells = {m: ("", "") for m in stat}
        if len(centre) and not group["recipe_point"].iloc[0]:
            for metric in stat:
                delta, se = runner.difference(group[metric], centre[metric])
                cells[metric] = (signed(delta), runner.verdict(delta, se, None))
        epochs = "/".join(str(e) for e in sorted(group["epochs"].unique()))
        lines.append(
            f"| {value:g}{mark} | {series} | {runner.mean_std(stat['val_top1'])} "
            f"| {runner.mean_std(stat['test_top1'])} | {int(stat['test_top1']['count'])} "
            f"| {epochs} | {' | '.join(cells['val_top1'])} | {' | '.join(cells['test_top1'])} |"
        )
    write_text_atomic(results / f"{stage}_{knob}.md", "\n".join(lines) + "\n")


def plot_sweep(frame: pd.DataFrame, results: Path, stage: str) -> None:
    """results/<stage>.png: one panel per knob, each series a line of mean ± std per value."""
    plt = runner.pyplot()
    panels = list(dict.fromkeys(frame["panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        part = frame[frame["panel"] == panel]
        values = sorted(part["value"].unique())
        for series, group in part.groupby("series", sort=False):
            stats = group.groupby("value")["test_top1"].agg(["mean", "std"])
            x = [values.index(v) for v in stats.index]
            ax.errorbar(
                x, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=4, label=series
            )
        recipe = part[part["recipe_point"]]
        if len(recipe):
            ax.plot(
                [values.index(recipe["value"].iloc[0])],
                [recipe["test_top1"].mean()],
                "r*",
                markersize=13,
                label="recipe's point",
            )
        ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set(title=panel, xlabel=part["knob"].iloc[0], ylabel="test top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    runner.save_figure(fig, results / f"{stage}.png")


def write_sweep(frame: pd.DataFrame, rows: list[dict], results: Path, stage: str) -> None:
    frame = with_sweep_columns(frame, rows)
    if frame.empty:
        return
    for knob in dict.fromkeys(frame["knob"]):
        write_sweep_table(frame, knob, results, stage)
    plot_sweep(frame, results, stage)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep", action="store_true", help="Figure 4's sweeps instead of the rows"
    )
    parser.add_argument("--rows", nargs="*", help="only these rows (names, e.g. cr_weight=0.3)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument(
        "--epochs",
        type=int,
        help="the rows (or sweep) at this length, apart: results/ablation_e<N>.*, sweep_e<N>*",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (e.g. epochs=30)")
    args = parser.parse_args(argv)
    spec = runner.load_spec()
    every = sweep_rows(spec) if args.sweep else spec["rows"]
    unknown = sorted(set(args.rows or []) - {r["name"] for r in every})
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; see configs/ablation.yaml")
    rows = [r for r in every if not args.rows or r["name"] in args.rows]
    spec_seeds = spec["sweep_seeds" if args.sweep else "seeds"]
    seeds = args.seeds or spec_seeds
    overrides = [*args.overrides, *([f"epochs={args.epochs}"] if args.epochs else [])]
    jobs = runner.row_jobs(spec, rows, seeds, overrides)
    # The tables show every row and seed scored so far, not only this invocation's.
    shown = runner.row_jobs(spec, every, sorted({*spec_seeds, *seeds}), overrides)
    stage = ("sweep" if args.sweep else "ablation") + (f"_e{args.epochs}" if args.epochs else "")
    if args.sweep:
        report = partial(write_sweep, rows=every, results=args.results, stage=stage)
    else:
        # at length, the default length's scores (ablation.csv, which this stage leaves alone)
        short = at_default_length(every, spec, args.results) if args.epochs else None
        report = partial(
            write_ablation,
            rows=every,
            spec=spec,
            results=args.results,
            epochs=args.epochs,
            short=short,
        )
    runner.run_jobs(stage, spec["model"], jobs, args.results, spec, report, shown)


if __name__ == "__main__":
    main()

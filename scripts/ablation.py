"""`make ablation` / `make sweep`: the paper's Tables 2 and 3 on the embedded benchmark.

Rows and sweeps come from configs/ablation.yaml. Each (row, seed) is a real training run
(`python -m train`, resumable) followed by centre-crop predictions (`python -m ensemble.logits`),
scored on the full test set. Results are appended to results/ablation.csv (or sweep.csv) as each
run finishes, so the job can be stopped and restarted at any time; the table (`.md`) and the
bar chart (`.png`) are rewritten from the CSV after every run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common.fs import atomic_path, write_text_atomic
from ensemble.evaluate import logits_top1
from train.config import CONFIG_DIR, load_config

ROLE = {"student": "student", "teacher": "teacher", "teacher_fused": "teacher"}


def run_module(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args])
    if proc.returncode != 0:
        raise SystemExit(f"error: `python -m {' '.join(args)}` failed ({proc.returncode})")


def score_run(model: str, row: dict, seed: int, common: list[str], stage: Path) -> dict:
    """Train (or resume) one run, predict val and test with the row's head, return its scores."""
    runs = stage / "runs"
    name = f"{row.get('same_runs_as', row['name'])}_s{seed}"
    overrides = [
        *common,
        *row["overrides"],
        f"seed={seed}",
        f"name={name}",
        f"out_dir={runs}",
        f"logits_dir={stage / 'logits' / row['name']}",
    ]
    run_module("train", model, *overrides)
    run_module("ensemble.logits", model, *overrides, "--center-crop", "--role", ROLE[row["eval"]])
    cfg = load_config(model, overrides)
    logits = Path(cfg["logits_dir"]) / name
    meta = yaml.safe_load((logits / "meta.json").read_text())
    return {
        "row": row["name"],
        "seed": seed,
        "val_top1": meta["scores"]["val"]["top1"],  # held out: ablations train on train
        "test_top1": logits_top1(logits, Path(cfg["data_dir"]) / "test_labels.csv"),
        "epochs": cfg["epochs"],
    }


def summarise(frame: pd.DataFrame, rows: list[dict], path: Path, title: str) -> None:
    """results/<stage>.md (mean and std per row beside the paper) and .png (bars, error bars)."""
    stats = frame.groupby("row", sort=False)["test_top1"].agg(["mean", "std", "count"])
    order = [r["name"] for r in rows if r["name"] in stats.index]
    stats = stats.loc[order]
    paper = {r["name"]: r.get("paper") for r in rows}
    lines = [
        f"# {title}",
        "",
        "| row | test top-1 (%) mean ± std | seeds | paper (ImageNet val) |",
        "|---|---|---|---|",
    ]
    for name, stat in stats.iterrows():
        ref = "" if paper.get(name) is None else f"{paper[name]:.2f}"
        std = 0.0 if np.isnan(stat["std"]) else stat["std"]
        lines.append(f"| {name} | {stat['mean']:.2f} ± {std:.2f} | {int(stat['count'])} | {ref} |")
    write_text_atomic(path.with_suffix(".md"), "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(stats) + 2, 4))
    ax.bar(range(len(stats)), stats["mean"], yerr=stats["std"].fillna(0), capsize=4)
    ax.set_xticks(range(len(stats)), stats.index, rotation=30, ha="right")
    ax.set_ylim(stats["mean"].min() - 3, stats["mean"].max() + 2)
    ax.set(ylabel="test top-1 (%)", title=title)
    fig.tight_layout()
    with atomic_path(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def sweep_rows(spec: dict) -> list[dict]:
    """One row per swept value, around the full recipe (plus_aux_classifier's settings)."""
    full = next(r for r in spec["rows"] if r["name"] == "plus_aux_classifier")

    def setting(key, value) -> str:
        return f"{key}={'null' if value is None else value}"

    return [
        {
            "name": setting(key, value),
            "eval": full["eval"],
            "overrides": [*full["overrides"], setting(key, value)],
        }
        for key, values in spec["sweep"].items()
        for value in values
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="the knob sweep instead of the rows")
    parser.add_argument("--rows", nargs="*", help="only these rows (names)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (e.g. epochs=30)")
    args = parser.parse_args(argv)
    spec = yaml.safe_load((CONFIG_DIR / "ablation.yaml").read_text())
    stage = "sweep" if args.sweep else "ablation"
    folder = args.results / stage
    rows = sweep_rows(spec) if args.sweep else spec["rows"]
    rows = [r for r in rows if not args.rows or r["name"] in args.rows]
    seeds = args.seeds or spec["sweep_seeds" if args.sweep else "seeds"]
    common = [*spec["common"], *args.overrides]
    csv = args.results / f"{stage}.csv"
    frame = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=["row", "seed"])
    for row in rows:
        for seed in seeds:
            if ((frame["row"] == row["name"]) & (frame["seed"] == seed)).any():
                continue
            result = score_run(spec["model"], row, seed, common, folder)
            frame = pd.concat([frame, pd.DataFrame([result])], ignore_index=True)
            write_text_atomic(csv, frame.to_csv(index=False))
            print(f"{row['name']} seed {seed}: test top-1 {result['test_top1']:.2f}%", flush=True)
    summarise(frame, rows, args.results / stage, f"{stage} on the embedded benchmark")


if __name__ == "__main__":
    main()

"""`runs/<name>/metrics.csv` (one row per epoch) and `curves.png`, rewritten as training goes.

pandas and matplotlib are imported where they are used: `make status` reads metrics.csv of 16 runs
through `read_metrics` and should not pay for them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.fs import atomic_path, write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

FILE = "metrics.csv"
LOSS_COLUMNS = ("loss", "ce", "rce", "cr", "mt", "aux")
ACCURACY_COLUMNS = ("val_student", "val_teacher", "val_fused")


def score_column(cfg: dict[str, Any]) -> str:
    """The held-out top-1 that picks the best checkpoint: the teacher's when there is one."""
    return "val_teacher" if cfg["mt_weight"] > 0 else "val_student"


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(history)
    write_text_atomic(Path(run_dir) / FILE, frame.to_csv(index=False))
    plot_curves(frame, Path(run_dir) / "curves.png")


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv as text ([] when it has none yet)."""
    try:
        with open(Path(run_dir) / FILE, newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def plot_curves(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for column in LOSS_COLUMNS:
        if column in frame and frame[column].abs().sum() > 0:
            left.plot(frame["epoch"], frame[column], label=column)
    left.set(xlabel="epoch", ylabel="loss (unweighted terms)", title="training losses")
    left.legend()
    for column in ACCURACY_COLUMNS:
        if column in frame:
            right.plot(frame["epoch"], frame[column], marker=".", label=column)
    right.set(xlabel="epoch", ylabel="top-1 (%)", title="validation")
    if right.lines:
        right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)

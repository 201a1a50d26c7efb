"""`runs/<name>/metrics.csv` (one row per epoch) and `curves.png`, rewritten as training goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from common.fs import atomic_path, write_text_atomic
from train.losses import TERMS

LOSS_COLUMNS = ("loss", *TERMS)
ACCURACY_COLUMNS = ("heldout_student", "heldout_teacher", "heldout_fused")


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(history)
    write_text_atomic(Path(run_dir) / "metrics.csv", frame.to_csv(index=False))
    plot_curves(frame, Path(run_dir) / "curves.png")


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
    right.set(xlabel="epoch", ylabel="top-1 (%)", title="held-out images")
    if right.lines:
        right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)

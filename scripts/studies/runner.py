"""The one runner of `make ablation`, `make sweep` and `make long-run`: jobs in, scores out.

A job is (row, seed, overrides, eval). Its training run is named by what it trains: the model,
a digest of the resolved config where it differs from configs/base.yaml (keys that never change
the weights, and fusion_weight, left out) and the seed, under `<results>/runs/`. Rows that train
the same thing therefore share one run, in any stage. Each job trains (or resumes) its run with
`python -m train`, unless it is complete, predicts val and test with the row's head and centre
crop (`python -m ensemble.logits`, unless its logits are newer than the best checkpoint), and its
scores are appended to `<results>/<stage>.csv` at once. A rerun skips every job whose row, seed
and run are in the CSV, so the work accumulates across interrupted sessions and machines.

Before starting, the runner prints the estimated time of what is missing, from the per-view
training time and the scoring time of the runs already recorded in `<results>/*.csv` (the
`reference_*` figures of configs/ablation.yaml until there are any); a tqdm bar counts the runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from common import provenance
from common.errors import UserError
from common.fs import atomic_path, write_text_atomic
from common.lock import FileLock
from common.yamlio import load_yaml
from data_prep.layout import Layout
from ensemble.evaluate import logits_top1
from scripts.stages import logits_current, run_module
from train.config import CONFIG_DIR, load_config, logits_dir, read_yaml, run_dir
from train.data import split_train_eval
from train.run import RESUME_NEUTRAL_KEYS, config_changes

SPEC = CONFIG_DIR / "ablation.yaml"
# eval -> (the weights that predict, the fusion_weight override): teacher_fused chooses it on val.
EVALS = {
    "student": ("student", "0"),
    "teacher": ("teacher", "0"),
    "teacher_fused": ("teacher", "null"),
}
# eval -> the metrics.csv column that follows the same prediction epoch by epoch.
HELDOUT_COLUMN = {
    "student": "heldout_student",
    "teacher": "heldout_teacher",
    "teacher_fused": "heldout_fused",
}
# Keys that leave a run's weights unchanged: not part of its name. data_dir is (other data,
# other run) although resuming tolerates a moved dataset.
NOT_IDENTITY = (set(RESUME_NEUTRAL_KEYS) - {"data_dir"}) | {"name", "seed", "fusion_weight"}
KEY = ["row", "seed", "run"]


@dataclass(frozen=True)
class Job:
    row: str
    seed: int
    overrides: tuple[str, ...]  # everything the run trains with, the seed included
    eval: str


ROW_KEYS = {"name", "table", "paper_row", "paper", "eval", "compare_to", "from", "overrides"}


def load_spec() -> dict[str, Any]:
    """configs/ablation.yaml; a row with a key not in ROW_KEYS is refused (an unquoted comma in
    a flow mapping's value silently starts a new key)."""
    spec = load_yaml(SPEC.read_text())
    for row in spec["rows"]:
        unknown = sorted(map(str, set(row) - ROW_KEYS))
        if unknown:
            raise UserError(
                f"{SPEC}: row {row.get('name')} has unknown keys {', '.join(unknown)}; quote a"
                " value that holds a comma"
            )
    return spec


def row_overrides(rows: dict[str, dict], name: str) -> list[str]:
    """The row's overrides on top of those of the row it comes `from` (recursively)."""
    row = rows[name]
    parent = row_overrides(rows, row["from"]) if row.get("from") else []
    return [*parent, *row["overrides"]]


def row_jobs(spec: dict, rows: Iterable[dict], seeds: Iterable[int], extra: list[str]) -> list[Job]:
    """Jobs for `rows` x `seeds`: the spec's common overrides, the row's, then `extra`."""
    by_name = {r["name"]: r for r in spec["rows"]}
    return [
        Job(
            row["name"],
            seed,
            (
                *spec["common"],
                *row_overrides({**by_name, row["name"]: row}, row["name"]),
                *extra,
                f"seed={seed}",
            ),
            row["eval"],
        )
        for row in rows
        for seed in seeds
    ]


# ---- a job's run and logits ----------------------------------------------------------------
def identity(cfg: dict[str, Any]) -> str:
    """Digest of what the run trains: its config where it differs from base.yaml, so that a key
    added to base.yaml with its old behaviour as default renames no run."""
    base = load_yaml((CONFIG_DIR / "base.yaml").read_text())
    differs = {k: v for k, v in cfg.items() if k not in NOT_IDENTITY and base.get(k, k) != v}
    text = json.dumps(differs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def job_overrides(model: str, job: Job, results: Path) -> list[str]:
    """The job's overrides plus where its run and logits live (name, out_dir, logits_dir)."""
    cfg = load_config(model, list(job.overrides))
    role, fusion = EVALS[job.eval]
    name = f"{cfg['name']}-{identity(cfg)}-s{cfg['seed']}"
    return [
        *job.overrides,
        f"name={name}",
        f"out_dir={results / 'runs'}",
        f"logits_dir={results / 'logits' / f'{role}-w{fusion}'}",
        f"fusion_weight={fusion}",
    ]


def read_metrics(cfg: dict[str, Any]) -> pd.DataFrame:
    path = run_dir(cfg) / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame({"epoch": []})


def epochs_done(cfg: dict[str, Any]) -> int:
    metrics = read_metrics(cfg)
    return int(metrics["epoch"].max()) if len(metrics) else 0


def trained_otherwise(cfg: dict[str, Any]) -> list[str]:
    """The keys whose value the run on disk trained with differs from what the code and configs
    resolve now (a default changed in base.yaml keeps the run's name). A key its config.yaml
    lacks came later with the old behaviour as default (`identity`): not counted."""
    saved = run_dir(cfg) / "config.yaml"
    if not saved.is_file():
        return []
    recorded = read_yaml(saved)
    return [
        key
        for key in config_changes(recorded, cfg)
        if key in recorded and key != provenance.KEY and cfg.get(key) != "auto"
    ]


def require_current_runs(model: str, jobs: list[Job], results: Path) -> None:
    """Refuse to report (or resume) runs trained with other settings than the jobs ask for."""
    stale = {}
    for job in jobs:
        cfg = load_config(model, job_overrides(model, job, results))
        keys = trained_otherwise(cfg)
        if keys:
            stale[cfg["name"]] = keys
    if stale:
        shown = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in list(stale.items())[:3])
        raise UserError(
            f"{len(stale)} runs in {results / 'runs'} trained with other values than the configs "
            f"give now ({shown}): a default changed since; delete those run folders and their "
            "CSV rows to train them again, or restore the values"
        )


def score(model: str, job: Job, results: Path) -> dict[str, Any]:
    """Train (or resume) the job's run and predict with its head, unless done; its CSV row."""
    overrides = job_overrides(model, job, results)
    cfg = load_config(model, overrides)
    before = epochs_done(cfg)
    started = time.perf_counter()
    if before < cfg["epochs"]:
        run_module("train", model, *overrides)
    trained = time.perf_counter()
    role = EVALS[job.eval][0]
    if not logits_current(cfg, "center", role):
        run_module("ensemble.logits", model, *overrides, "--center-crop", "--role", role)
    meta = json.loads((logits_dir(cfg) / "meta.json").read_text())
    val = meta["scores"]["val"]
    metrics = read_metrics(cfg)
    return {
        "row": job.row,
        "seed": job.seed,
        "run": cfg["name"],
        "eval": job.eval,
        "epochs": cfg["epochs"],
        # val is held out for train-split runs only; a train+val run has no held-out score here.
        "val_top1": math.nan if val["trained_on"] else val["top1"],
        "test_top1": logits_top1(logits_dir(cfg), Layout(Path(cfg["data_dir"])).test_labels),
        "fusion_weight": meta["fusion_weight"],
        "img_per_s": float(metrics["img_per_s"].median()),
        "train_images": len(split_train_eval(cfg)[0]),
        "views": cfg["num_views"],
        "epochs_trained": cfg["epochs"] - before,
        "train_s": round(trained - started, 1),
        "score_s": round(time.perf_counter() - trained, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---- the time estimate ---------------------------------------------------------------------
TIMING = ["run", "epochs", "train_s", "epochs_trained", "train_images", "views", "score_s"]


def trained_runs(results: Path) -> pd.DataFrame:
    """The runs trained by any stage in `<results>/*.csv`, with how long they took."""
    frames = [pd.read_csv(p) for p in sorted(results.glob("*.csv"))]
    frames = [f[TIMING] for f in frames if set(TIMING) <= set(f.columns)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TIMING)
    return frame[frame["epochs_trained"] > 0]


def recorded_rates(results: Path, spec: dict) -> tuple[dict[int, float], float, str]:
    """({views: seconds per trained view}, seconds to score a run, where they come from):
    medians over the runs recorded in `<results>/*.csv`, else the spec's reference figures."""
    timed = trained_runs(results)
    if timed.empty:
        return {}, spec["reference_score_seconds"], "the reference figures of configs/ablation.yaml"
    per_view = timed["train_s"] / (timed["epochs_trained"] * timed["train_images"] * timed["views"])
    rates = per_view.groupby(timed["views"]).median().to_dict()
    return rates, float(timed["score_s"].median()), f"{len(timed)} recorded runs"


def training_minutes(results: Path) -> dict[str, float]:
    """{run: minutes} of the runs some stage trained from start to end in one go."""
    timed = trained_runs(results)
    whole = timed[timed["epochs_trained"] == timed["epochs"]]
    return dict(zip(whole["run"], whole["train_s"] / 60, strict=True))


def estimate_seconds(
    runs: list[dict[str, Any]], jobs: int, rates: dict[int, float], score_s: float, fallback: float
) -> float:
    """Seconds to train `runs` (each: epochs left, train images, views) and score `jobs` jobs:
    epochs x images x views x the seconds per view recorded at that view count (else the median
    over view counts, else `fallback`), plus `score_s` per job."""
    overall = float(np.median(list(rates.values()))) if rates else fallback
    train = sum(
        r["epochs_left"] * r["train_images"] * r["views"] * rates.get(r["views"], overall)
        for r in runs
    )
    return train + jobs * score_s


def estimate(model: str, jobs: list[Job], results: Path, spec: dict) -> tuple[float, str]:
    """(seconds, source) for `jobs`, none of them scored; a run shared by jobs trains once."""
    rates, score_s, source = recorded_rates(results, spec)
    runs = {}
    for job in jobs:
        cfg = load_config(model, job_overrides(model, job, results))
        runs[cfg["name"]] = {
            "epochs_left": cfg["epochs"] - epochs_done(cfg),
            "train_images": len(split_train_eval(cfg)[0]),
            "views": cfg["num_views"],
        }
    fallback = spec["reference_seconds_per_view"]
    return estimate_seconds(list(runs.values()), len(jobs), rates, score_s, fallback), source


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


# ---- the loop ------------------------------------------------------------------------------
def read_results(csv: Path) -> pd.DataFrame:
    frame = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=KEY)
    if "run" not in frame:  # rows from before runs were named by their settings: never current
        frame["run"] = ""
    return frame


def wanted(model: str, jobs: list[Job], results: Path) -> pd.DataFrame:
    """(row, seed, run) of each job, in job order."""
    return pd.DataFrame([(j.row, j.seed, run_name(model, j, results)) for j in jobs], columns=KEY)


def current(frame: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` that score exactly the jobs of `keys` (row, seed and run), in order."""
    return keys.merge(frame.astype({"seed": int}), on=KEY, how="inner")


def pending(stage: str, model: str, jobs: list[Job], results: Path) -> list[Job]:
    """The jobs not yet scored in `<results>/<stage>.csv`."""
    frame = read_results(results / f"{stage}.csv")
    return pending_jobs(frame, jobs, wanted(model, jobs, results))


def pending_jobs(frame: pd.DataFrame, jobs: list[Job], keys: pd.DataFrame) -> list[Job]:
    done = current(frame, keys)
    scored = set(zip(done["row"], done["seed"], strict=True))
    return [j for j in jobs if (j.row, j.seed) not in scored]


def run_name(model: str, job: Job, results: Path) -> str:
    return next(o for o in job_overrides(model, job, results) if o.startswith("name=")).split("=")[
        1
    ]


def append_row(csv: Path, result: dict[str, Any]) -> pd.DataFrame:
    """Add one scored job to `csv`, read again under a lock: another study process working on
    other rows of the same stage appends its own between ours, and neither is lost."""
    lock = FileLock(csv.with_name(f".{csv.name}.lock"), str(csv), "run one study at a time")
    with lock:
        try:
            frame, new = read_results(csv), pd.DataFrame([result])
            frame = pd.concat([frame, new], ignore_index=True) if len(frame) else new
            write_text_atomic(csv, frame.to_csv(index=False))
        finally:
            lock.remove_file()  # results/ is committed: no lock file left there
    return frame


def run_jobs(
    stage: str,
    model: str,
    jobs: list[Job],
    results: Path,
    spec: dict,
    report: Callable[[pd.DataFrame], None],
    shown: list[Job] | None = None,
) -> pd.DataFrame:
    """Score every job not yet in `<results>/<stage>.csv`, appending each as it finishes and
    calling `report` (tables, figures) after each on the scored rows of `shown` (default: the
    jobs; a run of a few rows keeps the others in the tables); returns those rows."""
    csv = results / f"{stage}.csv"
    require_current_runs(model, jobs, results)
    frame = read_results(csv)
    keys = wanted(model, jobs, results)
    shown_keys = keys if shown is None else wanted(model, shown, results)
    todo = pending_jobs(frame, jobs, keys)
    seconds, source = estimate(model, todo, results, spec)
    print(
        f"{stage}: {len(jobs)} runs, {len(jobs) - len(todo)} done, {len(todo)} to do: "
        f"estimated {duration(seconds)} (from {source})",
        flush=True,
    )
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=stage, unit="run")
    for job in todo:
        started = time.perf_counter()
        result = score(model, job, results)
        frame = append_row(csv, result)
        bar.update()
        tqdm.write(
            f"{job.row} seed {job.seed}: test top-1 {result['test_top1']:.2f}% "
            f"({duration(time.perf_counter() - started)})"
        )
        report(current(frame, shown_keys))
    bar.close()
    report(current(frame, shown_keys))
    return current(frame, keys)


# ---- aggregation ---------------------------------------------------------------------------
def aggregate(frame: pd.DataFrame, by: str = "row", value: str = "test_top1") -> pd.DataFrame:
    """Mean, sample standard deviation (n - 1; NaN for one seed) and count of `value` per `by`,
    in order of first appearance."""
    return frame.groupby(by, sort=False)[value].agg(["mean", "std", "count"])


def difference(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b))."""
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return float(a.mean() - b.mean()), se


def verdict(delta: float, se: float, paper_delta: float | None) -> str:
    """Within noise when |delta| <= 2 standard errors; else reproduced / not reproduced when the
    paper gives a difference (same sign or not), higher / lower when it does not."""
    if math.isnan(se):
        return "one seed: no verdict"
    if abs(delta) <= 2 * se:
        return "within noise"
    if paper_delta is None:
        return "higher" if delta > 0 else "lower"
    return "reproduced" if delta * paper_delta > 0 else "not reproduced"


def mean_std(stat: pd.Series) -> str:
    if math.isnan(stat["mean"]):
        return "–"  # e.g. val, where the runs trained on it
    std = "–" if math.isnan(stat["std"]) else f"{stat['std']:.2f}"
    return f"{stat['mean']:.2f} ± {std}"


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on the training machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

"""Experiment tracking: interval means, tracker choice, TensorBoard files of real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from common.errors import UserError
from tests.conftest import NARROW, ROOT, run_command
from train.config import load_config
from train.heartbeat import FILE as HEARTBEAT
from train.tracking import Tracking, hyperparameters, init_kwargs, trackers

TERMS = ("loss", "ce", "rce", "cr", "mt", "aux")


class Recorder(GeneralTracker):
    """An in-memory tracker: what Accelerate hands to every tracker, kept as a list."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self.rows

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, dict(values)))


def tracking_for(tmp_path: Path, every: int) -> tuple[Tracking, Recorder]:
    recorder = Recorder()
    acc = Accelerator(cpu=True, log_with=[recorder], project_dir=tmp_path)
    cfg = load_config("demo_resnet18", {"log_every_steps": every, "out_dir": str(tmp_path)})
    return Tracking(acc, cfg, tmp_path, TERMS), recorder


def test_interval_means_are_the_means_of_the_steps_since_the_last_interval_or_epoch(tmp_path):
    """Brute force: per-step terms, summed as the run sums them; each logged interval must be the
    float64 mean of its own steps, and a restored tracker continues the open interval."""
    generator = torch.Generator().manual_seed(0)
    terms = torch.rand(2, 7, len(TERMS), generator=generator, dtype=torch.float64)
    tracking, recorder = tracking_for(tmp_path, every=3)
    tracking.start(0, False, {})
    step, windows, window = 0, [], []
    for epoch in range(2):
        sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
        for values in terms[epoch]:
            step += 1
            sums += torch.cat([values, torch.ones(1, dtype=torch.float64)])
            window.append(values)
            tracking.interval(step, sums, lr=0.1, skipped=0)
            if step % 3 == 0:
                windows.append((step, torch.stack(window).mean(0)))
                window = []
            if step == 4:  # a resume: a fresh tracker restored from the checkpoint's state
                state = tracking.state_dict()
                tracking, recorder_b = tracking_for(tmp_path, every=3)
                tracking.load_state_dict(state)
                tracking.start(step, True, {})
        tracking.epoch_end({"epoch": epoch + 1, "step": step, "loss": 0.0})
        window = []  # an epoch's sums restart at zero, so does the interval
    logged = [(s, v) for s, v in recorder.rows + recorder_b.rows if "train/loss" in v]
    assert [s for s, _ in logged] == [s for s, _ in windows] == [3, 6, 9, 12]
    for (_, values), (_, expected) in zip(logged, windows, strict=True):
        got = [values[f"train/{t}"] for t in TERMS]
        assert got == pytest.approx(expected.tolist(), rel=1e-12)
    assert json.loads((tmp_path / HEARTBEAT).read_text())["state"] == "running"


def test_log_with_accepts_installed_trackers_and_refuses_others_in_one_line():
    assert trackers({"log_with": "tensorboard"}) == ["tensorboard"]
    assert trackers({"log_with": "none"}) == [] and trackers({"log_with": None}) == []
    with pytest.raises(UserError, match=r"log_with='tensorbord' is not a tracker.*tensorboard"):
        trackers({"log_with": "tensorbord"})
    from accelerate.tracking import get_available_trackers

    if "comet_ml" not in {str(t) for t in get_available_trackers()}:
        with pytest.raises(UserError, match=r"comet_ml package is not installed") as err:
            trackers({"log_with": "tensorboard,comet_ml"})
        assert f"`{sys.executable} -m pip install comet_ml`" in str(err.value)  # this venv's pip
        assert str(err.value).endswith("or use log_with=tensorboard")


def test_without_tensorboard_the_error_offers_no_tracker_rather_than_itself(monkeypatch):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    with pytest.raises(UserError, match=r"tensorboard package is not installed.*log_with=none$"):
        trackers({"log_with": "tensorboard"})


def test_hyperparameters_are_flat_scalars_and_resume_options_name_the_step():
    cfg = load_config("demo_resnet18")
    record = {"git_commit": "abc", "config_sha256": "f" * 64, "time": "2026-01-01T00:00:00+0000"}
    params = hyperparameters(cfg, {**record, "resumed": [{"step": 3}]})
    assert all(isinstance(v, (bool, int, float, str)) for v in params.values())
    assert json.loads(params["mean"]) == cfg["mean"] and params["git_commit"] == "abc"
    assert "resumed" not in params
    kwargs = init_kwargs(cfg, record, 14)
    assert kwargs["tensorboard"] == {"purge_step": 15}
    assert kwargs["wandb"]["id"] == init_kwargs(cfg, record, 0)["wandb"]["id"]  # stable


# ---- real runs --------------------------------------------------------------------------------
# 80 images, batch 8: 10 steps an epoch. Every step logged; checkpoints at 7, 10, 14, 20, so a
# kill after step 8 leaves logged steps that the resumed run must replace, not repeat.
RUN_ARGS = [
    "demo_resnet18",
    NARROW,
    "epochs=2",
    "batch_size=8",
    "workers=1",
    "ckpt_every_steps=7",
    "keep_last=50",
    "warmup_epochs=1",
    "lr=0.05",
    "train_splits=[train]",
    "log_every_steps=1",
]


def run_args(data: Path, out: Path) -> list[str]:
    return [*RUN_ARGS, f"data_dir={data}", f"out_dir={out}"]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: EventAccumulator, which honours purges after a restart."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def raw_steps(folder: Path, tag: str = "train/loss") -> list[int]:
    """Every step written for `tag`, purged or not, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary") and event.summary.value[0].tag == tag:
                steps.append(event.step)
    return steps


def newest_step(run: Path) -> int:
    done = [p for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    return max((int(p.name[5:14]) for p in done), default=-1)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, module_dir) -> Path:
    run_command("-m", "train", *run_args(tiny_dir, module_dir))
    return module_dir / "demo_resnet18"


@pytest.mark.slow
def test_tensorboard_scalars_match_metrics_csv_and_the_config_is_the_hyperparameters(
    uninterrupted,
):
    logged = scalars(uninterrupted / "attract-repulse")
    metrics = pd.read_csv(uninterrupted / "metrics.csv")
    for column in metrics.columns.drop("step"):
        steps, values = zip(*logged[f"epoch/{column}"], strict=True)
        assert list(steps) == metrics["step"].tolist(), column
        assert list(values) == pytest.approx(metrics[column].tolist(), rel=1e-6), column
    for tag in ("train/loss", "train/lr", "train/img_per_s", "train/skipped", "train/cr"):
        assert [s for s, _ in logged[tag]] == list(range(1, 21)), tag
    # One step per interval and no skipped step: an epoch's mean is the mean of its intervals.
    for epoch, row in metrics.iterrows():
        first = epoch * 10
        window = [v for s, v in logged["train/loss"] if first < s <= first + 10]
        assert sum(window) / 10 == pytest.approx(row["loss"], rel=1e-5)
    hparams = list((uninterrupted / "attract-repulse").glob("*/hparams.yml"))
    assert len(hparams) == 1
    text = hparams[0].read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert "name: demo_resnet18" in text and commit.stdout.strip() in text
    beat = json.loads((uninterrupted / HEARTBEAT).read_text())
    assert beat["state"] == "done" and beat["step"] == 20


@pytest.mark.slow
def test_a_killed_and_resumed_run_shows_each_step_once_with_the_uninterrupted_values(
    uninterrupted, tiny_dir, tmp_path
):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *run_args(tiny_dir, tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run, board = tmp_path / "demo_resnet18", tmp_path / "demo_resnet18" / "attract-repulse"
    # Kill once a step after the newest checkpoint has been logged: the resumed run repeats it.
    while proc.poll() is None:
        checkpointed = newest_step(run)
        if checkpointed >= 7 and board.is_dir() and max(raw_steps(board)) > checkpointed:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert newest_step(run) < 20, "the run finished before it was killed"
    resumed = run_command("-m", "train", *run_args(tiny_dir, tmp_path))
    assert "resumed from" in resumed.stdout
    raw = raw_steps(board)
    assert len(raw) > len(set(raw)), "no step was logged twice, so no purge was exercised"
    expected, got = scalars(uninterrupted / "attract-repulse"), scalars(board)
    assert got.keys() == expected.keys()
    for tag, events in expected.items():
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in events], tag  # each step once, none missing
        if not tag.endswith("img_per_s"):  # the only value that depends on the clock
            assert [v for _, v in got[tag]] == [v for _, v in events], tag
    assert len(list(board.glob("*/hparams.yml"))) == 1
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]

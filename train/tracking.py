"""Experiment tracking through Accelerate's trackers, and the run's heartbeat file.

`log_with` (configs/base.yaml) names the trackers: TensorBoard by default, or any tracker
Accelerate supports whose package is installed (wandb, mlflow, aim, ...; their offline modes are
theirs: WANDB_MODE=offline, a file MLFLOW_TRACKING_URI). Every `log_every_steps` optimiser steps
the run logs `train/<term>` (the mean of each loss term since the last interval or the epoch's
start), `train/lr`, `train/img_per_s` and `train/skipped`; every epoch it logs each column of its
metrics.csv row as `epoch/<column>`. The x-axis is the optimiser step throughout, so that runs of
different lengths and batch sizes compare on one chart. The resolved config and its provenance
are the run's hyperparameters.

Each step once after a kill: every scalar of a step <= S is logged and flushed before checkpoint S
is written (TensorBoard's tracker flushes on every log). A run resumed from S asks TensorBoard to
purge what a killed process logged after S (`purge_step`, a SessionLog.START that TensorBoard's
readers honour), then logs those steps again, with the same values since the resume is exact.
wandb resumes the same run by its id and keeps the first value of a step it has seen.

The heartbeat (train/heartbeat.py) is rewritten at every interval and epoch end, and says how the
run ended; `make status` reads it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from common.errors import UserError
from common.status import EXIT_PREEMPTED
from train import heartbeat
from train.config import run_dir

ENDED = {0: "done", EXIT_PREEMPTED: "stopped"}


def trackers(cfg: dict[str, Any]) -> list[str]:
    """The tracker names of `log_with`, each known to Accelerate and installed; [] for none."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    text = (cfg["log_with"] or "none").strip()
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name != "all" and name not in LOGGER_TYPE_TO_CLASS:
            valid = ", ".join([*LOGGER_TYPE_TO_CLASS, "all", "none"])
            raise UserError(f"log_with={name!r} is not a tracker Accelerate knows; valid: {valid}")
        if name != "all" and name not in installed:
            raise UserError(
                f"log_with={name}: the {name} package is not installed; "
                f"`{sys.executable} -m pip install {name}`, or use log_with="
                + ("none" if name == "tensorboard" else "tensorboard")
            )
    return names


def hyperparameters(cfg: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The config and its provenance as flat scalars (TensorBoard's hparams take no lists)."""
    flat = {**cfg, **{k: v for k, v in record.items() if k != "resumed"}}
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in flat.items()
    }


def init_kwargs(cfg: dict[str, Any], record: dict[str, Any], step: int) -> dict[str, Any]:
    """Per-tracker options: continue the same run, and purge what was logged after `step`."""
    # The id is stable over resumes (the run's config hash and start time, from config.yaml).
    stamp = f"{cfg['name']}-{record.get('config_sha256', '')[:8]}-{record.get('time', '')}"
    run_id = re.sub(r"[^A-Za-z0-9_-]", "", stamp)[:64]
    return {
        "tensorboard": {"purge_step": step + 1},
        "wandb": {"name": cfg["name"], "id": run_id, "resume": "allow", "dir": str(run_dir(cfg))},
        "mlflow": {"run_name": cfg["name"]},
    }


class Tracking:
    """The tracker calls of one run: `start`, `interval` after each optimiser step, `epoch_end`
    before the epoch's checkpoint, `finish`; the interval's starting sums travel in checkpoints."""

    def __init__(self, acc: Accelerator, cfg: dict[str, Any], run_dir: Path, terms: tuple):
        self.acc, self.cfg, self.dir, self.terms = acc, cfg, Path(run_dir), terms
        self.every = cfg["log_every_steps"]
        self.global_batch = cfg["batch_size"] * acc.num_processes * cfg["grad_accum"]
        # The sums of all processes at the last interval (the same on each, so the checkpoint's
        # copy, the main process's, serves every process on resume).
        self.mark = torch.zeros(len(terms) + 1, dtype=torch.float64)
        self.clock, self.clock_step = time.perf_counter(), 0
        self.started = None

    def state_dict(self) -> dict[str, Any]:
        return {"mark": self.mark}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mark" in state:
            self.mark = state["mark"]

    def start(self, step: int, resumed: bool, record: dict[str, Any]) -> None:
        """Open the trackers at `step`; a fresh run stores its hyperparameters once."""
        config = None if resumed else hyperparameters(self.cfg, record)
        self.acc.init_trackers(
            self.cfg["tracker_project"], config, init_kwargs(self.cfg, record, step)
        )
        self.clock, self.clock_step = time.perf_counter(), step
        self.started = time.time()
        self._heartbeat("running", step)

    def interval(self, step: int, sums: torch.Tensor, lr: float, skipped: int) -> None:
        """After optimiser step `step` (every process): log the interval when one is due.

        `sums` holds this process's running sums of the loss terms and the count of finite
        steps since the epoch began; the interval's share is their total over processes less
        the total at the last interval.
        """
        if self.every <= 0 or step % self.every:
            return
        total = self.acc.reduce(sums.to(self.acc.device), reduction="sum").cpu()
        delta, self.mark = total - self.mark, total
        means = (delta[:-1] / delta[-1].clamp(min=1)).tolist()
        now = time.perf_counter()
        values = {f"train/{t}": m for t, m in zip(self.terms, means, strict=True)}
        values["train/lr"], values["train/skipped"] = lr, skipped
        images = (step - self.clock_step) * self.global_batch
        values["train/img_per_s"] = images / max(now - self.clock, 1e-9)
        self.clock, self.clock_step = now, step
        self.acc.log(values, step=step)
        self._heartbeat("running", step)

    def epoch_end(self, row: dict[str, Any]) -> None:
        """Log the epoch's metrics.csv row at its step (every process; before its checkpoint)."""
        self.mark = torch.zeros_like(self.mark)  # the epoch's sums restart from zero
        values = {f"epoch/{k}": v for k, v in row.items() if k != "step" and v is not None}
        self.acc.log(values, step=row["step"])
        self._heartbeat("running", row["step"])

    def finish(self, code: int | None, step: int) -> None:
        """Close the trackers (flushing them) and record how the run ended (None: an error)."""
        if self.started is None:
            return
        if code is None:  # an error: leave the process group alone, a peer may be mid-collective
            for tracker in self.acc.trackers:
                tracker.finish()
        else:
            self.acc.end_training()
        self._heartbeat(ENDED.get(code, "failed"), step)

    def _heartbeat(self, state: str, step: int) -> None:
        if self.acc.is_main_process:
            heartbeat.write(self.dir, state, step, self.started)

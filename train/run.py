"""config -> Accelerator -> loop -> checkpoints: one training run that never loses work.

A rerun of the same command resumes from the newest verified checkpoint, mid-epoch included, and
ends bit-identical to an uninterrupted run: the data order, the augmentation and the mixing are
functions of (seed, epoch, step/index, rank), and the RNG states of every process travel in the
checkpoint. SIGTERM/SIGUSR1 (cluster preemption) checkpoint at the next step boundary and exit
with EXIT_PREEMPTED, so a job script can requeue.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from common.errors import UserError
from common.status import EXIT_PREEMPTED
from train import checkpoint as ckpt
from train.config import run_dir, save_config
from train.data import eval_loader, split_train_eval, train_loader
from train.distributed import make_accelerator
from train.engine import best_fusion, forward_step, step_generator, top1, two_view_batch
from train.inference import predict_crops
from train.losses import AttractRepulseLoss
from train.metrics import write_metrics
from train.model import build_model, build_teacher, ema_decay
from train.views import SharedMixup

# Keys that change where, how often or how a run is evaluated, never the weights it computes.
RESUME_NEUTRAL_KEYS = {
    "workers",
    "eval_every",
    "ckpt_every_steps",
    "keep_last",
    "allow_config_change",
    "out_dir",
    "logits_dir",
    "data_dir",
    "test_resize_ratio",
    "fusion_weight",
}
TERMS = ("loss", "ce", "rce", "cr", "mt", "aux")


class StopRequest:
    """Remembers SIGTERM/SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def optimizer_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"momentum": cfg["momentum"], "weight_decay": cfg["weight_decay"]}
    if cfg["opt"].startswith("rmsprop"):
        kwargs.update(alpha=cfg["rmsprop_alpha"], eps=cfg["opt_eps"])
    return kwargs


def global_lr(cfg: dict[str, Any], world: int) -> float:
    """lr scaled linearly with the global batch (RECIPE 4: 0.005 at 512)."""
    return cfg["lr"] * cfg["batch_size"] * world * cfg["grad_accum"] / cfg["lr_base_batch"]


def config_changes(saved: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(cfg)) - RESUME_NEUTRAL_KEYS
    return sorted(k for k in keys if saved.get(k) != cfg.get(k))


class Run:
    """The state of one training run and the loop that advances it."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.acc = make_accelerator(cfg["mixed_precision"])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.dir = run_dir(cfg)
        torch.manual_seed(cfg["seed"])
        self.train_items, self.eval_items = split_train_eval(cfg)
        self.loader, self.dataset, self.sampler = train_loader(
            cfg, self.train_items, self.rank, self.world
        )
        accum = cfg["grad_accum"]
        self.sampler.steps -= self.sampler.steps % accum  # whole optimiser steps per epoch
        self.steps_per_epoch = self.sampler.steps // accum
        if self.steps_per_epoch == 0:
            raise UserError(
                f"grad_accum={accum} exceeds the {self.sampler.steps} steps of an epoch"
            )
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        self.channels_last = cfg["channels_last"]
        if self.channels_last is None:
            self.channels_last = self.acc.device.type == "cuda"
        model = build_model(cfg)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.teacher = build_teacher(model, ema_decay(cfg, self.total_steps), cfg["ema_warmup"])
        optimizer = create_optimizer_v2(
            model, opt=cfg["opt"], lr=global_lr(cfg, self.world), **optimizer_kwargs(cfg)
        )
        self.scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg["sched"],
            num_epochs=cfg["epochs"],
            warmup_epochs=cfg["warmup_epochs"],
            warmup_lr=cfg["warmup_lr"],
            min_lr=cfg["min_lr"],
            step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.teacher.to(self.acc.device)
        self.criterion = AttractRepulseLoss.from_config(cfg)
        self.mix = SharedMixup.from_config(cfg)
        self.stop = StopRequest()
        # Where the loop stands; all of it travels in the checkpoint.
        self.epoch, self.micro, self.global_step = 0, 0, 0
        self.nonfinite_run, self.skipped = 0, 0
        self.best, self.history = -math.inf, []
        self.sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)  # term sums, step count

    # ---- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else {},
            "position": [self.epoch, self.micro, self.global_step],
            "nonfinite": [self.nonfinite_run, self.skipped],
            "best": self.best,
            "history": self.history,
            "sums": self.sums,
            "config": self.cfg,
        }

    def save(self) -> Path | None:
        weights = {
            "student": self.acc.unwrap_model(self.model).state_dict(),
            "teacher": self.teacher.module.state_dict(),
        }
        return ckpt.save_checkpoint(
            self.acc, self.dir, self.global_step, weights, self._state(), self.cfg["keep_last"]
        )

    def resume(self) -> bool:
        step_dir = ckpt.latest_valid(self.dir)
        if step_dir is None:
            return False
        weights, state, rng = ckpt.load_state(step_dir, self.rank)
        changed = config_changes(state["config"], self.cfg)
        if changed and not self.cfg["allow_config_change"]:
            raise UserError(
                f"{step_dir} was made with a different config ({', '.join(changed)}); "
                "rerun with the same settings, pass allow_config_change=true, or use another name="
            )
        self.acc.unwrap_model(self.model).load_state_dict(weights["student"])
        self.teacher.module.load_state_dict(weights["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.acc.scaler is not None and state["scaler"]:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.epoch, self.micro, self.global_step = state["position"]
        self.nonfinite_run, self.skipped = state["nonfinite"]
        self.best, self.history, self.sums = state["best"], state["history"], state["sums"]
        if rng is None:
            raise UserError(
                f"{step_dir} holds no RNG state for process {self.rank}: it was written by "
                f"{self.world} fewer processes; resume with the world size it was made with"
            )
        ckpt.set_rng_state(rng)
        self.acc.print(f"resumed from {step_dir} (epoch {self.epoch}, step {self.global_step})")
        return True

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        cfg = self.cfg
        self.acc.print(
            f"run {cfg['name']}: world size {self.world} ({self.acc.distributed_type.value}, "
            f"{self.acc.device}, precision {self.acc.mixed_precision}), "
            f"{len(self.train_items)} training images, {self.steps_per_epoch} steps per epoch, "
            f"global batch {cfg['batch_size'] * self.world * cfg['grad_accum']}"
        )
        if not self.resume() and self.acc.is_main_process:
            save_config(cfg, self.dir / "config.yaml")
        while self.epoch < cfg["epochs"]:
            if self.run_epoch():
                self.acc.print(f"stopped on request; checkpoint at step {self.global_step}")
                return EXIT_PREEMPTED
        self.acc.print(f"done: {self.dir}")
        return 0

    def run_epoch(self) -> bool:
        """Train the rest of the current epoch; True when a stop was requested."""
        cfg, accum = self.cfg, self.cfg["grad_accum"]
        self.sampler.set_position(self.epoch, self.micro)
        self.dataset.set_epoch(self.epoch)
        self.model.train()
        bar = tqdm(
            total=self.sampler.steps,
            initial=self.micro,
            disable=not self.acc.is_main_process,
            desc=f"{cfg['name']} epoch {self.epoch + 1}/{cfg['epochs']}",
            leave=False,
        )
        window_ok, started, images = True, time.perf_counter(), 0
        for batch in self.loader:
            boundary = (self.micro + 1) % accum == 0
            nonfinite, stop = self.micro_step(batch, boundary)
            window_ok &= not nonfinite
            self.micro += 1
            images += batch[0].shape[0] * self.world
            bar.update()
            if boundary:
                self.optimizer_step(window_ok)
                window_ok = True
                if stop or self._checkpoint_due():
                    self.save()
                if stop:
                    return True
        bar.close()
        self.end_epoch(images / max(time.perf_counter() - started, 1e-9))
        return False

    def micro_step(self, batch, boundary: bool) -> tuple[bool, bool]:
        cfg = self.cfg
        generator = step_generator(cfg, self.epoch, self.micro, self.rank)
        inputs, targets = two_view_batch(batch, self.mix, generator, self.channels_last)
        inputs, targets = inputs.to(self.acc.device), targets.to(self.acc.device)
        ramp = cfg["mt_rampup_epochs"]
        progress = self.epoch + self.micro / self.sampler.steps
        mt_scale = min(1.0, progress / ramp) if ramp > 0 else 1.0
        sync = contextlib.nullcontext() if boundary else self.acc.no_sync(self.model)
        with sync:
            result = forward_step(
                self.acc, self.model, self.teacher, self.criterion, inputs, targets, mt_scale
            )
            # Every process learns whether any process saw a non-finite loss or a stop signal,
            # so all skip the same step and stop at the same boundary (no DDP deadlock).
            flags = torch.tensor(
                [float(not result.finite), float(self.stop.requested)], device=self.acc.device
            )
            nonfinite, stop = (self.acc.reduce(flags, reduction="sum") > 0).tolist()
            if not nonfinite:
                self.acc.backward(result.loss / cfg["grad_accum"])
        if nonfinite:
            self.skipped += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= cfg["max_nonfinite"]:
                raise UserError(
                    f"{self.nonfinite_run} non-finite losses in a row at epoch {self.epoch + 1}, "
                    f"step {self.global_step}; no checkpoint written after them. Lower lr, "
                    "enable grad_clip, or use mixed_precision=no"
                )
        else:
            self.nonfinite_run = 0
            terms = [result.terms.get(name, 0.0) for name in TERMS]
            self.sums += torch.tensor([*terms, 1.0], dtype=torch.float64)
        return nonfinite, stop

    def optimizer_step(self, window_ok: bool) -> None:
        """Step the optimiser and the teacher, unless the window held a non-finite loss."""
        if window_ok:
            if self.cfg["grad_clip"] > 0:
                self.acc.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.scheduler.step_update(num_updates=self.global_step)
        if window_ok:
            self.teacher.update(self.acc.unwrap_model(self.model), step=self.global_step)

    def _checkpoint_due(self) -> bool:
        every = self.cfg["ckpt_every_steps"]
        last_of_epoch = self.micro == self.sampler.steps
        return every > 0 and self.global_step % every == 0 and not last_of_epoch

    def end_epoch(self, images_per_s: float) -> None:
        cfg = self.cfg
        sums = self.acc.reduce(self.sums.to(self.acc.device), reduction="sum").cpu()
        means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
        row = {"epoch": self.epoch + 1, "step": self.global_step}
        row.update(zip(TERMS, means, strict=True))
        row.update(lr=self.optimizer.param_groups[0]["lr"], skipped=self.skipped)
        row["img_per_s"] = images_per_s
        due = (self.epoch + 1) % cfg["eval_every"] == 0 or self.epoch + 1 == cfg["epochs"]
        score = None
        if self.eval_items and due:
            row.update(self.evaluate())
            score = row["val_teacher"] if cfg["mt_weight"] > 0 else row["val_student"]
        self.history.append(row)
        # Without a validation set (train+val, nothing held out) the newest epoch is the best.
        improved = not self.eval_items or (score is not None and score > self.best)
        if score is not None:
            self.best = max(self.best, score)  # before the save: a resumed run keeps it
        self.epoch, self.micro = self.epoch + 1, 0
        self.sums = torch.zeros_like(self.sums)
        step_dir = self.save()
        if self.acc.is_main_process:
            if improved:
                ckpt.mark_best(self.dir, step_dir)
            write_metrics(self.dir, self.history)
        self.acc.wait_for_everyone()
        self.acc.print(
            f"epoch {row['epoch']}: loss {row['loss']:.4f}"
            + "".join(f", {k} {row[k]:.2f}" for k in ("val_student", "val_teacher") if k in row)
        )

    def evaluate(self) -> dict[str, float]:
        """Top-1 on the validation items: student, teacher, and the teacher's fused prediction."""
        cfg = self.cfg
        loader = eval_loader(cfg, self.eval_items, self.rank, self.world, cfg["batch_size"] * 2)
        labels = torch.tensor([item[2] for item in self.eval_items])
        args = (loader, len(self.eval_items), cfg["num_classes"], cfg["aux_weight"] > 0, False)
        self.model.eval()
        student = predict_crops(self.acc, self.model, *args, self.channels_last)
        teacher = predict_crops(self.acc, self.teacher.module, *args, self.channels_last)
        self.model.train()
        weight, fused = best_fusion(teacher["main"], teacher.get("aux"), labels)
        return {
            "val_student": top1(student["main"], labels),
            "val_teacher": top1(teacher["main"], labels),
            "val_fused": fused,
            "fusion_w": weight,
        }


def train(cfg: dict[str, Any]) -> int:
    """Train (or resume) the run of `cfg`; returns the process exit code."""
    if cfg["batch_size"] == "auto":
        from train.auto_batch import train_auto_batch  # it builds on Run

        return train_auto_batch(cfg)
    return Run(cfg).train()

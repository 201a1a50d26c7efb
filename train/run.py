"""config -> Accelerator -> loop -> checkpoints: one training run that never loses work.

A rerun of the same command resumes from the newest verified checkpoint, mid-epoch included, and
ends bit-identical to an uninterrupted run (on the CPU, at the same thread count: a reduction's
float order follows its threads; on a GPU within rounding, cuDNN choosing kernels by time): the
data order, the augmentation and the mixing are functions of (seed, epoch, step/index, rank),
and the RNG states of every process travel in the checkpoint. SIGTERM/SIGUSR1 (cluster
preemption) checkpoint at the next step boundary and exit with EXIT_PREEMPTED, so a job script
can requeue (train/stop.py bounds how long that may take). One trainer at a time: the main
process holds `runs/<name>/train.lock` for the whole run.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from common.errors import UserError
from common.fs import require_writable
from common.lock import FileLock
from common.metrics import top1
from common.status import EXIT_PREEMPTED
from data_prep.layout import Layout
from train import checkpoint as ckpt
from train import heartbeat
from train.config import require_run_dataset, run_dir, save_config, score_column
from train.data import (
    DevicePrefetcher,
    eval_loader,
    split_train_eval,
    train_loader,
    worker_death,
)
from train.distributed import make_accelerator, plain_module, tune_for_gpu
from train.engine import SUM_COLUMNS, AttractRepulseStep, StepResult
from train.inference import best_fusion, fuse, predict_crops_of
from train.losses import AttractRepulseLoss
from train.metrics import write_metrics
from train.model import build_model, build_teacher, ema_decay, use_channels_last
from train.rng import mix_generator, rng_state, seed_everything, set_rng_state, stable_seed
from train.stop import StopRequest
from train.tracking import Tracking, trackers
from train.views import DeviceAugment, SharedMixup, build_train_transform

# Keys that change where, how often or how a run is evaluated, never the weights it computes.
RESUME_NEUTRAL_KEYS = {
    "workers",
    "cpu_workers",
    "eval_every",
    "ckpt_every_steps",
    "ckpt_every_minutes",
    "keep_last",
    "allow_config_change",
    "out_dir",
    "logits_dir",
    "data_dir",
    "test_resize_ratio",
    "fusion_weight",
    "stop_timeout_s",
    "log_with",
    "log_every_steps",
    "tracker_project",
    "fusion_fallback",
}


def optimizer_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"momentum": cfg["momentum"], "weight_decay": cfg["weight_decay"]}
    if cfg["opt"].startswith("rmsprop"):
        kwargs.update(alpha=cfg["rmsprop_alpha"], eps=cfg["opt_eps"])
    return kwargs


def global_lr(cfg: dict[str, Any], world: int) -> float:
    """lr scaled linearly with the global batch (docs/recipe.md 4: 0.005 at 512)."""
    return cfg["lr"] * cfg["batch_size"] * world * cfg["grad_accum"] / cfg["lr_base_batch"]


def config_changes(saved: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(cfg)) - RESUME_NEUTRAL_KEYS
    return sorted(k for k in keys if saved.get(k) != cfg.get(k))


def check_eval_shares(images: int, world: int) -> None:
    """Every process evaluates a share of the held-out images: the DDP student's first forward
    after training broadcasts its buffers, a collective that a process without a batch never
    joins, and the others would wait for it until the process group's timeout."""
    if 0 < images < world:
        raise UserError(
            f"{images} held-out image(s) for {world} processes: each process needs at least one; "
            "hold out more (a larger val split, or holdout_per_class= on a train+val run), or run "
            "fewer processes"
        )


class Run:
    """The state of one training run and the loop that advances it."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.dir = run_dir(cfg)
        self.acc = make_accelerator(
            cfg["mixed_precision"], cfg["grad_accum"], cfg["compile"], trackers(cfg), self.dir
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.tracking = Tracking(self.acc, cfg, self.dir, SUM_COLUMNS[:-1])
        seed_everything(cfg["seed"])
        self.train_items, self.eval_items = split_train_eval(cfg)
        check_eval_shares(len(self.eval_items), self.world)
        self.loader, self.dataset, self.sampler = train_loader(
            cfg, self.train_items, self.rank, self.world
        )
        tune_for_gpu(self.loader.num_workers)
        # The workers ship uint8 views; the device normalises and erases them (train/views.py).
        self.prefetcher = DevicePrefetcher(self.loader, self.acc.device)
        self.augment = DeviceAugment(build_train_transform(cfg))
        cuda = self.acc.device.type == "cuda"
        self.noise = torch.Generator(self.acc.device) if cuda else None  # erasing on a GPU
        accum = cfg["grad_accum"]
        self.sampler.steps -= self.sampler.steps % accum  # whole optimiser steps per epoch
        self.steps_per_epoch = self.sampler.steps // accum
        if self.steps_per_epoch == 0:
            raise UserError(
                f"grad_accum={accum} exceeds the {self.sampler.steps} steps of an epoch"
            )
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        self.channels_last = use_channels_last(cfg, self.acc.device)
        model = build_model(cfg)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.teacher = build_teacher(model, ema_decay(cfg, self.total_steps), cfg["ema_warmup"])
        try:
            optimizer = create_optimizer_v2(
                model, opt=cfg["opt"], lr=global_lr(cfg, self.world), **optimizer_kwargs(cfg)
            )
        except ValueError as err:
            if "not found in registry" not in str(err):  # timm's words for an unknown opt
                raise
            raise UserError(
                f"opt={cfg['opt']!r}: {err}; use one of timm's optimisers (the recipe's: rmsproptf)"
            ) from None
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
        criterion = AttractRepulseLoss.from_config(cfg, model)
        self.step = AttractRepulseStep(
            self.acc,
            self.model,
            self.teacher,
            self.optimizer,
            criterion,
            SharedMixup.from_config(cfg),
            cfg["grad_clip"],
            self.channels_last,
        )
        # Where the loop stands; all of it travels in the checkpoint.
        self.epoch, self.micro, self.global_step = 0, 0, 0
        self.nonfinite_run, self.skipped = 0, 0
        self.best, self.history = -math.inf, []
        self.saved_at = time.monotonic()  # of the last checkpoint (or the start)
        self.saved_step: int | None = None  # of the newest checkpoint, once there is one
        self.steps_missed = False  # a ckpt_every_steps point fell in a stretch of skipped steps
        self.save_due = False  # ckpt_every_minutes have passed, on some process
        self.sums = self._zero_sums()  # SUM_COLUMNS summed over the epoch's finite micro-steps

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
            # Summed over processes: the main process writes state.pt, and a resume gives
            # the total to the main process and zeros to the others (`resume`).
            "sums": self.acc.reduce(self.sums, reduction="sum").cpu(),
            "config": self.cfg,
            "tracking": self.tracking.state_dict(),
        }

    def save(self) -> Path | None:
        self.saved_at, self.saved_step = time.monotonic(), self.global_step
        self.steps_missed = False
        weights = {
            "student": plain_module(self.acc, self.model).state_dict(),
            "teacher": self.teacher.module.state_dict(),
        }
        return ckpt.save_checkpoint(
            self.acc, self.dir, self.global_step, weights, self._state(), self.cfg["keep_last"]
        )

    def _check_world(self, step_dir: Path) -> None:
        """A run resumes with the processes that wrote its checkpoint: the learning-rate
        schedule it restores counts the optimiser steps of their global batch, and the data
        order and random streams are per process (on fewer, the schedule reached 0 early)."""
        wrote = ckpt.checkpoint_info(step_dir)["world_size"]
        if wrote not in (None, self.world) and not self.cfg["allow_config_change"]:
            raise UserError(
                f"{step_dir} was written by {wrote} processes and this run has {self.world}; "
                f"resume with {wrote} (NPROC=, or that many GPUs visible), or use another name= "
                "(allow_config_change=true resumes anyway: schedule and position as saved)"
            )

    def _chosen_checkpoint(self) -> Path | None:
        """The main process repairs, verifies and chooses; every process resumes from its
        choice (each choosing alone could pick different steps where the nodes' views of
        out_dir differ, and would read every file once per process)."""
        chosen = [None]
        if self.acc.is_main_process:
            ckpt.repair(self.dir)
            chosen = [ckpt.latest_valid(self.dir)]
        if self.world > 1:
            broadcast_object_list(chosen)
        step_dir = chosen[0]
        if step_dir is not None and not (step_dir / ckpt.MARKER).is_file():
            raise UserError(
                f"{step_dir} is not visible to process {self.rank}: out_dir= must be a folder "
                "every node of the run shares"
            )
        return step_dir

    def resume(self) -> bool:
        step_dir = self._chosen_checkpoint()
        if step_dir is None:
            return False
        self._check_world(step_dir)
        weights, state, rng = ckpt.load_state(step_dir, self.rank)
        changed = config_changes(state["config"], self.cfg)
        if changed and not self.cfg["allow_config_change"]:
            raise UserError(
                f"{step_dir} was made with a different config ({', '.join(changed)}); "
                "rerun with the same settings, pass allow_config_change=true, or use another name="
            )
        require_run_dataset(self.cfg, "resume")
        ckpt.load_into(plain_module(self.acc, self.model), weights["student"], step_dir)
        ckpt.load_into(self.teacher.module, weights["teacher"], step_dir)
        self._load_optimizer(state, changed)
        if self.acc.scaler is not None and state["scaler"]:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.epoch, self.micro, self.global_step = state["position"]
        self.saved_step = self.global_step
        self.nonfinite_run, self.skipped = state["nonfinite"]
        self.best, self.history = state["best"], state["history"]
        self.sums = state["sums"].to(self.acc.device)
        if not self.acc.is_main_process:
            self.sums.zero_()
        self.tracking.load_state_dict(state.get("tracking", {}))
        if rng is None:
            raise UserError(
                f"{step_dir} holds no RNG state for process {self.rank}: it was written by fewer "
                "processes; resume with the world size it was made with"
            )
        set_rng_state(rng)
        if changed:  # the lr at the saved position of the schedule now in use
            self.scheduler.step_update(num_updates=self.global_step)
        if self.acc.is_main_process and self._is_best_epoch_end():
            self._mark_best_again(step_dir)
        self.acc.print(f"resumed from {step_dir} (epoch {self.epoch}, step {self.global_step})")
        return True

    def _is_best_epoch_end(self) -> bool:
        """Whether the resumed checkpoint is an epoch end that `best` copies: the first to reach
        the best held-out score, or without held-out images the newest epoch end."""
        if self.micro or not self.history or self.history[-1].get("step") != self.global_step:
            return False
        if not self.eval_items:
            return True
        scores = [row.get(score_column(self.cfg)) for row in self.history]
        earlier = [s for s in scores[:-1] if s is not None and not math.isnan(s)]
        return scores[-1] == self.best and all(s < self.best for s in earlier)

    def _mark_best_again(self, step_dir: Path) -> None:
        """A kill between an improved epoch's save and its mark_best leaves `best` an epoch
        behind, and the resumed score stops any later epoch from marking it: mark it now."""
        if ckpt.best_step(ckpt.checkpoint_root(self.dir)) != self.global_step:
            ckpt.mark_best(self.dir, step_dir)

    def _load_optimizer(self, state: dict[str, Any], changed: list[str]) -> None:
        """The optimiser's moments; with a config change allowed, the hyperparameters (weight
        decay, eps, ...) and the lr schedule of the config in use, not the saved ones, so that
        `allow_config_change=true epochs=20` trains its new epochs on the new schedule."""
        if not changed:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            return
        fresh = [
            {k: v for k, v in group.items() if k not in ("params", "lr")}
            for group in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update(values)  # resume() then sets the lr from the new schedule

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        """Resume, then train to the end or to a stop signal. SIGTERM/SIGUSR1 are the run's only
        while it trains: the process gets its own handlers back however this returns."""
        with StopRequest(self.cfg["stop_timeout_s"]) as self.stop:
            return self._train()

    def _train(self) -> int:
        cfg = self.cfg
        self.acc.print(
            f"run {cfg['name']}: world size {self.world} ({self.acc.distributed_type.value}, "
            f"{self.acc.device}, precision {self.acc.mixed_precision}), "
            f"{len(self.train_items)} training images, {self.steps_per_epoch} steps per epoch, "
            f"global batch {cfg['batch_size'] * self.world * cfg['grad_accum']}"
        )
        resumed, record = self.resume(), {}
        if self.acc.is_main_process:  # the config in use, changes allowed on resume included
            resumed_step = self.global_step if resumed else None
            record = save_config(cfg, self.dir / "config.yaml", resumed_step)
        self.tracking.start(self.global_step, resumed, record)
        if self.epoch == cfg["epochs"] and self.acc.is_main_process:
            # Resumed after its last checkpoint: a kill right after that save cut off the
            # metrics of its last epoch, which the checkpoint's history holds.
            write_metrics(self.dir, self.history)
        while self.epoch < cfg["epochs"]:
            if self.run_epoch():
                self.acc.print(f"stopped on request; checkpoint at step {self.global_step}")
                return EXIT_PREEMPTED
        self.acc.print(f"done: {self.dir}")
        return 0

    def run_epoch(self) -> bool:
        """Train the rest of the current epoch; True when a stop was requested."""
        cfg = self.cfg
        self.sampler.set_position(self.epoch, self.micro)
        self.dataset.set_epoch(self.epoch)
        self.model.train()
        started, images = time.perf_counter(), 0
        # Closed however the epoch ends: an error or a stop then prints on a line of its own.
        with tqdm(
            total=self.sampler.steps,
            initial=self.micro,
            disable=not self.acc.is_main_process,
            desc=f"{cfg['name']} epoch {self.epoch + 1}/{cfg['epochs']}",
            leave=False,
        ) as bar:
            for batch in self.prefetcher:
                result = self.train_step(batch, self.stop.requested, self._minutes_due())
                self.sums += result.sums
                self.micro += 1
                images += len(batch[1]) * self.world  # the labels: one per image
                bar.update()
                if result.boundary:
                    self._count_update(result.skipped)
                    self.save_due = result.save  # agreed by every process
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.tracking.interval(self.global_step, self.sums, lr, self.skipped)
                    if result.stop or self._checkpoint_due():
                        self.save()
                    if result.stop:
                        return True
        # An epoch resumed at its end (stopped after its last step) trained no images: no rate.
        rate = images / (time.perf_counter() - started) if images else math.nan
        return self.end_epoch(rate)

    def train_step(self, batch: tuple, stop: bool, save: bool) -> StepResult:
        """One micro-step at the loop's position: the device finishes the loader's uint8 views
        (normalise, erase), then Algorithm 1 (train/engine.py)."""
        cfg = self.cfg
        views, labels, index = batch
        if self.noise is not None:  # keyed like the mixing: a resumed run draws the same
            self.noise.manual_seed(
                stable_seed(cfg["seed"], "erase", self.epoch, self.micro, self.rank)
            )
        return self.step(
            (self.augment(views, self.noise), labels, index),
            mix_generator(cfg["seed"], self.epoch, self.micro, self.rank),
            self._mt_scale(),
            stop,
            next_step=self.global_step + 1,
            save=save,
        )

    def _mt_scale(self) -> float:
        """gamma's linear ramp-up over `mt_rampup_epochs` (1 without a ramp)."""
        ramp = self.cfg["mt_rampup_epochs"]
        progress = self.epoch + self.micro / self.sampler.steps
        return min(1.0, progress / ramp) if ramp > 0 else 1.0

    def _count_update(self, skipped: bool) -> None:
        """Advance the optimiser-step counter and the lr schedule; stop after too many skips."""
        self.global_step += 1
        self.scheduler.step_update(num_updates=self.global_step)
        self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
        self.skipped += skipped
        if self.nonfinite_run >= self.cfg["max_nonfinite"]:
            first = self.global_step - self.nonfinite_run + 1
            among = self.saved_step is not None and self.saved_step >= first
            raise UserError(
                f"{self.nonfinite_run} optimiser steps in a row skipped for a non-finite loss at "
                f"epoch {self.epoch + 1}, step {self.global_step}; "
                + (
                    f"the newest checkpoint (step {self.saved_step}) is among them"
                    if among
                    else "no checkpoint written after them"
                )
                + ". Lower lr, enable grad_clip, or use mixed_precision=no"
            )

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(len(SUM_COLUMNS), dtype=torch.float64, device=self.acc.device)

    def _checkpoint_due(self) -> bool:
        """Mid-epoch: every `ckpt_every_steps` steps, or once `ckpt_every_minutes` have passed."""
        every = self.cfg["ckpt_every_steps"]
        last_of_epoch = self.micro == self.sampler.steps
        by_steps = every > 0 and self.global_step % every == 0
        # Not inside a stretch of skipped steps: a resume would start in it (a stop still saves);
        # a step point missed there is taken at the first finite step after it.
        self.steps_missed |= by_steps and bool(self.nonfinite_run)
        due = by_steps or self.steps_missed or self.save_due
        return due and not last_of_epoch and not self.nonfinite_run

    def _minutes_due(self) -> bool:
        """This process's clock only: the step's reduction turns it into `save_due` for all."""
        minutes = self.cfg["ckpt_every_minutes"]
        return minutes > 0 and time.monotonic() - self.saved_at >= 60 * minutes

    def end_epoch(self, images_per_s: float) -> bool:
        """Evaluate, record and checkpoint the epoch; True when a stop came during the
        evaluation (a long held-out pass would outlast stop_timeout_s)."""
        cfg = self.cfg
        sums = self.acc.reduce(self.sums, reduction="sum").cpu()
        means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
        row = {"epoch": self.epoch + 1, "step": self.global_step}
        row.update(zip(SUM_COLUMNS[:-1], means, strict=True))
        row.update(lr=self.optimizer.param_groups[0]["lr"], skipped=self.skipped)
        row["img_per_s"] = images_per_s
        due = (self.epoch + 1) % cfg["eval_every"] == 0 or self.epoch + 1 == cfg["epochs"]
        score = None
        if self.eval_items and due:
            scores = self.evaluate()
            if scores is None:  # stopped: saved before the epoch's end, which a resume redoes
                self.save()
                return True
            row.update(scores)
            score = row[score_column(cfg)]
        self.history.append(row)
        improved = score is not None and score > self.best
        # The best checkpoint is chosen on held-out images only; a run that holds out none
        # (train+val, holdout_per_class 0) keeps the newest saved epoch as the best.
        if score is not None:
            self.best = max(self.best, score)  # before the save: a resumed run keeps it
        self.epoch, self.micro = self.epoch + 1, 0
        self.sums = self._zero_sums()
        self.tracking.epoch_end(row)  # before the checkpoint: a resume from it finds it logged
        # An epoch end is saved when it is the best so far, the last, or a save is due by time:
        # a checkpoint costs a full write and hash of both networks (about 1 s at ResNet-18).
        last = self.epoch == cfg["epochs"]
        timed = self.save_due and not self.nonfinite_run  # as _checkpoint_due
        step_dir = self.save() if improved or last or timed else None
        if self.acc.is_main_process:
            # Without held-out images there is nothing to choose on: the newest is the best.
            if step_dir is not None and (improved or not self.eval_items):
                ckpt.mark_best(self.dir, step_dir)
            write_metrics(self.dir, self.history)
        self.acc.wait_for_everyone()
        self.acc.print(f"epoch {row['epoch']}: loss {row['loss']:.4f}{heldout_note(row)}")
        return False

    def evaluate(self) -> dict[str, float] | None:
        """Top-1 on the held-out items (val for train-split runs, the held-out images of a
        train+val run): student, teacher, and the teacher's fused prediction, whose weight is
        the configured one or the best on these same images. None when a stop came during it.
        The random streams are as before it either way: eval_every is resume-neutral (a run
        evaluated less often computes the same weights) and a resume redoes a stopped pass
        bit-identically."""
        cfg = self.cfg
        before = rng_state()  # the loader's iterator draws its seed from torch's generator
        loader = eval_loader(cfg, self.eval_items, self.rank, self.world, cfg["batch_size"] * 2)
        labels = torch.tensor([item[2] for item in self.eval_items])
        args = (loader, len(self.eval_items), cfg["num_classes"], cfg["aux_weight"] > 0, False)
        self.model.eval()
        # One pass for both networks: each held-out image decoded once (50,000 at ImageNet).
        networks = [self.model, self.teacher.module]
        found = predict_crops_of(
            self.acc, networks, *args, self.channels_last, lambda: self.stop.requested
        )
        self.model.train()
        set_rng_state(before)
        if found is None:
            return None
        student, teacher = found
        weight = cfg["fusion_weight"]
        if weight is None:
            weight, fused = best_fusion(teacher["main"], teacher.get("aux"), labels)
        else:
            fused = top1(fuse(teacher["main"], teacher.get("aux"), weight), labels)
        return {
            "heldout_images": len(self.eval_items),
            "heldout_student": top1(student["main"], labels),
            "heldout_teacher": top1(teacher["main"], labels),
            "heldout_fused": fused,
            "fusion_w": weight,
        }


def heldout_note(row: dict[str, Any]) -> str:
    """The epoch line's accuracies, named by the images they were measured on."""
    if "heldout_images" not in row:
        return ""
    return (
        f", held-out ({row['heldout_images']} images): student {row['heldout_student']:.2f}, "
        f"teacher {row['heldout_teacher']:.2f}, fused {row['heldout_fused']:.2f} "
        f"(w {row['fusion_w']:.2f})"
    )


def run_to_end(run: Run) -> int:
    """Train `run` to its end or its stop; the trackers and the heartbeat are closed either way."""
    code = None
    try:
        code = run.train()
        return code
    finally:
        run.tracking.finish(code, run.global_step)


def fixed_batch(cfg: dict[str, Any]) -> int:
    """Train (or resume) `cfg` at its own batch_size and grad_accum; the exit code."""
    return run_to_end(Run(cfg))


def train(cfg: dict[str, Any], fit: Callable[[dict[str, Any]], int] = fixed_batch) -> int:
    """Train (or resume) the run of `cfg` under its lock with `fit`; the process exit code.
    The caller chooses `fit` (train/__main__.py: `train.auto_batch` for `batch_size: auto`)."""
    # Before the Accelerator: a refused second trainer touches nothing. The global rank is
    # the launcher's RANK (unset for a single process).
    main_process = os.environ.get("RANK", "0") == "0"
    # A wrong data_dir, head size or out_dir creates no run folder.
    Layout(Path(cfg["data_dir"])).require_classes(cfg["num_classes"])
    require_writable(run_dir(cfg), "pass out_dir= a folder you can write")
    lock = FileLock(
        run_dir(cfg) / heartbeat.LOCK,
        f"run {run_dir(cfg)}",
        "wait for it to end, stop it, or train under another name=",
    )
    new_run = not run_dir(cfg).exists()
    with lock if main_process else contextlib.nullcontext():
        try:
            return fit(cfg)
        except RuntimeError as err:
            death = worker_death(err)
            if death is None:
                raise
            raise death from None
        finally:
            if main_process and new_run:
                # Refused before it wrote anything (a timm optimiser name it lacks, too few
                # images for one batch): no folder is left looking like a started run.
                lock.remove_folder_if_only_lock()

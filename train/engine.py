"""One step of the paper's Algorithm 1, and nothing else.

`AttractRepulseStep` takes one micro-batch through the recipe: two views of each image, the same
Mixup/CutMix on both, the student on both views, the teacher on both without gradient,
L = CE + alpha RCE + beta CR + gamma MT (+ the auxiliary head), backward; at the end of a
gradient-accumulation window, the optimiser step and the teacher's EMA update. The formulas live
in `train/losses.py`; the loop's bookkeeping (position, scheduler, checkpoints, signals, metrics)
lives in `train/run.py`. With several processes the EMA reads the main process's batch-norm
statistics (ours; the paper is silent), so every process holds the teacher checkpoints keep.

Host synchronisation: loss terms stay on the device (the loop sums them and reads them once an
epoch). The targets and the CR positives are computed on the host from the labels and the
mixing parameters, before the forward, and copied without a wait (pinned, non-blocking): the
loss reads nothing back. The only host read is at the end of an accumulation window: whether
any process saw a non-finite loss, got a stop signal, or wants a checkpoint by its clock. It
cannot wait: a non-finite step must be skipped before it reaches the weights, and every process
must skip, stop and save at the same step (DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from train.distributed import plain_module, share_main_buffers
from train.losses import TERMS, AttractRepulseLoss
from train.views import SharedMixup, to_device

# The row a micro-step adds to the loop's running sums: total loss, each term, 1 (the count).
SUM_COLUMNS = ("loss", *TERMS, "count")


@dataclass
class StepResult:
    sums: torch.Tensor  # [len(SUM_COLUMNS)] float64 on the device; zeros for a non-finite step
    boundary: bool  # an accumulation window ended here (optimiser step taken or skipped)
    skipped: bool = False  # the window held a non-finite loss on some process: no update
    stop: bool = False  # some process was asked to stop (SIGTERM/SIGUSR1)
    save: bool = False  # some process wants a checkpoint (its clock says one is due)


def two_view_batch(views, labels, mix: SharedMixup, generator, channels_last: bool):
    """Views [N, V, C, H, W] -> mixed inputs [V*N, C, H, W] (view-major) and their targets.

    The mixing parameters come from the host generator and the targets from the host labels,
    so the targets are on the host (before any forward); the views are mixed where they are."""
    params = mix.draw(views.shape[0], views.shape[3], views.shape[4], generator)
    mixed = mix.apply(views.transpose(0, 1), params)
    inputs = mixed.flatten(0, 1)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, mix.targets(labels, params).repeat(mixed.shape[0], 1)


def _float(logits: torch.Tensor | None) -> torch.Tensor | None:
    return None if logits is None else logits.float()


@torch.no_grad()
def restore_finite_buffers(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """The teacher's values wherever the student's buffers are not finite. A skipped step's
    forward has already moved the batch-norm statistics (they update before the loss is seen):
    a NaN there would reach the teacher at the next update, make the MT term NaN at every step
    after, and end the run at `max_nonfinite` however good its batches. The teacher's
    statistics, an average of the student's, are the nearest finite values at hand."""
    for mine, theirs in zip(student.buffers(), teacher.buffers(), strict=True):
        if mine.is_floating_point():
            mine.copy_(torch.where(torch.isfinite(mine), mine, theirs))


class AttractRepulseStep:
    """Algorithm 1 on one micro-batch (see the module docstring); holds only the window's state."""

    def __init__(
        self,
        accelerator: Accelerator,
        student: torch.nn.Module,
        teacher: ModelEmaV3,  # updated every step; run forward only when MT is on
        optimizer: torch.optim.Optimizer,
        criterion: AttractRepulseLoss,
        mix: SharedMixup,
        grad_clip: float = 0.0,
        channels_last: bool = False,
    ):
        self.acc, self.student, self.teacher = accelerator, student, teacher
        self.optimizer, self.criterion, self.mix = optimizer, criterion, mix
        self.grad_clip, self.channels_last = grad_clip, channels_last
        self.window_bad = torch.zeros((), device=accelerator.device)
        self.bits = torch.tensor([1, 2, 4], device=accelerator.device)  # bad, stop, save

    def __call__(
        self, batch, generator, mt_scale: float, stop: bool, next_step: int, save: bool = False
    ) -> StepResult:
        acc = self.acc
        views, labels, _ = batch
        # Two views of each image, mixed with ONE pairing, lambda and box shared by both views.
        inputs, targets = two_view_batch(views, labels, self.mix, generator, self.channels_last)
        # The CR positives depend on the targets alone: found on the host, before the forward,
        # so that the loss never waits for the device.
        positives = self.criterion.positives(targets)
        inputs = inputs.to(acc.device)  # already there when the loop prefetched it
        targets, positives = to_device(targets, acc.device), to_device(positives, acc.device)
        with acc.accumulate(self.student):
            # The student on both views; the teacher (EMA of the student) without gradient.
            logits, aux_logits = self.student(inputs)
            teacher_logits = None
            if self.criterion.mt_weight > 0:  # without MT the teacher's output is unused
                with torch.no_grad(), acc.autocast():
                    teacher_logits = self.teacher.module(inputs)[0]
            # L = CE + alpha RCE + beta CR + gamma MT + aux, in float32 (train/losses.py).
            loss, terms = self.criterion(
                logits.float(),
                targets,
                _float(aux_logits),
                _float(teacher_logits),
                mt_scale,
                positives,
            )
            finite = torch.isfinite(loss)
            acc.backward(loss)  # divided by grad_accum; all-reduced at the window's end only
            self.window_bad += ~finite
            row = torch.stack([loss.detach(), *(terms.get(t, loss.new_zeros(())) for t in TERMS)])
            sums = torch.cat([torch.where(finite, row, 0.0), finite[None]]).double()
            if not acc.sync_gradients:
                return StepResult(sums, boundary=False)
            # The window's end: one reduction tells every process to update or skip, and whether
            # to stop or checkpoint here (clocks differ between processes; the decision must not).
            # Its one host read is the step's only one: a skip must be known before the update.
            requests = to_device(torch.tensor([float(stop), float(save)]), acc.device)
            flags = torch.cat([self.window_bad[None], requests])
            code = int(((acc.reduce(flags, reduction="sum") > 0) * self.bits).sum())
            bad, stop_any, save_any = (bool(code & bit) for bit in (1, 2, 4))
            self.window_bad.zero_()
            if bad:
                restore_finite_buffers(plain_module(acc, self.student), self.teacher.module)
            else:
                if self.grad_clip > 0:
                    acc.clip_grad_norm_(self.student.parameters(), self.grad_clip)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if not bad:
                student = plain_module(acc, self.student)
                share_main_buffers(student, acc.num_processes)  # one teacher on every process
                self.teacher.update(student, step=next_step)
        return StepResult(sums, boundary=True, skipped=bad, stop=stop_any, save=save_any)

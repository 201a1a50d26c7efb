"""The Algorithm 1 step: accumulation matches one big batch, a non-finite loss never lands."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from train.engine import SUM_COLUMNS, AttractRepulseStep
from train.losses import AttractRepulseLoss
from train.model import build_teacher
from train.rng import generator_for
from train.views import SharedMixup

C, N = 4, 6


class Linear(nn.Module):
    """A batch-independent student (no BatchNorm), so a window of two micro-batches of N must
    update exactly like one batch of 2N."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, C)

    def forward(self, x):
        return self.fc(x.flatten(1)), None


def make_step(accum: int, student: nn.Module) -> tuple[AttractRepulseStep, torch.optim.Optimizer]:
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    student, optimizer = acc.prepare(student, optimizer)
    teacher = build_teacher(student, 0.5, warmup=False)
    criterion = AttractRepulseLoss(rce_weight=0.1, num_views=2)  # CE + alpha RCE: batch means
    mix = SharedMixup(0.0, 0.0, 0.0, 0.5, 0.1, C)  # no mixing: the targets are known
    return AttractRepulseStep(acc, student, teacher, optimizer, criterion, mix), optimizer


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, 4, 4, generator=g), torch.randint(0, C, (n,), generator=g), None


def test_two_accumulated_micro_batches_update_like_one_batch_of_both():
    torch.manual_seed(0)
    base = Linear()
    a, b = batch(N, 1), batch(N, 2)
    both = (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), None)

    accumulated, _ = make_step(2, copy.deepcopy(base))
    first = accumulated(a, generator_for(0), 1.0, False, next_step=2)
    assert not first.boundary
    assert torch.equal(accumulated.student.fc.weight, base.fc.weight)  # no update mid-window
    second = accumulated(b, generator_for(0), 1.0, False, next_step=2)
    assert second.boundary and not second.skipped

    single, _ = make_step(1, copy.deepcopy(base))
    assert single(both, generator_for(0), 1.0, False, next_step=2).boundary
    torch.testing.assert_close(
        accumulated.student.fc.weight, single.student.fc.weight, rtol=0, atol=1e-6
    )
    # The teacher moved half way (eta 0.5) towards the updated student (timm copies the
    # student at step 1, so this is step 2).
    expected = 0.5 * base.fc.weight + 0.5 * single.student.fc.weight
    torch.testing.assert_close(accumulated.teacher.module.fc.weight, expected, atol=1e-6, rtol=0)


def test_a_non_finite_loss_skips_the_update_and_is_left_out_of_the_sums():
    torch.manual_seed(0)
    step, _ = make_step(1, Linear())
    before = step.student.fc.weight.detach().clone()
    teacher_before = step.teacher.module.fc.weight.detach().clone()
    views, labels, _ = batch(N, 3)
    views[0, 0, 0, 0, 0] = float("nan")
    result = step((views, labels, None), generator_for(0), 1.0, False, next_step=1)
    assert result.boundary and result.skipped and not result.stop
    assert torch.equal(step.student.fc.weight, before)
    assert torch.equal(step.teacher.module.fc.weight, teacher_before)
    assert step.student.fc.weight.grad is None  # the poisoned gradient was dropped
    assert torch.count_nonzero(result.sums) == 0  # neither the terms nor the count

    ok = step(batch(N, 4), generator_for(0), 1.0, True, next_step=2)
    assert ok.boundary and not ok.skipped and ok.stop
    assert not torch.equal(step.student.fc.weight, before)
    assert ok.sums[SUM_COLUMNS.index("count")] == 1
    assert ok.sums[SUM_COLUMNS.index("loss")] > 0


class Normed(nn.Module):
    """A student with batch-norm statistics, which its forward updates before the loss exists."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.BatchNorm1d(3 * 4 * 4), nn.Linear(3 * 4 * 4, C)

    def forward(self, x):
        return self.fc(self.norm(x.flatten(1))), None


def test_a_skipped_step_leaves_no_non_finite_statistics_to_reach_the_teacher():
    torch.manual_seed(0)
    step, _ = make_step(1, Normed())
    views, labels, _ = batch(N, 3)
    views[0, 0, 0, 0, 0] = float("inf")
    assert step((views, labels, None), generator_for(0), 1.0, False, next_step=1).skipped
    norm, teacher = step.student.norm, step.teacher.module.norm
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    # Where the batch left finite statistics they stay the student's; the poisoned feature's
    # are the teacher's.
    torch.testing.assert_close(norm.running_mean[0], teacher.running_mean[0], rtol=0, atol=0)
    assert not torch.equal(norm.running_mean[1:], teacher.running_mean[1:])

    assert not step(batch(N, 4), generator_for(0), 1.0, False, next_step=2).skipped
    for buffer in step.teacher.module.buffers():
        assert torch.isfinite(buffer).all()


# Ops that make a GPU wait for the host: a read of a value (.item(), bool(), .tolist()), and
# ops whose output size depends on values (nonzero, unique, masked_select, boolean indexing).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select")


class SyncCounter(TorchDispatchMode):
    """Counts the host-waiting ops dispatched while active, outside `host_side` regions."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        boolean_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if not self.paused and (boolean_index or any(op in name for op in SYNC_OPS)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_step_reads_the_device_once_per_optimiser_step_and_never_inside_the_loss(monkeypatch):
    """The full recipe's terms (CR with mixing, MT, aux) over one accumulation window of two
    micro-steps: no host-waiting op inside the loss, exactly one read at the window's end. The
    mixing draw (a CPU generator) and the CR positives (from the host targets) run on the host
    before anything reaches the device: those regions are not counted here. On a GPU,
    tests/test_gpu.py counts the syncs of whole real steps (torch.cuda.set_sync_debug_mode)."""
    import train.losses as losses

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.aux = nn.Linear(3 * 4 * 4, C), nn.Linear(3 * 4 * 4, C)

        def forward(self, x):
            return self.fc(x.flatten(1)), self.aux(x.flatten(1))

    counter = SyncCounter()
    real_loss = AttractRepulseLoss.forward

    def host_side(fn):
        def paused(*args, **kwargs):
            counter.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.paused = False

        return paused

    inside_loss = []

    def loss(self, *args, **kwargs):
        before = len(counter.seen)
        out = real_loss(self, *args, **kwargs)
        inside_loss.extend(counter.seen[before:])
        return out

    # Host side by construction: the mixing draw (a CPU generator) and the positives.
    monkeypatch.setattr(losses, "positive_mask", host_side(losses.positive_mask))
    monkeypatch.setattr(SharedMixup, "draw", host_side(SharedMixup.draw))
    monkeypatch.setattr(AttractRepulseLoss, "forward", loss)
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    student = Net()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student, optimizer = acc.prepare(student, optimizer)
    criterion = AttractRepulseLoss(
        rce_weight=0.1, cr_weight=1.0, mt_weight=1.0, aux_weight=0.3, num_views=2
    )
    mix = SharedMixup(0.5, 1.0, 1.0, 0.5, 0.1, C)
    teacher = build_teacher(student, 0.5, warmup=False)
    step = AttractRepulseStep(acc, student, teacher, optimizer, criterion, mix)
    with counter:
        first = step(batch(N, 5), generator_for(1), 1.0, False, next_step=1)
        assert not first.boundary and counter.seen == []
        second = step(batch(N, 6), generator_for(2), 1.0, False, next_step=1)
    assert second.boundary and not second.skipped
    assert inside_loss == []
    assert counter.seen == ["_local_scalar_dense.default"]  # the window's one reduction, read once
    assert first.sums[SUM_COLUMNS.index("cr")] > 0 and first.sums[SUM_COLUMNS.index("aux")] > 0

"""The Algorithm 1 step: accumulation matches one big batch, a non-finite loss never lands."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn

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

"""`batch_size: auto`: halving on an out-of-memory error in the first step, global batch kept."""

from __future__ import annotations

import os
import signal

import pandas as pd
import pytest
import torch
import yaml

import train.auto_batch as auto_batch
import train.run as run_module
from common.errors import UserError
from common.status import EXIT_PREEMPTED
from ensemble.logits import images_per_forward, resolve_config
from train.config import load_config
from train.data import EpochBatchSampler
from train.engine import AttractRepulseStep

# 80 training images; the global batch is lr_base_batch = 16.
ARGS = [
    "batch_size=auto",
    "lr_base_batch=16",
    "epochs=1",
    "workers=0",
    "warmup_epochs=0",
    "train_splits=[train]",
    "mixed_precision=no",
]


def simulate_oom(monkeypatch, above_rows: int = 10**6, after_calls: int = 10**6) -> list[int]:
    """The training step raises CUDA's out-of-memory error for batches of more than `above_rows`
    views, or from its `after_calls`-th call on; returns the batch sizes (views) it saw."""
    real = AttractRepulseStep.__call__
    seen: list[int] = []

    def step(self, batch, *args, **kwargs):
        views = batch[0]
        seen.append(views.shape[0] * views.shape[1])
        if seen[-1] > above_rows or len(seen) > after_calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(AttractRepulseStep, "__call__", step)
    return seen


def test_out_of_memory_in_the_first_step_halves_the_micro_batch_and_keeps_the_global_batch(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    seen = simulate_oom(monkeypatch, above_rows=8)  # 4 images x 2 views fit, 8 and 16 do not
    cfg = load_config("demo_resnet18", [*ARGS, f"data_dir={tiny_dir}", f"out_dir={tmp_path}"])
    assert run_module.train(cfg, auto_batch.train_auto_batch) == 0
    out = capsys.readouterr().out
    assert "trying micro-batch 16 x 1 processes x grad_accum 1 = global batch 16" in out
    assert "out of memory at micro-batch 16; halving it" in out
    assert "out of memory at micro-batch 8; halving it" in out
    assert "trying micro-batch 4 x 1 processes x grad_accum 4 = global batch 16" in out
    assert seen[:2] == [32, 16] and set(seen[2:]) == {8}
    saved = yaml.safe_load((tmp_path / "demo_resnet18" / "config.yaml").read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (4, 4)
    assert run_module.global_lr(saved, 1) == saved["lr"]  # the lr given for lr_base_batch
    metrics = pd.read_csv(tmp_path / "demo_resnet18" / "metrics.csv")
    assert metrics["step"].tolist() == [80 // 16]  # optimiser steps of the global batch
    # `make logits` given the same ARGS predicts with the micro-batch chosen, not the word.
    resolved = resolve_config("demo_resnet18", [*ARGS, f"out_dir={tmp_path}"])
    assert resolved["batch_size"] == 4
    assert images_per_forward(resolved, "center", torch.device("cuda")) == 8

    # A rerun resumes with the saved choice instead of trying the larger batches again.
    built = []
    monkeypatch.setattr(auto_batch, "Run", lambda c: built.append(c) or run_module.Run(c))
    assert run_module.train(cfg, auto_batch.train_auto_batch) == 0
    assert [(c["batch_size"], c["grad_accum"]) for c in built] == [(4, 4)]
    assert "resumed from" in capsys.readouterr().out


def test_out_of_memory_after_the_first_step_is_raised(tiny_dir, tmp_path, monkeypatch):
    seen = simulate_oom(monkeypatch, after_calls=1)  # micro-batch 16, no accumulation
    cfg = load_config("demo_resnet18", [*ARGS, f"data_dir={tiny_dir}", f"out_dir={tmp_path}"])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_module.train(cfg, auto_batch.train_auto_batch)
    assert seen == [32, 32]  # the first step fitted; the second failed and was not retried


def test_a_stop_during_a_first_step_that_ran_out_of_memory_ends_the_run_instead_of_a_retry(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """The next attempt's stop request would start afresh: the launcher relays a signal once."""

    def stop_then_oom(self, batch, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AttractRepulseStep, "__call__", stop_then_oom)
    cfg = load_config("demo_resnet18", [*ARGS, f"data_dir={tiny_dir}", f"out_dir={tmp_path}"])
    assert run_module.train(cfg, auto_batch.train_auto_batch) == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert "stopped on request before a micro-batch fitted" in out
    assert out.count("batch_size=auto: trying") == 1


def test_under_cuda_graphs_an_out_of_memory_first_step_is_refused_in_one_line(
    tiny_dir, tmp_path, monkeypatch
):
    """Halving would need grad_accum, which compile=reduce-overhead refuses: say why here,
    not in words about a grad_accum the user never set."""
    simulate_oom(monkeypatch, above_rows=8)
    overrides = [*ARGS, f"data_dir={tiny_dir}", f"out_dir={tmp_path}", "compile=reduce-overhead"]
    cfg = load_config("demo_resnet18", overrides)
    with pytest.raises(UserError, match="micro-batch 16 ran out of memory.*compile=true"):
        run_module.train(cfg, auto_batch.train_auto_batch)


def test_a_compiled_run_out_of_memory_drops_dynamos_graphs_before_each_smaller_try(
    tiny_dir, tmp_path, monkeypatch
):
    seen = simulate_oom(monkeypatch, above_rows=0)  # nothing fits: the step never compiles
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(len(seen)))
    overrides = [*ARGS, f"data_dir={tiny_dir}", f"out_dir={tmp_path}", "compile=true"]
    cfg = load_config("demo_resnet18", overrides)
    with pytest.raises(UserError, match="a micro-batch of 2 does not fit"):
        run_module.train(cfg, auto_batch.train_auto_batch)
    assert seen == [32, 16, 8, 4] and resets == [1, 2, 3]  # after each failed try but the last


def test_a_global_batch_that_does_not_split_into_even_micro_batches_is_refused():
    cfg = load_config("demo_resnet18", ["batch_size=auto", "lr_base_batch=20", "grad_accum=3"])
    with pytest.raises(UserError, match="does not split into 2 processes x grad_accum=3 even"):
        auto_batch.first_choice(cfg, 2)
    with pytest.raises(UserError, match="into 1 processes x grad_accum=4 even"):
        auto_batch.first_choice({**cfg, "grad_accum": 4}, 1)  # 5 images: mixing needs pairs
    assert auto_batch.first_choice({**cfg, "grad_accum": 2}, 5) == (2, 2)
    assert auto_batch.halved(4, 2, 2) == (2, 4)
    with pytest.raises(UserError, match="micro-batch of 2 does not fit and cannot be halved"):
        auto_batch.halved(2, 8, 2)
    no_mixing = {**cfg, "mix_prob": 0.0}
    assert auto_batch.pairs(no_mixing) == 1 and auto_batch.halved(2, 8, 1) == (1, 16)


def test_a_global_batch_larger_than_the_training_set_names_lr_base_batch_as_the_fix():
    """batch_size=auto fills lr_base_batch (512): "lower batch_size" alone would name the word."""
    with pytest.raises(UserError) as err:
        EpochBatchSampler(80, 512, seed=0, rank=0, world=1)
    assert str(err.value) == (
        "80 training images cannot fill one global batch of 512 x 1 processes; lower "
        "batch_size (batch_size=auto fills lr_base_batch: give a number)"
    )

"""The GPU path on a GPU: skipped without CUDA (CI and this project's CPU machines), run by a
session lent a GPU (`make test-gpu`: `GPU_TESTS=1 python -m pytest tests/test_gpu.py`; the rest of
the suite hides the GPU, tests/conftest.py) beside `make gpu-check`.

What differs from the CPU, by design: RandomErasing's noise comes from a CUDA generator (erased
pixels differ; every other pixel equals the CPU's up to float rounding), and cuDNN's benchmark
picks kernels whose sums round differently, so two GPU runs agree to a tolerance, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from scripts.bench import gpu_check
from tests.conftest import run_command
from train.config import load_config
from train.data import split_train_eval
from train.views import DeviceAugment, MultiViewDataset, WorkerViews, build_train_transform

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU and GPU_TESTS=1 (make test-gpu)"
)
RUN = ["demo_resnet18", "epochs=1", "batch_size=8", "train_splits=[train]", "seed=3"]


def test_the_device_half_on_the_gpu_equals_the_cpu_outside_the_erased_boxes(tiny_dir):
    cfg = load_config("demo_resnet18", [f"data_dir={tiny_dir}", "reprob=0.5"])
    items = split_train_eval(cfg)[0][:16]
    full = build_train_transform(cfg)
    views, labels, _ = next(iter(DataLoader(MultiViewDataset(items, WorkerViews(full), 2, 0), 16)))
    augment = DeviceAugment(full)
    cpu = augment(views)
    gpu_views = views._replace(pixels=views.pixels.cuda())
    gpu = augment(gpu_views, torch.Generator("cuda").manual_seed(0)).cpu()
    erased = torch.zeros_like(cpu, dtype=torch.bool)
    boxes = views.erase.view(-1, 4).tolist()
    for (n, v), (top, left, h, w) in zip(np.ndindex(16, 2), boxes, strict=True):
        erased[n, v, :, top : top + h, left : left + w] = True
    torch.testing.assert_close(gpu[~erased], cpu[~erased], rtol=0, atol=1e-6)


def test_an_attract_repulse_step_reads_the_device_at_most_once_per_optimiser_step(
    tiny_dir, tmp_path
):
    overrides = [*gpu_check.data_overrides(tiny_dir, tmp_path, 10), "batch_size=8"]
    assert gpu_check.syncs_per_update("demo_resnet18", overrides, tmp_path) <= 1


def test_two_gpu_runs_of_one_seed_agree_on_their_losses(tiny_dir, tmp_path):
    losses = []
    for name in ("a", "b"):
        args = [*RUN, f"data_dir={tiny_dir}", f"out_dir={tmp_path / name}"]
        run_command("-m", "train", *args)
        losses.append(pd.read_csv(tmp_path / name / "demo_resnet18" / "metrics.csv")["loss"])
    # cuDNN's kernels (benchmark on) differ in summation order: a tolerance, not equality.
    torch.testing.assert_close(
        torch.tensor(losses[0].values), torch.tensor(losses[1].values), rtol=1e-3, atol=1e-3
    )

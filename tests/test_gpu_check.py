"""`make gpu-check`: the refusal without CUDA, and its measurements run on the CPU at toy sizes
(this project has had no GPU: the parts must at least run)."""

from __future__ import annotations

import pytest
import torch

from scripts.bench import gpu_check
from scripts.ops import plan
from tests.conftest import run_command
from train.config import load_config

TOY = ["arch=resnet18", "img_size=32", "test_size=32", "batch_size=4", "workers=1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check instead")
def test_without_cuda_it_refuses_in_one_line():
    proc = run_command("-m", "scripts.bench.gpu_check", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: make gpu-check needs a CUDA GPU and this machine has none visible "
        "(torch.cuda.is_available() is False); run it on a GPU machine"
    ]


def test_the_step_rates_compare_the_baseline_and_the_attract_repulse_step():
    rates = gpu_check.step_rates(gpu_check.B2, TOY, repeat=2)
    # Both steps ran and were timed (which is faster is the GPU's to say: toy sizes on a
    # shared CPU measure overheads).
    assert rates["attract_repulse"] > 0 and rates["baseline"] > 0
    gflops, _ = plan.forward_gflops(load_config(gpu_check.B2, TOY))
    assert rates["tflops"] == pytest.approx(rates["attract_repulse"] * 2 * 4 * gflops / 1e3)


def test_the_loader_rate_counts_the_images_after_the_first_batch(tmp_path):
    assert gpu_check.loader_rate(gpu_check.B2, TOY, tmp_path, batches=2) > 0
    assert len(list(tmp_path.glob("*.JPEG"))) == 4 * 3


@pytest.mark.slow
def test_the_two_process_run_reports_its_images_per_second(tmp_path):
    toy = [*TOY, "mixed_precision=no", "drop_path_rate=0.0", "eval_every=1"]
    rate = gpu_check.two_process_rate(gpu_check.B2, toy, tmp_path, per_class=4)
    assert rate > 0
    assert (tmp_path / "runs" / gpu_check.B2 / "checkpoints" / "best" / "COMPLETE").is_file()

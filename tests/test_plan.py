"""`make plan`: FLOPs, the memory line against a measured CPU peak, the batch split, the hours."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from scripts.ops import plan
from tests.conftest import run_command
from train.config import load_config
from train.model import build_model

# A fresh process measures its own peak resident memory (VmHWM) over one training step, above
# its resident memory before the model was built. glibc is told to return freed blocks at once,
# so that the peak reflects live memory rather than what the heap happens to keep.
MEASURE = """
import sys, torch
from scripts.ops.plan import build_state, training_step
from train.config import load_config

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
cfg = load_config(sys.argv[1], [f"img_size={sys.argv[2]}"])
base = status("VmRSS:")
state = build_state(cfg)
training_step(state, 1, cfg["img_size"])
training_step(state, int(sys.argv[3]), cfg["img_size"])
print(status("VmHWM:") - base)
"""


def measured_cpu_peak(model: str, size: int, images: int) -> int:
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = run_command("-c", MEASURE, model, str(size), str(images), env=env)
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("model, size", [("effnet_b2_ablation", 160), ("table1_resnet50", 128)])
def test_the_memory_line_agrees_with_a_measured_cpu_peak_within_20_percent(model, size):
    cfg = load_config(model, [f"img_size={size}"])
    estimate = plan.footprint(cfg).bytes_at(3)  # fitted at 1 and 2 images: an extrapolation
    measured = measured_cpu_peak(model, size, 3)
    assert abs(estimate - measured) / measured < 0.2, (estimate, measured)


def brute_force_gflops(model: nn.Module, size: int) -> float:
    """2 x multiply-adds of every convolution and linear layer, from the shapes a real forward
    produces (forward hooks), the FLOP convention of torch.utils.flop_counter."""
    total = []

    def conv(module, inputs, output):
        kh, kw = module.kernel_size
        per_output = module.in_channels // module.groups * kh * kw
        total.append(2 * output.numel() * per_output)

    def linear(module, inputs, output):
        total.append(2 * output.numel() * module.in_features)

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(linear)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return sum(total) / 1e9


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_forward_gflops_match_a_count_over_the_layers(arch):
    cfg = load_config("effnet_b2_ablation", [f"arch={arch}", "img_size=64"])
    gflops, params = plan.forward_gflops(cfg)
    model = build_model(cfg)
    assert params == sum(p.numel() for p in model.parameters())
    assert gflops == pytest.approx(brute_force_gflops(model, 64), rel=1e-9)


def test_the_storage_tracker_counts_each_storage_once_until_it_is_freed():
    tracker = plan.StorageTracker()
    kept = torch.zeros(100)  # 400 bytes from before, tracked by hand
    tracker.track(kept)
    with tracker:
        a = torch.ones(1000)  # 4,000 bytes
        view = a.view(10, 100)  # the same storage
        view.add_(1)  # in place: no new storage
        b = a * 2  # another 4,000
        assert tracker.live == 400 + 8000
        del a, view, b
        c = torch.ones(250, dtype=torch.float64)  # 2,000, after 8,000 were freed
    assert tracker.peak == 8400 and tracker.live == 2400
    del c
    assert tracker.live == 400


def brute_force_split(global_batch: int, gpus: int, fits: int, multiple: int) -> tuple[int, int]:
    exact = [
        (accum, micro)
        for accum, micro in itertools.product(range(1, global_batch + 1), range(1, fits + 1))
        if micro * gpus * accum == global_batch and micro % multiple == 0
    ]
    if exact:
        accum, micro = min(exact)
        return micro, accum
    usable = fits - fits % multiple
    return (usable, -(-global_batch // (gpus * usable))) if usable else (0, 0)


def test_the_batch_split_is_the_fewest_accumulation_steps_that_keep_the_global_batch():
    cases = itertools.product(range(1, 70), (1, 2, 3, 8), range(0, 40), (1, 2))
    for global_batch, gpus, fits, multiple in cases:
        expected = brute_force_split(global_batch, gpus, fits, multiple)
        assert plan.split_global_batch(global_batch, gpus, fits, multiple) == expected
    assert plan.split_global_batch(96, 8, 5, 2) == (4, 3)  # B7 at 512 on a small GPU


def test_largest_micro_batch_and_hours_follow_their_formulas():
    fp = plan.Footprint(params=10**8, gflops=40.0, fixed_bytes=5 * plan.GIB, per_image_bytes=2**29)
    usable = plan.usable_bytes(80, fp.params, gpus=8)
    assert usable == int(80 * 0.9 * 2**30) - 2 * 2**30 - 4 * 10**8
    assert plan.largest_micro_batch(fp, usable) == (usable - 5 * 2**30) // 2**29
    assert plan.usable_bytes(80, fp.params, gpus=1) == int(72 * 2**30) - 2 * 2**30
    cfg = load_config("effnet_b7")  # train+val, 2 held out per class, 460 epochs
    assert plan.training_images(cfg) == 100_000 - 2_000
    hours = plan.train_hours(cfg, 40.0, gpus=8, tflops=50.0)
    assert hours == pytest.approx(460 * 98_000 * 2 * 4 * 40e9 / (8 * 50e12) / 3600, rel=1e-12)


def test_make_plan_prints_the_table(tmp_path):
    proc = run_command(
        "-m",
        "scripts.ops.plan",
        "--models",
        "effnet_b2_ablation",
        "--gpu-mem",
        "16",
        "--gpus",
        "2",
        "img_size=64",
        env={"OMP_NUM_THREADS": "1"},
    )
    header, rule, row = proc.stdout.split("\n\n")[1].splitlines()
    assert header.startswith("| model | arch | px | params (M) | GFLOPs/img |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["effnet_b2_ablation", "efficientnet_b2", "64"]
    micro, _, gpus, _, accum = cells[8].split()
    assert int(micro) * int(gpus) * int(accum) == int(cells[9]) == 64 * 8  # batch_size x 8 GPUs
    assert "timm's RTX 3090 training benchmark" in proc.stdout


def test_a_bad_gpu_count_is_one_line():
    proc = run_command("-m", "scripts.ops.plan", "--gpus", "0", check=False)
    assert proc.returncode == 2 and "GPUS" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--gpu-mem", "nan"], ["--gpu-mem", "inf"], ["--tflops", "nan"]])
def test_a_gpu_size_or_speed_that_is_no_number_is_one_line(args, capsys):
    with pytest.raises(SystemExit) as stopped:
        plan.main(args)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: GPU_MEM, GPUS and TFLOPS must be positive numbers (e.g. make plan GPU_MEM=80)\n"
    )


def test_the_default_models_are_the_ensemble_the_ablation_and_table_1():
    models = plan.plan_models()
    assert len(models) == 22 and models[16] == "effnet_b2_ablation"
    table1 = [load_config(m) for m in models[17:]]
    archs = {c["arch"].split("_patch")[0] for c in table1}
    assert archs == {
        "efficientnet_b2",
        "efficientnet_b4",
        "resnet50",
        "resnext101_32x4d",
        "swin_tiny",
    }
    # the paper's Table 1 setting: the Strong Baseline on the train split at 320 px
    strong = {"num_views": 1, "rce_weight": 0, "cr_weight": 0, "mt_weight": 0, "aux_weight": 0}
    for c in table1:
        assert c["train_splits"] == ["train"] and c["img_size"] == 320 and c["drop_rate"] > 0
        assert {k: c[k] for k in strong} == strong


def test_swin_is_planned_on_fake_tensors_at_its_one_size():
    """timm's Swin computes its drop-path rates with .item() while built and takes one input
    size: the plan builds it on the meta device and warms up at the config's size."""
    fp = plan.footprint(load_config("table1_swin_tiny"))
    assert 28e6 < fp.params < 29e6 and fp.per_image_bytes > 0


def test_a_gpu_memory_below_what_cuda_keeps_is_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        plan.main(["--gpu-mem", "0.5"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: GPU_MEM=0.5 GiB leaves no memory to use (90% of it, less 2 GiB for CUDA): give "
        "the GPU's memory in GiB (e.g. GPU_MEM=80)\n"
    )

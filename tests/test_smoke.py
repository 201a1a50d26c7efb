"""`make smoke`: real configs end to end on the CPU in bf16, and the pieces it relies on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from common.processes import children, kill_tree, process_tree
from scripts.ops import smoke
from tests.conftest import run_command
from train.config import load_config
from train.distributed import cpu_has_native_bf16, make_accelerator
from train.engine import SUM_COLUMNS, AttractRepulseStep
from train.inference import predict_crops
from train.losses import AttractRepulseLoss
from train.model import build_model, build_teacher
from train.rng import generator_for
from train.views import SharedMixup


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    (work / "logs").mkdir()
    return work, smoke.build_data(work)


def test_the_generated_dataset_has_the_real_classes_and_a_handful_of_images(smoke_data):
    _, data = smoke_data
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["classes"]) == 1000
    assert sum(manifest["counts"]["train"].values()) == 2 + 2
    assert sum(manifest["counts"]["val"].values()) == 2 and manifest["counts"]["test"] == 1


@pytest.mark.parametrize("model", ["effnet_b2_ablation", "effnet_b7"])
def test_two_optimiser_steps_make_one_epoch(smoke_data, model):
    """The ablation config trains on the train split, the final one on train+val less 1 image
    per class held out: both on 4 images, 2 steps of one micro-batch of 2."""
    _, data = smoke_data
    cfg = load_config(model, smoke.data_overrides(model, data))
    micro, accum = smoke.micro_batches(cfg)
    assert (micro, accum) == (2, 1)
    from train.data import split_train_eval

    assert len(split_train_eval(cfg)[0]) == micro * accum * smoke.STEPS


def test_the_process_tree_reaches_a_grandchild_and_children_stop_at_the_child():
    """The launcher relays a stop to its children (the training processes) alone."""
    sleeper = "import time; time.sleep(60)"

    def spawning(code: str) -> str:
        return (
            f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {code!r}]); {sleeper}"
        )

    parent = subprocess.Popen([sys.executable, "-c", spawning(spawning(sleeper))])
    try:
        deadline = time.time() + 30
        while len(process_tree(parent.pid)) < 3 and time.time() < deadline:
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 3
        assert children(parent.pid) == [tree[1]]
    finally:
        kill_tree(parent.pid)
        parent.wait()


def test_a_checkpoint_in_bf16_is_refused(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    best.mkdir(parents=True)
    save_file({"w": torch.zeros(2, dtype=torch.bfloat16)}, best / "student.safetensors")
    save_file({"w": torch.zeros(2)}, best / "teacher.safetensors")
    with pytest.raises(smoke.SmokeFailure, match="student.safetensors holds"):
        smoke.check_checkpoint(tmp_path)


def test_bf16_autocasts_student_teacher_and_inference_and_keeps_losses_and_grads_float32(
    fresh_accelerate_state,
):
    """The mixed-precision path on the CPU: convolutions of the student (Accelerate's prepared
    forward), of the teacher (its autocast region) and of inference run in bf16; the losses, the
    gradients, the weights and the probabilities stay float32."""
    cfg = load_config("demo_resnet18", ["mixed_precision=bf16"])
    acc = make_accelerator(cfg["mixed_precision"])
    assert acc.mixed_precision == "bf16"
    model = build_model(cfg)
    teacher = build_teacher(model, 0.99, False)
    model, optimizer = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen, grads = [], []
    for role, net in (("student", acc.unwrap_model(model)), ("teacher", teacher.module)):
        net.backbone.conv1.register_forward_hook(lambda m, i, o, r=role: seen.append((r, o.dtype)))
    for p in model.parameters():
        p.register_hook(lambda g: grads.append(g.dtype))
    criterion = AttractRepulseLoss.from_config(cfg, model)
    step = AttractRepulseStep(
        acc, model, teacher, optimizer, criterion, SharedMixup.from_config(cfg)
    )
    batch = (torch.randn(4, 2, 3, 32, 32), torch.arange(4), torch.arange(4))
    result = step(batch, generator_for(0), 1.0, False, next_step=2)
    assert seen == [("student", torch.bfloat16), ("teacher", torch.bfloat16)]
    assert result.boundary and not result.skipped and torch.isfinite(result.sums).all()
    for term in ("ce", "cr", "mt", "aux"):  # every term computed (float32 losses, finite)
        assert result.sums[SUM_COLUMNS.index(term)] > 0, term
    assert set(grads) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    crops = torch.randn(2, 10, 3, 32, 32)
    loader = [(crops, torch.zeros(2), torch.arange(2))]
    probs = predict_crops(acc, teacher.module.eval(), loader, 2, 10, True, False)
    assert seen[-1] == ("teacher", torch.bfloat16)
    assert probs["main"].dtype == torch.float32
    assert torch.allclose(probs["main"].sum(-1), torch.ones(2), atol=1e-5)


def test_smoke_trains_in_fp32_where_bf16_would_be_emulated_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # how an AVX2-only CPU is emulated
    assert not cpu_has_native_bf16()
    assert smoke.choose_precision("native") == "no"
    assert "training in fp32" in capsys.readouterr().out
    assert smoke.choose_precision("bf16") == "bf16"  # make smoke's default: kept, with a warning
    assert "bf16 is emulated, about 9x slower" in capsys.readouterr().err
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == native
    assert smoke.choose_precision("native") == ("bf16" if native else "no")


@pytest.mark.slow
@pytest.mark.longest
def test_make_smoke_runs_one_efficientnet_one_resnet_and_the_dsk_resnext(tmp_path):
    """The CI subset: the smallest real config of each family, through every stage, in the
    precision this CPU computes natively (bf16, or fp32 where bf16 would be emulated), its
    logits from the centre crop (TenCrop's ten views are tested at 32 px)."""
    started = time.perf_counter()
    command = ["-m", "scripts.ops.smoke", "--models", *smoke.CI_MODELS, "--work", str(tmp_path)]
    proc = run_command(*command, "--precision", "native", "--center-crop")
    times = pd.read_csv(tmp_path / "times.csv")
    assert sorted(times["model"]) == sorted(smoke.CI_MODELS)
    assert (times["total_s"] > 0).all()
    for model in smoke.CI_MODELS:
        metrics = pd.read_csv(tmp_path / "runs" / model / "metrics.csv")
        assert metrics["step"].tolist() == [smoke.STEPS]
        meta = json.loads((tmp_path / "logits" / model / "meta.json").read_text())
        assert meta["view"] == "center"
        assert not (tmp_path / "runs" / model / "checkpoints").exists()
    assert "smoke.csv: valid; top-1" in proc.stdout
    print(f"CI smoke subset: {time.perf_counter() - started:.0f} s")

"""train/model.py: the configured backbones, the auxiliary head's stage, fusion, the teacher."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import yaml
from timm.layers import DropPath, SelectiveKernel
from torch import nn

from common.errors import UserError
from tests.conftest import ROOT
from train.model import build_model, build_teacher, ema_decay

# Every backbone that the model configs name (docs/recipe.md sections 5 and 7).
ARCHS = [
    "efficientnet_b0",
    "efficientnet_b2",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "resnet18",
    "resnet152",
    "seresnet152",
    "dsk_resnext101_32x4d",
]


def config(**overrides) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    cfg.update(num_classes=7)
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_backbone_builds_and_its_aux_head_reads_the_claimed_stage(arch):
    torch.manual_seed(0)
    model = build_model(config(arch=arch, drop_path_rate=0.0 if "resnet" in arch else 0.2))
    info = model.aux_feature_info
    stage = dict(model.backbone.named_modules())[info["module"]]
    assert info == {"index": 3, **model.backbone.feature_info[3]}  # aux_stage -2 of 5 stages
    seen, calls = [], []
    stage.register_forward_hook(lambda mod, args, out: seen.append(out))
    first = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda mod, args, out: calls.append(1))
    x = torch.randn(2, 3, 64, 64)

    main, aux = model.train()(x)
    assert main.shape == aux.shape == (2, 7) and main.requires_grad and aux.requires_grad
    assert len(calls) == 1  # one pass through the backbone serves both heads

    model.eval()
    with torch.no_grad():
        main, aux = model(x)
        features = seen[-1]
        assert features.shape == (
            2,
            info["num_chs"],
            64 // info["reduction"],
            64 // info["reduction"],
        )
        # the head is pool -> dropout (off in eval) -> linear over exactly that stage's output
        expected_aux = model.aux_head.fc(features.mean((2, 3)))
        assert torch.allclose(aux, expected_aux, atol=1e-5)
        assert torch.allclose(main, model.backbone(x), atol=1e-5)


def test_backbones_are_random_initialised_with_the_configured_regularisation():
    cfg = config(arch="efficientnet_b0", drop_rate=0.3, drop_path_rate=0.2)
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    # pretrained weights would make two builds agree
    assert not torch.equal(a.backbone.conv_stem.weight, b.backbone.conv_stem.weight)
    assert a.backbone.drop_rate == 0.3 and a.aux_head.drop.p == 0.3
    rates = [m.drop_prob for m in a.backbone.modules() if isinstance(m, DropPath)]
    assert rates and 0 < max(rates) <= 0.2
    resnet = build_model(config(arch="resnet18", drop_path_rate=0.0, aux_drop_rate=0.1))
    assert not any(isinstance(m, DropPath) for m in resnet.modules())
    assert resnet.aux_head.drop.p == 0.1


def test_aux_stage_picks_any_feature_stage_counting_from_either_end():
    for stage, module, channels in ((1, "layer1", 64), (-3, "layer2", 128), (4, "layer4", 512)):
        model = build_model(config(arch="resnet18", drop_path_rate=0.0, aux_stage=stage))
        info = model.aux_feature_info
        assert (info["module"], info["num_chs"]) == (module, channels)
        assert model(torch.randn(2, 3, 32, 32))[1].shape == (2, 7)


def test_arch_kwargs_reach_timm_and_a_misfit_is_a_user_error():
    narrow = build_model(
        config(arch="resnet18", drop_path_rate=0.0, arch_kwargs={"channels": [16, 32, 64, 128]})
    )
    assert [narrow.backbone.layer1[0].conv1.out_channels, narrow.backbone.num_features] == [16, 128]
    assert narrow.aux_feature_info["num_chs"] == 64  # the head follows the narrower stage
    assert narrow(torch.randn(2, 3, 32, 32))[0].shape == (2, 7)
    with pytest.raises(UserError, match="arch_kwargs=.*does not fit arch='efficientnet_b0'"):
        build_model(config(arch="efficientnet_b0", arch_kwargs={"channels": [16, 32, 64, 128]}))


def test_without_aux_weight_there_is_no_head_and_predict_is_the_main_softmax():
    model = build_model(config(arch="resnet18", drop_path_rate=0.0, aux_weight=0.0)).eval()
    assert model.aux_head is None and model.aux_feature_info is None
    assert not any("aux" in name for name, _ in model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        main, aux = model(x)
        assert aux is None
        logits = main.double().numpy()
        expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        np.testing.assert_allclose(model.predict(x, 0.7).double().numpy(), expected, atol=1e-6)


def test_predict_is_the_weighted_sum_of_the_two_softmaxes():
    model = build_model(config(arch="resnet18", drop_path_rate=0.0)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        main, aux = (t.double().numpy() for t in model(x))
        for w in (0.0, 0.35, 1.0):
            expected = np.zeros_like(main)
            for i in range(3):
                expected[i] = (
                    w * np.exp(aux[i]) / np.exp(aux[i]).sum()
                    + (1 - w) * np.exp(main[i]) / np.exp(main[i]).sum()
                )
            probs = model.predict(x, w).double().numpy()
            np.testing.assert_allclose(probs, expected, atol=1e-6)
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
        with pytest.raises(ValueError, match="fusion_weight"):
            model.predict(x, 1.5)


def test_bad_arch_and_stage_are_user_errors():
    with pytest.raises(UserError, match="not_a_net"):
        build_model(config(arch="not_a_net"))
    with pytest.raises(UserError, match="aux_stage=5"):
        build_model(config(arch="resnet18", aux_stage=5))
    with pytest.raises(UserError, match="aux_stage=-6"):
        build_model(config(arch="resnet18", aux_stage=-6))


def test_dsk_resnext101_is_a_registered_selective_kernel_resnext101_32x4d():
    assert "dsk_resnext101_32x4d" in timm.list_models("dsk_*")
    net = timm.create_model("dsk_resnext101_32x4d", num_classes=5)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    first = net.layer1[0].conv2
    assert isinstance(first, SelectiveKernel)
    assert first.paths[0].conv.groups == 32 and first.paths[0].conv.out_channels == 32 * 4
    assert net.layer4[-1].conv3.conv.out_channels == 2048 and net.fc.out_features == 5
    doc = timm.models.model_entrypoint("dsk_resnext101_32x4d").__doc__
    assert "APPROXIMATION" in doc and "no public code" in doc
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("dsk_resnext101_32x4d", pretrained=True)


# ---- the projector of feature-space Contrastive Regularization -------------------------------
@pytest.mark.parametrize("aux_weight", [0.4, 0.0])
def test_the_projector_embeds_the_pooled_final_features_normalised(aux_weight):
    cfg = config(arch="resnet18", cr_space="features", cr_proj_dim=16, aux_weight=aux_weight)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert [m.out_features for m in model.projector if isinstance(m, nn.Linear)] == [512, 16]
    x = torch.randn(4, 3, 32, 32)
    main, aux = model(x)
    embeddings = model.take_embeddings()
    assert embeddings.shape == (4, 16) and (aux is None) == (aux_weight == 0)
    # independently, in float64: mean over the final feature map, the MLP, unit length
    with torch.no_grad():
        final = model.backbone.forward_features(x).double().mean((2, 3)).numpy()
        first, _, last = model.projector
        hidden = np.maximum(
            final @ first.weight.double().numpy().T + first.bias.double().numpy(), 0
        )
        out = hidden @ last.weight.double().numpy().T + last.bias.double().numpy()
        expected = out / np.linalg.norm(out, axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings.detach().double().numpy(), expected, atol=1e-5)
    embeddings.sum().backward()  # the contrast trains the backbone through the projector
    assert model.projector[0].weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.take_embeddings()  # taken once: the next batch's must come from its own pass
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model.backbone(x))
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model.take_embeddings()  # inference computes no embeddings


def test_the_loss_reads_the_projector_of_the_model_it_is_built_with():
    from train.losses import AttractRepulseLoss, contrastive_regularization

    cfg = config(arch="resnet18", cr_space="features", cr_weight=0.5, mt_weight=0.0)
    model = build_model(cfg).train()
    loss = AttractRepulseLoss.from_config(cfg, model)
    x = torch.randn(8, 3, 32, 32)
    targets = torch.eye(7)[torch.tensor([0, 1, 2, 3])].repeat(2, 1)
    main, aux = model(x)
    embeddings = model.projector(model.backbone.forward_features(x).mean((2, 3)))
    expected = contrastive_regularization(
        nn.functional.normalize(embeddings, dim=1), targets, cfg["cr_tau"], cfg["cr_delta"]
    )
    total, terms = loss(main, targets, aux_logits=aux)
    assert terms["cr"].item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    assert model.projector[2].weight.grad.abs().sum() > 0
    plain = build_model(config(arch="resnet18"))
    assert plain.projector is None and not any("projector" in k for k in plain.state_dict())


# ---- the EMA teacher -------------------------------------------------------------------------


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("warmup", [False, True])
def test_teacher_averages_parameters_and_batchnorm_statistics(warmup):
    decay = 0.8

    def decays(step: int) -> float:
        if not warmup:  # Algorithm 1: theta'_t = eta theta'_(t-1) + (1 - eta) theta_t from t = 1
            return decay
        return 0.0 if step <= 1 else min(decay, 1 - step ** (-2 / 3))  # timm's warm-up

    torch.manual_seed(0)
    student = small_net().train()
    teacher = build_teacher(student, decay, warmup=warmup)
    assert not any(p.requires_grad for p in teacher.parameters())
    expected = {k: v.double().numpy().copy() for k, v in student.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        student(torch.randn(8, 3, 6, 6, generator=gen) * step).square().mean().backward()
        opt.step()
        opt.zero_grad()
        teacher.update(student, step)
        d = decays(step)
        for key, value in student.state_dict().items():
            value = value.double().numpy()
            expected[key] = (
                d * expected[key] + (1 - d) * value if key != "1.num_batches_tracked" else value
            )

    state = teacher.module.state_dict()
    assert set(state) == set(expected) and {"1.running_mean", "1.running_var"} <= set(state)
    for key, value in expected.items():
        np.testing.assert_allclose(
            state[key].double().numpy(), value, rtol=1e-5, atol=1e-6, err_msg=key
        )
    # the batch-norm statistics moved, so the check above is not vacuous
    assert not np.allclose(expected["1.running_mean"], 0.0)
    assert int(state["1.num_batches_tracked"]) == 6

    restored = build_teacher(small_net(), decay, warmup=warmup)
    restored.load_state_dict(copy.deepcopy(teacher.state_dict()))
    for key, value in teacher.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[key], value)


def test_ema_decay_from_the_config_or_from_a_horizon():
    assert ema_decay(config(ema_decay=0.9998, ema_horizon=None), 1000) == 0.9998
    assert ema_decay(config(ema_horizon=0.1), 1000) == pytest.approx(0.99)
    assert ema_decay(config(ema_horizon=0.5), 1) == 0.0  # shorter than one step: a plain copy
    with pytest.raises(UserError, match="ema_horizon"):
        ema_decay(config(ema_horizon=0.0), 1000)
    with pytest.raises(UserError, match="ema_decay"):
        ema_decay(config(ema_decay=1.0, ema_horizon=None), 1000)


def test_the_horizon_is_the_time_constant_of_the_average():
    """After 1 / (1 - eta) steps of a unit step input, the EMA has covered 1 - 1/e of the way."""
    eta = ema_decay(config(ema_horizon=0.25), 800)  # 200 steps
    value = 0.0
    for _ in range(200):
        value = eta * value + (1 - eta)
    assert value == pytest.approx(1 - np.exp(-1), abs=2e-3)

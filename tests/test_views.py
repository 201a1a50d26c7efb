"""train/views.py: seeded two-view loading, the transforms, Mixup/CutMix shared by the views."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.data.auto_augment import AutoAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader
from torchvision import transforms

from common.errors import UserError
from tests.conftest import ROOT
from train.inference import build_crop_transform
from train.rng import generator_for, stable_seed
from train.views import (
    DeviceAugment,
    EvalDataset,
    MultiViewDataset,
    SharedMixup,
    WorkerViews,
    build_train_transform,
    load_rgb,
    to_device,
)

SMALL = {"img_size": 48, "test_size": 48}


def config(**overrides) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    cfg.update(SMALL, num_classes=10)
    cfg.update(overrides)
    return cfg


def smooth_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB"):
    """Real-looking content: a coarse random field upsampled, so JPEG and AutoAugment behave."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC).convert(mode)


@pytest.fixture(scope="module")
def image_items(tmp_path_factory) -> list[tuple[str, object, int]]:
    """Eight JPEGs of different sizes, with labels."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        path = folder / f"img{i}.JPEG"
        smooth_image(rng, 60 + 7 * i, 90 - 5 * i).save(path, quality=90)
        items.append((f"c{i % 3}/{path.name}", path, i % 3))
    return items


def global_rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def assert_same_rng_states(a, b) -> None:
    assert a[0] == b[0]
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert torch.equal(a[2], b[2])


# ---- seeds -----------------------------------------------------------------------------------


def test_stable_seed_is_pinned_so_that_old_runs_replay():
    # A salted hash() of a key holding a string would change from process to process.
    assert stable_seed(7, "mix", 3, 1) == 760844206070692402
    assert stable_seed(0, "order", 0) == 907303049817992436


@pytest.mark.slow
def test_stable_seed_is_the_same_in_another_process_with_another_hash_salt():
    code = "from train.rng import stable_seed; print(stable_seed(7, 'mix', 3, 1))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"},
    ).stdout
    assert int(out) == stable_seed(7, "mix", 3, 1)
    assert 0 <= stable_seed(7, "mix", 3, 1) < 2**63


def test_stable_seed_distinguishes_order_type_and_value_of_keys():
    seeds = {
        stable_seed(0, 1, 2),
        stable_seed(0, 2, 1),
        stable_seed(0, "1", 2),
        stable_seed(0, 1),
        stable_seed(1, 1, 2),
        stable_seed(np.int64(0), 1, 3),
    }
    assert len(seeds) == 6
    assert stable_seed(np.int64(5), 2) == stable_seed(5, 2)
    with pytest.raises(TypeError):
        stable_seed(0.5)


def test_generator_for_replays_its_stream():
    a = torch.rand(5, generator=generator_for(3, "order", 2))
    b = torch.rand(5, generator=generator_for(3, "order", 2))
    c = torch.rand(5, generator=generator_for(3, "order", 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- decoding --------------------------------------------------------------------------------


def test_load_rgb_converts_cmyk_grayscale_palette_and_misnamed_png(tmp_path):
    rng = np.random.default_rng(1)
    base = smooth_image(rng, 40, 50)
    grey = Image.new("L", (50, 40), 77)
    cases = {
        "cmyk.JPEG": base.convert("CMYK"),
        "grey.JPEG": grey,
        "palette.png": base.convert("P"),
        "rgba.png": base.convert("RGBA"),
        "png_named.JPEG": base,  # PNG bytes under a .JPEG name, as n02105855_2933.JPEG
    }
    for name, image in cases.items():
        image.save(tmp_path / name, format="PNG" if name.startswith("png") else None)
    for name in cases:
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (50, 40), name
    assert np.all(np.asarray(load_rgb(tmp_path / "grey.JPEG")) == 77)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "png_named.JPEG")), np.asarray(base))


def test_load_rgb_names_a_damaged_file(tmp_path):
    rng = np.random.default_rng(2)
    good = tmp_path / "good.JPEG"
    smooth_image(rng, 64, 64).save(good)
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"not an image at all")
    # A broken chunk type after the first image chunk: PIL raises SyntaxError from load(), not
    # OSError (noise does not compress: the PNG holds several IDAT chunks).
    png = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(png)
    data = png.read_bytes()
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    broken_chunk = tmp_path / "broken_chunk.png"
    broken_chunk.write_bytes(data[:second] + bytes([0, 1, 2, 3]) + data[second + 4 :])
    with pytest.raises(SyntaxError), Image.open(broken_chunk) as image:
        image.load()
    float_tiff = tmp_path / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32)).save(float_tiff)  # mode F: no range to scale
    for path in (truncated, garbage, tmp_path / "missing.JPEG", broken_chunk, float_tiff):
        with pytest.raises(UserError, match=path.name):
            load_rgb(path)


def test_load_rgb_scales_a_16_bit_grayscale_image_to_8_bits_rather_than_clipping_it(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # mode I;16, as microscopy saves it
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    out = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    for channel in range(3):  # clipping at 255 turned 99.6% of this ramp white
        assert np.array_equal(out[..., channel], (ramp >> 8).astype(np.uint8))


# ---- transforms ------------------------------------------------------------------------------


def test_train_transform_wires_every_config_key():
    cfg = config(
        rrc_scale=[0.3, 0.9],
        rrc_ratio=[0.5, 2.0],
        hflip=0.3,
        reprob=0.4,
        remode="rand",
        auto_augment="original",
        interpolation="bilinear",
    )
    steps = build_train_transform(cfg).transforms
    rrc = next(t for t in steps if isinstance(t, RandomResizedCropAndInterpolation))
    assert rrc.size == (48, 48) and rrc.scale == (0.3, 0.9) and rrc.ratio == (0.5, 2.0)
    assert next(t for t in steps if isinstance(t, transforms.RandomHorizontalFlip)).p == 0.3
    assert any(isinstance(t, AutoAugment) for t in steps)
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert erasing.probability == 0.4 and erasing.mode == "rand" and erasing.device == "cpu"
    norm = next(t for t in steps if isinstance(t, transforms.Normalize))
    assert torch.allclose(torch.as_tensor(norm.mean), torch.tensor(cfg["mean"]))
    assert not any(isinstance(t, transforms.ColorJitter) for t in steps)

    plain = build_train_transform(config(auto_augment=None, reprob=0.0, hflip=0.0)).transforms
    assert not any(
        isinstance(
            t, (AutoAugment, RandomErasing, transforms.RandomHorizontalFlip, transforms.ColorJitter)
        )
        for t in plain
    )


def test_train_transform_without_randomness_is_resize_and_normalise():
    """With the whole image as the only crop and every random op off, the transform is a plain
    bicubic resize and normalisation, computed here with PIL and numpy."""
    cfg = config(
        rrc_scale=[1.0, 1.0],
        rrc_ratio=[1.0, 1.0],
        hflip=0.0,
        auto_augment=None,
        reprob=0.0,
        interpolation="bicubic",
    )
    image = smooth_image(np.random.default_rng(3), 80, 80)
    expected = np.asarray(image.resize((48, 48), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = (expected - np.array(cfg["mean"])) / np.array(cfg["std"])
    out = build_train_transform(cfg)(image).double().permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_eval_transform_resizes_the_short_side_then_centre_crops():
    cfg = config(test_size=64, test_resize_ratio=0.875, interpolation="bicubic")
    image = smooth_image(np.random.default_rng(4), 200, 300)  # height 200, width 300
    short = math.floor(64 / 0.875)  # 73, as timm floors it
    long = int(short * 300 / 200)
    resized = np.asarray(image.resize((long, short), Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = round((short - 64) / 2), round((long - 64) / 2)
    expected = (resized[top : top + 64, left : left + 64] - cfg["mean"]) / np.array(cfg["std"])
    out = build_crop_transform(cfg, "center")(image)[0].double().permute(1, 2, 0).numpy()
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# ---- the two-view dataset --------------------------------------------------------------------


def reference_views(path, transform, num_views, seed, epoch, index, rank) -> torch.Tensor:
    """What the contract promises, written out: seed the three global RNGs from the key, decode
    once, draw the transform num_views times."""
    key = stable_seed(seed, epoch, index, rank)
    random.seed(key)
    np.random.seed([key & 0xFFFFFFFF, key >> 32])
    torch.manual_seed(key)
    image = Image.open(path).convert("RGB")
    return torch.stack([transform(image) for _ in range(num_views)])


def test_views_replay_from_seed_epoch_index_rank_whatever_the_global_rng(image_items):
    transform = build_train_transform(config())
    first = MultiViewDataset(image_items, transform, num_views=2, seed=11, rank=1)
    first.set_epoch(4)
    views, label, index = first[5]
    assert views.shape == (2, 3, 48, 48) and views.dtype == torch.float32
    assert (label, index) == (image_items[5][2], 5)

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    fresh = MultiViewDataset(image_items, build_train_transform(config()), 2, seed=11, rank=1)
    fresh.set_epoch(4)
    assert torch.equal(fresh[5][0], views)
    expected = reference_views(image_items[5][1], transform, 2, 11, 4, 5, 1)
    assert torch.equal(views, expected)


def test_getitem_leaves_the_global_rngs_untouched(image_items):
    dataset = MultiViewDataset(image_items, build_train_transform(config()), 2, seed=0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = global_rng_states()
    dataset[0], dataset[3]
    assert_same_rng_states(before, global_rng_states())


def test_epoch_index_rank_and_view_each_change_the_pixels(image_items):
    same_image = [image_items[0]] * 2
    transform = build_train_transform(config())
    dataset = MultiViewDataset(same_image, transform, 2, seed=0, rank=0)
    base = dataset[0][0]
    assert not torch.equal(base, dataset[1][0])  # same file, another index
    dataset.set_epoch(1)
    assert not torch.equal(base, dataset[0][0])
    other_rank = MultiViewDataset(same_image, transform, 2, seed=0, rank=1)
    assert not torch.equal(base, other_rank[0][0])
    other_seed = MultiViewDataset(same_image, transform, 2, seed=1, rank=0)
    assert not torch.equal(base, other_seed[0][0])
    for i in range(len(image_items)):
        views = MultiViewDataset(image_items, transform, 2, seed=0)[i][0]
        assert (views[0] != views[1]).float().mean() > 0.5


def test_persistent_workers_load_the_same_views_and_follow_set_epoch(image_items):
    transform = build_train_transform(config())
    dataset = MultiViewDataset(image_items, transform, 2, seed=3)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, persistent_workers=True)
    for epoch in (0, 2):
        dataset.set_epoch(epoch)
        views = torch.cat([batch[0] for batch in loader])
        indices = torch.cat([batch[2] for batch in loader])
        assert indices.tolist() == list(range(len(image_items)))
        expected = torch.stack([dataset[i][0] for i in range(len(image_items))])
        assert torch.equal(views, expected), f"epoch {epoch}"


@pytest.mark.parametrize(
    "remode,reprob", [("pixel", 1.0), ("pixel", 0.25), ("rand", 1.0), ("const", 1.0)]
)
def test_worker_half_then_device_half_equal_the_one_process_pipeline_bit_for_bit(
    image_items, remode, reprob
):
    """Same draws: crop, flip, AutoAugment and erasing from the same generators in the same
    order, through a real loader with workers; normalisation and the erasing on the device
    (here the CPU) give exactly today's float views."""
    full = build_train_transform(config(remode=remode, reprob=reprob))
    reference = MultiViewDataset(image_items, full, 2, seed=5, rank=1)
    split = MultiViewDataset(image_items, WorkerViews(full), 2, seed=5, rank=1)
    loader = DataLoader(split, batch_size=4, num_workers=2)
    augment = DeviceAugment(full)
    for epoch in (0, 3):
        reference.set_epoch(epoch)
        split.set_epoch(epoch)
        shipped = [batch for batch in loader]
        assert shipped[0][0].pixels.dtype == torch.uint8
        got = torch.cat([augment(batch[0]) for batch in shipped])
        expected = torch.stack([reference[i][0] for i in range(len(image_items))])
        assert torch.equal(got, expected), (remode, reprob, epoch)
        erased = torch.cat([batch[0].erase[..., 2] > 0 for batch in shipped])
        assert erased.all() if reprob == 1.0 else 0 < erased.sum() < erased.numel()


def test_eval_dataset_returns_image_label_or_minus_one_and_index(image_items):
    transform = build_crop_transform(config(), "center")
    labelled = EvalDataset(image_items, transform)
    image, label, index = labelled[2]
    assert image.shape == (1, 3, 48, 48) and label == image_items[2][2] and index == 2
    unlabelled = EvalDataset(
        [(f"img_{i}.JPEG", p) for i, (_, p, _) in enumerate(image_items)], transform
    )
    image2, label2, index2 = unlabelled[2]
    assert torch.equal(image, image2) and label2 == -1 and index2 == 2


# ---- shared Mixup / CutMix -------------------------------------------------------------------

C = 10


def brute_targets(labels, lam, partner, smoothing) -> np.ndarray:
    """Smoothed one-hot of each image mixed with its partner's, loop by loop in float64."""
    n = len(labels)
    out = np.zeros((n, C))
    for i in range(n):
        for c in range(C):
            own = (1 - smoothing + smoothing / C) if labels[i] == c else smoothing / C
            other = (1 - smoothing + smoothing / C) if labels[partner[i]] == c else smoothing / C
            out[i, c] = lam * own + (1 - lam) * other
    return out


def coded_views(num_views: int, n: int, size: int = 16) -> torch.Tensor:
    """[V, N, 3, H, W] whose every pixel of view v of image i holds 100 v + i."""
    code = 100 * torch.arange(num_views)[:, None] + torch.arange(n)[None, :]
    return code[:, :, None, None, None].float().expand(num_views, n, 3, size, size).clone()


def test_cutmix_pastes_one_partner_box_into_every_view():
    mix = SharedMixup(0.0, 1.0, 1.0, 0.5, smoothing=0.1, num_classes=C)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    boxes = 0
    for step in range(12):
        # The engine passes views [N, V, ...] transposed: a non-contiguous view of the batch.
        views = coded_views(2, 8).transpose(0, 1).contiguous().transpose(0, 1)
        mixed, targets = mix(views, labels, generator_for(0, "mix", 0, step, 0))
        assert mixed.shape == views.shape and targets.shape == (8, C)
        box = (mixed != views)[0, 0, 0]  # where image 0 of view 0 shows another image
        # the same box, at the same place, in every channel, image and view
        assert torch.equal(mixed != views, box.expand_as(views))
        area = int(box.sum())
        partner = list(range(8))
        if area:
            rows, cols = torch.nonzero(box, as_tuple=True)
            assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == area
            for i in range(8):
                source = mixed[0, i, 0][box].unique()
                assert len(source) == 1
                partner[i] = int(source)
                # view 1 shows the same partner (its code is 100 + partner)
                assert torch.all(mixed[1, i, 0][box] == 100 + partner[i])
            assert all(partner[partner[i]] == i != partner[i] for i in range(8))
            boxes += 1
        lam = 1.0 - area / 16**2
        expected = brute_targets(labels.tolist(), lam, partner, 0.1)
        np.testing.assert_allclose(targets.double().numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, atol=1e-6)
    assert boxes >= 8


def test_mixup_mixes_every_view_with_the_same_lambda_and_partner():
    mix = SharedMixup(0.5, 0.0, 1.0, 0.5, smoothing=0.1, num_classes=C)
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(2, 6, 3, 8, 8, generator=gen)
    labels = torch.tensor([3, 3, 1, 0, 9, 4])
    mixed, targets = mix(views, labels, generator_for(1, "mix", 0, 0, 0))
    x, m = views.double().numpy(), mixed.double().numpy()
    lams, partner = [], []
    for i in range(6):
        fits = []
        for j in range(6):
            if j == i:
                continue
            # least-squares lam for m = lam x_i + (1 - lam) x_j on view 0, then its residual
            a, b = (x[0, i] - x[0, j]).ravel(), (m[0, i] - x[0, j]).ravel()
            lam = float(a @ b / (a @ a))
            fits.append((np.abs(lam * a - b).max(), lam, j))
        residual, lam, j = min(fits)
        assert residual < 1e-5
        np.testing.assert_allclose(m[1, i], lam * x[1, i] + (1 - lam) * x[1, j], atol=1e-5)
        lams.append(lam)
        partner.append(j)
    assert np.ptp(lams) < 1e-5 and 0 < lams[0] < 1
    assert all(partner[partner[i]] == i for i in range(6))
    expected = brute_targets(labels.tolist(), lams[0], partner, 0.1)
    np.testing.assert_allclose(targets.double().numpy(), expected, atol=1e-5)


def test_unmixed_batches_keep_their_pixels_and_get_smoothed_one_hots():
    views = torch.randn(2, 4, 3, 8, 8)
    labels = torch.tensor([2, 0, 7, 7])
    for mix in (SharedMixup(0.5, 1.0, 0.0, 0.5, 0.1, C), SharedMixup(0.0, 0.0, 1.0, 0.5, 0.1, C)):
        mixed, targets = mix(views, labels, generator_for(0, 1))
        assert torch.equal(mixed, views)
        expected = np.full((4, C), 0.01)
        expected[np.arange(4), labels.numpy()] = 0.91
        np.testing.assert_allclose(targets.double().numpy(), expected, atol=1e-7)
    # unmixed batches may be odd
    assert SharedMixup(0.5, 1.0, 0.0, 0.5, 0.0, C)(views[:, :3], labels[:3], generator_for(0))


def test_mixing_replays_from_the_generator_and_varies_by_step():
    mix = SharedMixup(0.5, 1.0, 1.0, 0.5, 0.1, C)
    views, labels = torch.randn(2, 8, 3, 12, 12), torch.arange(8) % C
    a = mix(views, labels, generator_for(5, "mix", 2, 7, 0))
    b = mix(views, labels, generator_for(5, "mix", 2, 7, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [mix(views, labels, generator_for(5, "mix", 2, s, 0))[1] for s in range(8, 12)]
    assert all(not torch.equal(a[1], t) for t in others)


def test_mix_prob_and_switch_prob_set_the_frequencies():
    mix = SharedMixup(0.5, 1.0, mix_prob=0.6, switch_prob=0.25, smoothing=0.0, num_classes=C)
    draws = [mix.draw(8, 16, 16, generator_for(0, step)) for step in range(400)]
    mixed = [d for d in draws if not torch.equal(d.partner, torch.arange(8))]
    assert abs(len(mixed) / 400 - 0.6) < 0.08
    assert abs(sum(d.box is not None for d in mixed) / len(mixed) - 0.25) < 0.08
    for d in mixed:
        if d.box is not None:  # lambda is the share of the image kept: 1 - box area / H W
            y0, y1, x0, x1 = d.box
            assert d.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
    mixup_lams = [d.lam for d in mixed if d.box is None]
    assert abs(np.mean(mixup_lams) - 0.5) < 0.06  # Beta(0.5, 0.5) is symmetric around 1/2


def test_an_odd_batch_is_refused_when_mixing_is_on():
    mix = SharedMixup(0.5, 1.0, 1.0, 0.5, 0.1, C)
    with pytest.raises(ValueError, match="even batch_size"):
        mix(torch.zeros(2, 5, 3, 8, 8), torch.zeros(5, dtype=torch.long), generator_for(0))
    with pytest.raises(ValueError, match=r"\[V, N, C, H, W\]"):
        mix(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), generator_for(0))


def test_from_config_reads_the_recipe_keys():
    mix = SharedMixup.from_config(
        config(mixup_alpha=0.2, cutmix_alpha=0.0, mix_prob=0.7, switch_prob=0.1, smoothing=0.05)
    )
    assert (
        mix.mixup_alpha,
        mix.cutmix_alpha,
        mix.mix_prob,
        mix.switch_prob,
        mix.smoothing,
        mix.num_classes,
    ) == (0.2, 0.0, 0.7, 0.1, 0.05, 10)


def test_no_positives_stay_none_on_the_way_to_a_gpu():
    """The strong baseline (cr_weight: 0) has no CR positives; the copy to a GPU, the one
    branch the CPU tests do not run, must pass that on (it called None.pin_memory())."""
    assert to_device(None, torch.device("cuda")) is None
    labels = torch.arange(4)
    assert to_device(labels, torch.device("cpu")) is labels

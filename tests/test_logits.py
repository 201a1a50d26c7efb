"""TenCrop and per-crop Auxiliary Fusion (train/inference.py), checked against explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from common.errors import UserError, user_message
from ensemble.logits import choose_fusion_weight, unchanged_checkpoint, write_outputs
from ensemble.members import open_members
from train.checkpoint import mark_best
from train.config import load_config
from train.distributed import make_accelerator
from train.inference import (
    CENTER,
    build_crop_transform,
    crop_probabilities,
    for_inference,
    fuse,
    predict_crops,
    resize_size,
)
from train.model import build_model
from train.views import EvalDataset

CFG = {
    "test_size": 8,
    "test_resize_ratio": 0.8,  # short side 10
    "interpolation": "bilinear",
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
}


class TwoHeads(nn.Module):
    """A tiny position-sensitive net with a main and an auxiliary head, like train.model.AuxNet."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.main = nn.Linear(4 * 6 * 6, num_classes)
        self.aux = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x):
        features = torch.tanh(self.conv(x)).flatten(1)
        return 3 * self.main(features), 3 * self.aux(features)


class Constant(nn.Module):
    """Ignores its input: the same main and auxiliary logits for every image."""

    def __init__(self, main, aux):
        super().__init__()
        self.register_buffer("main", torch.tensor(main))
        self.register_buffer("aux", torch.tensor(aux))

    def forward(self, x):
        n = x.shape[0]
        return self.main.expand(n, -1), self.aux.expand(n, -1)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def five_crops(array: np.ndarray, s: int) -> list[np.ndarray]:
    _, height, width = array.shape
    top, left = int(round((height - s) / 2)), int(round((width - s) / 2))
    corners = [(0, 0), (0, width - s), (height - s, 0), (height - s, width - s), (top, left)]
    return [array[:, y : y + s, x : x + s] for y, x in corners]


def explicit_ten_crops(image: Image.Image, cfg: dict) -> list[np.ndarray]:
    """Resize the short side, normalise, slice the 4 corners and the centre of the image and of
    its mirror image (torchvision's TenCrop; with an odd margin the mirrored centre crop sits
    one pixel off the mirror of the centre crop)."""
    short = math.floor(cfg["test_size"] / cfg["test_resize_ratio"])
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    array = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float64) / 255.0
    array = (array - np.array(cfg["mean"])) / np.array(cfg["std"])
    array = array.transpose(2, 0, 1)
    return five_crops(array, cfg["test_size"]) + five_crops(array[:, :, ::-1], cfg["test_size"])


def softmax64(logits: torch.Tensor) -> np.ndarray:
    z = logits.double().numpy()
    e = np.exp(z - z.max())
    return e / e.sum()


def test_resize_size_is_floor_of_test_size_over_ratio():
    assert resize_size({"test_size": 448, "test_resize_ratio": 0.875}) == 512
    assert resize_size({"test_size": 320, "test_resize_ratio": 0.875}) == 365
    assert resize_size(CFG) == 10


@pytest.mark.parametrize("height, width", [(13, 17), (21, 11), (10, 10)])
def test_tencrop_equals_an_explicit_loop_over_the_ten_crops(height, width):
    image = random_image(height, width, seed=height * width)
    model = TwoHeads().eval()
    crops = build_crop_transform(CFG, "tencrop")(image)
    assert crops.shape == (10, 3, 8, 8)
    with torch.no_grad():
        main, aux = crop_probabilities(model, crops.unsqueeze(0))
        expected_main, expected_aux = np.zeros(5), np.zeros(5)
        for crop in explicit_ten_crops(image, CFG):
            m, a = model(torch.tensor(crop.copy(), dtype=torch.float32).unsqueeze(0))
            expected_main += softmax64(m[0]) / 10
            expected_aux += softmax64(a[0]) / 10
    np.testing.assert_allclose(main.mean(1)[0].numpy(), expected_main, atol=2e-6)
    np.testing.assert_allclose(aux.mean(1)[0].numpy(), expected_aux, atol=2e-6)


def test_tencrop_crops_are_the_five_crops_of_the_image_and_of_its_mirror_in_order():
    image = random_image(13, 17, seed=1)
    crops = build_crop_transform(CFG, "tencrop")(image).double().numpy()
    for got, expected in zip(crops, explicit_ten_crops(image, CFG), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_centre_view_is_the_fifth_crop():
    image = random_image(19, 14, seed=2)
    cfg = {**CFG, "interpolation": "bicubic"}
    centre = build_crop_transform(cfg, "center")(image)[0]
    torch.testing.assert_close(build_crop_transform(cfg, "tencrop")(image)[CENTER], centre)


def test_fusing_per_crop_then_averaging_equals_averaging_then_fusing():
    model = TwoHeads().eval()
    crops = torch.stack([build_crop_transform(CFG)(random_image(15, 12, s)) for s in range(3)])
    with torch.no_grad():
        main, aux = crop_probabilities(model, crops)
    for w in (0.0, 0.3, 1.0):
        per_crop = fuse(main, aux, w).mean(1)
        torch.testing.assert_close(per_crop, fuse(main.mean(1), aux.mean(1), w))


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator("no")


def loader_for(images, view: str) -> DataLoader:
    items = [(f"c/{i}.png", path, i % 2) for i, path in enumerate(images)]
    return DataLoader(EvalDataset(items, build_crop_transform(CFG, view)), batch_size=2)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (h, w) in enumerate([(12, 16), (20, 10), (10, 10), (17, 13), (11, 19)]):
        paths.append(folder / f"{i}.png")
        random_image(h, w, seed=i).save(paths[-1])
    return paths


def test_a_model_that_ignores_its_input_gives_the_same_answer_from_every_path(
    accelerator, image_files
):
    main_logits, aux_logits = [2.0, -1.0, 0.5], [0.0, 1.5, -0.5]
    model = Constant(main_logits, aux_logits).to(accelerator.device)
    expected_main = softmax64(torch.tensor(main_logits))
    expected_aux = softmax64(torch.tensor(aux_logits))
    ten = predict_crops(accelerator, model, loader_for(image_files, "tencrop"), 5, 3, True, True)
    centre = predict_crops(accelerator, model, loader_for(image_files, "center"), 5, 3, True, True)
    paths = [ten["main"], ten["center_main"], centre["main"], centre["center_main"]]
    for probs in paths:
        np.testing.assert_allclose(probs.numpy(), np.tile(expected_main, (5, 1)), atol=1e-6)
    for probs in (ten["aux"], ten["center_aux"], centre["aux"]):
        np.testing.assert_allclose(probs.numpy(), np.tile(expected_aux, (5, 1)), atol=1e-6)
    fused = 0.35 * expected_aux + 0.65 * expected_main
    for main, aux in [(ten["main"], ten["aux"]), (centre["main"], centre["aux"])]:
        np.testing.assert_allclose(fuse(main, aux, 0.35).numpy(), np.tile(fused, (5, 1)), atol=1e-6)


def test_predict_crops_keeps_rows_in_index_order(accelerator, image_files):
    model = TwoHeads(num_classes=3).to(accelerator.device).eval()
    got = predict_crops(accelerator, model, loader_for(image_files, "tencrop"), 5, 3, True, False)
    transform = build_crop_transform(CFG, "tencrop")
    for i, path in enumerate(image_files):
        crops = transform(Image.open(path).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            main, aux = crop_probabilities(model, crops)
        torch.testing.assert_close(got["main"][i], main.mean(1)[0])
        torch.testing.assert_close(got["aux"][i], aux.mean(1)[0])


def test_predict_crops_without_an_auxiliary_head_returns_main_only(accelerator, image_files):
    class MainOnly(nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3)).unsqueeze(1).repeat(1, 4) * torch.arange(4.0), None

    loader = loader_for(image_files, "tencrop")
    got = predict_crops(accelerator, MainOnly(), loader, 5, 4, False, True)
    assert sorted(got) == ["center_main", "main"]
    assert got["main"].shape == (5, 4)


def test_fusion_weight_is_picked_on_held_out_images_with_ties_to_the_smaller_weight():
    # Image 0 is right only for w > 4/7 (aux wins), image 1 only for w < 0.75 (main wins).
    main = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    aux = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([1, 1])
    cfg = {"fusion_weight": None, "fusion_fallback": 0.5, "aux_weight": 0.4}
    weight, source = choose_fusion_weight(cfg, {"main": main, "aux": aux}, labels)
    # Brute force over the same grid: both right for w in {0.6, 0.65, 0.7}; the smallest wins.
    grid = [i / 20 for i in range(21)]
    scores = [
        sum(int(np.argmax(w * aux[i].numpy() + (1 - w) * main[i].numpy()) == 1) for i in range(2))
        for w in grid
    ]
    assert weight == grid[scores.index(max(scores))] == 0.6
    assert source == "chosen on held-out images"
    fixed = {**cfg, "fusion_weight": 0.2}
    assert choose_fusion_weight(fixed, {"main": main, "aux": aux}, labels) == (0.2, "config")
    # no held-out images: the configured fallback, never a weight chosen on trained-on images
    assert choose_fusion_weight(cfg, None, None) == (0.5, "fusion_fallback (no held-out images)")
    assert choose_fusion_weight(fixed, None, None) == (0.2, "config")
    no_head = {**cfg, "aux_weight": 0.0}
    assert choose_fusion_weight(no_head, {"main": main}, labels) == (0.0, "no auxiliary head")
    assert choose_fusion_weight(no_head, None, None) == (0.0, "no auxiliary head")


def test_a_user_error_from_a_loader_worker_keeps_its_one_line_message():
    wrapped = UserError(
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1\ncommon.errors.UserError: cannot read image '
        "data/d/test/imgs/img_3.png (broken); replace or remove the file\n"
    )
    assert user_message(wrapped) == (
        "cannot read image data/d/test/imgs/img_3.png (broken); replace or remove the file"
    )
    assert user_message(UserError("plain message")) == "plain message"


@pytest.mark.parametrize("arch", ["resnet18", "seresnet18", "efficientnet_b0"])
def test_the_fast_inference_path_gives_the_plain_paths_probabilities(accelerator, arch):
    """`make logits` folds BatchNorm into the convolutions and may run channels-last, and on the
    CPU runs the traced, frozen oneDNN model: the same TenCrop probabilities as the plain model,
    up to float rounding."""
    cfg = load_config("demo_resnet18", [f"arch={arch}", "num_classes=5", "test_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg)
    for module in model.modules():  # BatchNorm statistics far from the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = for_inference(model).to(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) or arch != "resnet18"
    frozen = for_inference(model, torch.zeros(2, 3, 32, 32))  # the CPU path of `make logits`
    assert isinstance(frozen, torch.jit.ScriptModule)
    crops = torch.randn(6, 10, 3, 32, 32)
    with torch.inference_mode():
        plain_main, plain_aux = crop_probabilities(model, crops)
        for fast, channels_last in ((folded, True), (frozen, False)):
            fast_main, fast_aux = crop_probabilities(fast, crops, channels_last)
            torch.testing.assert_close(fast_main.mean(1), plain_main.mean(1), atol=1e-5, rtol=0)
            torch.testing.assert_close(fast_aux.mean(1), plain_aux.mean(1), atol=1e-5, rtol=0)
            assert torch.equal(fast_main.mean(1).argmax(-1), plain_main.mean(1).argmax(-1))


def test_a_rewrite_cut_short_leaves_no_folder_that_looks_complete(tmp_path):
    """The second write fails after its val.npz (an object array cannot be stored): the old
    meta.json must not stay beside the new val.npz, where `make ensemble` would trust both."""
    ids = np.array(["a", "b"])
    probs = np.full((2, 3), 1 / 3, dtype=np.float16)
    first = {"val": {"ids": ids, "probs": probs, "labels": np.array([0, 1])}}
    write_outputs(tmp_path, {**first, "test": {"ids": ids, "probs": probs}}, {"role": "teacher"})
    assert open_members(tmp_path.parent, [tmp_path.name])[0].meta == {"role": "teacher"}
    broken = {"ids": np.array(["a", "b"], dtype=object), "probs": probs}
    with pytest.raises(TypeError, match="object array"):
        write_outputs(tmp_path, {**first, "test": broken}, {"role": "student"})
    with pytest.raises(UserError, match="meta.json is missing"):
        open_members(tmp_path.parent, [tmp_path.name])


@pytest.mark.parametrize(
    ("change", "asked", "current"),
    [
        ({}, {}, True),
        ({"view": "center"}, {}, False),  # a centre-crop `make logits` in the demo's folder
        ({}, {"view": "center"}, False),
        ({"role": "student"}, {}, False),
        ({"test_size": 16}, {}, False),
        ({"checkpoint": "last"}, {}, False),
        ({"provenance": {"checkpoint_sha256": "0" * 64}}, {}, False),  # an older best's
    ],
)
def test_logits_are_reused_only_when_made_as_asked_from_the_best_checkpoint_as_it_is(
    tmp_path, change, asked, current
):
    import json

    from scripts.stages import logits_current
    from train.checkpoint import MARKER

    cfg = load_config("demo_resnet18", [f"out_dir={tmp_path / 'runs'}", f"logits_dir={tmp_path}"])
    best = tmp_path / "runs" / cfg["name"] / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / MARKER).write_text(json.dumps({"files": {"teacher.safetensors": "a" * 64}}))
    meta = {
        "checkpoint": "best",
        "role": "teacher",
        "view": "tencrop",
        "test_size": cfg["test_size"],
        "resize_size": resize_size(cfg),
        "provenance": {"checkpoint_sha256": "a" * 64},
    }
    (tmp_path / cfg["name"]).mkdir()
    (tmp_path / cfg["name"] / "meta.json").write_text(json.dumps({**meta, **change}))
    assert logits_current(cfg, **asked) is current


def test_a_best_checkpoint_replaced_while_it_is_read_is_refused_in_one_line(tmp_path):
    """make logits on a run still training: mark_best swaps `best` (two renames) between the
    marker's read and the weights' read, or in the gap between its renames."""
    for step in (1, 2):
        folder = tmp_path / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "COMPLETE").write_text(f'{{"step": {step}}}')
    mark_best(tmp_path, tmp_path / "checkpoints" / "step_1")
    best = tmp_path / "checkpoints" / "best"
    with unchanged_checkpoint(best, "make logits MODEL=m"):
        (best / "COMPLETE").read_text()  # nothing replaced it: no error
    with pytest.raises(UserError) as caught:
        with unchanged_checkpoint(best, "make logits MODEL=m"):
            mark_best(tmp_path, tmp_path / "checkpoints" / "step_2")
    assert user_message(caught.value) == (
        f"{best} was replaced while it was read (its run is still training?); rerun "
        "`make logits MODEL=m` once the run has ended"
    )
    with pytest.raises(UserError, match="was replaced while it was read"):
        with unchanged_checkpoint(best, "make logits MODEL=m"):
            best.rename(best.with_name("best.old"))  # the gap between mark_best's renames
            (best / "teacher.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):  # a file missing from an unchanged folder is a bug
        with unchanged_checkpoint(tmp_path / "checkpoints" / "step_2", "make logits MODEL=m"):
            (tmp_path / "checkpoints" / "step_2" / "absent").read_bytes()

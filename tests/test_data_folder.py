"""`python -m data_prep folder`: a user's class folders, split stratified and seeded."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.layout import Layout
from tests.conftest import run_command
from train.config import load_config

# Class -> [(relative path in the class folder, format)]; bird 12, cat 20 (5 nested), dog 15.
TREE = {
    "bird": [(f"b{i}.jpg", "JPEG") for i in range(12)],
    "cat": [(f"c{i}.jpg", "JPEG") for i in range(15)]
    + [(f"indoor/c{i}.jpg", "JPEG") for i in range(5)],
    "dog": [(f"d{i}.PNG", "PNG") for i in range(10)] + [(f"e{i}.jpeg", "JPEG") for i in range(5)],
}
# --per-class 4,3,0.3: test = 0.3 * size rounded half up (12 -> 3.6 -> 4, 20 -> 6, 15 -> 4.5 -> 5).
EXPECTED = {"bird": (4, 3, 4), "cat": (4, 3, 6), "dog": (4, 3, 5)}
# Every image of TREE drawn: at most 10 train, 5 val and 5 test per class.
EVERY_IMAGE = ["--per-class", "10,5,5", "--at-most"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user") / "photos"
    rng = np.random.default_rng(0)
    for name, files in TREE.items():
        for rel, fmt in files:
            path = root / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, fmt)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.jpg").write_text("ignored")
    return root


def build_folder(root: Path, out: Path | None, *extra: str, check=True, cwd=None):
    args = ["-m", "data_prep", "folder", "--root", str(root), "--per-class", "4,3,0.3", *extra]
    args += ["--out", str(out)] if out is not None else []
    kwargs = {"cwd": cwd} if cwd is not None else {}
    return run_command(*args, check=check, **kwargs)


def sources_by_inode(root: Path) -> dict[int, tuple[str, Path]]:
    return {
        p.stat().st_ino: (p.relative_to(root).parts[0], p) for p in root.rglob("*") if p.is_file()
    }


def drawn(out: Path, photos: Path) -> dict[str, list[tuple[str, Path]]]:
    """Split -> [(class the output claims, source file it is)] for a link-mode build."""
    sources = sources_by_inode(photos)
    result = {}
    for split in ("train", "val"):
        result[split] = [
            (p.parent.name, sources[p.stat().st_ino][1])
            for p in sorted((out / split).rglob("*"))
            if p.is_file()
        ]
    classes = json.loads((out / "manifest.json").read_text())["classes"]
    rows = (out / "test_labels.csv").read_text().splitlines()[1:]
    result["test"] = [
        (classes[int(label)], sources[(out / "test/imgs" / name).stat().st_ino][1])
        for name, label in (row.split(",") for row in rows)
    ]
    return result


def test_a_stratified_split_of_hard_links_to_the_right_classes(photos, tmp_path):
    out = tmp_path / "mine"
    build_folder(photos, out)
    splits = drawn(out, photos)
    for split, column in (("train", 0), ("val", 1), ("test", 2)):
        per_class = {name: sum(c == name for c, _ in splits[split]) for name in TREE}
        assert per_class == {name: n[column] for name, n in EXPECTED.items()}, split
        # Every output is a source image of the class it is filed under (or labelled with).
        assert all(src.relative_to(photos).parts[0] == c for c, src in splits[split]), split
    used = [src for split in splits.values() for _, src in split]
    assert len(used) == len(set(used)) == sum(sum(n) for n in EXPECTED.values())
    names = sorted(p.name for p in (out / "test/imgs").iterdir())
    assert names == sorted(f"img_{i}{src.suffix}" for i, (_, src) in enumerate(splits["test"]))
    nested = [p for p in (out / "train" / "cat").iterdir() if p.name.startswith("indoor__")]
    assert all(os.path.samefile(p, photos / "cat/indoor" / p.name[8:]) for p in nested)


def test_the_printed_training_command_loads_a_config_that_fits_the_dataset(photos, tmp_path):
    out = tmp_path / "my 'photos'"
    hint = build_folder(photos, out).stdout.strip().splitlines()[-1]
    make, train, model, args = shlex.split(hint.split(": ", 1)[1].split(", or DATA=")[0])
    assert (make, train) == ("make", "train")
    model = model.removeprefix("MODEL=")
    cfg = load_config(model, shlex.split(args.removeprefix("ARGS=")))
    Layout(Path(cfg["data_dir"])).require_classes(cfg["num_classes"])  # raises if they differ
    assert Path(cfg["data_dir"]) == out and cfg["num_classes"] == len(TREE)
    data = tmp_path / "photos.yaml"  # the other way the line offers: a data config as a path
    data.write_text(f"data_dir: {out}\nnum_classes: {len(TREE)}\nmean: [0.4, 0.5, 0.6]\n")
    cfg = load_config(model, [f"data={data}"])
    assert (cfg["data_dir"], cfg["num_classes"]) == (str(out), len(TREE))
    assert cfg["mean"] == [0.4, 0.5, 0.6]


def test_the_draw_is_seeded(photos, tmp_path):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_folder(photos, first)
    build_folder(photos, again)
    build_folder(photos, other, "--seed", "1")
    checksums = [json.loads((p / "manifest.json").read_text())["checksum"] for p in (first, again)]
    assert drawn(first, photos) == drawn(again, photos) and checksums[0] == checksums[1]
    assert drawn(first, photos) != drawn(other, photos)


def test_the_default_out_is_data_slash_the_folder_name(photos, tmp_path):
    build_folder(photos, None, cwd=tmp_path)
    assert (tmp_path / "data" / "photos" / "manifest.json").is_file()


def test_a_class_with_too_few_images_is_named(photos, tmp_path):
    out = tmp_path / "out"
    proc = build_folder(photos, out, "--per-class", "9,3,0.3", check=False)
    assert proc.returncode == 2
    assert "class 'bird' has 12 images, too few" in proc.stderr and not out.exists()


@pytest.mark.parametrize("spec", ["4,3", "4,3,1.5", "a,3,1", "4,-3,1", "4,3,0.3,1"])
def test_a_malformed_per_class_is_an_error(photos, tmp_path, spec):
    proc = build_folder(photos, tmp_path / "out", "--per-class", spec, check=False)
    assert proc.returncode == 2 and f"--per-class {spec!r} is not TRAIN,VAL,TEST" in proc.stderr


@pytest.mark.parametrize("content", ["garbage", "float pixels"])
def test_an_unreadable_image_is_named(photos, tmp_path, content):
    root = tmp_path / "broken"
    for name, files in TREE.items():
        for rel, _ in files:
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(photos / name / rel, root / name / rel)
    bad = root / "dog" / "d3.PNG"
    bad.unlink()
    if content == "garbage":
        bad.write_bytes(b"\x00" * 100)
    else:  # a float TIFF (mode F): no range to scale to 8 bits, refused as training would
        Image.fromarray(np.ones((8, 8), np.float32)).save(bad, "TIFF")
    out = tmp_path / "out"
    proc = build_folder(root, out, *EVERY_IMAGE, check=False)
    assert proc.returncode == 2 and f"{bad} is not a readable image" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_is_decoded_and_refused_before_the_dataset_is_built(
    photos, tmp_path, fmt
):
    """Its header parses, so only decoding finds it; `--verify header` lets it through."""
    root = tmp_path / "truncated"
    for name, files in TREE.items():
        for rel, _ in files:
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(photos / name / rel, root / name / rel)
    bad = root / "bird" / "b3.jpg"
    bad.unlink()
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(bad, fmt)  # PIL reads by content: a PNG named .jpg is fine
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size * 2 // 3])
    with Image.open(bad) as header_only:
        assert header_only.size == (64, 64)
    out = tmp_path / "out"
    proc = build_folder(root, out, *EVERY_IMAGE, check=False)
    assert proc.returncode == 2
    assert f"error: {bad} is not a readable image (" in proc.stderr
    assert "truncated" in proc.stderr.lower() and not out.exists()
    build_folder(root, out, *EVERY_IMAGE, "--verify", "header")
    assert (out / "manifest.json").is_file()


def test_at_most_takes_what_small_classes_have_and_keeps_empty_classes(photos, tmp_path):
    from data_prep.layout import Layout

    root = tmp_path / "longtail"
    for i in range(12):
        (root / "bird").mkdir(parents=True, exist_ok=True)
        os.link(photos / "bird" / f"b{i}.jpg", root / "bird" / f"b{i}.jpg")
    (root / "fox").mkdir()
    for i in range(2):
        os.link(photos / "bird" / f"b{i}.jpg", root / "fox" / f"f{i}.jpg")
    (root / "eel").mkdir()
    out = tmp_path / "out"
    run_command(
        "-m",
        "data_prep",
        "folder",
        "--root",
        str(root),
        "--per-class",
        "4,3,1",
        "--at-most",
        "--out",
        str(out),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["bird", "eel", "fox"]
    assert manifest["counts"]["train"] == {"bird": 4, "eel": 0, "fox": 2}
    assert manifest["counts"]["val"] == {"bird": 3, "eel": 0, "fox": 0}
    assert manifest["counts"]["test"] == 1 and manifest["options"]["at_most"] is True
    layout = Layout(out)
    assert [label for _, _, label in layout.split_items("val")] == [0, 0, 0]
    assert sorted({label for _, _, label in layout.split_items("train")}) == [0, 2]
    # Without --at-most the same tree is refused, naming the first class that is too small.
    proc = run_command(
        "-m",
        "data_prep",
        "folder",
        "--root",
        str(root),
        "--per-class",
        "4,3,1",
        "--out",
        str(tmp_path / "strict"),
        check=False,
    )
    assert proc.returncode == 2 and "class 'eel' has 0 images, too few" in proc.stderr


def linked_copy(photos: Path, root: Path) -> None:
    """`photos` again under `root`, each image a hard link."""
    for name, files in TREE.items():
        for rel, _ in files:
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(photos / name / rel, root / name / rel)


def test_symlinked_images_and_subfolders_are_followed_as_imagefolder_follows_them(photos, tmp_path):
    root, extra = tmp_path / "linked", tmp_path / "elsewhere"
    linked_copy(photos, root)
    (root / "bird" / "b0_again.jpg").symlink_to("b0.jpg")  # relative: dangling from elsewhere
    extra.mkdir()
    for i in range(3):
        os.link(photos / "dog" / f"d{i}.PNG", extra / f"x{i}.png")
    (root / "dog" / "more").symlink_to(extra, target_is_directory=True)
    (extra / "again").symlink_to(".", target_is_directory=True)  # a loop: walked once
    out = tmp_path / "out"
    build_folder(root, out, *EVERY_IMAGE)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["dog"] + counts["val"]["dog"] == 15  # 18 images, 3 of them in test
    for image in [p for p in out.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".jpeg")]:
        assert not image.is_symlink(), image
        with Image.open(image) as opened:
            opened.load()


@pytest.mark.parametrize(
    ("layout", "extra", "problem"),
    [
        ("one class", [], "has 1 class folder: a classifier needs at least 2"),
        ("no test", ["--per-class", "4,3,0"], "puts no image in test; give each split at least"),
        ("no val", ["--per-class", "4,0,1"], "puts no image in val; give each split at least"),
        ("small", ["--per-class", "20,5,1", "--at-most"], "puts no image in val or test"),
        ("link up", [], "is a link to"),
        ("out inside", [], "lies inside --root"),
    ],
)
def test_a_dataset_that_cannot_train_or_be_predicted_is_refused_before_any_file(
    photos, tmp_path, layout, extra, problem
):
    root = tmp_path / "mine"
    linked_copy(photos, root)
    out = tmp_path / "out"
    if layout == "one class":
        for name in ("cat", "dog"):
            shutil.rmtree(root / name)
    if layout == "out inside":
        out = root / "dataset"
    if layout == "link up":  # would file the dog images under cat, and loop
        (root / "cat" / "up").symlink_to("..", target_is_directory=True)
    proc = build_folder(root, out, *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and problem in line
    assert not out.exists()


def test_an_image_past_pils_decompression_bomb_limit_is_one_line(photos, tmp_path):
    """Its header alone says 20,000 x 20,000 pixels: PIL refuses to open it."""
    root = tmp_path / "bomb"
    linked_copy(photos, root)
    bomb = root / "cat" / "huge.png"
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(header))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )
    for verify in ("decode", "header"):
        proc = build_folder(root, tmp_path / "out", *EVERY_IMAGE, "--verify", verify, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert line.startswith(f"error: {bomb} is not a readable image (") and "bomb" in line

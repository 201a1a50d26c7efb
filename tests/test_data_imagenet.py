"""`python -m data_prep imagenet` on a miniature ImageNet tree built from the official lists.

The tree holds the first three classes (sorted wnids) with the real file names of the lists:
their 150 train, 150 val and 150 test (ImageNet val) entries, as small JPEGs, plus one CMYK JPEG,
one grayscale JPEG and one PNG named .JPEG, as ImageNet has. `--classes 3` builds just those
classes after verifying the full lists.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from data_prep import imagenet
from data_prep import place as place_module
from data_prep.splits import read_splits
from tests.conftest import ROOT, run_command

N_CLASSES = 3


class MiniImageNet:
    """The expected dataset, computed from the plain lists, and the two source trees."""

    def __init__(self, lists: dict[str, list], base: Path):
        self.classes = sorted({w for w, _ in lists["train"]})[:N_CLASSES]
        keep = set(self.classes)
        self.train = [(w, f) for w, f in lists["train"] if w in keep]
        self.val = [(w, f) for w, f in lists["val"] if w in keep]
        self.test = [(i, *e.split("/")) for i, e in enumerate(lists["test"]) if e[:9] in keep]
        self.root = base / "imagenet"  # val in class folders
        self.flat = base / "imagenet_flat"  # val flat, same files (hard links)
        self.cmyk = self.root / "train" / self.train[0][0] / self.train[0][1]
        self.gray = self.root / "train" / self.val[60][0] / self.val[60][1]
        self.png = self.root / "val" / self.test[5][1] / self.test[5][2]

    def expected_files(self) -> dict[str, Path]:
        """Output path -> source path, straight from the lists."""
        files = {f"train/{w}/{f}": self.root / "train" / w / f for w, f in self.train}
        files |= {f"val/{w}/{f}": self.root / "train" / w / f for w, f in self.val}
        files |= {f"test/imgs/img_{i}.JPEG": self.root / "val" / w / f for i, w, f in self.test}
        return files

    def expected_labels(self) -> list[str]:
        return ["Image IDs,label"] + [
            f"img_{i}.JPEG,{self.classes.index(w)}" for i, w, _ in self.test
        ]

    def write(self) -> None:
        rng = np.random.default_rng(0)
        for src in self.expected_files().values():
            h, w = (48, 64) if rng.random() < 0.5 else (64, 48)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            src.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels)
            if src == self.cmyk:
                image.convert("CMYK").save(src, format="JPEG", quality=90)
            elif src == self.gray:
                image.convert("L").save(src, format="JPEG", quality=90)
            else:
                image.save(src, format="PNG" if src == self.png else "JPEG", quality=90)
        shutil.copytree(self.root / "train", self.flat / "train", copy_function=os.link)
        (self.flat / "val").mkdir()
        for _, w, f in self.test:
            os.link(self.root / "val" / w / f, self.flat / "val" / f)


@pytest.fixture(scope="module")
def mini(official_lists, tmp_path_factory) -> MiniImageNet:
    tree = MiniImageNet(official_lists, tmp_path_factory.mktemp("mini"))
    tree.write()
    return tree


def imagenet_args(root: Path, out: Path, *extra: str) -> list[str]:
    """A build from the shipped lists, as `make data IMAGENET=root` runs it."""
    return [
        "-m",
        "data_prep",
        "imagenet",
        "--imagenet",
        str(root),
        "--out",
        str(out),
        "--classes",
        str(N_CLASSES),
        *extra,
    ]


def build(root, out, *extra, check=True):
    return run_command(*imagenet_args(root, out, *extra), check=check)


@pytest.fixture(scope="module")
def linked(mini, tmp_path_factory) -> Path:
    """One complete link-mode build, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("linked") / "imagenet50"
    build(mini.root, out)
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def output_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def snapshot(out: Path) -> dict[str, str]:
    """Path -> sha256 of the contents of every file of a build."""
    return {rel: hashlib.sha256((out / rel).read_bytes()).hexdigest() for rel in output_files(out)}


def test_builds_the_exact_layout_with_hard_links(mini, linked):
    expected = mini.expected_files()
    assert output_files(linked) == set(expected) | {
        "test_labels.csv",
        "manifest.json",
        ".data_prep.json",
    }
    assert all(os.path.samefile(linked / rel, src) for rel, src in expected.items())
    assert (linked / "test_labels.csv").read_text().splitlines() == mini.expected_labels()
    meta = manifest(linked)
    assert meta["classes"] == mini.classes
    assert meta["counts"]["train"] == dict.fromkeys(mini.classes, 50)
    assert meta["counts"]["val"] == dict.fromkeys(mini.classes, 50)
    assert meta["counts"]["test"] == 150
    assert meta["source"] == "imagenet" and meta["options"] == {"classes": 3, "resize": None}
    assert meta["inputs"]["val_layout"] == "classes"
    lines = sorted(
        f"{rel}\t{(linked / rel).stat().st_size}\n"
        for rel in output_files(linked)
        if rel not in ("manifest.json", ".data_prep.json")
    )
    assert meta["checksum"] == hashlib.sha256("".join(lines).encode()).hexdigest()


@pytest.mark.parametrize(
    ("variables", "expected"), [([], []), (["SPLITS=/toolkit"], ["--splits", "/toolkit"])]
)
def test_make_data_passes_splits_only_when_given(variables, expected):
    # A dry run prints the recipe: the argv of `build` above, which the other tests run.
    proc = subprocess.run(
        ["make", "-n", "data", "IMAGENET=/imagenet", *variables, "DATA_ARGS=--classes 3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if "data_prep" in line]
    argv = ["-m", "data_prep", "imagenet", "--imagenet", "/imagenet", *expected, "--classes", "3"]
    assert commands == [argv]


@pytest.mark.parametrize(
    ("target", "variables", "expected"),
    [
        ("data", ["IMAGENET=/my data/imagenet"], ["--imagenet", "/my data/imagenet"]),
        ("data", ["FOLDER=/my photos", "PER_CLASS=2, 1, 1"], ["--root", "/my photos"]),
        ("evaluate", ["SUBMISSION=/my subs/a.csv", "LABELS=/l s.csv"], ["/my subs/a.csv"]),
        ("ensemble", ["MODELS=a b", "NAME=my best"], ["--name", "my best"]),
        ("tensorboard", ["LOGDIR=/my runs"], ["--logdir", "/my runs"]),
    ],
)
def test_make_passes_a_path_or_name_with_spaces_as_one_argument(target, variables, expected):
    proc = subprocess.run(
        ["make", "-n", target, *variables], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = proc.stdout.replace("\\\n", " ").splitlines()  # a recipe's continued lines joined
    [argv] = [shlex.split(line) for line in lines if " -m " in line]
    assert any(argv[i : i + len(expected)] == expected for i in range(len(argv)))


def test_the_toolkit_pickles_build_the_same_dataset(mini, linked, splits_dir, tmp_path):
    out = tmp_path / "from_pickles"
    build(mini.root, out, "--splits", str(splits_dir))
    assert snapshot(out) == snapshot(linked)


def test_the_flat_val_layout_gives_the_same_dataset(mini, linked, tmp_path):
    out = tmp_path / "flat"
    build(mini.flat, out)
    assert manifest(out)["inputs"]["val_layout"] == "flat"
    assert manifest(out)["checksum"] == manifest(linked)["checksum"]
    assert snapshot(out) == snapshot(linked) | {"manifest.json": snapshot(out)["manifest.json"]}
    first = mini.test[0]
    assert os.path.samefile(out / f"test/imgs/img_{first[0]}.JPEG", mini.flat / "val" / first[2])


def test_a_rerun_restores_deleted_outputs_and_keeps_the_rest(mini, tmp_path):
    out = tmp_path / "rerun"
    build(mini.root, out)
    before = snapshot(out)
    deleted = [
        "train/" + "/".join(mini.train[3]),
        f"test/imgs/img_{mini.test[7][0]}.JPEG",
        "test_labels.csv",
        "manifest.json",
    ]
    for rel in deleted:
        (out / rel).unlink()
    proc = build(mini.root, out)
    assert snapshot(out) == before
    assert "train: 150 files (149 kept, 1 linked)" in proc.stdout
    assert "test: 150 files (149 kept, 1 linked)" in proc.stdout


def test_resize_writes_rgb_jpegs_from_cmyk_gray_and_png_named_jpeg(mini, tmp_path):
    out = tmp_path / "small"
    build(mini.root, out, "--resize", "32")
    expected = mini.expected_files()
    assert output_files(out) - {"test_labels.csv", "manifest.json", ".data_prep.json"} == set(
        expected
    )
    for rel, src in expected.items():
        with Image.open(out / rel) as img:
            assert (img.format, img.mode, min(img.size)) == ("JPEG", "RGB", 32), rel
            with Image.open(src) as source:
                # Orientation kept: the long side is the source's long side, scaled.
                assert (img.width > img.height) == (source.width > source.height)
                assert abs(max(img.size) - 32 * max(source.size) / min(source.size)) <= 1
    special = {"cmyk": mini.cmyk, "gray": mini.gray, "png": mini.png}
    for kind, src in special.items():
        rel = next(r for r, s in expected.items() if s == src)
        with Image.open(src) as source:
            want = np.asarray(source.convert("RGB").resize(Image.open(out / rel).size), float)
        got = np.asarray(Image.open(out / rel), float)
        # Noise images: a faithful conversion stays close to PIL's own, a wrong one does not.
        assert np.abs(got.mean((0, 1)) - want.mean((0, 1))).max() < 8, kind
    assert manifest(out)["options"] == {"classes": 3, "resize": 32}


def test_copy_and_symlink_modes_hold_the_same_bytes(mini, linked, tmp_path):
    copied, symlinked = tmp_path / "copied", tmp_path / "symlinked"
    build(mini.root, copied, "--mode", "copy")
    build(mini.root, symlinked, "--mode", "symlink")
    reference = snapshot(linked)
    for out in (copied, symlinked):
        assert manifest(out)["checksum"] == manifest(linked)["checksum"]
        assert {k: v for k, v in snapshot(out).items() if k != "manifest.json"} == {
            k: v for k, v in reference.items() if k != "manifest.json"
        }
    for rel, src in mini.expected_files().items():
        assert not (copied / rel).is_symlink() and not os.path.samefile(copied / rel, src)
        assert (symlinked / rel).is_symlink() and os.readlink(symlinked / rel) == str(src)


def test_a_rebuild_in_copy_mode_replaces_a_symlink_build_s_links_and_the_manifest_says_so(
    mini, linked, tmp_path
):
    out, images = tmp_path / "out", len(mini.expected_files())
    assert manifest(linked)["inputs"]["placed"] == {"files": 1, "hard links": images}
    build(mini.root, out, "--mode", "symlink")
    assert manifest(out)["inputs"]["placed"] == {"files": 1, "symlinks": images}
    build(mini.root, out, "--mode", "copy")  # so that the source can be deleted
    assert not [rel for rel in mini.expected_files() if (out / rel).is_symlink()]
    assert manifest(out)["inputs"]["placed"] == {"files": 1 + images}
    assert manifest(out)["checksum"] == manifest(linked)["checksum"]


def test_a_rebuild_in_copy_mode_over_a_link_build_shares_no_bytes_with_the_originals(
    mini, linked, tmp_path
):
    out, images = tmp_path / "out", len(mini.expected_files())
    shutil.copytree(linked, out, copy_function=os.link)  # the link build's hard links, again
    build(mini.root, out, "--mode", "copy")
    assert [rel for rel in mini.expected_files() if (out / rel).stat().st_nlink > 1] == []
    assert manifest(out)["inputs"]["placed"] == {"files": 1 + images}
    assert manifest(out)["checksum"] == manifest(linked)["checksum"]
    # A backup tool's hard links of the copies (rsnapshot, cp -al) are not the originals: kept.
    shutil.copytree(out, tmp_path / "backup", copy_function=os.link)
    build(mini.root, out, "--mode", "copy")
    for rel in mini.expected_files():
        assert os.path.samefile(out / rel, tmp_path / "backup" / rel), rel


@pytest.mark.parametrize("old_copy", ["moved", "kept"])
def test_a_symlink_build_whose_source_moved_is_repaired_by_a_rebuild_from_the_new_place(
    mini, linked, tmp_path, old_copy
):
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "symlinked"
    shutil.copytree(mini.root, old, copy_function=os.link)
    build(old, out, "--mode", "symlink")
    if old_copy == "moved":  # every link of the build dangles (training names `make data`)
        old.rename(new)
    else:  # the links still work, yet the dataset must follow the place it is built from
        shutil.copytree(old, new, copy_function=os.link)
    build(new, out, "--mode", "symlink")
    assert manifest(out)["checksum"] == manifest(linked)["checksum"]
    for rel in mini.expected_files():
        assert Path(os.readlink(out / rel)).is_relative_to(new), rel


def test_a_killed_run_then_a_rerun_equals_an_uninterrupted_run(mini, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    build(mini.root, whole, "--resize", "40")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = imagenet_args(mini.root, killed, "--resize", "40", "--workers", "1")
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (killed / "train").is_dir() and len(list((killed / "train").rglob("*"))) > 20:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert not (killed / "manifest.json").exists()
    images = [p for p in killed.rglob("*.JPEG")]
    assert 0 < len(images) < 450
    for path in images:  # every file under its final name is complete
        with Image.open(path) as img:
            img.load()
    build(mini.root, killed, "--resize", "40")
    assert manifest(killed)["checksum"] == manifest(whole)["checksum"]
    assert snapshot(killed) == snapshot(whole)
    assert not [p for p in killed.rglob("*.tmp")]


def test_missing_images_are_counted_and_named_before_any_output(mini, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(mini.root, root, copy_function=os.link)
    gone = [root / "train" / w / f for w, f in mini.val[:7]]
    for path in gone:
        path.unlink()
    out = tmp_path / "out"
    proc = build(root, out, check=False)
    assert proc.returncode == 2
    assert "7 of 300 files listed in the train and val lists are missing" in proc.stderr
    assert str(gone[0]) in proc.stderr and str(gone[4]) in proc.stderr
    assert not out.exists()


def test_a_missing_imagenet_folder_is_an_error(tmp_path):
    proc = build(tmp_path / "nowhere", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert f"{tmp_path / 'nowhere'} is not a folder" in proc.stderr
    kaggle = tmp_path / "kaggle"  # the Kaggle download: train/ and val/ two levels down
    (kaggle / "ILSVRC/Data/CLS-LOC/train").mkdir(parents=True)
    with pytest.raises(UserError, match=f"pass --imagenet {kaggle}/ILSVRC/Data/CLS-LOC$"):
        imagenet.make_plan(kaggle, read_splits(None), 1, None)


def test_an_unreadable_image_stops_a_resize_build(mini, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(mini.root, root, copy_function=os.link)
    bad = root / "train" / mini.train[10][0] / mini.train[10][1]
    bad.unlink()
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    proc = build(root, out, "--resize", "32", check=False)
    assert proc.returncode == 2
    assert f"{bad} is not a readable image" in proc.stderr
    assert not (out / "manifest.json").exists()


def test_a_folder_holding_another_dataset_is_refused(mini, linked, tmp_path):
    before = snapshot(linked)
    proc = build(mini.root, linked, "--resize", "32", check=False)
    assert proc.returncode == 2 and "holds a different dataset" in proc.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = build(mini.root, foreign, check=False)
    assert proc.returncode == 2 and "holds files that data_prep did not write" in proc.stderr
    assert snapshot(linked) == before and output_files(foreign) == {"notes.txt"}


def test_a_stray_file_in_an_own_folder_is_refused(mini, tmp_path):
    out = tmp_path / "stray"
    build(mini.root, out)
    (out / "train" / mini.classes[0] / "extra.JPEG").write_bytes(b"x")
    proc = build(mini.root, out, check=False)
    assert proc.returncode == 2 and "train/" + mini.classes[0] + "/extra.JPEG" in proc.stderr


def test_hard_links_fall_back_to_copies_across_file_systems(tmp_path, monkeypatch):
    src = tmp_path / "src.JPEG"
    src.write_bytes(b"pixels")

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(place_module.os, "link", cross_device)
    assert place_module.place(src, tmp_path / "dst.JPEG", "link") == "copied"
    assert (tmp_path / "dst.JPEG").read_bytes() == b"pixels"
    assert not os.path.samefile(src, tmp_path / "dst.JPEG")
    assert place_module.place(src, tmp_path / "dst.JPEG", "link") == "kept"


def test_a_source_that_vanished_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"cannot link .*gone\.JPEG .*No such file"):
        place_module.place(tmp_path / "gone.JPEG", tmp_path / "dst.JPEG", "link")


@pytest.mark.skipif(
    not os.access("/dev/shm", os.W_OK) or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
    reason="needs /dev/shm on a file system other than /tmp",
)
def test_hard_links_fall_back_to_copies_on_a_real_second_file_system(tmp_path):
    shm = Path("/dev/shm") / f"data_prep_test_{os.getpid()}"
    shm.mkdir()
    try:
        src = shm / "a.JPEG"
        src.write_bytes(b"pixels")
        assert place_module.place(src, tmp_path / "a.JPEG", "link") == "copied"
        assert (tmp_path / "a.JPEG").read_bytes() == b"pixels"
    finally:
        shutil.rmtree(shm)

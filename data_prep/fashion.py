"""`python -m data_prep fashion`: the embedded benchmark, Fashion-MNIST under the VIPriors protocol.

The VIPriors protocol (docs/recipe.md section 1) at desk size: 50 train and 50 val images per class,
drawn without overlap from Fashion-MNIST's training set with a seeded generator, and the whole
10,000-image test set as `test/imgs/img_<i>.png` in a seeded shuffled order. Images are
grayscale PNGs (the loaders convert to RGB). Train/val files are named `fmnist_<index>.png`
after their index in the training set, so every image can be traced to its source.
The same seed gives byte-identical files: PNG encoding is deterministic, and the generator is
numpy's PCG64, stable across versions for `permutation`.
"""

from __future__ import annotations

import argparse
import gzip
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError
from common.fs import write_bytes_atomic
from data_prep.build import Plan, build
from data_prep.layout import test_name

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's label order, as folder names; the sorted order defines the class index.
LABEL_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
PER_CLASS = (50, 50)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("data/fashion50"), help="default: data/fashion50"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and test order")
    parser.add_argument("--idx", type=Path, default=IDX_DIR, help="folder of the .gz idx files")
    parser.add_argument("--workers", type=int, default=4, help="PNG writer threads")


def run(args: argparse.Namespace) -> None:
    train = read_idx(args.idx, "train")
    test = read_idx(args.idx, "test")
    plan = replace(make_plan(train, test, args.seed), inputs={"idx": str(args.idx.resolve())})
    build(args.out, plan, write_png, args.workers)


def read_idx(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of `part` ("train" or "test")."""
    images_file, labels_file = (folder / name for name in IDX_FILES[part])
    images = _idx_array(images_file, magic=2051)
    labels = _idx_array(labels_file, magic=2049)
    if images.ndim != 3 or len(images) != len(labels) or labels.max() >= len(LABEL_NAMES):
        raise UserError(f"{images_file} and {labels_file} do not match; reinstall Fashion-MNIST")
    return images, labels


def _idx_array(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file: a big-endian magic (0x08 = uint8, then the rank), shape, then data."""
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise UserError(
            f"{path} is missing; run `make setup` (installs Debian's dataset-fashion-mnist) "
            "or pass --idx the folder holding the Fashion-MNIST .gz files"
        ) from None
    except (OSError, EOFError) as err:
        raise UserError(f"{path} is not a readable gzip file ({err}); reinstall it") from None
    ndim = magic & 0xFF
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim) if len(data) >= 4 + 4 * ndim else []
    if len(header) != 1 + ndim or header[0] != magic:
        raise UserError(f"{path} is not an idx file of magic {magic}; reinstall it")
    shape = tuple(int(n) for n in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({body.size} of {np.prod(shape)} bytes); reinstall")
    return body.reshape(shape)


def make_plan(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int
) -> Plan:
    """The seeded draw: per class 50 train + 50 val from the training set; the test set shuffled."""
    rng = np.random.default_rng(seed)
    classes = sorted(LABEL_NAMES)
    index = {name: classes.index(name) for name in LABEL_NAMES}
    (train_images, train_labels), (test_images, test_labels) = train, test
    n_train, n_val = PER_CLASS
    items = []
    for label, name in enumerate(LABEL_NAMES):
        drawn = rng.permutation(np.flatnonzero(train_labels == label))
        chosen = {"train": drawn[:n_train], "val": drawn[n_train : n_train + n_val]}
        for split, indices in chosen.items():
            items += [(train_images[i], f"{split}/{name}/fmnist_{i:05d}.png") for i in indices]
    order = rng.permutation(len(test_labels))
    names = [test_name(i, ".png") for i in range(len(order))]
    labels = [index[LABEL_NAMES[test_labels[j]]] for j in order]
    items += [(test_images[j], f"test/imgs/{name}") for name, j in zip(names, order, strict=True)]
    return Plan(
        source="fashion",
        options={"seed": seed, "per_class": list(PER_CLASS)},
        classes=classes,
        items=items,
        test_labels=list(zip(names, labels, strict=True)),
    )


def write_png(pixels: np.ndarray, dst: Path) -> str:
    if dst.exists():
        return "kept"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_bytes_atomic(dst, buffer.getvalue())
    return "written"

"""`python -m data_prep folder`: a user's own `ImageFolder`-style tree in the VIPriors layout.

`--root DIR` holds one folder per class (images may sit in subfolders, as `ImageFolder` allows).
`--per-class TRAIN,VAL,TEST` gives each split a count per class (`50`) or a fraction of the
class's images (`0.5`, rounded half up); the draw is stratified (every class on its own) and
seeded, and the test images of all classes are then shuffled into `test/imgs/img_<i>.<ext>`,
keeping each source file's extension. A class with too few images is an error that names it;
with `--at-most` the counts are maxima instead: a class with fewer images gives what it has (train
first, then val, then test), and an empty class folder stays a class (a long-tailed collection;
`make smoke`'s 1,000 classes, most of them empty, so that TenCrop at 600 px stays affordable).
Files are placed as `imagenet` places them (hard links by default, `--mode`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.cli import make_command
from common.errors import UserError
from data_prep.build import SPLITS, Plan, build
from data_prep.layout import is_image, test_name
from data_prep.place import MODES, add_verify_argument, file_writer

COUNT = re.compile(r"^\d+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="one folder per class")
    parser.add_argument(
        "--per-class", default="50,50,0.5", help="TRAIN,VAL,TEST counts or fractions"
    )
    parser.add_argument(
        "--at-most",
        action="store_true",
        help="counts are maxima: small classes give what they have",
    )
    parser.add_argument("--out", type=Path, help="default: data/<name of --root>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="link", help="default: hard links")
    parser.add_argument("--workers", type=int, default=8, help="I/O threads")
    add_verify_argument(parser)


def run(args: argparse.Namespace) -> None:
    root = args.root.resolve()
    if not root.is_dir():
        raise UserError(f"--root {args.root} is not a folder; pass the folder of class folders")
    out = args.out if args.out is not None else Path("data") / root.name
    if out.resolve().is_relative_to(root):
        raise UserError(
            f"--out {out} lies inside --root {args.root}: a rerun would read it as a class; "
            "choose a folder outside it"
        )
    spec = parse_per_class(args.per_class)
    images = class_images(root)
    plan = make_plan(images, spec, args.seed, args.at_most)
    require_every_split(plan, args.per_class)
    plan = replace(plan, inputs={"root": str(root), "mode": args.mode})
    build(out, plan, file_writer(args.mode, None), args.workers, args.verify)
    print(train_hint(out, len(plan.classes)))


def train_hint(out: Path, num_classes: int) -> str:
    """How to train on the new dataset: these two overrides are all the paper's recipe needs;
    a data config of one's own names a dataset's other choices."""
    train = make_command("train", "effnet_b7", [f"data_dir={out}", f"num_classes={num_classes}"])
    return (
        f"train on it: {train}, or DATA=<a .yaml file: configs/data/imagenet50.yaml with these "
        "two keys and your images' mean and std>"
    )


def require_every_split(plan: Plan, per_class: str) -> None:
    """Training needs train images, held-out scores and `make logits` val images, and logits
    predict the test images: a split left empty by --per-class (0, or --at-most on small
    classes) is refused before any file."""
    splits = {rel.split("/", 1)[0] for _, rel in plan.items}
    _refuse_empty([split for split in SPLITS if split not in splits], per_class)


def _refuse_empty(empty: list[str], per_class: str) -> None:
    if empty:
        raise UserError(
            f"--per-class {per_class} puts no image in {' or '.join(empty)}; give each split at "
            "least 1 image per class (or a fraction)"
        )


def parse_per_class(text: str) -> list[int | float]:
    """`"50,50,0.5"` -> [50, 50, 0.5]: integers are counts, values in (0, 1) fractions."""
    values = [_count_or_fraction(part.strip()) for part in text.split(",")]
    if len(values) != 3 or None in values:
        raise UserError(
            f"--per-class {text!r} is not TRAIN,VAL,TEST; give three counts (50) or fractions "
            "in (0, 1) (0.5), e.g. --per-class 50,50,0.5"
        )
    _refuse_empty([split for split, value in zip(SPLITS, values, strict=True) if value == 0], text)
    return values


def _count_or_fraction(text: str) -> int | float | None:
    if COUNT.match(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < 1 else None


def class_images(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """Each class's images as (path, output name), sorted so that the seed alone decides the draw.

    An image in a subfolder of a class folder gets its relative path with "/" written "__" as
    its output name, since the output keeps one flat folder per class.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(
            f"--root {root} has {len(classes)} class folder{'s' * (len(classes) != 1)}: a "
            "classifier needs at least 2; put each class's images in a folder of its own"
        )
    images = {}
    for name in classes:
        found = {}
        for folder, files in _class_folders(root, name):
            for file in files:
                path = folder / file
                if is_image(path):
                    flat = "__".join(path.relative_to(root / name).parts)
                    if flat in found:
                        raise UserError(
                            f"{path} and {found[flat]} would both become {name}/{flat}; "
                            "rename one of them"
                        )
                    found[flat] = path
        images[name] = sorted((path, flat) for flat, path in found.items())
    return images


def _class_folders(root: Path, name: str) -> Iterator[tuple[Path, list[str]]]:
    """The folders of one class and their files. Symlinked subfolders are followed, as
    torchvision's ImageFolder follows them, each real folder once (a link back up the class is
    no loop); a link to another part of --root would file another class's images under this
    one, and is refused."""
    home, seen = (root / name).resolve(), set()
    for dirpath, dirnames, files in os.walk(root / name, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if real.is_relative_to(root) and not real.is_relative_to(home):
            raise UserError(
                f"{dirpath} is a link to {real}, outside its class but inside --root: its images "
                "would be filed under two classes; remove the link"
            )
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield Path(dirpath), files


def split_sizes(n: int, spec: list[int | float]) -> list[int]:
    """Counts per split for a class of `n` images; fractions round half up."""
    return [v if isinstance(v, int) else math.floor(v * n + 0.5) for v in spec]


def available_sizes(n: int, sizes: list[int]) -> list[int]:
    """`--at-most`: each split takes what is left of the class's `n` images, in split order."""
    out = []
    for size in sizes:
        out.append(min(size, n - sum(out)))
    return out


def make_plan(
    images: dict[str, list[tuple[Path, str]]],
    spec: list[int | float],
    seed: int,
    at_most: bool = False,
) -> Plan:
    """The stratified seeded draw, then one seeded shuffle of all test images."""
    rng = np.random.default_rng(seed)
    classes = sorted(images)
    items, test_pool = [], []
    for label, name in enumerate(classes):
        files = images[name]
        n_train, n_val, n_test = split_sizes(len(files), spec)
        if at_most:
            n_train, n_val, n_test = available_sizes(len(files), [n_train, n_val, n_test])
        elif n_train < 1 or n_val < 1 or n_train + n_val + n_test > len(files):
            raise UserError(
                f"class {name!r} has {len(files)} images, too few for --per-class "
                f"{','.join(map(str, spec))} ({n_train} train, {n_val} val, {n_test} test); "
                "add images to it, remove it, or lower --per-class"
            )
        drawn = [files[i] for i in rng.permutation(len(files))]
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val)}
        for split, (lo, hi) in bounds.items():
            items += [(src, f"{split}/{name}/{flat}") for src, flat in drawn[lo:hi]]
        test_pool += [(src, label) for src, _ in drawn[n_train + n_val : n_train + n_val + n_test]]
    order = rng.permutation(len(test_pool))
    names = [test_name(i, test_pool[j][0].suffix) for i, j in enumerate(order)]
    items += [(test_pool[j][0], f"test/imgs/{name}") for name, j in zip(names, order, strict=True)]
    options = {"per_class": spec, "seed": seed} | ({"at_most": True} if at_most else {})
    return Plan(
        source="folder",
        options=options,
        classes=classes,
        items=items,
        test_labels=[(name, test_pool[j][1]) for name, j in zip(names, order, strict=True)],
    )

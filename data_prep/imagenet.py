"""`python -m data_prep imagenet`: the VIPriors ImageNet subset from an ImageNet-1k copy.

Follows the challenge toolkit and docs/recipe.md section 1: the official split lists ship in
`data_prep/vipriors/` (`--splits DIR` reads the toolkit's pickles instead and checks that they
equal the shipped lists). Train and val images come from `ROOT/train/<wnid>/<file>` as the lists
name them; test entry `i` (`wnid/ILSVRC2012_val_*.JPEG`) is ImageNet val image
`ROOT/val/<wnid>/<file>` or, in the flat layout many copies use, `ROOT/val/<file>`, and becomes
`test/imgs/img_<i>.JPEG` as the toolkit names it. The wnid of a test entry only goes to
`test_labels.csv`.

Everything is checked before a file is touched: the lists (`splits.py`), the ImageNet folders,
and the presence of every listed image.

`--classes N` (for tests and trials on a partial ImageNet copy) still verifies the full lists,
then builds only the first N classes in sorted-wnid order; test images keep their official
index, so `img_<i>.JPEG` names the same image as in a full build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError
from data_prep.build import Plan, build
from data_prep.layout import test_name
from data_prep.place import MODES, add_verify_argument, file_writer, require_files
from data_prep.splits import NUM_CLASSES, SHIPPED, Splits, read_splits

FIX = "check that --imagenet is the ImageNet-1k root holding train/<wnid>/ and val/"
KAGGLE = Path("ILSVRC/Data/CLS-LOC")  # where the Kaggle download keeps train/ and val/


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--imagenet", type=Path, help="ImageNet-1k root (train/ and val/)")
    parser.add_argument(
        "--splits",
        type=Path,
        help="the toolkit's train/val/test.pickle folder, checked against the shipped lists "
        "(default: the shipped data_prep/vipriors/)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("data/imagenet50"), help="default: data/imagenet50"
    )
    parser.add_argument("--mode", choices=MODES, default="link", help="default: hard links")
    parser.add_argument(
        "--resize", type=int, metavar="SHORT_SIDE", help="write RGB JPEGs downscaled to this"
    )
    parser.add_argument("--workers", type=int, default=8, help="I/O threads")
    add_verify_argument(parser)
    parser.add_argument("--check", action="store_true", help="verify the split lists and stop")
    # For tests and trials on a partial ImageNet. The full lists are still verified (one code
    # path for verification), then only the subset is built; the manifest records it, so such
    # a folder is never mistaken for the full dataset.
    parser.add_argument(
        "--classes",
        type=int,
        default=NUM_CLASSES,
        metavar="N",
        help="testing: build only the first N classes (sorted wnids); test ids stay official",
    )


def run(args: argparse.Namespace) -> None:
    splits = read_splits(args.splits)
    if args.check:
        print(f"{args.splits or SHIPPED}: the official VIPriors lists (verified)")
        return
    if not 1 <= args.classes <= NUM_CLASSES:
        raise UserError(f"--classes {args.classes} is out of range; use 1..{NUM_CLASSES}")
    if args.resize is not None and args.resize < 1:
        raise UserError(f"--resize {args.resize} must be a positive short side in pixels")
    if args.imagenet is None:
        raise UserError("--imagenet is missing; pass the ImageNet-1k root (train/ and val/)")
    plan = make_plan(args.imagenet, splits, args.classes, args.resize, args.mode)
    build(args.out, plan, file_writer(args.mode, args.resize), args.workers, args.verify)


def make_plan(
    root: Path, splits: Splits, n_classes: int, resize: int | None, mode: str = "link"
) -> Plan:
    """Where every listed image comes from and goes to; fails if any source is missing."""
    root = root.resolve()  # symlinks must hold absolute targets
    for folder in (root, root / "train", root / "val"):
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; {root_fix(root)}")
    splits, test_index = splits.first_classes(n_classes)
    classes = splits.classes
    flat = val_layout(root, splits) == "flat"
    items = [(root / "train" / w / f, f"train/{w}/{f}") for w, f in splits.train]
    items += [(root / "train" / w / f, f"val/{w}/{f}") for w, f in splits.val]
    require_files([src for src, _ in items], "the train and val lists", FIX)
    test_src = [root / "val" / f if flat else root / "val" / w / f for w, f in splits.test]
    require_files(test_src, "the test list", FIX)
    index = {w: i for i, w in enumerate(classes)}
    pairs = zip(test_index, splits.test, strict=True)
    names = [test_name(i, Path(f).suffix) for i, (_, f) in pairs]
    items += [(src, f"test/imgs/{name}") for src, name in zip(test_src, names, strict=True)]
    return Plan(
        source="imagenet",
        options={"classes": n_classes, "resize": resize},
        classes=classes,
        items=items,
        test_labels=[(name, index[w]) for name, (w, _) in zip(names, splits.test, strict=True)],
        inputs={
            "imagenet": str(root),
            "val_layout": "flat" if flat else "classes",
            "mode": mode if resize is None else "resize",
        },
    )


def root_fix(root: Path) -> str:
    """The fix for a root without train/ and val/: the Kaggle layout's own root, if it is one."""
    if (root / KAGGLE).is_dir():
        return f"{root} holds the Kaggle layout: pass --imagenet {root / KAGGLE}"
    return FIX


def val_layout(root: Path, splits: Splits) -> str:
    """The layout of ImageNet val: "classes" (`val/<wnid>/<file>`) or "flat" (`val/<file>`)."""
    wnid, name = splits.test[0]
    if (root / "val" / wnid / name).is_file():
        return "classes"
    if (root / "val" / name).is_file():
        return "flat"
    raise UserError(
        f"{root / 'val'} holds neither {wnid}/{name} nor {name}: the ImageNet val images "
        f"are missing; {FIX}"
    )

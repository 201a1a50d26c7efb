"""The official VIPriors split lists: safe loading and verification.

Follows the challenge toolkit (`image-classification/{train,val,test}.pickle`) and RECIPE.md
section 1. The pickles are data, so they are read with an unpickler that refuses every global:
nothing in them can name a callable, hence nothing can run. Verification checks every property
the later stages rely on before a single image is touched, so a wrong list fails in a second
instead of after an hour of copying.
"""

from __future__ import annotations

import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

NUM_CLASSES = 1000
PER_CLASS = 50
NUM_TEST = 50_000
SPLIT_FILES = ("train.pickle", "val.pickle", "test.pickle")
WNID = re.compile(r"^n\d{8}$")
TRAIN_FILE = re.compile(r"^(n\d{8})_\d+\.JPEG$")
TEST_ENTRY = re.compile(r"^(n\d{8})/(ILSVRC2012_val_\d{8}\.JPEG)$")
OFFICIAL_HINT = (
    "use the unmodified train/val/test.pickle of the VIPriors toolkit (image-classification/)"
)


class _NoGlobals(pickle.Unpickler):
    """Unpickler that can build lists, tuples and strings but never look up a global.

    Every opcode that could call code (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*, then REDUCE) needs
    a callable, and callables only come from `find_class`; persistent ids are refused by the base
    class. So refusing `find_class` makes loading inert.
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refuses global {module}.{name}")


def load_list(path: Path) -> list:
    """Load a pickled list of strings (or of lists/tuples of strings), refusing anything else."""
    try:
        with open(path, "rb") as fh:
            data = _NoGlobals(fh).load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; pass --splits the folder; {OFFICIAL_HINT}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise UserError(
            f"{path} is not a plain list of strings ({err}); it may carry code: {OFFICIAL_HINT}"
        ) from None
    if not isinstance(data, list) or not all(_is_entry(x) for x in data):
        raise UserError(f"{path} holds something other than a list of strings: {OFFICIAL_HINT}")
    return data


def _is_entry(item: object) -> bool:
    if isinstance(item, str):
        return True
    return isinstance(item, list | tuple) and all(isinstance(s, str) for s in item)


@dataclass(frozen=True)
class Splits:
    """The verified lists: (wnid, file) pairs for train and val, and test in official order."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]

    @property
    def classes(self) -> list[str]:
        return sorted({wnid for wnid, _ in self.train})

    def first_classes(self, n: int) -> tuple[Splits, list[int]]:
        """The entries of the first `n` classes (sorted wnids), and the official test indices kept.

        Test entries keep their official index, so `img_<i>.JPEG` is the same image as in a full
        build and as on the evaluation server.
        """
        keep = set(self.classes[:n])
        test_idx = [i for i, (wnid, _) in enumerate(self.test) if wnid in keep]
        subset = Splits(
            train=[e for e in self.train if e[0] in keep],
            val=[e for e in self.val if e[0] in keep],
            test=[self.test[i] for i in test_idx],
        )
        return subset, test_idx


def read_splits(folder: Path) -> Splits:
    """Load and verify `train/val/test.pickle` from `folder`; raise `UserError` on any deviation."""
    if not folder.is_dir():
        raise UserError(f"--splits {folder} is not a folder; pass the folder with {OFFICIAL_HINT}")
    train = _pairs(folder / "train.pickle", load_list(folder / "train.pickle"))
    val = _pairs(folder / "val.pickle", load_list(folder / "val.pickle"))
    test = _test_entries(folder / "test.pickle", load_list(folder / "test.pickle"))
    splits = Splits(train, val, test)
    verify(folder, splits)
    return splits


def _pairs(path: Path, entries: list) -> list[tuple[str, str]]:
    pairs = []
    for entry in entries:
        ok = isinstance(entry, list | tuple) and len(entry) == 2
        match = TRAIN_FILE.match(entry[1]) if ok else None
        if match is None or match.group(1) != entry[0]:
            raise UserError(
                f"{path}: entry {entry!r} is not [wnid, '<wnid>_<n>.JPEG']: {OFFICIAL_HINT}"
            )
        pairs.append((entry[0], entry[1]))
    return pairs


def _test_entries(path: Path, entries: list) -> list[tuple[str, str]]:
    test = []
    for entry in entries:
        match = TEST_ENTRY.match(entry) if isinstance(entry, str) else None
        if match is None:
            raise UserError(
                f"{path}: entry {entry!r} is not 'wnid/ILSVRC2012_val_<8 digits>.JPEG': "
                f"{OFFICIAL_HINT}"
            )
        test.append((match.group(1), match.group(2)))
    return test


def verify(folder: Path, splits: Splits) -> None:
    """The properties of the official lists: 1,000 classes, 50 per class, disjoint, 50,000 test."""
    for name, pairs in (("train", splits.train), ("val", splits.val)):
        _check_per_class(folder / f"{name}.pickle", Counter(w for w, _ in pairs))
        _check_unique(folder / f"{name}.pickle", [f for _, f in pairs])
    overlap = sorted({f for _, f in splits.train} & {f for _, f in splits.val})
    if overlap:
        raise UserError(
            f"{folder}: {len(overlap)} files are in both train.pickle and val.pickle "
            f"(e.g. {', '.join(overlap[:3])}): {OFFICIAL_HINT}"
        )
    if {w for w, _ in splits.val} != set(splits.classes):
        raise UserError(f"{folder}: train.pickle and val.pickle name different classes")
    test_path = folder / "test.pickle"
    if len(splits.test) != NUM_TEST:
        raise UserError(
            f"{test_path} has {len(splits.test)} entries, expected {NUM_TEST}: {OFFICIAL_HINT}"
        )
    _check_per_class(test_path, Counter(w for w, _ in splits.test), set(splits.classes))
    _check_unique(test_path, [f for _, f in splits.test])


def _check_per_class(path: Path, counts: Counter, classes: set[str] | None = None) -> None:
    if len(counts) != NUM_CLASSES:
        raise UserError(
            f"{path} names {len(counts)} classes, expected {NUM_CLASSES}: {OFFICIAL_HINT}"
        )
    if classes is not None and set(counts) != classes:
        stray = sorted(set(counts) - classes)
        raise UserError(f"{path} names classes not in train.pickle ({stray[:3]}): {OFFICIAL_HINT}")
    wrong = sorted((w, n) for w, n in counts.items() if n != PER_CLASS)
    if wrong:
        w, n = wrong[0]
        raise UserError(
            f"{path}: class {w} has {n} entries, expected {PER_CLASS} "
            f"({len(wrong)} classes are off): {OFFICIAL_HINT}"
        )


def _check_unique(path: Path, files: list[str]) -> None:
    dupes = sorted(f for f, n in Counter(files).items() if n > 1)
    if dupes:
        raise UserError(
            f"{path} lists {len(dupes)} files twice (e.g. {', '.join(dupes[:3])}): {OFFICIAL_HINT}"
        )

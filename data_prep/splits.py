"""The official VIPriors split lists: the shipped copies, the toolkit's pickles, verification.

Follows the challenge toolkit (`image-classification/{train,val,test}.pickle`) and docs/recipe.md
section 1. The lists ship with this repository in `data_prep/vipriors/` as gzipped CSV, converted
once by `python -m data_prep.convert_splits` (README there: license, checksums); that is what a
build reads by default, and no pickle is loaded then. The toolkit's pickles (`--splits DIR`) are
still accepted: they are read with an unpickler that refuses every global, so nothing in them can
name a callable and nothing can run, and they must equal the shipped lists entry for entry.

Verification checks every property the later stages rely on before a single image is touched, so
a wrong list fails in a second instead of after an hour of copying.
"""

from __future__ import annotations

import csv
import gzip
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

NUM_CLASSES = 1000
PER_CLASS = 50
NUM_TEST = 50_000
NAMES = ("train", "val", "test")
SHIPPED = Path(__file__).resolve().parent / "vipriors"
# The CSV header of each shipped list: train and val rows are [wnid, file]; test rows are the
# toolkit's single `wnid/file` string, whose position is the official test index.
HEADERS = {"train": ["class", "file"], "val": ["class", "file"], "test": ["path"]}
TRAIN_FILE = re.compile(r"^(n\d{8})_\d+\.JPEG$")
TEST_ENTRY = re.compile(r"^(n\d{8})/(ILSVRC2012_val_\d{8}\.JPEG)$")
OFFICIAL_HINT = (
    "use the shipped data_prep/vipriors/ as committed (git checkout data_prep/vipriors) or the "
    "unmodified train/val/test.pickle of the VIPriors toolkit (image-classification/)"
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


def load_csv(path: Path, name: str) -> list:
    """The rows of a shipped list, in the toolkit's entry format (a list per row, or the string)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {OFFICIAL_HINT}") from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path} is not a gzipped UTF-8 CSV ({err}): {OFFICIAL_HINT}") from None
    if not rows or rows[0] != HEADERS[name]:
        raise UserError(
            f"{path} does not start with the header {','.join(HEADERS[name])}: {OFFICIAL_HINT}"
        )
    if name == "test":
        return [row[0] if len(row) == 1 else row for row in rows[1:]]
    return rows[1:]


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


def read_splits(folder: Path | None = None) -> Splits:
    """The verified official lists: the shipped copies, or the toolkit's pickles in `folder`,
    which must then equal the shipped copies; raise `UserError` on any deviation."""
    shipped = read_shipped()
    if folder is None:
        return shipped
    splits = read_pickles(folder)
    for name in NAMES:
        _check_same(folder / f"{name}.pickle", getattr(splits, name), getattr(shipped, name), name)
    return splits


def read_shipped(folder: Path = SHIPPED) -> Splits:
    """Load and verify the lists shipped as `train/val/test.csv.gz` in `folder`."""
    paths = {name: folder / f"{name}.csv.gz" for name in NAMES}
    return _parse(paths, {name: load_csv(path, name) for name, path in paths.items()})


def read_pickles(folder: Path) -> Splits:
    """Load and verify the toolkit's `train/val/test.pickle` from `folder`."""
    if not folder.is_dir():
        raise UserError(f"--splits {folder} is not a folder; pass the folder with {OFFICIAL_HINT}")
    paths = {name: folder / f"{name}.pickle" for name in NAMES}
    return _parse(paths, {name: load_list(path) for name, path in paths.items()})


def _parse(paths: dict[str, Path], entries: dict[str, list]) -> Splits:
    splits = Splits(
        train=_pairs(paths["train"], entries["train"]),
        val=_pairs(paths["val"], entries["val"]),
        test=_test_entries(paths["test"], entries["test"]),
    )
    verify(paths, splits)
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


def _check_same(path: Path, got: list, shipped: list, name: str) -> None:
    """Verified lists have equal lengths, so the first differing entry always exists."""
    if got != shipped:
        i = next(i for i, (a, b) in enumerate(zip(got, shipped, strict=True)) if a != b)
        raise UserError(
            f"{path} differs from the shipped {SHIPPED / f'{name}.csv.gz'} at entry {i} "
            f"({got[i]} instead of {shipped[i]}): use the toolkit's unmodified pickles, or leave "
            "out --splits (SPLITS=) to build from the shipped lists"
        )


def verify(paths: dict[str, Path], splits: Splits) -> None:
    """The properties of the official lists: 1,000 classes, 50 per class, disjoint, 50,000 test."""
    for name in ("train", "val"):
        pairs = getattr(splits, name)
        _check_per_class(paths[name], Counter(w for w, _ in pairs))
        _check_unique(paths[name], [f for _, f in pairs])
    overlap = sorted({f for _, f in splits.train} & {f for _, f in splits.val})
    if overlap:
        raise UserError(
            f"{len(overlap)} files are in both {paths['train']} and {paths['val']} "
            f"(e.g. {', '.join(overlap[:3])}): {OFFICIAL_HINT}"
        )
    if {w for w, _ in splits.val} != set(splits.classes):
        raise UserError(f"{paths['train']} and {paths['val']} name different classes")
    if len(splits.test) != NUM_TEST:
        raise UserError(
            f"{paths['test']} has {len(splits.test)} entries, expected {NUM_TEST}: {OFFICIAL_HINT}"
        )
    _check_per_class(paths["test"], Counter(w for w, _ in splits.test), set(splits.classes))
    _check_unique(paths["test"], [f for _, f in splits.test])


def _check_per_class(path: Path, counts: Counter, classes: set[str] | None = None) -> None:
    if len(counts) != NUM_CLASSES:
        raise UserError(
            f"{path} names {len(counts)} classes, expected {NUM_CLASSES}: {OFFICIAL_HINT}"
        )
    if classes is not None and set(counts) != classes:
        stray = sorted(set(counts) - classes)
        raise UserError(
            f"{path} names classes not in the train list ({stray[:3]}): {OFFICIAL_HINT}"
        )
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

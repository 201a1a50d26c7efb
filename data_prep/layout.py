"""The on-disk layout of a prepared dataset: the contract between `make data` and later stages.

```
<root>/train/<class>/<file>      training images, one folder per class
<root>/val/<class>/<file>        validation images, same classes
<root>/test/imgs/img_<i>.<ext>   test images, named as the challenge's toolkit names them
<root>/test_labels.csv           `Image IDs,label`, local evaluation only: training never reads it
<root>/manifest.json             counts, source, options, checksum; written last: marks completion
```
Class index = position of the class folder name in sorted order (as `ImageFolder` numbers them,
and as the VIPriors submission expects). Every row carries an id: a val image's id is
`<class>/<file>`, a test image's id is its file name `img_<i>.<ext>` (the submission's `Image IDs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TEST_NAME = re.compile(r"^img_(\d+)\.[A-Za-z]+$")
LABELS_HEADER = ("Image IDs", "label")


def test_name(index: int, ext: str) -> str:
    """File name (and submission id) of test image `index`: `img_<index><ext>`."""
    return f"img_{index}{ext}"


def test_index(name: str) -> int:
    match = TEST_NAME.match(name)
    if match is None:
        raise UserError(f"{name!r} is not a test image name; expected img_<index>.<ext>")
    return int(match.group(1))


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


@dataclass(frozen=True)
class Layout:
    """Paths of one prepared dataset."""

    root: Path

    def split_dir(self, split: str) -> Path:
        return self.root / split

    @property
    def test_dir(self) -> Path:
        return self.root / "test" / "imgs"

    @property
    def test_labels(self) -> Path:
        return self.root / "test_labels.csv"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        if not self.manifest.is_file():
            raise UserError(f"{self.manifest} is missing{self._elsewhere()}")
        return json.loads(self.manifest.read_text())

    def _elsewhere(self) -> str:
        """Why the manifest was not found: a relative path read from another folder than the
        project's (where `make data` builds), or a dataset that is not built."""
        if self.root.is_absolute() or Path.cwd() == PROJECT_ROOT:
            return (
                f": {self.root} is not a complete dataset; "
                "run `make data` (or `python -m data_prep ...`) to build or finish it"
            )
        looked = (
            f" (looked in {Path.cwd() / self.root}: a relative path starts at the current folder, "
            f"not at the project {PROJECT_ROOT}); "
        )
        if (PROJECT_ROOT / self.manifest).is_file():
            return looked + (
                f"the project has this dataset: run from {PROJECT_ROOT} or pass "
                f"data_dir={PROJECT_ROOT / self.root}"
            )
        return looked + f"build it with `make data` in {PROJECT_ROOT}, then run from there"

    def classes(self) -> list[str]:
        """Class names in index order (sorted), read from the manifest."""
        return list(self.read_manifest()["classes"])

    def require_classes(self, num_classes: int) -> None:
        """Refuse a model head of `num_classes` outputs for this dataset's classes: more
        would train a head whose extra outputs no image has, fewer fails mid-epoch."""
        classes = self.classes()
        if len(classes) != num_classes:
            raise UserError(
                f"{self.manifest} lists {len(classes)} classes but num_classes={num_classes}; "
                "pass data=<the dataset config> or num_classes="
            )

    def split_items(self, split: str) -> list[tuple[str, Path, int]]:
        """(id, path, label) of every image of `split` ("train" or "val"), sorted by id."""
        manifest = self.read_manifest()
        items = []
        for label, name in enumerate(manifest["classes"]):
            folder = self.split_dir(split) / name
            if not folder.is_dir():
                raise UserError(f"{folder} is missing; {self._repair()}")
            images = [p for p in sorted(folder.iterdir()) if is_image(p)]
            self._require_count(folder, len(images), manifest["counts"][split][name])
            items += [(f"{name}/{p.name}", p, label) for p in images]
        return items

    def test_items(self) -> list[tuple[str, Path]]:
        """(id, path) of every test image, in index order (`img_0`, `img_1`, ...)."""
        listed = self.read_manifest()["counts"]["test"]
        paths = [p for p in self.test_dir.iterdir() if is_image(p)]
        self._require_count(self.test_dir, len(paths), listed)
        self._require_test_names([p.name for p in paths])
        paths.sort(key=lambda p: test_index(p.name))
        return [(p.name, p) for p in paths]

    def _require_test_names(self, names: list[str]) -> None:
        """Refuse a test image renamed since the build (re-encoded to another extension): the
        count holds, and the challenge would skip the row of the id it lost without a word."""
        if not self.test_labels.is_file():
            return
        with self.test_labels.open() as rows:
            built = {row.split(",", 1)[0] for row in list(rows)[1:]}
        stray = sorted(set(names) - built)
        if stray:
            raise UserError(
                f"{self.test_dir / stray[0]} is not among the test images {self.test_labels} "
                f"lists ({len(stray)} such: renamed since the build?); {self._repair()}"
            )

    def _require_count(self, folder: Path, found: int, listed: int) -> None:
        """Refuse a folder that lost or gained images since the build: a submission short of
        test rows would be scored by the challenge on the rows it has, without a word."""
        if found != listed:
            raise UserError(
                f"{folder} holds {found} images but {self.manifest} lists {listed}; "
                f"{self._repair()}"
            )

    def _repair(self) -> str:
        return f"rerun `make data` to repair {self.root}"


CHECKSUM_EXCLUDES = ("manifest.json", ".data_prep.json")


def dataset_paths(root: Path) -> list[str]:
    """Path relative to `root` of every file of a dataset, sorted: the images and
    `test_labels.csv`, not the manifest (it holds the checksum) nor the build's identity marker.
    Names only: a symlink whose source has moved is listed (the build re-points it)."""
    paths = []
    for dirpath, _, names in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        paths += [(rel / name).as_posix() for name in names]
    return sorted(p for p in paths if p not in CHECKSUM_EXCLUDES)


def dataset_files(root: Path) -> list[tuple[str, int]]:
    """(path, size in bytes) of every file of `dataset_paths`: what the checksum covers."""
    return [(rel, os.stat(root / rel).st_size) for rel in dataset_paths(root)]


def tree_checksum(files: list[tuple[str, int]]) -> str:
    """sha256 over the sorted `path<TAB>size` lines of `dataset_files`: the manifest's checksum.

    Paths and sizes, not contents: hashing 150,000 images would cost as much as copying them,
    while a renamed, missing, extra or truncated file already changes this digest.
    """
    digest = hashlib.sha256()
    for path, size in sorted(files):
        digest.update(f"{path}\t{size}\n".encode())
    return digest.hexdigest()

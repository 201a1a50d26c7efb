"""The build protocol shared by every source: claim the target, place the files, seal it.

A source (imagenet, fashion, folder) only decides *what* goes where: a `Plan` of (payload,
relative path) items, the class names and the test labels. This module owns *how* it lands on
disk (`layout.py` describes the result):

0. verify: every source image is decoded (`--verify header`: its header parsed) before the
   target is touched, so that a truncated image fails the build instead of being sealed.
1. claim: a target folder that holds another dataset (other source or options), or files this
   tool did not write, is refused; temporary files of a killed run are removed; the identity is
   recorded in `.data_prep.json`; an old `manifest.json` is removed, because from here on the
   folder is being changed and must not look complete.
2. place: every missing file is written (atomically, see `place.py`); files already there are
   kept, which makes a rerun after a kill, or after deleting some outputs, finish the job.
3. seal: `test_labels.csv`, then a scan proving the folder holds exactly the planned files, then
   `manifest.json`, written last so that its presence means complete.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.fs import require_writable, write_text_atomic
from data_prep.layout import LABELS_HEADER, Layout, dataset_files, dataset_paths, tree_checksum
from data_prep.place import check_image, run_parallel

MARKER = ".data_prep.json"
SPLITS = ("train", "val", "test")
# The temporary names of `fs.atomic_path` (mkstemp with prefix ".<name>." and suffix ".tmp").
TEMP_FILE = re.compile(r"^\..+\.tmp$")


@dataclass(frozen=True)
class Plan:
    """What a source wants written.

    `source` and `options` define the dataset's content: a target built with other values is a
    different dataset. `inputs` (paths, link mode) are recorded but may change between runs.
    `items` maps a payload (a source path, a pixel array) to a path relative to the root.
    """

    source: str
    options: dict[str, Any]
    classes: list[str]
    items: list[tuple[Any, str]]
    test_labels: list[tuple[str, int]]
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "options": self.options}

    def expected(self) -> set[str]:
        return {rel for _, rel in self.items} | {"test_labels.csv"}


def build(
    root: Path, plan: Plan, write: Callable[[Any, Path], str], workers: int, verify: str = "decode"
) -> dict:
    """Write `plan` under `root` with `write(payload, dst)`; return the manifest."""
    verify_sources(plan, workers, verify)
    claim(root, plan)
    # Every class has its train and val folder, also a class without images there (--at-most).
    class_dirs = {root / split / name for split in SPLITS[:2] for name in plan.classes}
    for parent in sorted({(root / rel).parent for _, rel in plan.items} | class_dirs):
        parent.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        items = [(p, root / rel) for p, rel in plan.items if rel.split("/", 1)[0] == split]
        tally = run_parallel(write, items, workers, desc=split)
        done = ", ".join(f"{n} {what}" for what, n in sorted(tally.items()))
        print(f"{split}: {len(items)} files ({done})")
    manifest = seal(root, plan)
    counts = manifest["counts"]
    print(
        f"{root}: complete, {len(plan.classes)} classes, {sum(counts['train'].values())} train, "
        f"{sum(counts['val'].values())} val, {counts['test']} test images"
    )
    return manifest


def verify_sources(plan: Plan, workers: int, verify: str) -> None:
    """Decode (or read the header of) every source file of `plan` on `workers` threads (PIL
    decodes without the GIL); pixel payloads (fashion) are written by this tool and skipped."""
    sources = [(src, src) for src, _ in plan.items if isinstance(src, Path)]
    if sources:
        tally = run_parallel(lambda src, _: check_image(src, verify), sources, workers, "verify")
        done = ", ".join(f"{n} {what}" for what, n in sorted(tally.items()))
        print(f"verify: {len(sources)} source images ({done})")


def claim(root: Path, plan: Plan) -> None:
    """Make `root` ours for `plan`, or refuse; see the module docstring (step 1)."""
    layout = Layout(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; choose a folder")
    require_writable(root, "choose another --out")
    if root.is_dir() and any(root.iterdir()):
        _check_identity(root, plan)
    expected = plan.expected()
    stray = []
    for rel in dataset_paths(root) if root.is_dir() else []:
        if TEMP_FILE.match(Path(rel).name):
            (root / rel).unlink()
        elif rel not in expected:
            stray.append(rel)
    if stray:
        raise UserError(
            f"{root} holds {len(stray)} files this build would not write (first: "
            f"{', '.join(stray[:5])}), added by hand or left by a build of a source that has "
            f"changed since; delete {root} and rebuild, or choose another --out"
        )
    write_text_atomic(root / MARKER, json.dumps(plan.identity, indent=1, sort_keys=True) + "\n")
    layout.manifest.unlink(missing_ok=True)


def _check_identity(root: Path, plan: Plan) -> None:
    found = None
    for name in (MARKER, "manifest.json"):
        if (root / name).is_file():
            try:
                meta = json.loads((root / name).read_text())
                found = {"source": meta["source"], "options": meta["options"]}
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{root / name} is damaged; delete {root} and rebuild") from None
            break
    if found is None:
        first = sorted(p.name for p in root.iterdir())[:3]
        raise UserError(
            f"--out {root} holds files that data_prep did not write ({', '.join(first)}); "
            "choose another --out or empty it"
        )
    if found != json.loads(json.dumps(plan.identity)):
        raise UserError(
            f"--out {root} holds a different dataset (source {found['source']}, options "
            f"{found['options']}; this run: source {plan.source}, options {plan.options}); "
            f"choose another --out or delete {root}"
        )


def seal(root: Path, plan: Plan) -> dict:
    """Write the labels, check the folder holds exactly the plan, and write the manifest last."""
    layout = Layout(root)
    lines = [",".join(LABELS_HEADER)] + [f"{name},{label}" for name, label in plan.test_labels]
    write_text_atomic(layout.test_labels, "\n".join(lines) + "\n")
    files = dataset_files(root)
    found = {rel for rel, _ in files}
    if found != plan.expected():
        # Placement writes every planned file and claim removed all others: only a process
        # writing into the folder at the same time gets here.
        odd = sorted(found ^ plan.expected())
        raise UserError(
            f"{root} changed during the build ({len(odd)} files differ from the plan, first: "
            f"{', '.join(odd[:3])}); run the command again, alone"
        )
    manifest = {
        "source": plan.source,
        "options": plan.options,
        "inputs": {**plan.inputs, "placed": placed(root, files)},
        "classes": plan.classes,
        "counts": _counts(plan),
        "checksum": tree_checksum(files),
    }
    write_text_atomic(layout.manifest, json.dumps(manifest, indent=1) + "\n")
    return manifest


def placed(root: Path, files: list[tuple[str, int]]) -> dict[str, int]:
    """How the files stand (`--mode link` falls back to copies across file systems): what a
    user deleting the source images needs to know."""
    kinds = Counter(_link_kind(os.lstat(root / rel)) for rel, _ in files)
    return dict(sorted(kinds.items()))


def _link_kind(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "symlinks"
    return "hard links" if info.st_nlink > 1 else "files"


def _counts(plan: Plan) -> dict[str, Any]:
    per_split: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    test = 0
    for _, rel in plan.items:
        split, cls, *_ = rel.split("/")
        if split == "test":
            test += 1
        else:
            per_split[split][cls] += 1
    counts: dict[str, Any] = {s: {c: per_split[s][c] for c in plan.classes} for s in per_split}
    counts["test"] = test
    return counts

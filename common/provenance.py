"""Where an artifact came from: the code, the config, the data and the library versions.

A run's `config.yaml`, each `logits/<model>/meta.json` and each submission's json carry a
`provenance` record, so that a file a team uploads names the commit (and whether the tree had
uncommitted changes), the resolved config's hash, the dataset's manifest checksum and the versions
of torch, timm and accelerate that produced it. Reading it needs no import of those libraries.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "timm", "accelerate")
KEY = "provenance"  # the key a saved config keeps its record under; not a config key


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_state() -> dict[str, Any]:
    """The commit of this code and whether files differ from it (None outside a git checkout).

    Untracked files count as changes: a new module that is not committed changes what runs.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": None if status is None else bool(status.strip()),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def config_hash(cfg: dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys), its record left out."""
    body = {k: v for k, v in cfg.items() if k != KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def dataset_checksum(manifest: Path) -> str | None:
    """The checksum `make data` wrote into the dataset's manifest (None when it has none)."""
    try:
        return json.loads(Path(manifest).read_text()).get("checksum")
    except (OSError, ValueError):
        return None


def ids_hash(ids: list[str]) -> str:
    """sha256 of a split's ids in order: two artifacts describe the same rows when it agrees."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def record(cfg: dict[str, Any], manifest: Path) -> dict[str, Any]:
    """The provenance of an artifact made now from `cfg` and the dataset of `manifest`."""
    return {
        **code_state(),
        "config_sha256": config_hash(cfg),
        "dataset_checksum": dataset_checksum(manifest),
        "versions": versions(),
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

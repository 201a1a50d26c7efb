"""Provenance records, and the checks `make ensemble` makes with them."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from common import provenance
from common.errors import UserError
from data_prep.layout import Layout, dataset_files, tree_checksum
from ensemble.members import Member, check_provenance
from tests.conftest import ROOT
from train.config import load_config, read_provenance, save_config


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


def test_code_state_is_the_checkouts_commit_and_whether_it_has_changes():
    state = provenance.code_state()
    assert state["git_commit"] == git("rev-parse", "HEAD").strip()
    assert state["git_dirty"] == bool(git("status", "--porcelain").strip())


def test_the_config_hash_ignores_key_order_and_the_record_but_not_a_value():
    cfg = load_config("demo_resnet18")
    reordered = dict(reversed(list(cfg.items())))
    same = provenance.config_hash(reordered)
    assert provenance.config_hash(cfg) == same
    assert provenance.config_hash({**cfg, provenance.KEY: {"git_commit": "x"}}) == same
    assert provenance.config_hash({**cfg, "lr": cfg["lr"] * 2}) != same
    canonical = json.dumps(cfg, sort_keys=True).encode()  # the stdlib's canonical JSON
    assert same == hashlib.sha256(canonical).hexdigest()


def test_the_dataset_checksum_is_the_manifests_tree_checksum(tiny_dir):
    recomputed = tree_checksum(dataset_files(tiny_dir))
    assert provenance.dataset_checksum(Layout(tiny_dir).manifest) == recomputed
    assert provenance.dataset_checksum(tiny_dir / "absent.json") is None


def test_a_saved_config_carries_its_record_and_loads_back_as_the_same_config(tiny_dir, tmp_path):
    cfg = load_config("demo_resnet18", {"data_dir": str(tiny_dir), "out_dir": str(tmp_path)})
    path = tmp_path / "config.yaml"
    record = save_config(cfg, path)
    assert read_provenance(path) == record
    assert record["config_sha256"] == provenance.config_hash(cfg)
    assert record["dataset_checksum"] == tree_checksum(dataset_files(tiny_dir))
    assert set(record["versions"]) == {"python", "torch", "timm", "accelerate"}
    assert load_config(str(path)) == cfg  # the record is not read as a config key
    save_config(cfg, path, resumed_step=7)
    resumed = read_provenance(path)
    assert resumed["time"] == record["time"]  # the start is kept
    assert [r["step"] for r in resumed["resumed"]] == [7]
    assert resumed["resumed"][0]["git_commit"] == record["git_commit"]


def member(name: str, dataset: str = "d" * 64, test: str = "t" * 64, commit: str = "a" * 40):
    record = {
        "dataset_checksum": dataset,
        "ids_sha256": {"val": "v", "test": test},
        "training": {"git_commit": commit, "git_dirty": False},
    }
    return Member(name, Path(name), {"provenance": record}, f"make logits MODEL={name}")


def test_members_from_other_datasets_or_test_ids_are_refused_naming_them():
    with pytest.raises(UserError, match=r"different datasets.*\(a, c\).*\(b\)"):
        check_provenance([member("a"), member("b", dataset="e" * 64), member("c")])
    with pytest.raises(UserError, match=r"different test ids.*\(a\).*\(b\)"):
        check_provenance([member("a"), member("b", test="u" * 64)])


def test_members_trained_on_other_commits_are_listed_in_a_warning():
    resumed = member("c")
    resumed.meta["provenance"]["training"]["resumed"] = [{"git_commit": "b" * 40}]
    warnings = check_provenance([member("a"), member("b", commit="b" * 40), resumed])
    assert warnings == [
        "members were trained on different commits: aaaaaaaaaaaa (a); bbbbbbbbbbbb (b); "
        "aaaaaaaaaaaa, bbbbbbbbbbbb (c)"
    ]
    assert check_provenance([member("a"), member("b")]) == []
    old = Member("old", Path("old"), {}, "make logits MODEL=old")
    assert "no provenance in the meta.json of old" in check_provenance([member("a"), old])[0]

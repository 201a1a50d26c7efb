"""Checks of what a user names on a command line, shared by the commands and the config."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable

NAME_RULE = "one folder name (no /, not . or ..)"


def is_one_name(text: str) -> bool:
    """`text` names one entry inside a folder: a run or submission name that cannot write
    outside its out_dir (`..`, `a/b`, `/abs` would)."""
    return text not in ("", ".", "..") and "/" not in text


def make_command(target: str, model: str, overrides: list[str]) -> str:
    """The `make` line that acts on the same run as this command: its model and overrides (a
    `name=` override names the run, not a config)."""
    args = f" {make_args(overrides)}" if overrides else ""
    return f"make {target} MODEL={shlex.quote(model)}{args}"


def make_args(overrides: list[str]) -> str:
    """`ARGS=...` that hands `overrides` to make's recipe as the same words, quoted for a shell
    twice: once by the shell that runs make, once by the recipe's."""
    return f"ARGS={shlex.quote(shlex.join(overrides))}"


def name_arg(text: str) -> str:
    """argparse type: a run or submission name."""
    if not is_one_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be {NAME_RULE}")
    return text


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    return int_at_least(1)(text)


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: a whole number of at least `low`."""

    def parse(text: str) -> int:
        return _at_least(text, int, low, f"a whole number of at least {low}")

    return parse


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    return _at_least(text, float, 0, "a number of at least 0")


def _at_least(text: str, kind: type, low: float, rule: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value < float("inf"):  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"{text!r} must be {rule}")
    return value

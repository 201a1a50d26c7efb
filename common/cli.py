"""Checks of what a user names on a command line, shared by the commands and the config."""

from __future__ import annotations

import argparse

NAME_RULE = "one folder name (no /, not . or ..)"


def is_one_name(text: str) -> bool:
    """`text` names one entry inside a folder: a run or submission name that cannot write
    outside its out_dir (`..`, `a/b`, `/abs` would)."""
    return text not in ("", ".", "..") and "/" not in text


def name_arg(text: str) -> str:
    """argparse type: a run or submission name."""
    if not is_one_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be {NAME_RULE}")
    return text


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of at least 0")
    return value

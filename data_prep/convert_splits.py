"""`python -m data_prep.convert_splits --splits DIR [--out DIR]`: the shipped split lists.

Converts the VIPriors toolkit's `train/val/test.pickle` (read through the restricted unpickler of
`splits.py`, then verified) into the plain `train/val/test.csv.gz` that ship in
`data_prep/vipriors/`: one row per entry in the toolkit's order, `class,file` for train and val,
`path` (the toolkit's `wnid/file` string) for test. The gzip header carries no name and mtime 0,
so a rerun on the same pickles writes the same bytes. Prints the sha256 of every input and output
for `data_prep/vipriors/README.md`. Run once by the maintainers; users never need it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
from pathlib import Path

from common.errors import cli_main
from common.fs import write_bytes_atomic
from data_prep.splits import HEADERS, NAMES, SHIPPED, Splits, read_pickles


def csv_rows(splits: Splits, name: str) -> list[list[str]]:
    """The header, then one row per entry exactly as the toolkit lists it."""
    entries = getattr(splits, name)
    if name == "test":
        return [HEADERS[name]] + [[f"{wnid}/{file}"] for wnid, file in entries]
    return [HEADERS[name]] + [[wnid, file] for wnid, file in entries]


def csv_gz(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    # mtime=0 and no file name in the header: the bytes depend on the rows alone.
    return gzip.compress(text.getvalue().encode("utf-8"), compresslevel=9, mtime=0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.convert_splits", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--splits", type=Path, required=True, help="folder with the toolkit's train/val/test.pickle"
    )
    parser.add_argument("--out", type=Path, default=SHIPPED, help=f"default: {SHIPPED}")
    args = parser.parse_args(argv)
    splits = read_pickles(args.splits)
    for name in NAMES:
        data = csv_gz(csv_rows(splits, name))
        write_bytes_atomic(args.out / f"{name}.csv.gz", data)
        source = args.splits / f"{name}.pickle"
        print(f"{sha256(source.read_bytes())}  {source}")
        print(f"{sha256(data)}  {args.out / f'{name}.csv.gz'}")


if __name__ == "__main__":
    main()

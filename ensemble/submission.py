"""The submission the VIPriors server scores, written and validated (shared/vipriors/README.md).

A submission is a CSV with the header `Image IDs,Predictions` and one row `img_<i>.<ext>,<class>`
per test image, the class being the index in sorted-wnid order; CodaLab takes it zipped. The
challenge's `evaluate_classification.py` reads it with pandas and silently skips ids it lacks
(and scores only the rows it finds), so a submission with missing rows would score on a subset
without a word: `validate_submission` refuses it, and every other malformation, with a one-line
`UserError` naming the file and the problem. What the scorer reads exactly as intended is
accepted with a `warning:` line: a UTF-8 byte-order mark (Excel's "CSV UTF-8"; pandas drops it)
and integral floats such as `3.0` (pandas reads the column as floats, and the scorer's `==`
finds 3.0 equal to the label 3). A fractional class such as `3.5` equals no label: refused.
Labels files have the header `Image IDs,label`.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError, warn
from common.fs import atomic_path
from data_prep.layout import LABELS_HEADER

HEADER = ("Image IDs", "Predictions")
INTEGER = re.compile(r"^-?[0-9]+$")
INTEGRAL_FLOAT = re.compile(r"^-?[0-9]+\.0*$")  # 3.0, 3., 3.00: the scorer compares 3.0 == 3
BOM = "\ufeff"
SHOWN = 5  # examples named in a message
MAX_CLASSES = 2**31  # a label past it is no class index (and would overflow an int64 array)
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so that the same predictions give the same zip bytes


def _examples(values: Iterable[str]) -> str:
    values = list(values)
    more = ", ..." if len(values) > SHOWN else ""
    return ", ".join(values[:SHOWN]) + more


def format_submission(ids: Sequence[str], predictions: Sequence[int] | np.ndarray) -> str:
    """CSV text: the header, then `id,class` per row, in the order given."""
    lines = [",".join(HEADER)] + [f"{i},{int(p)}" for i, p in zip(ids, predictions, strict=True)]
    return "\n".join(lines) + "\n"


def _read_table(
    path: Path, header: tuple[str, str], column: str, data: bytes | None = None
) -> tuple[list[str], list[str]]:
    """(ids, values) of a two-column CSV whose first line must be `header` exactly; `data`:
    its bytes when they are not `path`'s own (a CSV inside a zip, named `path` in messages)."""
    try:
        text = (Path(path).read_bytes() if data is None else data).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text
    if text.startswith(BOM):
        warn(f"{path} starts with a UTF-8 byte-order mark (Excel's CSV UTF-8): the scorer skips it")
        text = text[len(BOM) :]
    rows = list(csv.reader(io.StringIO(text)))
    if rows and not rows[-1]:  # an editor's blank lines at the end: the scorer skips them
        while rows and not rows[-1]:
            rows.pop()
        warn(f"{path} ends with blank lines: the scorer skips them")
    if not rows or tuple(rows[0]) != header:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise UserError(f"{path}: header is {found!r}; it must be exactly {','.join(header)!r}")
    ids, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0]:
            found = ",".join(row)
            raise UserError(f"{path}: line {line} is {found!r}; expected <image id>,<{column}>")
        ids.append(row[0])
        values.append(row[1])
    return ids, values


def _parse_classes(path: Path, ids: list[str], values: list[str], column: str) -> list[int]:
    """Python integers, whatever their size: a range check, not int64, refuses a huge one."""
    pairs = list(zip(ids, values, strict=True))
    bad = [f"{i}={v!r}" for i, v in pairs if not (INTEGER.match(v) or INTEGRAL_FLOAT.match(v))]
    if bad:
        raise UserError(
            f"{path}: {len(bad)} {column} values are not integer class indices ({_examples(bad)})"
        )
    floats = [f"{i}={v!r}" for i, v in pairs if not INTEGER.match(v)]
    if floats:
        warn(
            f"{path}: {len(floats)} {column} values are written as floats ({_examples(floats)}); "
            "read as the integers they equal, as the scorer compares them"
        )
    return [int(v.split(".")[0]) for v in values]


def _refuse_duplicates(path: Path, ids: list[str]) -> None:
    duplicates = [i for i, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise UserError(f"{path}: {len(duplicates)} duplicate ids ({_examples(duplicates)})")


def read_labels(path: Path) -> dict[str, int]:
    """An `Image IDs,label` file (the local test_labels.csv, or val labels) as {id: class}."""
    ids, values = _read_table(path, LABELS_HEADER, "label")
    _refuse_duplicates(path, ids)
    labels = _parse_classes(path, ids, values, "label")
    odd = [f"{i}={v}" for i, v in zip(ids, labels, strict=True) if not 0 <= v < MAX_CLASSES]
    if odd:
        raise UserError(
            f"{path}: {len(odd)} labels are not class indices in [0, {MAX_CLASSES}) "
            f"({_examples(odd)})"
        )
    return dict(zip(ids, labels, strict=True))


def validate_submission(
    path: Path, expected_ids: Iterable[str], num_classes: int, data: bytes | None = None
) -> dict[str, int]:
    """{id: class} of a submission that has exactly `expected_ids`, each once, classes in range
    (`data`: its bytes, as `_read_table` takes them)."""
    ids, values = _read_table(path, HEADER, "Predictions", data)
    _refuse_duplicates(path, ids)
    classes = _parse_classes(path, ids, values, "Predictions")
    pairs = zip(ids, classes, strict=True)
    out_of_range = [f"{i}={c}" for i, c in pairs if not 0 <= c < num_classes]
    if out_of_range:
        raise UserError(
            f"{path}: {len(out_of_range)} predictions outside [0, {num_classes}) "
            f"({_examples(out_of_range)})"
        )
    expected = list(expected_ids)
    present = set(ids)
    missing = [i for i in expected if i not in present]
    if missing:
        raise UserError(f"{path}: {len(missing)} test ids missing ({_examples(missing)})")
    known = set(expected)
    extra = [i for i in ids if i not in known]
    if extra:
        raise UserError(f"{path}: {len(extra)} rows with unexpected ids ({_examples(extra)})")
    return dict(zip(ids, classes, strict=True))


def write_submission(
    csv_path: Path, ids: Sequence[str], predictions: np.ndarray, num_classes: int
) -> Path:
    """Write the CSV and the zip beside it (`<name>.zip` holding `<name>.csv`), both atomically.

    The CSV is validated at its temporary name, so a submission that would be refused is never
    put in place; an earlier zip is removed first, so that none is left beside a new CSV.
    """
    csv_path = Path(csv_path)
    zip_path = csv_path.with_suffix(".zip")
    zip_path.unlink(missing_ok=True)
    text = format_submission(ids, predictions)
    with atomic_path(csv_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        validate_submission(tmp, ids, num_classes)
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            info = zipfile.ZipInfo(csv_path.name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text)
    return zip_path

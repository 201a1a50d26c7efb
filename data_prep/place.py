"""Putting one source file in place: hard link, symlink, copy or downscaled copy; and doing many.

Every way of creating a file is atomic, so a process killed at any moment leaves each output
either absent or complete, and "the file exists" is a sufficient test of "this file is done":
`os.link` and `os.symlink` create the name in one step, and copies and resizes are written to a
temporary name and renamed (`common.fs.atomic_path`). That is what makes every build
resumable without per-file bookkeeping.

The work is I/O bound (link/stat/copy syscalls, which release the GIL), so a thread pool over
chunks of files keeps the disk busy; one chunk is one task, so that 150,000 files cost a few
hundred futures rather than 150,000.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from common.errors import UserError
from common.fs import atomic_path
from common.images import check_mode, to_rgb, unreadable

T = TypeVar("T")
MODES = ("link", "symlink", "copy")
CHUNK = 256
JPEG_QUALITY = 95
# Hard links fail across file systems (EXDEV), on files another user owns when the kernel's
# protected_hardlinks is on (EPERM), at the link-count limit (EMLINK) and on file systems
# without links (ENOTSUP): a copy gives the same bytes in every case.
LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def copy_file(src: Path, dst: Path) -> str:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return "copied"


def place(src: Path, dst: Path, mode: str) -> str:
    """Make `dst` hold `src`'s bytes by `mode`; return what was done ("kept" if already there)."""
    try:
        return _place(src, dst, mode)
    except OSError as err:
        # A source that vanished or is unreadable, a full disk: the user's to fix, not a bug.
        raise UserError(
            f"cannot {mode} {src} to {dst} ({err.strerror}); check that the file is readable "
            "and that the target has free space, then run the command again"
        ) from None


def _place(src: Path, dst: Path, mode: str) -> str:
    if mode == "copy":
        if dst.exists() and not dst.is_symlink() and not same_file(src, dst):
            return "kept"
        # Over a symlink or an earlier link build's hard link too (a rename): a copy shares no
        # bytes with the originals, so they can be edited or deleted.
        return copy_file(src, dst)
    try:
        if mode == "link":
            # The file itself: on Linux os.link links a symlink as a symlink (follow_symlinks
            # is ignored), and a relative one would point nowhere from the dataset.
            os.link(os.path.realpath(src), dst)
            return "linked"
        os.symlink(src, dst)
        return "symlinked"
    except FileExistsError:
        if placed_by(dst, src, mode):
            return "kept"
        # A symlink to another place (the source moved or was copied since the last run: point
        # it at the current file), or a symlink where --mode link places the file itself.
        dst.unlink()
        return _place(src, dst, mode)
    except OSError as err:
        if mode == "link" and err.errno in LINK_FALLBACK:
            return _place(src, dst, "copy")
        raise


def same_file(src: Path, dst: Path) -> bool:
    """Whether `dst` is `src` itself (a hard link: one inode); a backup tool's hard links of a
    copy, or a source gone, are not."""
    try:
        return os.path.samefile(src, dst)
    except OSError:
        return False


def placed_by(dst: Path, src: Path, mode: str) -> bool:
    """Whether an existing `dst` is what `mode` makes of `src`: a symlink to `src` itself, or
    (link) a file that is not a symlink."""
    if mode == "symlink":
        return dst.is_symlink() and os.readlink(dst) == str(src)
    return dst.exists() and not dst.is_symlink()


def resize_image(src: Path, dst: Path, short_side: int) -> str:
    """Write `src` as an RGB JPEG whose short side is at most `short_side`.

    Handles what ImageNet holds besides RGB JPEGs: a PNG named .JPEG (PIL reads by content),
    CMYK JPEGs and grayscale images (all converted to RGB, as every loader would). PIL's own
    resize, which torchvision's `Resize` calls on PIL images, with the same size rule; importing
    torch would cost seconds per run for one function call.
    """
    if dst.exists():
        return "kept"
    from PIL import Image

    try:
        with Image.open(src) as img:
            size = scaled_size(img.size, short_side)
            if size != img.size:
                # JPEG DCT scaling decodes straight to >= the target size: several times faster.
                img.draft("RGB", size)
            img = to_rgb(img)
    except unreadable() as err:
        raise UserError(
            f"{src} is not a readable image ({err}); replace it with an intact copy"
        ) from None
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    with atomic_path(dst) as tmp:
        img.save(tmp, format="JPEG", quality=JPEG_QUALITY)
    return "resized"


VERIFY = ("decode", "header")


def add_verify_argument(parser) -> None:
    parser.add_argument(
        "--verify",
        choices=VERIFY,
        default="decode",
        help="before anything is placed, decode every source image (default; parallel, on "
        "--workers threads) or only parse its header (faster; a truncated image then passes)",
    )


def check_image(path: Path, verify: str) -> str:
    """Decode `path` (`verify="decode"`) or parse its header (`"header"`): a damaged image fails
    the build, naming the file, before the dataset is sealed complete."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            check_mode(img)  # known from the header: an image training could not scale
            if verify == "header":
                return "header read"
            # JPEG DCT scaling decodes every coded block (a truncated file still fails) into a
            # picture 8 times smaller: a few times faster than a full decode.
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except unreadable() as err:
        raise UserError(
            f"{path} is not a readable image ({err}); replace it with an intact copy or remove "
            "it, then run the command again"
        ) from None
    return "decoded"


def scaled_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at most `short_side`, as torchvision's Resize(int)."""
    w, h = size
    if min(w, h) <= short_side:
        return w, h
    if w <= h:
        return short_side, int(short_side * h / w)
    return int(short_side * w / h), short_side


def file_writer(mode: str, resize: int | None) -> Callable[[Path, Path], str]:
    """The per-file function for a build from files: `--resize` wins over `--mode`."""
    if resize is not None:
        return lambda src, dst: resize_image(src, dst, resize)
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    return lambda src, dst: place(src, dst, mode)


def run_parallel(
    write: Callable[[T, Path], str],
    items: Sequence[tuple[T, Path]],
    workers: int,
    desc: str,
) -> Counter:
    """Apply `write(payload, dst)` to every item on `workers` threads; tally the outcomes.

    The first exception (a `UserError` for an unreadable image, say), or Ctrl-C, cancels what
    has not started and is re-raised here, so a failure stops the build at once.
    """
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    tally: Counter = Counter()
    stop = threading.Event()
    with tqdm(total=len(items), desc=desc, unit="file") as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = {pool.submit(_run_chunk, write, chunk, stop) for chunk in chunks}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            raise future.exception()
                        tally.update(future.result())
                        bar.update(sum(future.result().values()))
            except BaseException:
                # A failed file or Ctrl-C: the chunks not started are dropped (leaving the
                # `with` would otherwise run them all first), the running ones stop at their
                # next file.
                stop.set()
                pool.shutdown(cancel_futures=True)
                raise
    return tally


def _run_chunk(
    write: Callable[[T, Path], str], chunk: Sequence[tuple[T, Path]], stop: threading.Event
) -> Counter:
    tally: Counter = Counter()
    for payload, dst in chunk:
        if stop.is_set():
            break
        tally[write(payload, dst)] += 1
    return tally


def require_files(paths: Sequence[Path], listed_in: str, fix: str) -> None:
    """Fail with the count and the first few names if any of `paths` is not a file."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise UserError(
            f"{len(missing)} of {len(paths)} files listed in {listed_in} are missing "
            f"(first: {shown}); {fix}"
        )

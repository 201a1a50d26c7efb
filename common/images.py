"""How an image file becomes RGB pixels, for `make data` (checks, `--resize`) and the loaders alike.

PIL reads by content (a PNG named .JPEG is a PNG) and converts CMYK, grayscale and palette images
to RGB as every loader would. It does not scale high bit depths: `convert("RGB")` clips a 16-bit
grayscale PNG (mode I;16) at 255, so that most of a medical or microscopy image turns white. Those
are scaled to 8 bits here; 32-bit integer and float pixels (mode I, F: TIFFs) have no range to
scale from and are refused, naming the file. PIL is imported only when an image is read.
"""

from __future__ import annotations

from typing import Any

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
NO_RANGE = ("I", "F")


def unreadable() -> tuple[type[Exception], ...]:
    """What PIL raises for a file that is no intact image (a broken PNG chunk: SyntaxError), or
    one past its decompression-bomb limit."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_mode(image: Any) -> None:
    """Refuse pixels whose range is unknown (raises ValueError, one of `unreadable()`)."""
    if image.mode in NO_RANGE:
        raise ValueError(
            f"{image.mode!r} pixels ({'32-bit integer' if image.mode == 'I' else 'float'}) have "
            "no range to scale to 8 bits; save it as an 8- or 16-bit image"
        )


def to_rgb(image: Any) -> Any:
    """`image` (a decoded PIL image) as 8-bit RGB; 16-bit grayscale scaled, not clipped."""
    check_mode(image)
    if image.mode in SIXTEEN_BIT:
        import numpy as np
        from PIL import Image

        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
    return image.convert("RGB")

"""PNG / JPEG / TIFF / BMP images (exports of radiographs, photographs, dermoscopy) read with Pillow.

They carry no physical units and no window: the stored values are already display values, so their
range is the format's own (0-255, or 0-65535 for 16-bit grayscale). No patient identifiers either.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medtransfer.io.dicom import ImageData, MedIOError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_raster_path(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(RASTER_SUFFIXES)


def read_raster(path: str | os.PathLike[str]) -> ImageData:
    """A raster image → ``ImageData``: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB, with ``value_range``
    (the format's range, for scaling to ``[0, 1]``) and ``photometric_interpretation`` in ``meta``."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise MedIOError(p, "file not found")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                a, vmax = np.asarray(im, dtype=np.uint16), 65535.0
            elif mode in ("I", "F"):
                a = np.asarray(im, dtype=np.float32)
                vmax = 65535.0 if a.max(initial=0) > 255 else 255.0
            elif mode in ("1", "L", "LA"):
                a, vmax = np.asarray(im.convert("L")), 255.0
            else:  # RGB(A), palette, CMYK, ...: colour unless all three channels are equal
                a, vmax = np.asarray(im.convert("RGB")), 255.0
                if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
                    a = a[..., 0]  # a grayscale image stored as RGB (common for radiograph exports)
    except Image.DecompressionBombError as exc:
        raise MedIOError(p, f"refused: {exc} (an image this large is a decompression bomb or not a medical "
                            "image; remove it from the inputs)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MedIOError(p, f"not a readable image ({type(exc).__name__}: {exc})") from None
    colour = a.ndim == 3
    meta = {"path": str(p), "value_range": (0.0, vmax), "rows": int(a.shape[0]), "columns": int(a.shape[1]),
            "photometric_interpretation": "RGB" if colour else "MONOCHROME2", "format": mode}
    return ImageData(np.ascontiguousarray(a), meta)

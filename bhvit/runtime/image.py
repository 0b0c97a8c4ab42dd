"""Image decoding and normalisation for the runtime (Pillow + numpy, no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def decode_image(path: Path, channels: int, size: Optional[int]) -> np.ndarray:
    """Decode an image file to uint8 ``(C, H, W)``, greyscale for ``channels == 1``.

    With ``size``: the shorter side is resized to ``size`` (bilinear), then centre-cropped
    to ``size x size``. Raises OSError (Pillow's) for unreadable files.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size, size):
            # shorter side to `size`, then centre crop
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def normalize_images(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``(B, C, H, W)`` -> float32 normalised with per-channel mean/std of [0, 1] pixels.

    The same float32 arithmetic as the training pipeline (``bhvit.data.normalize``).
    """
    m = (np.asarray(mean, dtype=np.float32) * np.float32(255)).reshape(1, -1, 1, 1)
    s = (np.asarray(std, dtype=np.float32) * np.float32(255)).reshape(1, -1, 1, 1)
    return (np.asarray(x).astype(np.float32) - m) / s

"""Image decoding and normalisation for the runtime (Pillow + numpy, no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import BhvitError, ConfigError
from ..files import open_regular


# Images with more pixels than this are refused before their pixels are decoded (a
# decompression bomb is a small file that decodes to gigabytes). The environment variable
# BHVIT_MAX_IMAGE_PIXELS, or ``max_pixels``, sets another limit.
MAX_IMAGE_PIXELS = 50_000_000


class ImageTooLarge(BhvitError, ValueError):
    """An image has more pixels than the decoder's limit."""


def max_image_pixels() -> int:
    env = os.environ.get("BHVIT_MAX_IMAGE_PIXELS")
    if env is None:
        return MAX_IMAGE_PIXELS
    try:
        v = int(env)
    except ValueError:
        v = 0
    if v < 1:
        raise ConfigError(f"BHVIT_MAX_IMAGE_PIXELS must be a positive integer, got {env!r}.")
    return v


def _to_8bit(im):
    """Pillow's ``convert`` saturates 16- and 32-bit greyscale (mode I;16, I) at 255, which
    turns almost every pixel white; scale them to 8 bits instead (65535 -> 255)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if im.mode == "I" and (a.size == 0 or a.max() <= 255) and a.min() >= 0:
            return Image.fromarray(a.astype(np.uint8), "L")  # 8-bit values stored as 32-bit
        a = np.clip(a, 0, 65535)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    if im.mode == "F":  # float images: [0, 1] scaled to 0..255, anything else clipped
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im


def open_image(path: Path, channels: int, max_pixels: Optional[int] = None, info: Optional[dict] = None, draft=None):
    """Open an image file as an 8-bit Pillow image, greyscale (``L``) for ``channels == 1``
    else RGB. An image of more than ``max_pixels`` pixels (default :func:`max_image_pixels`)
    raises :class:`ImageTooLarge` before it is decoded; 16-bit images are scaled to 8 bits.
    ``draft(w, h)``, if given, returns the smallest ``(w, h)`` the caller needs: a JPEG is
    then decoded at a reduced size (1/2, 1/4 or 1/8, by the DCT) no smaller than that.
    ``info`` receives the file's ``mode`` and ``size``. Raises OSError for unreadable files."""
    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels() if max_pixels is None else max_pixels
    with open_regular(path) as fp:  # a FIFO or device is refused, not waited on
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # this limit replaces Pillow's
        try:
            im_file = Image.open(fp)  # reads the header only
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
        return _decode_opened(im_file, path, channels, limit, info, draft)


def _decode_opened(im_file, path, channels, limit, info, draft):
    with im_file as im:
        w, h = im.size
        if w * h > limit:
            raise ImageTooLarge(
                f"{path}: {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} "
                "(set BHVIT_MAX_IMAGE_PIXELS to allow larger images)."
            )
        if info is not None:
            info.update(mode=im.mode, size=(w, h))
        if draft is not None and im.format == "JPEG":
            im.draft("L" if channels == 1 else "RGB", draft(w, h))
        im.load()
        return _to_8bit(im).convert("L" if channels == 1 else "RGB")


INTERPOLATIONS = ("bilinear", "bicubic")


def eval_transform(data: Optional[dict], size: int) -> Tuple[int, str]:
    """The evaluation transform a checkpoint's or an export's ``data`` entry records:
    ``(resize, interpolation)``, the shorter side before the centre ``size x size`` crop and
    the resampling filter. Absent keys: no enlargement (``resize = size``), bilinear."""
    data = data or {}
    resize, interpolation = data.get("resize"), data.get("interpolation")  # null: absent
    return (size if resize is None else int(resize)), ("bilinear" if interpolation is None else str(interpolation))


def pretrained_cfg(in_chans: int, img_size: int, num_classes: int, data: Optional[dict]) -> dict:
    """timm's ``pretrained_cfg`` keys for a model whose checkpoint or export records ``data``:
    ``input_size``, ``mean`` and ``std`` (of [0, 1] pixels; None where not recorded),
    ``interpolation``, ``crop_pct`` (the crop over the resized shorter side, as timm's
    ``resolve_data_config`` reads it), ``crop_mode``, ``num_classes``, ``label_names`` and
    ``dataset``. A view of ``data`` and :func:`eval_transform`, which stay the one record."""
    data = data or {}
    resize, interpolation = eval_transform(data, img_size)
    mean, std = data.get("mean"), data.get("std")
    return {
        "input_size": (int(in_chans), int(img_size), int(img_size)),
        "mean": tuple(mean) if mean else None,
        "std": tuple(std) if std else None,
        "interpolation": interpolation,
        "crop_pct": img_size / resize,
        "crop_mode": "center",
        "num_classes": int(num_classes),
        "label_names": list(data["classes"]) if data.get("classes") else None,
        "dataset": data.get("name"),
    }


def resize_centre_crop(im, size: int, resize: Optional[int] = None, interpolation: str = "bilinear"):
    """The shorter side resized to ``resize`` (default ``size``), then the centre ``size x size``
    crop: pixel for pixel what torchvision's ``Resize(resize)`` and ``CenterCrop(size)`` do to a
    Pillow image (the longer side truncated, ``int(resize * long / short)``; the crop offsets
    ``int(round((w - size) / 2))``, Python's round half to even)."""
    from PIL import Image

    resize = size if resize is None else resize
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    if resize < size:
        raise ConfigError(f"resize {resize} is smaller than the crop {size}.")
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    nw, nh = (resize, new_long) if w <= h else (new_long, resize)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR)
    if (nw, nh) == (size, size):
        return im
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def to_chw(im) -> np.ndarray:
    """A Pillow image as a writable, contiguous uint8 ``(C, H, W)`` array."""
    arr = np.asarray(im, dtype=np.uint8)
    return np.array(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1), order="C")  # a writable copy


def decode_image(
    path: Path,
    channels: int,
    size: Optional[int],
    max_pixels: Optional[int] = None,
    info: Optional[dict] = None,
    resize: Optional[int] = None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Decode an image file to uint8 ``(C, H, W)``, greyscale for ``channels == 1``.

    With ``size``: :func:`resize_centre_crop` (the shorter side to ``resize``, default
    ``size``, then the centre ``size x size``). 16-bit images are scaled to 8 bits. An image of more
    than ``max_pixels`` pixels (default :func:`max_image_pixels`) raises
    :class:`ImageTooLarge` before it is decoded. ``info``, if given, receives the file's
    ``mode`` and ``size``. Raises OSError (Pillow's) for unreadable files.
    """
    im = open_image(path, channels, max_pixels, info)
    if size is not None:
        im = resize_centre_crop(im, size, resize, interpolation)
    return to_chw(im)


def normalize_images(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``(B, C, H, W)`` -> float32 normalised with per-channel mean/std of [0, 1] pixels.

    The same float32 arithmetic as the training pipeline (``bhvit.data.normalize``).
    """
    m = (np.asarray(mean, dtype=np.float32) * np.float32(255)).reshape(1, -1, 1, 1)
    s = (np.asarray(std, dtype=np.float32) * np.float32(255)).reshape(1, -1, 1, 1)
    return (np.asarray(x).astype(np.float32) - m) / s


def prepare_image(path, in_chans: int, img_size: int, data: Optional[dict], info: Optional[dict] = None) -> np.ndarray:
    """One image file as the network's normalised float32 ``(C, H, W)`` input, prepared the way a
    checkpoint's or an export's ``data`` entry records: :func:`eval_transform` (shorter side,
    filter, centre crop) and ``mean`` / ``std`` (:func:`normalize_images`)."""
    data = data or {}
    mean, std = data.get("mean"), data.get("std")
    if not mean or not std:
        raise ConfigError(
            "the model records no input normalisation (mean/std), so images cannot be prepared as in training."
        )
    resize, interpolation = eval_transform(data, img_size)
    a = decode_image(Path(path), in_chans, img_size, info=info, resize=resize, interpolation=interpolation)
    return normalize_images(a[None], mean, std)[0]

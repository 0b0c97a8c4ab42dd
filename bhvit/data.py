"""Datasets: Fashion-MNIST (IDX), CIFAR-10 (python pickle or JPEG ImageFolder), ImageFolder.

Every dataset is decoded once into a uint8 tensor ``(N, C, H, W)`` plus int64 labels
(and cached on disk for ImageFolders), so epochs after the first do no image decoding.
Augmentations (random crop with zero padding, horizontal flip) are batched tensor ops.

Bad data raises :class:`DataError` naming the file, unless ``skip_bad=True``, in
which case unreadable images are skipped and counted in ``Dataset.skipped``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BhvitError, ConfigError
from .files import open_regular
from .runtime.image import decode_image

__all__ = ["DataError", "Dataset", "load_dataset", "DATASETS", "augment_batch", "normalize", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FASHION_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


class DataError(BhvitError, ValueError):
    """A data file or directory is missing, malformed or inconsistent."""


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: List[str]
    skipped: int = 0
    source: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.source}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}."
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels.")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            bad = int(self.labels.max()) if int(self.labels.max()) >= len(self.classes) else int(self.labels.min())
            raise DataError(f"{self.source}: label {bad} out of range 0..{len(self.classes) - 1}.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int, seed: int = 0) -> "Dataset":
        """A fixed random subset of ``n`` images (all if ``n >= len``)."""
        idx = subset_indices(len(self), n, seed)
        if idx is None:
            return self
        return Dataset(self.images[idx], self.labels[idx], self.classes, self.skipped, self.source)

    def channel_stats(self, chunk_bytes: int = 4 << 20) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std (unbiased) of the pixels scaled to [0, 1], from exact
        per-channel histograms of ``chunk_bytes`` of images at a time: no copy of the set."""
        n_img, c = self.images.shape[:2]
        step = max(1, chunk_bytes // max(1, self.images[0].numel() if n_img else 1))
        hist = torch.zeros(c, 256, dtype=torch.int64)
        for i in range(0, n_img, step):
            chunk = self.images[i : i + step]
            for ch in range(c):
                hist[ch] += torch.bincount(chunk[:, ch].reshape(-1), minlength=256)
        v = torch.arange(256, dtype=torch.int64)
        n = self.images.numel() // c if c else 0
        mean, std = [], []
        for h in hist:
            s, s2 = int((h * v).sum()), int((h * v * v).sum())  # exact
            mean.append(s / n / 255)
            var = (s2 * n - s * s) / (n * max(n - 1, 1)) / 255**2
            std.append(max(1e-3, max(var, 0.0) ** 0.5))
        return mean, std


def subset_indices(length: int, n: int, seed: int = 0) -> Optional[torch.Tensor]:
    """The sorted indices of a fixed random subset of ``n`` of ``length`` items (None: all)."""
    if n <= 0:
        raise DataError(f"subset size must be positive, got {n}.")
    if n >= length:
        return None
    idx = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:n]
    return idx.sort().values


# --- IDX (Fashion-MNIST) ---------------------------------------------------------
# An IDX payload larger than this is refused before it is read (Fashion-MNIST's largest
# file is 47 MB); raise it for bigger IDX datasets.
MAX_IDX_BYTES = 1 << 30


@contextlib.contextmanager
def _open_maybe_gz(path: Path):
    with open_regular(path) as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


def read_idx(path: Path, max_bytes: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw) of unsigned bytes into an array.

    The header is checked before the payload is read, and the payload is read in chunks
    into an array of exactly the size the header gives (at most ``max_bytes``, default
    :data:`MAX_IDX_BYTES`), so a file that expands to more than it claims is never held."""
    max_bytes = MAX_IDX_BYTES if max_bytes is None else max_bytes
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: too short for an IDX header ({len(head)} bytes).")
            zero, dtype, ndim = head[0] << 8 | head[1], head[2], head[3]
            if zero != 0 or dtype != 0x08 or ndim < 1:
                raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {head.hex()}).")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header.")
            dims = struct.unpack(">" + "I" * ndim, raw_dims)
            expected = int(np.prod(dims, dtype=object))
            if expected > max_bytes:
                raise DataError(
                    f"{path}: the IDX header gives shape {dims} ({expected:,} bytes), more "
                    f"than the {max_bytes:,} bytes allowed (bhvit.data.MAX_IDX_BYTES)."
                )
            out = np.empty(expected, dtype=np.uint8)
            view, got = memoryview(out), 0
            while got < expected:
                n = f.readinto(view[got : got + (16 << 20)])
                if not n:
                    break
                got += n
            if got != expected:
                raise DataError(
                    f"{path}: IDX payload is {got} bytes, expected {expected} for shape "
                    f"{dims}; the file is truncated or corrupt."
                )
            if f.read(1):
                raise DataError(
                    f"{path}: IDX payload is longer than the {expected} bytes its header "
                    f"gives for shape {dims}; the file is corrupt."
                )
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{path}: cannot read ({e.__class__.__name__}: {e}); the file is truncated or corrupt."
        ) from None
    return out.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: missing {stem}.gz (Fashion-MNIST IDX files; on Debian/Ubuntu "
        "`apt-get install dataset-fashion-mnist` puts them in "
        f"{FASHION_MNIST_DIR})."
    )


def load_fashion_mnist(root: Path, split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected 3-D image array, got shape {images.shape}.")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected 1-D label array, got shape {labels.shape}.")
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lbl_path} has {len(labels)} labels.")
    if len(labels) and labels.max() >= 10:
        i = int(np.argmax(labels >= 10))
        raise DataError(f"{lbl_path}: label {int(labels[i])} at index {i} out of range 0..9.")
    return Dataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_CLASSES),
        source=str(img_path),
    )


# --- CIFAR-10 python pickle ------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays (no code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytes"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open_regular(path) as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing CIFAR-10 batch file.") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(
            f"{path}: cannot unpickle CIFAR-10 batch ({e.__class__.__name__}: {e}); the file is truncated or corrupt."
        ) from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, got {type(d).__name__}.")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: missing 'data' or 'labels' in CIFAR-10 batch.")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(
                f"{path}: 'data' holds {data.dtype} values"
                + (f" from {data.min()} to {data.max()}" if data.dtype.kind in "iuf" and data.size else "")
                + "; CIFAR-10 pixels are integers 0..255."
            )
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: 'labels' are not integers ({e}).") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(
            f"{path}: data of shape {data.shape} with {len(labels)} labels; expected (N, 3072) and N labels."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= 10):
        i = int(np.argmax((labels < 0) | (labels >= 10)))
        raise DataError(f"{path}: label {int(labels[i])} at index {i} out of range 0..9.")
    return data.reshape(-1, 3, 32, 32), labels


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar_pickle(root: Path, split: str) -> Dataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_load_cifar_batch(root / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Dataset(torch.from_numpy(data), torch.from_numpy(labels), list(CIFAR_CLASSES), source=str(root))


# --- ImageFolder -----------------------------------------------------------------
def _split_dir(root: Path, split: str) -> Path:
    cands = ["train"] if split == "train" else ["val", "test"]
    for c in cands:
        if (root / c).is_dir():
            return root / c
    raise DataError(
        f"{root}: no {' or '.join(cands)}/ directory (ImageFolder layout: "
        f"{root}/train/<class>/*, {root}/val|test/<class>/*)."
    )


def _list_images(split_dir: Path, classes: Optional[List[str]]) -> Tuple[List[str], List[Tuple[Path, int]]]:
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not found:
        raise DataError(f"{split_dir}: no class folders.")
    if classes is not None and found != classes:
        raise DataError(f"{split_dir}: class folders {found} differ from the training classes {classes}.")
    items = []
    for i, c in enumerate(found):
        files = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"{split_dir / c}: empty class folder (no image files).")
        items += [(p, i) for p in files]
    return found, items


_decode = decode_image  # the runtime's decoder: training and deployment see the same pixels


def load_imagefolder(
    root: Path,
    split: str,
    channels: int = 3,
    size: Optional[int] = None,
    skip_bad: bool = False,
    cache_dir: Optional[Path] = None,
    classes: Optional[List[str]] = None,
    progress: bool = False,
    subset: Optional[int] = None,
    seed: int = 0,
) -> Dataset:
    """Decode an ImageFolder split. With ``subset``, only the files of the fixed random
    subset (:meth:`Dataset.subset`'s choice among the listed files) are decoded."""
    split_dir = _split_dir(root, split)
    found, items = _list_images(split_dir, classes)
    if subset is not None:
        idx = subset_indices(len(items), subset, seed)
        if idx is not None:
            items = [items[i] for i in idx.tolist()]
    # Every file's class, name, size and mtime: a file moved to another class folder, or
    # changed, makes a new cache (one stat per file, small next to decoding it).
    stats, readable, unstat = [], [], 0
    for p, label in items:
        try:
            st = p.stat()
        except OSError as e:  # e.g. a dangling link or a link loop
            if skip_bad:
                unstat += 1
                continue
            raise DataError(
                f"{p}: cannot read ({e.strerror or e}); remove or fix this file, or pass "
                "skip_bad / --skip-bad to skip and count such files."
            ) from None
        stats.append(f"{label}/{p.name}:{st.st_size}:{st.st_mtime_ns}")
        readable.append((p, label))
    items = readable
    # (the "tv" tag: images resized with torchvision's rounding, runtime.image.resize_centre_crop)
    key_src = f"tv|{split_dir.resolve()}|{channels}|{size}|{skip_bad}|{len(items)}|" + "|".join(stats)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"imagefolder-{key}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        from safetensors.torch import load_file

        try:
            t = load_file(str(cache))
            return Dataset(t["images"], t["labels"], found, int(t["skipped"].item()), str(split_dir))
        except Exception:
            pass  # unreadable cache: decode again and rewrite it
    images, labels, skipped, shape = None, [], unstat, None
    for n, (p, y) in enumerate(items):
        try:
            a = _decode(p, channels, size)
        except Exception as e:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(
                f"{p}: cannot decode image ({e.__class__.__name__}: {e}); pass "
                "skip_bad / --skip-bad to skip and count such files."
            ) from None
        if shape is None:
            shape = a.shape
            # one uint8 tensor for the split, filled in place: the peak is the decoded set (no
            # list of arrays and stacked copy); the files before this one were all skipped
            images = torch.empty((len(items) - n, *shape), dtype=torch.uint8)
        elif a.shape != shape:
            if skip_bad:
                skipped += 1
                continue
            raise DataError(
                f"{p}: image size {a.shape[2]}x{a.shape[1]} differs from "
                f"{shape[2]}x{shape[1]} of the first image; set an image size to resize."
            )
        images[len(labels)] = torch.from_numpy(a)
        labels.append(y)
        if progress and (n + 1) % 5000 == 0:
            print(f"decoded {n + 1}/{len(items)} images from {split_dir}", flush=True)
    if not labels:
        raise DataError(f"{split_dir}: no readable images.")
    images = images[: len(labels)]  # a view: skipped files leave their rows unused
    ds = Dataset(images, torch.tensor(labels, dtype=torch.int64), found, skipped, str(split_dir))
    if cache is not None:
        from safetensors.torch import save_file

        from .checkpoint import _atomic

        tensors = {"images": ds.images, "labels": ds.labels, "skipped": torch.tensor([skipped])}
        try:  # the cache only saves time: a full disk or a read-only directory must not stop a run
            _atomic(cache, lambda tmp: save_file(tensors, tmp))  # written from the tensors, no copy
        except OSError as e:
            print(f"warning: could not write the decoded-image cache ({e}); going on without it", file=sys.stderr)
    return ds


def default_cache_dir() -> Path:
    return Path(os.environ.get("BHVIT_CACHE", Path.home() / ".cache" / "bhvit"))


def _cifar_pickles(root: Path) -> List[Path]:
    return [
        c for c in (root, root / "cifar-10-batches-py") if (c / "batches.meta").exists() or (c / "test_batch").exists()
    ]


def image_folder_root(name: str, data_dir: Optional[str]) -> Optional[Path]:
    """The ImageFolder root a dataset reads (``imagefolder``, or ``cifar10`` given as JPEG
    folders), or None for the sets read from their own files (IDX, CIFAR pickles)."""
    if name == "imagefolder":
        return Path(data_dir) if data_dir is not None else None
    if name != "cifar10" or data_dir is None:
        return None
    root = Path(data_dir)
    if _cifar_pickles(root):
        return None
    folder = next((c for c in (root, root / "cifar10") if (c / "train").is_dir()), None)
    if folder is None and root.is_dir():
        raise DataError(
            f"{root}: neither cifar-10-batches-py/ (python release) nor an ImageFolder with train/ and test/."
        )
    return folder


def count_images(root: Path, split: str) -> int:
    """Image files of an ImageFolder split (listed, not opened)."""
    return len(_list_images(_split_dir(root, split), None)[1])


def load_dataset(
    name: str,
    split: str,
    data_dir: Optional[str] = None,
    *,
    channels: int = 3,
    size: Optional[int] = None,
    skip_bad: bool = False,
    cache_dir: Optional[str] = None,
    classes: Optional[List[str]] = None,
    progress: bool = False,
    subset: Optional[int] = None,
    seed: int = 0,
) -> Dataset:
    """Load ``split`` ('train' or 'test') of a dataset as uint8 tensors.

    ``fashion-mnist``: IDX files in ``data_dir`` (default /usr/share/datasets/fashion-mnist).
    ``cifar10``: ``cifar-10-batches-py/`` (python pickles, read without running code) or a
    JPEG ImageFolder (``train/``, ``test/``). ``imagefolder``: ``train/<class>/*`` and
    ``val/`` or ``test/``; ``size`` resizes (shorter side) and centre-crops. ``subset``: a
    fixed random subset of that many images, chosen with ``seed`` (an ImageFolder decodes
    only those files).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}.")
    if name == "fashion-mnist":
        root = Path(data_dir or FASHION_MNIST_DIR)
    elif data_dir is None:
        raise DataError(f"dataset {name!r} needs a data directory (--data-dir).")
    else:
        root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist.")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = image_folder_root(name, data_dir)
    if name == "fashion-mnist":
        ds = load_fashion_mnist(root, split)
    elif name == "cifar10":
        if folder is None:
            ds = load_cifar_pickle(_cifar_pickles(root)[0], split)
        channels = 3
    if folder is not None:  # decodes only the subset's files
        return load_imagefolder(folder, split, channels, size, skip_bad, cache, classes, progress, subset, seed)
    return ds.subset(subset, seed) if subset is not None else ds


# --- batch transforms ------------------------------------------------------------
def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float normalised with per-channel mean/std of [0, 1] pixels."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (x.float() - m) / s


def augment_batch(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per image."""
    B, C, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        rows = (dy.view(B, 1) + torch.arange(H)).view(B, 1, H, 1).expand(B, C, H, W + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (dx.view(B, 1) + torch.arange(W)).view(B, 1, 1, W).expand(B, C, H, W)
        x = xp.gather(3, cols)
    if flip:
        m = torch.rand(B, generator=gen) < 0.5
        x = torch.where(m.view(B, 1, 1, 1), x.flip(3), x)
    return x

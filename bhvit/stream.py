"""Streaming ImageFolder data: images are decoded per sample in DataLoader worker processes,
so memory stays flat however many images the dataset holds (ImageNet at 224 would be about
190 GB decoded).

:class:`StreamingImageFolder` lists the files (one ``stat`` each, no decoding) and decodes
an image when a batch needs it. Training transforms are per sample and deterministic in
``(seed, epoch, sample index)``, so a run resumed after a kill repeats the interrupted epoch
exactly, with any number of workers:

- ``pad-crop`` (the default, as the in-memory path): the image resized (shorter side) and
  centre-cropped to ``img_size``, then a random crop with zero padding and a horizontal flip;
- ``rrc`` (the ImageNet recipe of the BHViT release, without torchvision): RandomResizedCrop
  (area 0.08-1 of the image, aspect ratio 3/4-4/3, bilinear) to ``img_size`` and a horizontal
  flip; JPEGs are decoded at a reduced DCT size (Pillow's ``draft()``) where the crop allows.

Evaluation: the shorter side to ``resize`` (``round(img_size / 0.875)`` with ``rrc``,
``img_size`` otherwise, or what the caller sets, e.g. a checkpoint's record), centre crop:
:func:`bhvit.runtime.image.resize_centre_crop`, the pixels of the in-memory path and of
``bhvit predict``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .data import DataError, _list_images, _split_dir, subset_indices
from .runtime.image import open_image, resize_centre_crop, to_chw

__all__ = ["StreamingImageFolder", "StreamLoader", "AUGMENTS", "available_memory", "fits_in_memory"]

AUGMENTS = ("pad-crop", "rrc")
# Peak resident memory per decoded byte of an ImageFolder read into memory (bhvit.data decodes
# into one preallocated uint8 tensor, statistics from histograms): 1.08 measured, 2,000
# images at 224 (287 MiB), peak RSS growth of load_imagefolder + channel_stats.
IN_MEMORY_PEAK_FACTOR = 1.1
# `--data-in-memory auto` decodes into memory when that peak, for the training and test sets
# of every process on the machine, takes at most this share of the available memory (the
# rest is for the model, its activations and the optimizer), else streams.
IN_MEMORY_SHARE = 0.5
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
STATS_SAMPLE = 2000  # images the normalisation statistics of a streamed set are estimated from


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory() -> Optional[int]:
    """Bytes this process can still take: the system's MemAvailable, bounded by the cgroup's
    limit minus its usage (a container's limit is not in /proc/meminfo); None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage, stat, cache in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:
            use -= _stat_value(stat, cache)  # page cache the kernel reclaims is not in use
            avail = lim - use if avail is None else min(avail, lim - use)
    return None if avail is None else max(avail, 0)


def in_memory_bytes(n_images: int, channels: int, size: int, processes: int = 1) -> int:
    """The peak memory of decoding ``n_images`` into memory in each of ``processes``."""
    return int(n_images * channels * size * size * IN_MEMORY_PEAK_FACTOR * processes)


def fits_in_memory(n_images: int, channels: int, size: int, processes: int = 1, available=None) -> bool:
    """Whether ``--data-in-memory auto`` decodes ``n_images`` (training and test) into memory."""
    avail = available_memory() if available is None else available
    if avail is None:  # no way to know: the limit of earlier versions, 4 GiB of decoded images
        return n_images * channels * size * size <= 4 << 30
    return in_memory_bytes(n_images, channels, size, processes) <= IN_MEMORY_SHARE * avail


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (run seed, epoch, sample) only."""
    return (seed * 1_000_003 + epoch * 7919) * 2_147_483_647 + index


def rrc_box(w: int, h: int, gen: torch.Generator) -> Tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, width, height) in a ``w x h`` image: area a
    uniform fraction of RRC_SCALE, log-uniform aspect ratio in RRC_RATIO, ten tries, then
    the whole image cropped to the ratio range (as torchvision's)."""
    area = w * h
    log_r = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        target = area * (RRC_SCALE[0] + u[0] * (RRC_SCALE[1] - RRC_SCALE[0]))
        ratio = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            v = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
            return int(v[0] * (w - cw + 1)), int(v[1] * (h - ch + 1)), cw, ch
    r = w / h
    if r < RRC_RATIO[0]:
        cw, ch = w, round(w / RRC_RATIO[0])
    elif r > RRC_RATIO[1]:
        cw, ch = round(h * RRC_RATIO[1]), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def pad_crop_flip(a: np.ndarray, pad: int, flip: bool, gen: torch.Generator) -> np.ndarray:
    """One image's random crop with zero padding ``pad`` and random horizontal flip."""
    C, H, W = a.shape
    if pad > 0:
        d = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        p = np.zeros((C, H + 2 * pad, W + 2 * pad), np.uint8)
        p[:, pad : pad + H, pad : pad + W] = a
        a = p[:, d[0] : d[0] + H, d[1] : d[1] + W]
    if flip and float(torch.rand((), generator=gen)) < 0.5:
        a = a[:, :, ::-1]
    return np.ascontiguousarray(a)


class StreamingImageFolder:
    """An ImageFolder split read per sample: ``labels``, ``classes`` and ``len`` as
    :class:`bhvit.data.Dataset`, images decoded by :meth:`train_image` / :meth:`eval_image`."""

    streaming = True

    def __init__(
        self,
        root: Path,
        split: str,
        channels: int,
        size: int,
        classes: Optional[List[str]] = None,
        subset: Optional[int] = None,
        seed: int = 0,
        skip_bad: bool = False,
        augment: str = "pad-crop",
        resize: Optional[int] = None,
        interpolation: str = "bilinear",
    ):
        if augment not in AUGMENTS:
            raise DataError(f"augment must be one of {AUGMENTS}, got {augment!r}.")
        self.split_dir = _split_dir(Path(root), split)
        self.classes, items = _list_images(self.split_dir, classes)
        if subset is not None:
            idx = subset_indices(len(items), subset, seed)
            if idx is not None:
                items = [items[i] for i in idx.tolist()]
        readable, self.skipped = [], 0
        for p, label in items:
            if p.is_file():
                readable.append((str(p), label))
            elif skip_bad:
                self.skipped += 1
            else:
                raise DataError(
                    f"{p}: cannot read (not a regular file, a dangling link or a link loop); "
                    "remove or fix it, or pass --skip-bad to skip and count such files."
                )
        self.items = readable
        self.labels = torch.tensor([y for _, y in readable], dtype=torch.int64)
        self.channels, self.size, self.augment, self.skip_bad = channels, size, augment, skip_bad
        # evaluation: the shorter side before the centre crop, and the filter
        self.resize = resize if resize is not None else round(size / 0.875) if augment == "rrc" else size
        self.interpolation = interpolation
        self.source = str(self.split_dir)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def _open(self, i: int, draft=None):
        try:
            return open_image(Path(self.items[i][0]), self.channels, draft=draft)
        except Exception as e:
            raise DataError(f"{self.items[i][0]}: cannot decode image ({e.__class__.__name__}: {e}).") from None

    def eval_image(self, i: int) -> np.ndarray:
        """uint8 ``(C, size, size)``: shorter side to ``resize``, centre crop."""
        return to_chw(resize_centre_crop(self._open(i), self.size, self.resize, self.interpolation))

    def train_image(self, i: int, seed: int, epoch: int, pad: int, flip: bool) -> np.ndarray:
        gen = torch.Generator().manual_seed(sample_seed(seed, epoch, i))
        if self.augment == "pad-crop":
            return pad_crop_flip(self.eval_image(i), pad, flip, gen)
        from PIL import Image

        box = {}

        def draft(w, h):  # decode at a reduced size that still gives the crop >= size pixels
            box["crop"], box["size"] = rrc_box(w, h, gen), (w, h)
            _, _, cw, ch = box["crop"]
            return (max(1, math.ceil(w * self.size / cw)), max(1, math.ceil(h * self.size / ch)))

        im = self._open(i, draft=draft)
        if "crop" not in box:  # not a JPEG: the box is drawn in the decoded image
            draft(*im.size)
        (left, top, cw, ch), (w0, h0) = box["crop"], box["size"]
        sx, sy = im.size[0] / w0, im.size[1] / h0
        im = im.resize(
            (self.size, self.size), Image.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        )
        a = to_chw(im)
        if flip and float(torch.rand((), generator=gen)) < 0.5:
            a = np.ascontiguousarray(a[:, :, ::-1])
        return a

    def channel_stats(self, n: int = STATS_SAMPLE, seed: int = 0) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std of [0, 1] pixels, estimated from a fixed random sample of
        ``n`` images (evaluation transform); all of them if there are fewer."""
        idx = subset_indices(len(self), n, seed)
        idx = range(len(self)) if idx is None else idx.tolist()
        s = torch.zeros(self.channels, dtype=torch.float64)
        s2 = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for i in idx:
            x = torch.from_numpy(self.eval_image(i)).double().div_(255).flatten(1)
            s += x.sum(1)
            s2 += (x * x).sum(1)
            count += x.shape[1]
        mean = s / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
        return mean.tolist(), std.tolist()


class _Samples(torch.utils.data.Dataset):
    """What DataLoader workers run: ``(epoch, index)`` -> (uint8 image, label)."""

    def __init__(self, ds: StreamingImageFolder, train: bool, seed: int, pad: int, flip: bool):
        self.ds, self.train, self.seed, self.pad, self.flip = ds, train, seed, pad, flip

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        a = self.ds.train_image(i, self.seed, epoch, self.pad, self.flip) if self.train else self.ds.eval_image(i)
        return torch.from_numpy(a), self.ds.labels[i]


class _EpochBatches:
    """A batch sampler whose batches (lists of dataset indices) are set per epoch."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def __iter__(self):
        return iter([[(self.epoch, int(i)) for i in b] for b in self.batches])

    def __len__(self):
        return len(self.batches)


class StreamLoader:
    """Batches of a :class:`StreamingImageFolder` decoded by ``workers`` DataLoader
    processes (persistent across epochs, pinned memory on CUDA, two batches prefetched per
    worker); ``workers=0`` decodes in the training process."""

    def __init__(
        self,
        ds: StreamingImageFolder,
        train: bool,
        workers: int,
        seed: int = 0,
        pad: int = 0,
        flip: bool = True,
        pin_memory: bool = False,
    ):
        self.sampler = _EpochBatches()
        kw = dict(persistent_workers=True, prefetch_factor=2) if workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            _Samples(ds, train, seed, pad, flip),
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            **kw,
        )

    def epoch(self, epoch: int, batches):
        """Iterate ``(images uint8 (B, C, H, W), labels)`` for ``batches`` of ``epoch``."""
        self.sampler.epoch, self.sampler.batches = epoch, [list(map(int, b)) for b in batches]
        return iter(self.loader)

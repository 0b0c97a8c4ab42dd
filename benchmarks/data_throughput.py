"""Streaming data path: decode + augment throughput per decoder and worker count, and the
peak memory of a training process on a small and a four-times larger ImageFolder.

Generates synthetic ImageFolders of real JPEGs (256-500 px sides, quality 90) under
``--work``, then prints

- images/s of decode + RandomResizedCrop + flip to ``--size`` for each decoder: Pillow
  decoding the whole JPEG, bhvit's ``rrc`` path (Pillow's ``draft()``: a DCT-reduced decode
  where the crop allows) and, if installed, simplejpeg (libjpeg-turbo) with the same
  reduced decode, single process; then bhvit's StreamLoader with 1 and 2 workers (median
  of ``--runs``);
- the peak RSS of ``bhvit train --data-in-memory no --workers 2 --max-steps N`` on
  ``--small`` and on ``--large`` images (bhvit_tiny at 224x224; memory must not grow with
  the number of images).

    python benchmarks/data_throughput.py --work runs/data_bench --small 4000 --large 16000
    python benchmarks/data_throughput.py --small 300 --images 300 --sides 1000 1600 --skip-rss
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, n: int, seed: int = 0, sides=(256, 500)) -> Path:
    """``root/{train,test}/c<k>/*.jpg``: n training JPEGs in 10 classes (and 64 test ones)."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", 64)):
        for i in range(count):
            d = root / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
            # smooth content (a gradient plus noise) compresses like a photograph, not like noise
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(str(n))
    return root


def pillow_full(path: Path, size: int, gen: torch.Generator):
    from PIL import Image

    from bhvit.stream import rrc_box

    with Image.open(path) as im:
        im = im.convert("RGB")
        left, top, cw, ch = rrc_box(*im.size, gen)
        im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return np.asarray(im)


def simplejpeg_rrc(ds, i: int, g: torch.Generator):
    """bhvit's rrc transform with libjpeg-turbo through simplejpeg instead of Pillow: the
    same box, the JPEG decoded at the smallest DCT-reduced size that leaves the crop
    ``--size`` pixels."""
    import simplejpeg
    from PIL import Image

    from bhvit.stream import rrc_box

    data = Path(ds.items[i][0]).read_bytes()
    w, h, _, _ = simplejpeg.decode_jpeg_header(data)
    left, top, cw, ch = rrc_box(w, h, g)
    arr = simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_width=math.ceil(w * ds.size / cw), min_height=math.ceil(h * ds.size / ch)
    )
    sx, sy = arr.shape[1] / w, arr.shape[0] / h
    im = Image.fromarray(arr).resize(
        (ds.size, ds.size), Image.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    )
    return np.asarray(im)[:, ::-1] if float(torch.rand((), generator=g)) < 0.5 else np.asarray(im)


def decoders(ds, size):
    out = {
        "pillow, full decode": lambda i, g: pillow_full(Path(ds.items[i][0]), size, g),
        "pillow draft (bhvit rrc)": lambda i, g: ds.train_image(i, 0, int(g.initial_seed()), 0, True),
    }
    try:
        import simplejpeg  # noqa: F401

        out["simplejpeg, reduced decode"] = lambda i, g: simplejpeg_rrc(ds, i, g)
    except ImportError:
        print("simplejpeg is not installed (pip install simplejpeg): not measured")
    return out


def throughput(args, root: Path) -> None:
    from bhvit.stream import StreamingImageFolder, StreamLoader

    ds = StreamingImageFolder(root, "train", channels=3, size=args.size, augment="rrc")
    n = min(args.images, len(ds))
    print(
        f"decode + RandomResizedCrop + flip to {args.size}x{args.size}, {n} images, median of {args.runs} "
        "(the decoders take turns in each run):"
    )
    fns = decoders(ds, args.size)
    rates = {name: [] for name in fns}
    for r in range(args.runs):
        for name, fn in fns.items():
            g = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            for i in range(n):
                fn(i, g)
            rates[name].append(n / (time.perf_counter() - t))
    base = statistics.median(rates["pillow, full decode"])
    for name, v in rates.items():
        m = statistics.median(v)
        print(f"  {name:<28} 1 process   {m:7.1f} images/s  ({m / base:.2f}x pillow, full decode)")
    for workers in (1, 2):
        loader = StreamLoader(ds, True, workers, seed=0, flip=True)
        batches = [list(range(i, min(i + 32, n))) for i in range(0, n, 32)]
        rates = []
        for r in range(args.runs):
            t = time.perf_counter()
            for _ in loader.epoch(r, batches):
                pass
            rates.append(n / (time.perf_counter() - t))
        print(f"  {'StreamLoader (bhvit rrc)':<28} {workers} worker(s) {statistics.median(rates):7.1f} images/s")
        del loader


def peak_rss_mb(args, root: Path, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "bhvit",
        "train",
        "--data",
        "imagefolder",
        "--data-dir",
        str(root),
        "--model",
        "bhvit_tiny",
        "--set",
        f"img_size={args.size}",
        "--out",
        str(out),
        "--data-in-memory",
        "no",
        "--augment",
        "rrc",
        "--workers",
        "2",
        "--max-steps",
        str(args.steps),
        "--batch-size",
        "8",
        "--test-subset",
        "16",
        "--threads",
        "1",
        "--no-progress",
        "--no-step-flips",
        "--cache-dir",
        str(out.parent / "cache"),
    ]
    # a fresh wrapper per run: RUSAGE_CHILDREN's maximum then covers this training process only
    wrap = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:]) if p.returncode else None; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    )
    r = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"training failed:\n{r.stderr[-4000:]}")
    return int(r.stdout.split()[-1]) / 1024  # KiB -> MiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/data_bench", help="where the synthetic ImageFolders go")
    p.add_argument("--small", type=int, default=4000, help="training images of the small folder")
    p.add_argument("--large", type=int, default=16000, help="training images of the large folder")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=400, help="images per throughput run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="--max-steps of each training process")
    p.add_argument(
        "--sides",
        type=int,
        nargs=2,
        default=[256, 500],
        metavar=("MIN", "MAX"),
        help="range of the JPEGs' side lengths in pixels",
    )
    p.add_argument("--skip-rss", action="store_true", help="throughput only")
    args = p.parse_args()
    work = Path(args.work)
    t = time.perf_counter()
    tag = "" if args.sides == [256, 500] else f"_{args.sides[0]}-{args.sides[1]}px"
    small = make_folder(work / f"folder{args.small}{tag}", args.small, sides=args.sides)
    print(f"ImageFolders ready in {time.perf_counter() - t:.0f} s")
    torch.set_num_threads(1)
    throughput(args, small)
    if args.skip_rss:
        return
    large = make_folder(work / f"folder{args.large}{tag}", args.large, seed=1, sides=args.sides)
    rss_small = peak_rss_mb(args, small, work / "run_small")
    rss_large = peak_rss_mb(args, large, work / "run_large")
    print(
        f"peak RSS of the training process: {args.small} images {rss_small:.0f} MiB, {args.large} images "
        f"{rss_large:.0f} MiB, difference {rss_large - rss_small:+.0f} MiB"
    )


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

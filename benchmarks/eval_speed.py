"""PyTorch evaluation throughput of a BHViT on the CPU, before and after the eval-mode
speed-ups, side by side in one process.

Arms, interleaved run by run so that machine noise hits them alike (a run: forward passes
over --images random images, at least one batch, in batches of each --batch size; the
median of --runs runs):

  before    torch.no_grad(); every forward binarizes every kernel again, through the
            quantizers' autograd Functions (the code before this change)
  cache     torch.no_grad(); binarized kernels cached in eval mode (bhvit.layers.EvalCache),
            quantizers as plain tensor ops when no gradient is needed
  after     as cache, under torch.inference_mode() (what bhvit.train.evaluate runs)

Then bhvit.train.evaluate itself on a synthetic uint8 dataset of --images images (loss,
accuracy, normalisation included) at each batch size and at its default
(bhvit.train.eval_batch_size: cache-sized on the CPU). A random-init model on random
inputs: the cost of a forward does not depend on the values.

    python benchmarks/eval_speed.py --model bhvit_tiny_c32 --batch 1 16 64 256 --threads 2 --runs 5
    python benchmarks/eval_speed.py --batch 256 --profile   # the top operators of each arm
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

import bhvit
from bhvit import layers, quantizers
from bhvit.data import Dataset
from bhvit.train import eval_batch_size, evaluate


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@contextlib.contextmanager
def before():
    """bhvit's eval path before the kernel cache: the quantizers' autograd Functions on
    every forward, nothing cached."""
    saved = quantizers._needs_autograd, layers.EvalCache.__dict__["usable"]  # the staticmethod itself
    quantizers._needs_autograd = lambda x: True
    layers.EvalCache.usable = staticmethod(lambda module: False)
    try:
        with torch.no_grad():
            yield
    finally:
        quantizers._needs_autograd, layers.EvalCache.usable = saved


ARMS = {
    "before": before,
    "cache": torch.no_grad,
    "after": torch.inference_mode,
}


def forward_all(model, images: torch.Tensor, batch: int) -> None:
    for b in images.split(batch):
        model(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bhvit_tiny_c32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256], help="batch sizes (default 1 16 64 256)")
    ap.add_argument("--images", type=int, default=64, help="images per run, at least one batch (default 64)")
    ap.add_argument("--runs", type=int, default=5, help="runs per arm; the median is reported (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of each arm at the first --batch")
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or args.images < 1 or args.runs < 1:
        ap.error("--batch, --images and --runs must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bhvit.create_model(args.model, num_classes=10).eval()
    cfg = model.cfg
    n_images = max(args.images, max(args.batch))
    images = torch.randn(n_images, cfg.in_chans, cfg.img_size, cfg.img_size)
    print(
        f"{args.model} (binary, random init), {cfg.in_chans}x{cfg.img_size}x{cfg.img_size} images; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_name()}; median of {args.runs} runs"
    )

    with torch.no_grad():  # warm-up: allocator, oneDNN primitives, the cache
        forward_all(model, images[: max(args.batch)], max(args.batch))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, arm in ARMS.items():
            with arm():
                forward_all(model, images[: args.batch[0]], args.batch[0])
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    forward_all(model, images[: args.batch[0]], args.batch[0])
            print(f"--- {name}, batch {args.batch[0]}")
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=28))

    print(f"{'batch':>5} | " + " | ".join(f"{n:>16}" for n in ARMS) + " | after/before")
    for batch in args.batch:
        run = images[: max(args.images, batch)]
        times = {name: [] for name in ARMS}
        for _ in range(args.runs):
            for name, arm in ARMS.items():
                with arm():
                    t = time.perf_counter()
                    forward_all(model, run, batch)
                    times[name].append(time.perf_counter() - t)
        rate = {name: len(run) / statistics.median(ts) for name, ts in times.items()}
        cells = " | ".join(f"{rate[n]:10.1f} img/s" for n in ARMS)
        print(f"{batch:5d} | {cells} | {rate['after'] / rate['before']:.2f}x", flush=True)

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, tuple(images.shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (len(pixels),), generator=g)
    mean, std = [0.5] * cfg.in_chans, [0.25] * cfg.in_chans
    default = eval_batch_size(model)
    for batch in [*args.batch, default]:
        n = max(args.images, batch)
        ds = Dataset(pixels[:n], labels[:n], [str(i) for i in range(10)])
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            evaluate(model, ds, mean, std, batch_size=batch)
            ts.append(time.perf_counter() - t)
        label = f"{batch:4d}" + (" (its default)" if batch == default else "")
        print(f"bhvit.train.evaluate, batch {label}: {n / statistics.median(ts):10.1f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

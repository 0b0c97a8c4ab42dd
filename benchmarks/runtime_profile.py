"""Per-op-kind profile of libbhvit's prepared plan, through the Python entry.

For each model, thread count and batch size: runs the plan --runs times with its profile on
(``Plan.profile``; the same sums ``BHVIT_PROFILE=1`` prints when a plan is freed) and prints,
per op kind, the milliseconds per image and the share of the run, one column per batch size.
The configurations run interleaved (round-robin, --rounds times) and each column is the
round with the median total, so a machine shared with other work shows in every column alike.

    python benchmarks/runtime_profile.py --models bhvit_tiny --batches 1 --threads 1
    python benchmarks/runtime_profile.py --models bhvit_tiny_c32 --batches 1 64 --threads 1 2

``--export DIR`` profiles an existing export instead of a fresh random-weight model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bhvit import runtime
from bhvit.runtime import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _export(name: str) -> str:
    import torch

    from bhvit.export import export_model
    from runtime_latency import _binary_model

    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    export_model(_binary_model(name), d)
    return d


def profile_once(rt, x, runs):
    """Profile of ``runs`` calls ``rt(x)`` (one warm-up first): {kind: seconds} and the wall seconds."""
    rt(x)
    rt.plan.profile(enable=True)
    t = time.perf_counter()
    for _ in range(runs):
        rt(x)
    wall = time.perf_counter() - t
    p = rt.plan.profile()
    rt.plan.profile(enable=False)
    return p, wall


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["bhvit_tiny_c32"])
    p.add_argument("--export", default=None, help="an export directory (instead of --models)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--runs", type=int, default=5, help="calls per profile")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is shown")
    args = p.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}; kernels: {kernels.backend()}")
    exports = [(args.export, args.export)] if args.export else [(n, _export(n)) for n in args.models]
    for name, d in exports:
        for threads in args.threads:
            rt = runtime.load(d, threads=threads)
            c = rt.cfg
            xs = {
                b: np.random.default_rng(b)
                .standard_normal((b, c["in_chans"], c["img_size"], c["img_size"]))
                .astype(np.float32)
                for b in args.batches
            }
            got = {b: [] for b in args.batches}
            for _ in range(args.rounds):
                for b in args.batches:
                    got[b].append(profile_once(rt, xs[b], max(1, args.runs)))
            cols = {}
            for b in args.batches:
                rounds = sorted(got[b], key=lambda pw: pw[0]["total"][0])
                cols[b] = rounds[len(rounds) // 2]
            kinds = [k for k in cols[args.batches[0]][0] if k not in ("total", "images", "workers", "tile")]
            print(
                f"\n{name}, {threads} thread(s): ms per image (share of the workers' time), "
                f"median of {args.rounds} rounds"
            )
            print(f"{'op kind':<36}" + "".join(f"{'batch ' + str(b):>20}" for b in args.batches))
            for k in kinds + ["other", "total (plan)", "Python entry (wall)"]:
                line = f"{k:<36}"
                show = False
                for b in args.batches:
                    prof, wall = cols[b]
                    imgs = prof["images"][1]
                    tot = max(prof["total"][0], prof["workers"][0])  # thread time with tiles in parallel
                    if k == "other":
                        v = tot - sum(prof[q][0] for q in kinds)
                    elif k == "total (plan)":
                        v = prof["total"][0]
                    elif k == "Python entry (wall)":
                        v = wall
                    else:
                        v = prof[k][0]
                        show |= prof[k][1] > 0
                    if k in ("other", "total (plan)", "Python entry (wall)"):
                        show = True
                    line += f"{1e3 * v / imgs:>12.3f} ({100 * v / tot:4.1f}%)" if imgs else f"{'-':>20}"
                if show:
                    print(line)
            med = {b: statistics.median(pw[0]["total"][0] / pw[0]["images"][1] for pw in got[b]) for b in args.batches}
            print(
                "tiles (images x workers): "
                + ", ".join(f"batch {b}: {cols[b][0]['tile'][1]} x {cols[b][0]['workers'][1]}" for b in args.batches)
            )
            print("images/s (plan, median round): " + ", ".join(f"batch {b}: {1 / med[b]:.0f}" for b in args.batches))
            del rt


if __name__ == "__main__":
    main()

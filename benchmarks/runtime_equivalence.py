"""Does the 1-bit runtime reproduce the trained model? Run an export over a test set and
compare with PyTorch logits: top-1 of both, predictions that differ, logit differences.

The reference is either a checkpoint (run in PyTorch on the CPU here) or an ``.npz``
written by ``bhvit eval CKPT --save-logits FILE`` (e.g. on the GPU the model was trained
on; its images must be the same test set in the same order).

    bhvit export runs/fm/student exp/fm
    python benchmarks/runtime_equivalence.py exp/fm --checkpoint runs/fm/student
    python benchmarks/runtime_equivalence.py exp/c10 --logits logits_cuda.npz --data-dir data/cifar10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bhvit import runtime
from bhvit.runtime import kernels
from bhvit.runtime.image import normalize_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", help="directory written by `bhvit export`")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--checkpoint", help="bhvit checkpoint to run in PyTorch (CPU) as the reference")
    ref.add_argument("--logits", help=".npz from `bhvit eval --save-logits` as the reference")
    p.add_argument("--data", default=None, help="dataset name (default: the one the export names)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="runtime threads (0: all)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    args = p.parse_args()

    from bhvit.data import Dataset, load_dataset

    rt = runtime.load(args.export, threads=args.threads)
    cfg, data = rt.cfg, rt.data
    name = args.data or data.get("name")
    if not name or not data.get("mean") or not data.get("std"):
        raise SystemExit(
            f"{args.export}: the export records no dataset name or input normalisation "
            "(mean/std); export with `bhvit export CKPT`, which records them."
        )
    ds = load_dataset(
        name, args.split, args.data_dir, channels=cfg["in_chans"], size=cfg["img_size"], classes=data.get("classes")
    )
    if args.limit:
        ds = Dataset(ds.images[: args.limit], ds.labels[: args.limit], ds.classes, source=ds.source)
    images, labels = ds.images.numpy(), ds.labels.numpy()
    mean, std = data["mean"], data["std"]

    if args.logits:
        z = np.load(args.logits)
        ref_logits = z["logits"][: len(labels)]
        if not np.array_equal(z["labels"][: len(labels)], labels):
            raise SystemExit(f"{args.logits}: its labels are not this test set's (order or content differ).")
    else:
        from bhvit.checkpoint import load_model
        from bhvit.train import evaluate

        model, _ = load_model(args.checkpoint)
        ref_logits = evaluate(model, ds, mean, std, args.batch, return_logits=True)["logits"].numpy()

    t = time.perf_counter()
    got = np.concatenate(
        [rt(normalize_images(images[i : i + args.batch], mean, std)) for i in range(0, len(images), args.batch)]
    )
    wall = time.perf_counter() - t
    diff = np.abs(got.astype(np.float64) - ref_logits)
    res = {
        "export": args.export,
        "reference": args.logits or args.checkpoint,
        "images": int(len(labels)),
        "runtime_top1": round(float(100 * (got.argmax(1) == labels).mean()), 4),
        "reference_top1": round(float(100 * (ref_logits.argmax(1) == labels).mean()), 4),
        "differing_predictions": int((got.argmax(1) != ref_logits.argmax(1)).sum()),
        "max_logit_diff": float(diff.max()),
        "median_logit_diff": float(np.median(diff)),
        "images_with_logit_diff_over_0.01": int((diff.max(1) > 0.01).sum()),
        "runtime_images_per_s": len(labels) / wall,
        "kernels": kernels.backend(),
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

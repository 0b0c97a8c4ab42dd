"""The BHViT ablation study at CPU scale, with a binary-CNN baseline at equal cost.

Gao et al. (CVPR 2025) remove BHViT's components one at a time on CIFAR-10 and compare
it with binary CNNs (ReActNet-ResNet18). This script runs that study at a fixed, small
budget: one full-precision teacher (the full config with ``binary=False``), then every
variant as a binary student distilled from it, on the same class-balanced training
subset, the whole test set, the same epochs and the same seeds:

    full        the full BHViT (``--model``, default bhvit_nano_c32)
    no_qd       qd=false: single-plane (1-bit) attention instead of 3 QD planes
    no_shift    shift=false: no shift branches in the MLPs
    no_msmha    msmha=false: plain global binary attention
    no_msgdc    msgdc=false: plain binary 3x3 conv mixer
    msgdc_only  hybrid=msgdc: MSGDC in all four stages
    msmha_only  hybrid=msmha: MSMHA in all four stages
    fp_down     fp_downsample=true: full-precision downsampling (the paper's dagger model)
    reactnet    the ReActNet-style binary ResNet (``--baseline``, default reactnet_c32),
                sized to the BHViT's BOPs and OPs

Run (CIFAR-10 extracted first with ``mkdir -p data && tar -xzf "$CIFAR10_TAR" -C data/``, a
tarball holding ``cifar10/{train,test}/<class>/*.jpg``; times in docs/ABLATION.md)::

    python experiments/ablation.py --data-dir data/cifar10 --out runs/ablation --threads 1

The training subset is written to ``OUT/data`` as symbolic links (``train/<class>/*`` to
the chosen images, ``test`` to the whole test folder), so every run, whatever its seed,
trains on the same images. Each run lives in ``OUT/<variant>/seed<k>`` and is trained with
``resume``: run the same command again after a kill and it skips finished runs and
continues the unfinished one from its last epoch. Several processes can share one study
(e.g. ``--seeds 0`` and ``--seeds 1`` on two cores): a run another process holds is
skipped. Seed 0 of every variant runs before seed 1, so a study cut short still covers
every variant. The results go to
``OUT/results.json``, ``OUT/results.md`` (mean and spread of the final-epoch test top-1
per variant, with params, BOPs, FLOPs and OPs from :func:`bhvit.complexity`) and
``OUT/ablation.png``; ``--report-only`` rewrites them from the finished runs.

Options: ``--variants full no_qd ...`` picks variants, ``--seeds 0 1``, ``--subset 10000``
(images, class-balanced), ``--epochs``, ``--teacher-epochs``, ``--lr``, ``--teacher-lr``,
``--batch-size``, ``--test-subset`` (for quick checks; default the whole test set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# name -> (label, overrides of the BHViT config; None: the binary-CNN baseline)
VARIANTS: Dict[str, tuple] = {
    "full": ("BHViT (full)", {}),
    "no_qd": ("w/o QD", {"qd": False}),
    "no_shift": ("w/o shift branches", {"shift": False}),
    "no_msmha": ("w/o MSMHA (plain attention)", {"msmha": False}),
    "no_msgdc": ("w/o MSGDC (plain conv)", {"msgdc": False}),
    "msgdc_only": ("MSGDC only (hybrid=msgdc)", {"hybrid": "msgdc"}),
    "msmha_only": ("MSMHA only (hybrid=msmha)", {"hybrid": "msmha"}),
    "fp_down": ("FP downsampling (dagger)", {"fp_downsample": True}),
    "reactnet": ("ReActNet binary CNN", None),
}

# What the paper reports for each variant relative to the full model (CIFAR-10 ablation:
# every removal costs accuracy; ImageNet: hybrid > MSMHA-only > MSGDC-only; the dagger
# models with FP downsampling are 1.7-2 points above the binary ones; BHViT-Small 95.0 %
# and BHViT-Tiny 93.3 % against ReActNet-ResNet18's 92.31 % on CIFAR-10).
PAPER_EXPECT = {
    "no_qd": "below full",
    "no_shift": "below full",
    "no_msmha": "below full",
    "no_msgdc": "below full",
    "msgdc_only": "below msmha_only",
    "msmha_only": "below full",
    "fp_down": "above full",
    "reactnet": "below full",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default="cifar10", help="dataset name for bhvit.data.load_dataset")
    p.add_argument(
        "--data-dir", default="data/cifar10", help="ImageFolder root with train/<class>/* and test/<class>/*"
    )
    p.add_argument("--out", default="runs/ablation", help="study directory")
    p.add_argument("--model", default="bhvit_nano_c32", help="the BHViT every variant modifies")
    p.add_argument("--baseline", default="reactnet_c32", help="the binary-CNN baseline model")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="variants to run, in this order"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument(
        "--subset", type=int, default=10000, help="training images (class-balanced, the same for every run); 0: all"
    )
    p.add_argument("--subset-seed", type=int, default=0, help="seed that picks the subset")
    p.add_argument("--test-subset", type=int, default=None, help="test images (default: all)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every student")
    p.add_argument("--teacher-epochs", type=int, default=10, help="epochs of the FP teacher")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="students' learning rate")
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/bhvit)")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress lines")
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite results.json/.md/.png from the finished runs"
    )
    return p


# --- the training subset ------------------------------------------------------------
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def make_subset_folder(data_dir: Path, out: Path, n: int, seed: int) -> Path:
    """``out/train/<class>/`` with links to ``n`` training images (as equal a share per
    class as ``n`` allows, picked with ``seed``) and ``out/test`` linked to the whole test
    folder. Idempotent: an existing folder made with the same choice is kept."""
    data_dir = data_dir.resolve()
    test = next((data_dir / s for s in ("test", "val") if (data_dir / s).is_dir()), None)
    if not (data_dir / "train").is_dir() or test is None:
        raise SystemExit(f"{data_dir}: needs train/<class>/* and test/<class>/* (ImageFolder).")
    classes = sorted(d.name for d in (data_dir / "train").iterdir() if d.is_dir())
    rng = np.random.default_rng(seed)
    chosen = {}
    for i, c in enumerate(classes):
        files = sorted(p.name for p in (data_dir / "train" / c).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        k = min(len(files), n // len(classes) + (1 if i < n % len(classes) else 0))
        chosen[c] = sorted(rng.choice(files, size=k, replace=False).tolist())
    manifest = {"source": str(data_dir), "n": n, "seed": seed, "files": chosen}
    mf = out / "subset.json"
    if mf.is_file() and json.loads(mf.read_text()) == manifest:
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    for c, files in chosen.items():
        d = out / "train" / c
        d.mkdir(parents=True)
        for f in files:
            os.symlink(data_dir / "train" / c / f, d / f)
    os.symlink(test, out / "test")
    mf.write_text(json.dumps(manifest))
    return out


# --- runs ------------------------------------------------------------------------------
def _train_config(
    args, data_dir: str, out: Path, model: str, overrides: Dict, seed: int, epochs: int, lr: float, teacher: str = None
):
    from bhvit.train import TrainConfig

    return TrainConfig(
        model=model,
        data=args.data,
        data_dir=data_dir,
        out=str(out),
        epochs=epochs,
        batch_size=args.batch_size,
        lr=lr,
        teacher=teacher,
        resume="auto",
        test_subset=args.test_subset,
        seed=seed,
        device=args.device,
        threads=args.threads,
        overrides=dict(overrides),
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )


def run_one(cfg, model=None) -> Dict:
    """Train (or resume) one run; a finished run (final.json) is read, not retrained."""
    from bhvit.train import train

    final = Path(cfg.out) / "final.json"
    if final.is_file():
        print(f"[ablation] {cfg.out}: finished, skipped", flush=True)
        return json.loads(final.read_text())
    t0 = time.time()
    print(f"[ablation] {cfg.out}: training ({cfg.model}, overrides {cfg.overrides}, seed {cfg.seed})", flush=True)
    from bhvit.rundir import RunLocked

    try:
        res = train(cfg, model=model)
    except RunLocked as e:  # another process of the same study trains it: go on to the next
        print(f"[ablation] {cfg.out}: skipped, {e}", flush=True)
        return None
    print(f"[ablation] {cfg.out}: top-1 {res['test_top1']:.2f} in {time.time() - t0:.0f} s", flush=True)
    return res


def variant_model(args, name: str):
    """(registered model name, overrides) of a variant."""
    over = VARIANTS[name][1]
    return (args.baseline, {}) if over is None else (args.model, over)


def run_study(args) -> Dict:
    import torch

    from bhvit.model import create_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir
    if args.subset:
        data_dir = str(make_subset_folder(Path(args.data_dir), out / "data", args.subset, args.subset_seed))
    teacher_dir = out / "teacher"
    tcfg = _train_config(
        args, data_dir, teacher_dir, args.model, {"binary": False}, args.seeds[0], args.teacher_epochs, args.teacher_lr
    )
    while run_one(tcfg) is None:  # another process trains the teacher: wait for it
        time.sleep(30)
    for seed in args.seeds:
        for name in args.variants:
            model_name, over = variant_model(args, name)
            cfg = _train_config(
                args,
                data_dir,
                out / name / f"seed{seed}",
                model_name,
                over,
                seed,
                args.epochs,
                args.lr,
                teacher=str(teacher_dir),
            )
            model = None
            if VARIANTS[name][1] is None and not (Path(cfg.out) / "final.json").is_file():
                # train() builds BHViTs only: the baseline comes ready, seeded like train() seeds
                n_cls = sum(1 for d in (Path(data_dir) / "train").iterdir() if d.is_dir())
                torch.manual_seed(seed)
                model = create_model(model_name, num_classes=n_cls)
            run_one(cfg, model)
    return write_report(args)


# --- report ----------------------------------------------------------------------------
def _stats(values: List[float]) -> Dict:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values) if n else None, "max": max(values) if n else None}


def collect(args) -> Dict:
    import torch

    from bhvit.costs import complexity
    from bhvit.model import create_model

    out = Path(args.out)
    rows = []
    teacher = out / "teacher" / "final.json"
    num_classes = 10
    if teacher.is_file():
        doc = json.loads((out / "teacher" / "last.json").read_text())
        num_classes = len(doc["data"]["classes"])
    for name in args.variants:
        model_name, over = variant_model(args, name)
        runs = {}
        for seed in args.seeds:
            f = out / name / f"seed{seed}" / "final.json"
            if f.is_file():
                r = json.loads(f.read_text())
                runs[seed] = {
                    "test_top1": r["test_top1"],
                    "best_top1": r["best_top1"],
                    "train_top1": r["train_top1"],
                    "epochs": r["epoch"],
                }
        with torch.no_grad():
            c = complexity(create_model(model_name, num_classes=num_classes, **over))
        rows.append(
            {
                "variant": name,
                "label": VARIANTS[name][0],
                "model": model_name,
                "overrides": over,
                "paper": PAPER_EXPECT.get(name, ""),
                "runs": runs,
                "top1": _stats([r["test_top1"] for r in runs.values()]) if runs else None,
                "params": c["params"],
                "bops": c["bops"],
                "flops": c["flops"],
                "ops": c["ops"],
                "size_bytes": c["size_bytes"],
            }
        )
    res = {"rows": rows, "settings": {k: v for k, v in vars(args).items()}}
    if teacher.is_file():
        res["teacher_top1"] = json.loads(teacher.read_text())["test_top1"]
    return res


def format_markdown(res: Dict) -> str:
    rows = res["rows"]
    full = next((r for r in rows if r["variant"] == "full" and r["top1"]), None)
    lines = [
        "| variant | top-1 mean (%) | spread: std (min-max) | vs full | runs (seed: top-1) | "
        "params | BOPs (M) | FLOPs (M) | OPs (M) | paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["top1"]
        if t:
            mean = f"{t['mean']:.2f}"
            spread = f"{t['std']:.2f} ({t['min']:.2f}-{t['max']:.2f})"
            delta = "" if (full is None or r is full) else f"{t['mean'] - full['top1']['mean']:+.2f}"
            runs = ", ".join(f"{s}: {v['test_top1']:.2f}" for s, v in sorted(r["runs"].items()))
        else:
            mean = spread = delta = runs = "not run"
        lines.append(
            f"| {r['label']} (`{r['variant']}`) | {mean} | {spread} | {delta} | {runs} | "
            f"{r['params']:,} | {r['bops'] / 1e6:.2f} | {r['flops'] / 1e6:.3f} | "
            f"{r['ops'] / 1e6:.3f} | {r['paper']} |"
        )
    if "teacher_top1" in res:
        lines.append("")
        lines.append(f"FP teacher (`binary=false`): {res['teacher_top1']:.2f} %.")
    return "\n".join(lines) + "\n"


def plot_bars(res: Dict, path: Path) -> Path:
    """Horizontal bars (mean top-1) with min-max whiskers and the seeds as dots (Pillow)."""
    from PIL import Image, ImageDraw

    rows = [r for r in res["rows"] if r["top1"]]
    W, row_h, left, right, top = 900, 34, 260, 60, 50
    H = top + row_h * max(len(rows), 1) + 50
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text(
        (10, 8),
        "CIFAR-10 test top-1 (%), final epoch: bars = mean over seeds, whiskers = min-max, dots = seeds",
        fill=(0, 0, 0),
    )
    if not rows:
        img.save(path)
        return path
    vals = [v["test_top1"] for r in rows for v in r["runs"].values()]
    lo = math.floor(min(vals) - 2)
    hi = math.ceil(max(vals) + 1)
    x0, x1 = left, W - right

    def px(v):
        return x0 + (v - lo) / max(hi - lo, 1e-9) * (x1 - x0)

    for k in range(6):
        v = lo + k * (hi - lo) / 5
        d.line([(px(v), top - 6), (px(v), H - 40)], fill=(220, 220, 220))
        d.text((px(v) - 12, H - 34), f"{v:.1f}", fill=(0, 0, 0))
    full = next((r for r in rows if r["variant"] == "full"), None)
    for i, r in enumerate(rows):
        y = top + i * row_h
        color = (
            (31, 119, 180)
            if r["variant"] == "full"
            else (214, 39, 40)
            if r["variant"] == "reactnet"
            else (255, 127, 14)
            if r["variant"] == "fp_down"
            else (150, 150, 150)
        )
        d.text((10, y + 10), r["label"], fill=(0, 0, 0))
        t = r["top1"]
        d.rectangle([px(lo), y + 6, px(t["mean"]), y + row_h - 6], fill=color)
        yc = y + row_h // 2
        d.line([(px(t["min"]), yc), (px(t["max"]), yc)], fill=(0, 0, 0), width=2)
        for v in r["runs"].values():
            xv = px(v["test_top1"])
            d.ellipse([xv - 3, yc - 3, xv + 3, yc + 3], fill=(0, 0, 0))
        d.text((px(t["max"]) + 6, y + 10), f"{t['mean']:.2f}", fill=(0, 0, 0))
    if full is not None:
        xf = px(full["top1"]["mean"])
        d.line([(xf, top - 6), (xf, H - 40)], fill=(31, 119, 180), width=1)
    path = Path(path)
    img.save(path, format="PNG")
    return path


def write_report(args) -> Dict:
    out = Path(args.out)
    res = collect(args)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = format_markdown(res)
    (out / "results.md").write_text(md)
    plot_bars(res, out / "ablation.png")
    print(md, flush=True)
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.report_only:
        write_report(args)
    else:
        run_study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

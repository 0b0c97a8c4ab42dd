"""How exactly does `bhvit convert` reproduce the authors' release? For each configuration, the
release's model (its own code, ../shared/reference/authors-release) with every parameter and
buffer randomised, saved as main_new.py saves it, converted, and both run on N inputs (half
random, half CIFAR-10 test photographs through the release's evaluation transform), one at a
time: top-1 agreement and relative logit differences in float32, the exceptions (> 1e-4) and
what explains each (a binarizer decision within float rounding of its threshold, the largest
such margin), the float64 comparison, and as the baseline each float32 model against the
release in float64 (the exact result): how often float32 rounding alone moves the logits by
more than 1e-4 or changes the top-1.

    python benchmarks/release_equivalence.py --inputs 200
    python benchmarks/release_equivalence.py --inputs 40 --configs tiny-bin-1000 --training

``--training`` also measures the two training differences: bhvit's L_re counting the binary
downsampling convs (the release's leaves them out) and the release's ``--recu`` option (bhvit
trains without it), as the relative change of the gradients of one step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import release_ref as R  # noqa: E402

from bhvit.checkpoint import load_model  # noqa: E402
from bhvit.release import RELEASE_EVAL, convert_release  # noqa: E402
from bhvit.runtime.image import prepare_image  # noqa: E402

CONFIGS = {
    "tiny-bin-1000": ("tiny", dict(nb_classes=1000)),
    "tiny-fpdown-1000": ("tiny", dict(nb_classes=1000, some_fp=True)),
    "tiny-bin-10": ("tiny", dict(nb_classes=10)),
    "tiny-fpdown-10": ("tiny", dict(nb_classes=10, some_fp=True)),
    "small-bin-1000": ("small", dict(nb_classes=1000)),
    "small-fpdown-1000": ("small", dict(nb_classes=1000, some_fp=True)),
    "small-bin-10": ("small", dict(nb_classes=10)),
    "small-fpdown-10": ("small", dict(nb_classes=10, some_fp=True)),
    "tiny-fp32-1000": ("tiny", dict(nb_classes=1000, weight_bits=32, input_bits=32)),
}


def inputs(n: int, tmp: Path, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(3, 224, 224, generator=g) for _ in range(n - n // 2)]
    jpegs = R.cifar_test_jpegs(-(-(n // 2) // 10))[: n // 2] if n // 2 else []
    for i, b in enumerate(jpegs):
        f = tmp / f"img{i}.jpg"
        f.write_bytes(b)
        out.append(torch.from_numpy(prepare_image(f, 3, 224, RELEASE_EVAL())))
    return out


def converted(size, opts, seed, tmp):
    args = R.release_args(size, **opts)
    rel = R.build_release(args)
    R.randomise(rel, seed)
    path = R.save_like_main_new(rel, args, tmp / f"{size}.pth")
    out = tmp / f"{size}-{seed}-{len(list(tmp.iterdir()))}"
    convert_release(path, out)
    return rel.eval(), load_model(out)[0]


def summarise(name, rows, seconds):
    exc = [r for r in rows if r["rel"] > R.TOL]
    margins = []
    for r in exc:
        for w in r["why"].values():
            margins += [m for *_, m in w["weights"]] or ([w["first"][3]] if w["first"] else [])
    exact = [r for r in rows if "rel64" in r]

    def vs_exact(key):
        return {
            "beyond_1e-4": sum(r[key][0] > R.TOL for r in exact),
            "top1_agreement": sum(r[key][1] for r in exact) / len(exact),
        }

    return {
        "config": name,
        "inputs": len(rows),
        "top1_agreement": sum(r["top1"] for r in rows) / len(rows),
        "max_rel_f32": max(r["rel"] for r in rows),
        "median_rel_f32": sorted(r["rel"] for r in rows)[len(rows) // 2],
        "exceptions": len(exc),
        "explained": all(any(w["weights"] or w["first"] for w in r["why"].values()) for r in exc),
        "largest_margin": max(margins, default=None),
        "weight_flips": sum(n for r in exc for w in r["why"].values() for _, n, _ in w["weights"]),
        "inputs_f64": len(exact),
        "max_rel_f64": max(r["rel64"] for r in exact),
        "top1_agreement_f64": sum(r["top1_64"] for r in exact) / len(exact),
        "release_f32_vs_exact": vs_exact("release_vs_exact"),
        "bhvit_f32_vs_exact": vs_exact("bhvit_vs_exact"),
        "seconds": round(seconds, 1),
    }


def training_differences(tmp: Path) -> dict:
    """Relative gradient change of one float64 step: L_re with vs without the downsampling
    convs (bhvit's vs the release's), and the release with --recu vs without."""
    from bhvit.layers import binary_layers
    from bhvit.losses import regularization_loss

    teacher, x, y = R.step_batch(1000, 8)
    lr = 5e-4 * 256 / 512
    res = {}
    rel, ours = converted("tiny", dict(nb_classes=1000), 3, tmp)
    # L_re: the gradient of 0.1 * (bhvit's L_re - the release's) against one step's gradient
    ours = ours.double()
    d = 0.1 * (regularization_loss(ours) - R.release_lre(ours))
    base = copy.deepcopy(rel).double().train()
    R.release_train_step(base, teacher, x, y, lr, regularization_loss=True)
    grads = {n: p.grad.clone() for n, p in base.named_parameters()}
    d_grads = torch.autograd.grad(d, [m.weight for m in binary_layers(ours)])
    g_all = torch.cat([g.flatten() for g in grads.values()])
    res["lre_loss_difference"] = float(d.detach())
    res["lre_grad_change_max_over_max_grad"] = max(float(t.abs().max()) for t in d_grads) / float(g_all.abs().max())
    res["lre_grad_change_rms_over_grad_rms"] = float(
        torch.cat([t.flatten() for t in d_grads]).pow(2).mean().sqrt() / g_all.pow(2).mean().sqrt()
    )
    # --recu: the release's own step with and without it, from the same weights
    recu = copy.deepcopy(rel).double().train()
    for m in recu.modules():
        if hasattr(m, "recu"):
            m.recu = True
    R.release_train_step(recu, teacher, x, y, lr, regularization_loss=True)
    diffs = [(p.grad - grads[n]) for n, p in recu.named_parameters()]
    res["recu_grad_change_max_over_max_grad"] = max(float(t.abs().max()) for t in diffs) / float(g_all.abs().max())
    res["recu_grad_change_rms_over_grad_rms"] = float(
        torch.cat([t.flatten() for t in diffs]).pow(2).mean().sqrt() / g_all.pow(2).mean().sqrt()
    )
    changed = sum(int((torch.sign(p.grad) != torch.sign(grads[n])).sum()) for n, p in recu.named_parameters())
    res["recu_first_adamw_step_signs_changed"] = changed
    res["parameters"] = sum(p.numel() for p in recu.parameters())
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--inputs", type=int, default=40, help="inputs per configuration, half random, half real (default 40)"
    )
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--f64", type=int, default=None, help="inputs also run in float64 (default: all; exceptions always)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--training", action="store_true", help="also measure the two training differences")
    args = p.parse_args()
    if R.release_dir() is None:
        raise SystemExit("needs the authors' release in ../shared/reference/authors-release")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        xs = inputs(args.inputs, tmp, args.seed)
        for name in args.configs:
            t = time.perf_counter()
            size, opts = CONFIGS[name]
            rel, ours = converted(size, opts, args.seed, tmp)
            rows = R.compare(rel, ours, xs, n64=len(xs) if args.f64 is None else args.f64)
            print(json.dumps(summarise(name, rows, time.perf_counter() - t)), flush=True)
        if args.training:
            print(json.dumps({"training": training_differences(tmp)}), flush=True)


if __name__ == "__main__":
    main()

"""Does a change to the binary student help? Paired runs, same teacher, data, seed and
number of student epochs:

- baseline: the binary student (1-bit weights and activations) for ``--epochs``;
- variant: the same with the model settings of ``--set KEY=VALUE`` (e.g.
  ``fp_downsample=true``, the paper's dagger models), and/or trained in two steps with
  ``--act-epochs N``: first N epochs with 1-bit activations and float weights, then
  ``--epochs - N`` fully binary, started from the first step's last weights (what
  ``bhvit recipe --act-epochs`` does, there with ``--epochs`` for the second step).

Both arms distil from ``--teacher`` and start from ``--init-from`` (e.g. the teacher itself)
or at random. Prints the test top-1 of both arms after every epoch and the final
difference, per seed. A run directory that already holds a run is resumed (a finished one
is only read back: no training, no evaluation), and one trained with other settings stops with an error;
``--arm`` runs one arm only, so the two can run in separate processes (a final call with
``--arm both`` prints the table).

    python experiments/paired_students.py --teacher runs/fmnist/teacher --init-from runs/fmnist/teacher \\
        --epochs 8 --act-epochs 4 --subset 12000 --test-subset 5000 --out runs/two_step
    python experiments/paired_students.py --teacher runs/fmnist/teacher --init-from runs/fmnist/teacher \\
        --epochs 8 --set fp_downsample=true --subset 12000 --test-subset 5000 --out runs/dagger
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bhvit.cli import parse_overrides
from bhvit.train import TrainConfig, read_metrics, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bhvit_micro_c28")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=8, help="student epochs of each arm in total")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model setting of the variant arm (repeatable)"
    )
    p.add_argument(
        "--act-epochs",
        type=int,
        default=None,
        help="train the variant in two steps, this many epochs with binary activations only first",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--teacher", required=True)
    p.add_argument("--init-from", default=None, help="start both students from this checkpoint")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arm", choices=["both", "baseline", "variant"], default="both")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    try:
        variant_set = parse_overrides(a.set)
    except ValueError as e:
        p.error(str(e))
    fixed = sorted({"binary", "binary_weights", "binary_acts"} & set(variant_set))
    if fixed:
        p.error(f"--set {', '.join(fixed)}: both arms are binary students; use --act-epochs for two-step binarization.")
    k = a.act_epochs or 0
    if a.act_epochs is not None and not 0 < a.act_epochs < a.epochs:
        p.error(f"--act-epochs must be between 1 and --epochs - 1 ({a.epochs - 1}), got {a.act_epochs}.")
    if not variant_set and not k:
        p.error("give the variant: --set KEY=VALUE and/or --act-epochs N.")
    label = " ".join([*a.set, *([f"two steps ({k} + {a.epochs - k} epochs)"] if k else [])])

    def run(out: Path, epochs: int, init_from, seed: int, **overrides) -> list:
        train(
            TrainConfig(
                model=a.model,
                data=a.data,
                data_dir=a.data_dir,
                out=str(out),
                epochs=epochs,
                batch_size=a.batch_size,
                lr=a.lr,
                subset=a.subset,
                test_subset=a.test_subset,
                teacher=a.teacher,
                init_from=init_from,
                threads=a.threads,
                seed=seed,
                overrides=overrides,
                resume=(out / "last.json").exists(),
                progress=False,
            )
        )
        return [h["test_top1"] for h in read_metrics(out)]

    results = []
    for seed in a.seeds:
        root = Path(a.out) / f"seed{seed}"
        curves = {}
        if a.arm in ("both", "baseline"):
            curves["baseline"] = run(root / "baseline", a.epochs, a.init_from, seed)
        if a.arm in ("both", "variant"):
            init, first = a.init_from, []
            if k:
                first = run(root / "variant_acts", k, a.init_from, seed, **{**variant_set, "binary_weights": False})
                init = str(root / "variant_acts" / "last.json")
            curves["variant"] = first + run(root / "variant", a.epochs - k, init, seed, **variant_set)
        results.append({"seed": seed, "variant": label, "act_epochs": k, "test_top1_per_epoch": curves})
    print(json.dumps(results, indent=1))
    if a.arm != "both":
        return
    print(f"variant: {label}")
    print(
        f"{'seed':>4} {'arm':<8} {'final top-1':>12} {'best top-1':>11}   per epoch"
        + (" (variant: binary activations only | fully binary)" if k else "")
    )
    for r in results:
        for arm, c in r["test_top1_per_epoch"].items():
            skip = k if arm == "variant" else 0  # best of the fully binary epochs only
            curve = " | ".join(" ".join(f"{v:.2f}" for v in part) for part in (c[:skip], c[skip:]) if part)
            print(f"{r['seed']:>4} {arm:<8} {c[-1]:>12.2f} {max(c[skip:]):>11.2f}   {curve}")
    diffs = [r["test_top1_per_epoch"]["variant"][-1] - r["test_top1_per_epoch"]["baseline"][-1] for r in results]
    spread = f", sd {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    print(
        f"variant - baseline, final top-1: mean {statistics.mean(diffs):+.2f} points{spread} over {len(diffs)} seed(s)"
    )


if __name__ == "__main__":
    main()

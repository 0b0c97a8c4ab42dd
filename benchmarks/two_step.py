"""Does two-step binarization help the binary student? Paired runs with the same number
of student epochs and the same teacher:

- one step: the binary student (1-bit weights and activations) for ``--epochs``;
- two steps: first ``--act-epochs`` with 1-bit activations and float weights, then
  ``--epochs - --act-epochs`` fully binary, started from the first step's last weights
  (what ``bhvit recipe --act-epochs`` does, there with ``--epochs`` for the second step).

Both distil from ``--teacher`` and start from ``--init-from`` (e.g. the teacher itself)
or at random. Prints the test top-1 of both after every epoch and the final difference,
per seed. Finished runs are reused; ``--arm`` runs one arm only, so the two can run in
separate processes (a final call with ``--arm both`` prints the table).

    python benchmarks/two_step.py --teacher runs/fmnist/teacher --init-from runs/fmnist/teacher \\
        --epochs 8 --act-epochs 4 --subset 12000 --test-subset 5000 --out runs/two_step
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bhvit.train import TrainConfig, read_metrics, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bhvit_micro_c28")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=8, help="student epochs of each arm in total")
    p.add_argument("--act-epochs", type=int, default=None,
                   help="epochs of the first step (binary activations only); default half of --epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--teacher", required=True)
    p.add_argument("--init-from", default=None, help="start both students from this checkpoint")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arm", choices=["both", "one-step", "two-step"], default="both")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    act_epochs = a.act_epochs if a.act_epochs is not None else a.epochs // 2
    if not 0 < act_epochs < a.epochs:
        p.error(f"--act-epochs must be between 1 and --epochs - 1 ({a.epochs - 1}), got {act_epochs}.")

    def run(out: Path, epochs: int, init_from, seed: int, **overrides) -> Path:
        if not (out / "final.json").exists():
            train(TrainConfig(model=a.model, data=a.data, data_dir=a.data_dir, out=str(out), epochs=epochs,
                              batch_size=a.batch_size, lr=a.lr, subset=a.subset, test_subset=a.test_subset,
                              teacher=a.teacher, init_from=init_from, threads=a.threads, seed=seed,
                              overrides=overrides, resume=(out / "last.json").exists(), progress=False))
        return out

    results = []
    for seed in a.seeds:
        root = Path(a.out) / f"seed{seed}"
        curves = {}
        if a.arm in ("both", "one-step"):
            curves["one step"] = [h["test_top1"] for h in read_metrics(
                run(root / "one_step", a.epochs, a.init_from, seed))]
        if a.arm in ("both", "two-step"):
            acts = run(root / "two_step_acts", act_epochs, a.init_from, seed, binary_weights=False)
            full = run(root / "two_step", a.epochs - act_epochs, str(acts / "last.json"), seed)
            curves["two steps"] = [h["test_top1"] for h in read_metrics(acts)] + [
                h["test_top1"] for h in read_metrics(full)]
        results.append({"seed": seed, "act_epochs": act_epochs, "test_top1_per_epoch": curves})
    print(json.dumps(results, indent=1))
    if a.arm != "both":
        return
    print(f"{'seed':>4} {'arm':<10} {'final top-1':>12} {'best top-1':>11}   per epoch "
          "(two steps: binary activations only | fully binary)")
    for r in results:
        for arm, c in r["test_top1_per_epoch"].items():
            k = act_epochs if arm == "two steps" else 0  # best of the fully binary epochs only
            curve = " | ".join(" ".join(f"{v:.2f}" for v in part) for part in (c[:k], c[k:]) if part)
            print(f"{r['seed']:>4} {arm:<10} {c[-1]:>12.2f} {max(c[k:]):>11.2f}   {curve}")
    diffs = [r["test_top1_per_epoch"]["two steps"][-1] - r["test_top1_per_epoch"]["one step"][-1]
             for r in results]
    spread = f", sd {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    print(f"two steps - one step, final top-1: mean {statistics.mean(diffs):+.2f} points{spread} "
          f"over {len(diffs)} seed(s); step 1 = {act_epochs} of {a.epochs} epochs")


if __name__ == "__main__":
    main()

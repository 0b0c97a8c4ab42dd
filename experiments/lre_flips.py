"""Does the regularization loss L_re reduce weight oscillation? Two identical binary
runs, with and without L_re, compared on sign flips of the latent binary weights.

For every epoch the training loop records the fraction of binary weights whose sign
changed over the epoch (net, ``flip_frac``) and the number of sign changes summed over
all optimizer steps divided by the number of binary weights (``step_flip_frac``: a
weight that oscillates across zero counts at every step it flips). This script prints
both for the epochs in the last ``--re-last-frac`` of training (where L_re is on in the
first run) and the final test top-1 of both runs.

    python experiments/lre_flips.py --model bhvit_micro_c28 --data fashion-mnist --epochs 10 \\
        --subset 20000 --teacher runs/fmnist/teacher --out runs/lre
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from bhvit.train import TrainConfig, read_metrics, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bhvit_micro_c28")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--teacher", default=None)
    p.add_argument("--re-beta", type=float, default=0.1)
    p.add_argument("--re-last-frac", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run the pair once per seed (OUT/seedN/...) and summarise the differences",
    )
    p.add_argument("--init-from", default=None, help="start both students from this checkpoint")
    a = p.parse_args()
    if a.re_beta <= 0:
        p.error(f"--re-beta must be > 0 (the pair compares it with 0), got {a.re_beta}.")

    results = []
    for seed in a.seeds if a.seeds is not None else [a.seed]:
        rows = {}
        for label, beta in (("with L_re", a.re_beta), ("without L_re", 0.0)):
            out = Path(a.out) / (f"seed{seed}" if a.seeds is not None else "") / ("with_lre" if beta else "without_lre")
            cfg = TrainConfig(
                model=a.model,
                data=a.data,
                data_dir=a.data_dir,
                out=str(out),
                epochs=a.epochs,
                batch_size=a.batch_size,
                lr=a.lr,
                subset=a.subset,
                test_subset=a.test_subset,
                teacher=a.teacher,
                init_from=a.init_from,
                re_beta=beta,
                re_last_frac=a.re_last_frac,
                threads=a.threads,
                seed=seed,
                resume=a.resume or (out / "last.json").exists(),
                progress=False,
            )
            # An existing run is resumed, or only read back if finished; one trained with
            # other settings stops with the resume-settings error.
            train(cfg)
            hist = read_metrics(out)
            if len(hist) != a.epochs:
                raise SystemExit(
                    f"{out} holds a {len(hist)}-epoch run, not {a.epochs}; use the same --epochs or another --out."
                )
            first_late = a.epochs - max(1, math.ceil(a.re_last_frac * a.epochs))
            late = [h for h in hist if h["epoch"] > first_late]
            rows[label] = {
                "seed": seed,
                "late_epochs": [h["epoch"] for h in late],
                "net_flip_frac": [round(h["flip_frac"], 6) for h in late],
                "step_flip_frac": [round(h["step_flip_frac"], 6) for h in late],
                "final_test_top1": hist[-1]["test_top1"],
                "best_test_top1": max(h["test_top1"] for h in hist),
            }
        results.append(rows)
    print(json.dumps(results, indent=1))
    print(f"{'seed':>4} {'run':<14} {'epochs':>8} {'net flips/epoch':>16} {'step flips/epoch':>17} {'final top-1':>12}")
    for rows in results:
        for label, r in rows.items():
            net = sum(r["net_flip_frac"]) / len(r["net_flip_frac"])
            stp = sum(r["step_flip_frac"]) / len(r["step_flip_frac"])
            eps = f"{r['late_epochs'][0]}-{r['late_epochs'][-1]}"
            print(f"{r['seed']:>4} {label:<14} {eps:>8} {net:>16.5f} {stp:>17.5f} {r['final_test_top1']:>12.2f}")
    if len(results) > 1:
        d_top1 = [r["with L_re"]["final_test_top1"] - r["without L_re"]["final_test_top1"] for r in results]
        d_step = [
            sum(r["with L_re"]["step_flip_frac"]) / max(sum(r["without L_re"]["step_flip_frac"]), 1e-12)
            for r in results
        ]
        print(
            f"with - without L_re, final top-1: mean {statistics.mean(d_top1):+.2f} points, "
            f"sd {statistics.stdev(d_top1):.2f} over {len(results)} seeds; "
            f"step flips with/without: {', '.join(f'{x:.3f}' for x in d_step)}"
        )


if __name__ == "__main__":
    main()

"""Run under torchrun by tests/test_train.py: only rank 1's teacher turns NaN; every rank
must stop with TrainingDiverged (none may wait forever in a collective)."""

import os
import sys

from bhvit.train import TrainConfig, TrainingDiverged, train
from test_train import NaNAfter  # this script's directory is on sys.path


def main(data_dir, out):
    rank = int(os.environ["RANK"])
    cfg = TrainConfig(
        model="bhvit_micro_c28",
        data_dir=data_dir,
        out=out,
        epochs=3,
        batch_size=32,
        subset=128,
        test_subset=32,
        progress=False,
        threads=1,
    )
    try:  # 2 steps per epoch and rank: rank 1's 3rd teacher call is epoch 2, step 1
        train(cfg, teacher=NaNAfter(3 if rank == 1 else 10**9))
        msg = "finished"
    except TrainingDiverged as e:
        msg = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


if __name__ == "__main__":
    main(*sys.argv[1:])

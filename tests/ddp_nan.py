"""Run under torchrun by tests/test_train.py: only rank 1's teacher turns NaN; every rank
must stop with TrainingDiverged (none may wait forever in a collective)."""
import os
import sys

import torch

from bhvit.train import TrainConfig, TrainingDiverged, train


class Teacher(torch.nn.Module):
    def __init__(self, nan_from):
        super().__init__()
        self.nan_from, self.calls = nan_from, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        out = torch.zeros(x.shape[0], 10)
        return out + float("nan") if self.calls >= self.nan_from else out


def main(data_dir, out):
    rank = int(os.environ["RANK"])
    cfg = TrainConfig(model="bhvit_micro_c28", data_dir=data_dir, out=out, epochs=3, batch_size=32,
                      subset=128, test_subset=32, progress=False, threads=1)
    try:  # 2 steps per epoch and rank: rank 1's 3rd teacher call is epoch 2, step 1
        train(cfg, teacher=Teacher(3 if rank == 1 else 10**9))
        msg = "finished"
    except TrainingDiverged as e:
        msg = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The streaming ImageFolder path: per-sample decoding in DataLoader workers, deterministic
per-sample augmentation, resume equality with workers, --max-steps, and the choice between
streaming and decoding into memory."""

import json
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bhvit.data import load_imagefolder
from bhvit.errors import ConfigError
from bhvit.stream import RRC_RATIO, RRC_SCALE, StreamingImageFolder, StreamLoader, rrc_box
from bhvit.train import TrainConfig, train
from synth import make_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of non-square JPEGs of several sizes (so resizing and cropping matter)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, base in (("cat", 60), ("dog", 190)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                arr = np.clip(base + rng.integers(-50, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=90)
    return root


def test_eval_images_equal_the_in_memory_decode(folder, tmp_path):
    ds = StreamingImageFolder(folder, "test", channels=3, size=32)
    mem = load_imagefolder(folder, "test", 3, 32, cache_dir=tmp_path)
    assert len(ds) == len(mem) == 16 and ds.classes == mem.classes == ["cat", "dog"]
    assert torch.equal(ds.labels, mem.labels)
    assert all(np.array_equal(ds.eval_image(i), mem.images[i].numpy()) for i in range(len(ds)))
    batches = list(StreamLoader(ds, train=False, workers=2).epoch(0, [range(0, 10), range(10, 16)]))
    assert torch.equal(torch.cat([b[0] for b in batches]), mem.images)
    # training batches without random augmentation are the in-memory images too
    train = StreamingImageFolder(folder, "train", channels=3, size=32)
    mem_train = load_imagefolder(folder, "train", 3, 32, cache_dir=tmp_path)
    order = [[5, 0, 17], [40, 3]]
    got = [x for x, _ in StreamLoader(train, True, workers=1, seed=3, pad=0, flip=False).epoch(4, order)]
    assert all(torch.equal(g, mem_train.images[b]) for g, b in zip(got, order))
    mean, std = ds.channel_stats()
    ref_mean, ref_std = mem.channel_stats()
    assert np.allclose(mean, ref_mean, atol=1e-6) and np.allclose(std, ref_std, atol=1e-4)


@pytest.mark.parametrize("augment", ["pad-crop", "rrc"])
def test_training_images_depend_on_seed_epoch_and_index_only(folder, augment):
    ds = StreamingImageFolder(folder, "train", channels=3, size=32, augment=augment)
    a = ds.train_image(5, seed=1, epoch=2, pad=4, flip=True)
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, ds.train_image(5, seed=1, epoch=2, pad=4, flip=True))
    others = [ds.train_image(5, seed=1, epoch=e, pad=4, flip=True) for e in range(3, 8)]
    assert not all(np.array_equal(a, o) for o in others)
    # two worker processes deliver exactly what the training process computes
    batches = [[0, 1, 2], [3, 4, 5]]
    got = torch.cat([x for x, _ in StreamLoader(ds, True, workers=2, seed=1, pad=4).epoch(2, batches)])
    want = np.stack([ds.train_image(i, 1, 2, 4, True) for i in range(6)])
    assert np.array_equal(got.numpy(), want)


def test_random_resized_crop_box_stays_in_its_ranges():
    gen = torch.Generator().manual_seed(0)
    for w, h in [(500, 375), (64, 64), (1000, 50), (50, 1000)]:
        for _ in range(200):
            left, top, cw, ch = rrc_box(w, h, gen)
            assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw >= 1 and ch >= 1
            if (w, h) in [(500, 375), (64, 64)]:  # the 10 tries succeed here nearly always
                assert RRC_SCALE[0] * w * h * 0.9 <= cw * ch <= w * h
    # an extreme aspect ratio falls back to the centre, cropped into the ratio range
    left, top, cw, ch = rrc_box(1000, 50, torch.Generator().manual_seed(0))
    assert ch == 50 and cw / ch <= RRC_RATIO[1] + 0.05


def test_rrc_decodes_a_large_jpeg_at_a_reduced_size(tmp_path):
    root = make_imagefolder(tmp_path / "big", classes=("a",), per_class=1, size=1024, splits=("train",))
    ds = StreamingImageFolder(root, "train", channels=3, size=32, augment="rrc")
    sizes = []
    pil = ds._open
    ds._open = lambda i, draft=None: sizes.append((r := pil(i, draft=draft)).size) or r
    outs = [ds.train_image(0, 0, epoch, 0, True) for epoch in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    # a crop of at least 8 % of a 1024x1024 image needs at most half its sides for 32 pixels
    assert all(s[0] <= 512 for s in sizes) and any(s[0] <= 256 for s in sizes)
    assert np.array_equal(outs[3], ds.train_image(0, 0, 3, 0, True))


def _cfg(folder, tmp_path, **kw):
    base = dict(
        model="bhvit_micro_c32",
        data="imagefolder",
        data_dir=str(folder),
        out=str(tmp_path / "r"),
        epochs=2,
        batch_size=8,
        lr=2e-3,
        threads=1,
        progress=False,
        data_in_memory="no",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_streamed_run_resumed_with_workers_equals_an_uninterrupted_one(folder, tmp_path):
    ref = train(_cfg(folder, tmp_path, out=str(tmp_path / "ref"), workers=0))
    cut = _cfg(folder, tmp_path, out=str(tmp_path / "cut"), workers=2, max_steps=6)  # one epoch: 48 / 8
    first = train(cut)
    assert first["epoch"] == 1 and json.loads((tmp_path / "cut" / "last.json").read_text())["epoch"] == 0
    done = train(replace(cut, max_steps=None, resume=True))
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "best_top1"):
        assert done[k] == ref[k], k


def test_max_steps_stops_inside_an_epoch_and_saves(folder, tmp_path):
    res = train(_cfg(folder, tmp_path, max_steps=2, epochs=3))
    hist = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and res["epoch"] == 1
    assert (tmp_path / "r" / "final.json").is_file() and (tmp_path / "r" / "epoch0000.safetensors").is_file()


def test_streaming_choices_are_checked(folder, tmp_path):
    with pytest.raises(ConfigError, match="--augment rrc crops the full-size images"):
        train(_cfg(folder, tmp_path, augment="rrc", data_in_memory="yes"))
    with pytest.raises(ConfigError, match="only ImageFolder datasets stream"):
        train(_cfg(folder, tmp_path, data="fashion-mnist", data_dir=None, model="bhvit_micro_c28"))
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        train(_cfg(folder, tmp_path, workers=-1))


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_resume_exactly(folder, tmp_path):
    """torchrun, 2 ranks (gloo), 2 decoding workers per rank: a run cut by --max-steps after
    its first epoch and resumed ends exactly like an uninterrupted one."""
    import os
    import subprocess
    import sys

    def run(out, *extra):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "bhvit.cli",
            "train",
            "--model",
            "bhvit_micro_c32",
            "--data",
            "imagefolder",
            "--data-dir",
            str(folder),
            "--data-in-memory",
            "no",
            "--workers",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "2e-3",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / out),
            *extra,
        ]
        p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return json.loads((tmp_path / out / "final.json").read_text())

    ref = run("ref")
    first = run("cut", "--max-steps", "3")  # 48 images, 2 ranks x batch 8: 3 steps per epoch
    assert first["epoch"] == 1 and first["world_size"] == 2
    done = run("cut", "--resume")
    assert done["ranks_identical"] and ref["ranks_identical"]
    for k in ("train_loss", "train_top1", "test_loss", "test_top1"):
        assert done[k] == ref[k], k


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_iterating_a_folder_does_not_hold_it(tmp_path):
    """Streaming 600 images of 224x224 (90 MB decoded) holds a few batches at a time: the
    resident memory grows by far less than the decoded set (holding the batches: +83 MB)."""
    root = make_imagefolder(tmp_path / "f", classes=("a", "b", "c"), per_class=200, size=256, splits=("train",))
    ds = StreamingImageFolder(root, "train", channels=3, size=224)
    batches = [list(range(i, i + 10)) for i in range(0, 600, 10)]
    base, grew, n = _rss(), 0, 0
    for x, _ in StreamLoader(ds, True, workers=0, pad=8).epoch(0, batches):
        n += len(x)
        grew = max(grew, _rss() - base)
    assert n == 600
    assert grew < 30 * 2**20, grew

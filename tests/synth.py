"""Small synthetic datasets in the real on-disk formats, for tests."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    arr = np.asarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz") if not path.name.endswith(".gz") else path
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def learnable_images(n: int, classes: int, shape, seed: int):
    """Images whose mean brightness pattern depends on the label (so a model can learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    base = rng.integers(0, 256, (classes,) + tuple(shape))
    noise = rng.integers(-40, 40, (n,) + tuple(shape))
    imgs = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return imgs, labels.astype(np.uint8)


def make_fashion_mnist(root: Path, n_train: int = 320, n_test: int = 96) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        imgs, labels = learnable_images(n, 10, (28, 28), seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte", imgs)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def make_cifar_pickle(root: Path, per_batch: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs, labels = learnable_images(per_batch, 10, (3, 32, 32), i)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": imgs.reshape(per_batch, -1), b"labels": labels.astype(int).tolist()}, f)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": []}))
    return d


def make_imagefolder(
    root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 32, splits=("train", "test")
) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.jpg", quality=90)
    return root


def micro_config(fmnist, out, **kw):
    """A bhvit_micro_c28 training config on the synthetic Fashion-MNIST at ``fmnist``, writing
    to ``out``, quiet, on one thread; ``kw``: the other TrainConfig fields."""
    from bhvit.train import TrainConfig

    return TrainConfig(model="bhvit_micro_c28", data_dir=str(fmnist), out=str(out), progress=False, threads=1, **kw)


def trained_micro_run(tmp_path: Path):
    """A bhvit_micro_c28 run trained for 2 epochs on 256 synthetic Fashion-MNIST images (96
    test images): returns (the dataset folder, the run directory)."""
    from bhvit.train import train

    fm = make_fashion_mnist(tmp_path / "fm", n_train=256, n_test=96)
    run = tmp_path / "run"
    train(micro_config(fm, run, epochs=2, batch_size=32, lr=2e-3))
    return fm, run

import gzip
import pickle

import numpy as np
import pytest
import torch

from bhvit.data import DataError, augment_batch, load_dataset, normalize, read_idx
from synth import make_cifar_pickle, make_fashion_mnist, make_imagefolder, write_idx


def test_fashion_mnist_loads(tmp_path):
    make_fashion_mnist(tmp_path, 40, 12)
    tr = load_dataset("fashion-mnist", "train", str(tmp_path))
    te = load_dataset("fashion-mnist", "test", str(tmp_path))
    assert tr.images.shape == (40, 1, 28, 28) and tr.images.dtype == torch.uint8
    assert te.images.shape == (12, 1, 28, 28) and tr.num_classes == 10
    assert tr.labels.dtype == torch.int64


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", "train", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "train", str(tmp_path))


def test_truncated_idx_gz_names_file(tmp_path):
    make_fashion_mnist(tmp_path, 40, 12)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read .*truncated or corrupt"):
        load_dataset("fashion-mnist", "train", str(tmp_path))


def test_corrupt_deflate_stream_names_file(tmp_path):
    make_fashion_mnist(tmp_path, 40, 12)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    b = bytearray(gzip.compress(gzip.decompress(p.read_bytes()), mtime=0))  # 10-byte header
    b[20:24] = bytes(x ^ 0xFF for x in b[20:24])  # inside the deflate data: a zlib.error, not an OSError
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read \(error: .*truncated or corrupt"):
        load_dataset("fashion-mnist", "train", str(tmp_path))


def test_short_idx_payload(tmp_path):
    p = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((5, 28, 28)), gz=False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="payload is 3910 bytes, expected 3920"):
        read_idx(p)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)


def test_idx_label_out_of_range(tmp_path):
    make_fashion_mnist(tmp_path, 40, 12)
    labels = np.zeros(40, dtype=np.uint8)
    labels[7] = 12
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match="label 12 at index 7 out of range 0..9"):
        load_dataset("fashion-mnist", "train", str(tmp_path))


def test_idx_count_mismatch(tmp_path):
    make_fashion_mnist(tmp_path, 40, 12)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8))
    with pytest.raises(DataError, match="40 images but .* has 39 labels"):
        load_dataset("fashion-mnist", "train", str(tmp_path))


def test_cifar_pickle_loads_and_refuses_code(tmp_path):
    d = make_cifar_pickle(tmp_path, per_batch=6)
    tr = load_dataset("cifar10", "train", str(tmp_path))
    assert tr.images.shape == (30, 3, 32, 32)
    assert load_dataset("cifar10", "test", str(d)).images.shape == (6, 3, 32, 32)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (d / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="test_batch: cannot unpickle .*refusing to load global"):
        load_dataset("cifar10", "test", str(tmp_path))
    (d / "data_batch_2").write_bytes((d / "data_batch_1").read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_2: cannot unpickle"):
        load_dataset("cifar10", "train", str(tmp_path))


def test_cifar_pickle_label_out_of_range(tmp_path):
    d = make_cifar_pickle(tmp_path, per_batch=4)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 10, 2]}, f)
    with pytest.raises(DataError, match="test_batch: label 10 at index 2 out of range"):
        load_dataset("cifar10", "test", str(tmp_path))


def test_imagefolder_loads_and_caches(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=3)
    cache = tmp_path / "cache"
    a = load_dataset("imagefolder", "train", str(root), cache_dir=str(cache))
    assert a.images.shape == (6, 3, 32, 32) and a.classes == ["cat", "dog"]
    assert a.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(list(cache.glob("*.safetensors"))) == 1
    b = load_dataset("imagefolder", "train", str(root), cache_dir=str(cache))
    assert torch.equal(a.images, b.images)
    c = load_dataset("imagefolder", "train", str(root), size=16, cache_dir=str(cache))
    assert c.images.shape == (6, 3, 16, 16)
    g = load_dataset("imagefolder", "test", str(root), channels=1, cache_dir=str(cache))
    assert g.images.shape == (6, 1, 32, 32)
    # cifar10 name also reads a JPEG ImageFolder
    assert load_dataset("cifar10", "test", str(root), cache_dir=str(cache)).images.shape == (6, 3, 32, 32)


def test_imagefolder_cache_sees_a_file_moved_to_another_class(tmp_path):
    # A mislabelled image moved to its class keeps its name, size and mtime, and here the
    # file order too: the cache must still not serve the old labels.
    root = make_imagefolder(tmp_path / "d", per_class=3, splits=("train",))
    dog = root / "train" / "dog"
    for i in (2, 1, 0):
        (dog / f"{i:04d}.jpg").rename(dog / f"{i + 3:04d}.jpg")
    cache = tmp_path / "cache"
    assert load_dataset("imagefolder", "train", str(root), cache_dir=str(cache)).labels.tolist() == [0, 0, 0, 1, 1, 1]
    (root / "train" / "cat" / "0002.jpg").rename(dog / "0002.jpg")
    assert load_dataset("imagefolder", "train", str(root), cache_dir=str(cache)).labels.tolist() == [0, 0, 1, 1, 1, 1]


def test_imagefolder_corrupt_jpeg_error_and_skip(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=3)
    bad = root / "train" / "dog" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(DataError, match=r"dog/0001.jpg: cannot decode image"):
        load_dataset("imagefolder", "train", str(root), cache_dir=str(tmp_path / "c"))
    ds = load_dataset("imagefolder", "train", str(root), skip_bad=True, cache_dir=str(tmp_path / "c"))
    assert ds.skipped == 1 and len(ds) == 5


def test_imagefolder_empty_class_and_mismatched_sizes(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=2)
    (root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match="emu: empty class folder"):
        load_dataset("imagefolder", "train", str(root), cache_dir=str(tmp_path / "c"))
    (root / "train" / "emu").rmdir()
    from PIL import Image

    Image.new("RGB", (20, 24)).save(root / "train" / "dog" / "9999.jpg")
    with pytest.raises(DataError, match="9999.jpg: image size 20x24 differs from 32x32"):
        load_dataset("imagefolder", "train", str(root), cache_dir=str(tmp_path / "c"))
    ok = load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "c"))
    assert ok.images.shape == (5, 3, 32, 32)


def test_imagefolder_missing_split_and_class_mismatch(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=1, splits=("train",))
    with pytest.raises(DataError, match="no val or test/ directory"):
        load_dataset("imagefolder", "test", str(root), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="differ from the training classes"):
        load_dataset("imagefolder", "train", str(root), classes=["a", "b"], cache_dir=str(tmp_path / "c"))


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, 0, False, g)
    assert torch.equal(x, y)
    y = augment_batch(x, 1, False, g)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for b in range(2):  # every output is a 4x4 window of the padded input
        assert any(torch.equal(y[b], xp[b, :, i : i + 4, j : j + 4]) for i in range(3) for j in range(3))
    flips = [torch.equal(augment_batch(x, 0, True, g)[0], x[0].flip(2)) for _ in range(40)]
    assert 5 < sum(flips) < 35


def test_normalize():
    x = torch.full((1, 2, 2, 2), 255, dtype=torch.uint8)
    y = normalize(x, [0.5, 1.0], [0.5, 0.25])
    assert torch.allclose(y[0, 0], torch.ones(2, 2)) and torch.allclose(y[0, 1], torch.zeros(2, 2))


def test_channel_stats_are_exact_in_chunks():
    from bhvit.data import Dataset

    x = torch.randint(0, 256, (37, 3, 9, 11), dtype=torch.uint8)
    mean, std = Dataset(x, torch.zeros(37, dtype=torch.int64), ["a"]).channel_stats(chunk_bytes=500)
    xd = x.double() / 255
    assert np.allclose(mean, xd.mean((0, 2, 3)).tolist(), rtol=1e-12)
    assert np.allclose(std, xd.std(dim=(0, 2, 3)).tolist(), rtol=1e-9)


_PEAK = """
import json, resource, sys
from pathlib import Path
from bhvit.data import load_imagefolder
from PIL import Image, JpegImagePlugin  # imported before the baseline (the decoder's own memory)
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
base = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
ds = load_imagefolder(Path(sys.argv[1]), "train", 3, 160)
ds.channel_stats()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"bytes": ds.images.numel(), "growth": peak - base}))
"""


def test_imagefolder_in_memory_peaks_at_the_decoded_size(tmp_path):
    """Decoding fills one preallocated uint8 tensor and the statistics come from histograms:
    the peak memory of load + channel_stats is the decoded set plus a little (it was 2x for
    decoding, a list of arrays and their stacked copy, and 5x for the float copy of the
    statistics)."""
    import json
    import subprocess
    import sys

    make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=200, size=8, splits=("train",))
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["bytes"] == 600 * 3 * 160 * 160
    assert r["growth"] <= 1.3 * r["bytes"], r["growth"] / r["bytes"]


def test_in_memory_or_streamed_follows_the_memory_available():
    from bhvit.stream import IN_MEMORY_PEAK_FACTOR, IN_MEMORY_SHARE, fits_in_memory

    need = 1000 * 3 * 224 * 224 * IN_MEMORY_PEAK_FACTOR
    assert fits_in_memory(1000, 3, 224, available=need / IN_MEMORY_SHARE + 1)
    assert not fits_in_memory(1000, 3, 224, available=need / IN_MEMORY_SHARE - 1)
    assert not fits_in_memory(1000, 3, 224, processes=2, available=need / IN_MEMORY_SHARE + 1)


def test_a_class_mismatch_is_reported_before_decoding(tmp_path, monkeypatch):
    import bhvit.data as data
    from bhvit.train import TrainConfig, train

    make_imagefolder(tmp_path / "d", classes=("cat", "dog"), splits=("train",))
    make_imagefolder(tmp_path / "d", classes=("cat", "cow"), splits=("test",))
    decoded = []
    monkeypatch.setattr(data, "_decode", lambda *a, **k: decoded.append(a) or np.zeros((3, 32, 32), np.uint8))
    cfg = TrainConfig(
        model="bhvit_micro_c32", data="imagefolder", data_dir=str(tmp_path / "d"), out=str(tmp_path / "r"), epochs=1
    )
    with pytest.raises(DataError, match=r"class folders \['cat', 'cow'\] differ from the training classes"):
        train(cfg)
    assert decoded == []


def test_a_fifo_among_the_images_is_skipped_or_named_not_waited_on(tmp_path):
    # was: a FIFO named *.png in a class folder made `bhvit train` wait forever, --skip-bad too
    import os
    import signal

    from bhvit.data import load_imagefolder

    make_imagefolder(tmp_path, classes=("a", "b"), per_class=2, splits=("train",))
    os.mkfifo(tmp_path / "train" / "a" / "zz.png")
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("blocked on a FIFO")))
    signal.alarm(20)
    try:
        assert load_imagefolder(tmp_path, "train", 3, 32, skip_bad=True).skipped == 1
        with pytest.raises(DataError, match=r"zz.png: cannot decode image \(NotARegularFile: .*a FIFO, not a regular"):
            load_imagefolder(tmp_path, "train", 3, 32)
    finally:
        signal.alarm(0)

"""Hostile input to the data loaders, checkpoints, run directories and the CLI: every case
is generated in a temporary directory and must give one clear error (or the documented
behaviour), never lose a user's file, never run a pickle."""

import errno
import gzip
import json
import os
import pickle
import re
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bhvit import create_model
import bhvit.checkpoint as ckpt
from bhvit.checkpoint import CheckpointError, load_model, read_checkpoint_json, save_checkpoint
from bhvit.cli import main
from bhvit.data import DataError, load_dataset, read_idx
from bhvit.errors import ConfigError
from bhvit.rundir import LOCK_NAME, RunLock, RunLocked
from bhvit.runtime.image import ImageTooLarge, decode_image
from bhvit.train import TrainConfig, train
from synth import make_fashion_mnist, make_imagefolder, write_idx

TINY = dict(
    model="bhvit_micro_c28", batch_size=64, subset=64, test_subset=32, progress=False, threads=1, step_flips=False
)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=128, n_test=32)


@pytest.fixture(scope="module")
def trained(fmnist, tmp_path_factory):
    """A finished 1-epoch run (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(TrainConfig(data_dir=str(fmnist), out=str(out), epochs=1, **TINY))
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _tiny():
    return create_model(
        "bhvit_micro_c28", num_classes=10, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), heads=(1, 1, 1, 1)
    )


# --- run directories ----------------------------------------------------------------
def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    user = {
        "epoch_notes.txt": b"my notes",
        "epochal-results.csv": b"a,b\n",
        "epoch0007.json": b"{}",
        "epoch0008.safetensors": b"not ours",
    }
    for name, data in user.items():
        (run / name).write_bytes(data)
    (run / "epoch_dir").mkdir()
    (run / "epoch_dir" / "keep.txt").write_text("x")
    model = _tiny()
    for epoch in range(3):
        save_checkpoint(run, epoch, model, {}, torch.optim.AdamW(model.parameters()), is_best=epoch == 0)
    for name, data in user.items():
        assert (run / name).read_bytes() == data, name
    assert (run / "epoch_dir" / "keep.txt").read_text() == "x"
    # epoch 0 is the best, epoch 2 the last; epoch 1 was this run's and is gone
    ours = sorted(p.name for p in run.iterdir() if p.name.startswith("epoch000") and p.name[8] in "012")
    assert ours == [
        "epoch0000.json",
        "epoch0000.optim.safetensors",
        "epoch0000.safetensors",
        "epoch0002.json",
        "epoch0002.optim.safetensors",
        "epoch0002.safetensors",
    ]


def test_checkpoint_and_export_files_get_normal_modes(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "run", 0, _tiny(), {})
    finally:
        os.umask(old)
    for f in (tmp_path / "run").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_stale_temp_files_of_a_killed_write_are_removed(fmnist, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    stale = [".epoch0000.safetensors.abc123.tmp", ".last.json.x_y9.tmp", ".curves.png.tmp"]
    mine = [".notes.abc.tmp", "epoch0000.safetensors.tmp", ".hidden"]
    for name in stale + mine:
        (out / name).write_text("partial")
    # a fresh run does not touch files of bhvit's names it did not write (it deleted them)
    with pytest.raises(ConfigError, match=r"holds .curves.png.tmp and 2 more, names a bhvit run writes"):
        train(TrainConfig(data_dir=str(fmnist), out=str(out), epochs=1, **TINY))
    assert {p.name for p in out.iterdir()} == set(stale + mine)
    # continuing (--resume auto) what a killed run left: its temporary files go
    train(TrainConfig(data_dir=str(fmnist), out=str(out), epochs=1, resume="auto", **TINY))
    names = {p.name for p in out.iterdir()}
    assert not names & set(stale)
    assert set(mine) <= names


@pytest.mark.parametrize("name", ["epoch0000.safetensors", "metrics.jsonl", "curves.png", "final.json"])
def test_a_fresh_run_refuses_files_of_bhvit_names_it_did_not_write(fmnist, tmp_path, name):
    # was: overwritten or deleted without a word
    out = tmp_path / "r"
    out.mkdir()
    (out / name).write_text("the user's")
    with pytest.raises(ConfigError, match=f"holds {name}, names a bhvit run writes, but no run to resume"):
        train(TrainConfig(data_dir=str(fmnist), out=str(out), epochs=1, **TINY))
    assert (out / name).read_text() == "the user's"


_HOLDER = """
import sys, time
from bhvit.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_on_a_locked_directory_fails_and_a_killed_holder_leaves_no_lock(fmnist, tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(RunLocked, match=rf"in use by another bhvit run \(PID {holder.pid}\)"):
            train(TrainConfig(data_dir=str(fmnist), out=str(out), epochs=1, **TINY))
        assert time.perf_counter() - t0 < 5  # at once, not after loading data
        assert main(["train", "--data-dir", str(fmnist), "--out", str(out), "--subset", "64", "--no-progress"]) == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(out):  # the kernel dropped the killed holder's lock
        pass
    assert (out / LOCK_NAME).is_file()


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("user data")
    assert main(["train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(f)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert f.read_text() == "user data"


# --- checkpoints --------------------------------------------------------------------
def _flip_byte(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x10
    path.write_bytes(bytes(b))


def test_corrupt_tensor_files_are_refused_on_every_load(fmnist, trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path / "run")
    _flip_byte(run / "epoch0000.safetensors", -100)  # a weight's bytes
    with pytest.raises(CheckpointError, match="epoch0000.safetensors: SHA-256 does not match"):
        load_model(run)
    assert main(["export", str(run), str(tmp_path / "exp")]) == 2
    assert "SHA-256 does not match" in capsys.readouterr().err
    assert main(["eval", str(run), "--no-progress"]) == 2
    assert "SHA-256 does not match" in capsys.readouterr().err
    cfg = TrainConfig(data_dir=str(fmnist), out=str(tmp_path / "student"), epochs=1, teacher=str(run), **TINY)
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        train(cfg)
    # resume reads the optimizer file too: a dtype swapped in its header
    run2 = _copy_run(trained, tmp_path / "run2")
    opt = run2 / "epoch0000.optim.safetensors"
    opt.write_bytes(opt.read_bytes().replace(b'"F32"', b'"I32"', 1))
    cfg = TrainConfig(data_dir=str(fmnist), out=str(run2), epochs=2, resume=True, **TINY)
    with pytest.raises(CheckpointError, match="optim.safetensors: SHA-256 does not match"):
        train(cfg)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ('{"format": "bhvit-checkpoint", "version": 1}', "no 'weights' entry"),
        ('{"format": "bhvit-checkpoint", "version": 1, "weights": ["a"]}', "'weights' must be the name"),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "../../etc/passwd.safetensors"}',
            "'weights' must be the name",
        ),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", "epoch": "3"}',
            "'epoch' must be a non-negative integer",
        ),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", "history": {}}',
            "'history' must be a JSON array",
        ),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", '
            '"data": {"mean": [NaN], "std": [0.3]}}',
            "finite numbers",
        ),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", '
            '"data": {"mean": [0.5], "std": [0.0]}}',
            r"std must be >= 1e-06",
        ),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", '
            '"data": {"mean": [0.5], "std": [1e-45]}}',
            r"std must be >= 1e-06, got \[1e-45\]",
        ),
        (
            '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", '
            '"model_config": {"dims": "abcd"}}',
            "bad model_config",
        ),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ],
)
def test_malformed_checkpoint_json_gives_one_clear_error(tmp_path, text, message):
    p = tmp_path / "best.json"
    p.write_text(text)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(p)
    assert str(p) in str(e.value)


def test_corrupt_rng_state_on_resume(fmnist, trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    doc = json.loads((run / "last.json").read_text())
    doc["rng"]["torch"] = "AAAA"
    (run / "last.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="random-number state is corrupt"):
        train(TrainConfig(data_dir=str(fmnist), out=str(run), epochs=2, resume=True, **TINY))


def test_a_full_disk_while_checkpointing_is_one_line(fmnist, tmp_path, monkeypatch, capsys):
    import bhvit.checkpoint as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "atomic_write_json", lambda *a, **k: full())
    code = main(
        [
            "train",
            "--data-dir",
            str(fmnist),
            "--out",
            str(tmp_path / "r"),
            "--subset",
            "64",
            "--test-subset",
            "32",
            "--batch-size",
            "64",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bhvit: error:") and "No space left on device" in err[-1]
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_atomic_write_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    from bhvit.checkpoint import atomic_write_json

    real_open = open

    def failing_open(path, mode="r", *a, **k):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match=r"cannot write .*last\.json: No space left on device"):
        atomic_write_json({}, tmp_path / "last.json")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# --- data -----------------------------------------------------------------------------
def test_idx_bomb_is_refused_by_its_header_and_never_read_whole(tmp_path):
    # a valid header for 10 images followed by 64 MB of zeros (64 KB compressed)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 10, 28, 28))
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(zeros)
    with pytest.raises(DataError, match="longer than the 7840 bytes its header gives"):
        read_idx(bomb)
    huge = tmp_path / "huge.gz"  # a header claiming 8 GB: refused before any payload is read
    with gzip.open(huge, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 10_000_000, 28, 30))
    with pytest.raises(DataError, match="more than the 1,073,741,824 bytes allowed"):
        read_idx(huge)
    good = write_idx(tmp_path / "ok", np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert read_idx(good).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    trunc = tmp_path / "trunc"
    trunc.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DataError, match="payload is 3 bytes, expected 10"):
        read_idx(trunc)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(good.read_bytes()[:-9])
    with pytest.raises(DataError, match="cut.gz: cannot read"):
        read_idx(gz)


def test_empty_training_set_is_refused(tmp_path):
    for prefix, n in (("train", 0), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.zeros((n,), np.uint8))
    cfg = TrainConfig(data_dir=str(tmp_path), out=str(tmp_path / "r"), epochs=1, progress=False)
    with pytest.raises(DataError, match="the training set has no images"):
        train(cfg)


def _png16(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(arr.astype(np.uint16)).save(path)
    return path


def test_16_bit_png_scales_to_8_bits(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    img = decode_image(_png16(tmp_path / "g.png", ramp), 1, None)
    assert img.shape == (1, 32, 32)
    assert img.dtype == np.uint8
    expect = (ramp.astype(np.int64) + 128) // 257
    assert np.array_equal(img[0], expect)
    assert img.min() == 0 and img.max() == 255 and len(np.unique(img)) > 200  # not saturated white
    rgb = decode_image(tmp_path / "g.png", 3, None)
    assert np.array_equal(rgb[0], expect) and np.array_equal(rgb[2], expect)


def test_16_bit_images_train_and_predict_as_their_8_bit_values(tmp_path):
    root = make_imagefolder(tmp_path / "if", per_class=2, size=32)
    from PIL import Image

    arr8 = np.asarray(Image.open(next((root / "train" / "cat").glob("*.jpg"))).convert("L"))
    _png16(root / "train" / "cat" / "deep.png", arr8.astype(np.uint16) * 257)
    ds = load_dataset("imagefolder", "train", str(root), channels=1, size=32, cache_dir=str(tmp_path / "c"))
    assert np.array_equal(ds.images[2, 0].numpy(), arr8)  # sorted: 0000.jpg, 0001.jpg, deep.png


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, capsys):
    # a PNG whose header says 30000 x 30000 (900 Mpixel) with almost no data
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(
        ImageTooLarge, match="bomb.png: 30000x30000 = 900,000,000 pixels, more than the limit of 50,000,000"
    ):
        decode_image(bomb, 3, 32)
    root = make_imagefolder(tmp_path / "if", per_class=1, size=32)
    monkeypatch.setenv("BHVIT_MAX_IMAGE_PIXELS", "1000")  # 32x32 = 1024 pixels
    with pytest.raises(DataError, match="more than the limit of 1,000"):
        load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "c"))
    monkeypatch.setenv("BHVIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="BHVIT_MAX_IMAGE_PIXELS must be a positive integer"):
        decode_image(bomb, 3, 32)


def test_symlink_loop_and_dangling_link_in_an_imagefolder(tmp_path):
    root = make_imagefolder(tmp_path / "if", per_class=2, size=32)
    loop = root / "train" / "cat" / "loop.jpg"
    os.symlink(loop, loop)
    with pytest.raises(DataError, match="loop.jpg: cannot read"):
        load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "c"))
    ds = load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "c"), skip_bad=True)
    assert (len(ds), ds.skipped) == (4, 1)


def test_an_unwritable_cache_warns_and_goes_on(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "if", per_class=2, size=32)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory would go")
    ds = load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(blocker))
    assert len(ds) == 4
    assert "warning: could not write the decoded-image cache" in capsys.readouterr().err


def _cifar(root: Path, data, labels) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return d


def test_cifar_float_pixels_are_refused_not_cast(tmp_path):
    _cifar(tmp_path, np.full((2, 3072), 0.5, dtype=np.float32), [0, 1])
    with pytest.raises(
        DataError, match="'data' holds float32 values from 0.5 to 0.5; CIFAR-10 pixels are integers 0..255"
    ):
        load_dataset("cifar10", "train", str(tmp_path))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    _cifar(tmp_path / "c", _Evil(marker), [0])
    with pytest.raises(DataError, match="refusing to load global"):
        load_dataset("cifar10", "train", str(tmp_path / "c"))
    run = tmp_path / "run"
    save_checkpoint(run, 0, _tiny(), {})
    (run / "epoch0000.safetensors").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError):
        load_model(run)
    assert not marker.exists()


def test_truncated_files_of_every_training_format(fmnist, trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    for name in ("best.json", "epoch0000.safetensors"):
        f = run / name
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt|SHA-256 does not match"):
            read_checkpoint_json(run) if name.endswith(".json") else load_model(run / "last.json")
    d = _cifar(tmp_path / "c", np.zeros((2, 3072), np.uint8), [0, 1])
    (d / "data_batch_3").write_bytes((d / "data_batch_3").read_bytes()[:50])
    with pytest.raises(DataError, match="data_batch_3: cannot unpickle"):
        load_dataset("cifar10", "train", str(tmp_path / "c"))
    root = make_imagefolder(tmp_path / "if", per_class=2, size=32)
    jpg = root / "train" / "dog" / "0001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:20])
    with pytest.raises(DataError, match="0001.jpg: cannot decode image"):
        load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "cache"))


def test_negative_threads_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "somewhere", "x.png", "--threads", "-1"])
    assert "--threads: must be >= 1, got -1" in capsys.readouterr().err


def test_a_hostile_model_config_is_refused_before_anything_is_built(trained, tmp_path):
    # was: shift_sizes of 10^7 made `bhvit eval` grow to 11.5 GB and die with a RuntimeError
    run = _copy_run(trained, tmp_path / "r")
    doc = json.loads((run / "best.json").read_text())
    doc["model_config"]["shift_sizes"] = list(range(1, 6_000_001))  # 50 MB of JSON (64 MiB allowed)
    (run / "best.json").write_text(json.dumps(doc, separators=(",", ":")))
    with pytest.raises(CheckpointError, match=r"best.json: bad model_config \(config shift_sizes must be"):
        load_model(run)


def test_an_oversized_weights_file_is_refused_unread(trained, tmp_path, monkeypatch):
    # was: a weights file sparse-extended to 12 GiB was read whole (53 s) before its SHA-256 failed
    run = _copy_run(trained, tmp_path / "r")
    doc = json.loads((run / "best.json").read_text())
    os.truncate(run / doc["weights"], 12 << 30)  # sparse: no disk is used
    read, real = [], ckpt.read_regular
    monkeypatch.setattr(ckpt, "read_regular", lambda p, *a: read.append(p) if p.suffix == ".safetensors" else real(p))
    with pytest.raises(CheckpointError, match=r"12,884,901,888 bytes, more than the [\d,]+ its checkpoint's model"):
        load_model(run)
    with pytest.raises(CheckpointError, match=r"more than the"):
        ckpt.load_matching_weights(create_model("bhvit_micro_c28", num_classes=10), run)
    assert read == []
    os.truncate(run / doc["weights"], 100)
    with pytest.raises(CheckpointError, match=r"100 bytes, too few for the [\d,]+ bytes of weights its model config"):
        load_model(run)


def test_removing_the_weights_digest_does_not_switch_verification_off(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "r")
    for name in ("best.json", "last.json"):
        doc = json.loads((run / name).read_text())
        del doc["weights_sha256"]
        (run / name).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"best.json: no SHA-256 of epoch\d+.safetensors, which bhvit records"):
        load_model(run)
    with pytest.raises(CheckpointError, match="no SHA-256"):
        ckpt.load_matching_weights(create_model("bhvit_micro_c28", num_classes=10), run)


def test_a_100000_digit_integer_in_a_checkpoint_json_is_one_error(tmp_path):
    # was: a raw ValueError traceback (Python refuses integers of over 4,300 digits)
    p = tmp_path / "best.json"
    head = '{"format": "bhvit-checkpoint", "version": 1, "weights": "e.safetensors", "epoch": '
    p.write_text(head + "9" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"best.json: not valid JSON \(Exceeds the limit"):
        load_model(p)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0, got -5.0"),
        (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number >= 0, got nan"),
        (["--min-lr", "-1"], "--min-lr must be a finite number >= 0, got -1.0"),
        (["--re-beta", "-5"], "--re-beta must be a finite number >= 0, got -5.0"),
        (["--re-last-frac", "5"], "--re-last-frac must be a number from 0 to 1, got 5.0"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to 2\\^63 - 1"),
        (["--workers", "100000"], "--workers must be at most 4096, got 100000"),
    ],
)
def test_bad_training_numbers_are_one_line_errors(fmnist, tmp_path, capsys, args, message):
    # was: raw tracebacks from deep inside PyTorch (or a run training into NaN)
    from bhvit.cli import main

    assert main(["train", "--data-dir", str(fmnist), "--out", str(tmp_path / "r"), "--epochs", "1", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_threads_beyond_the_cap_are_refused_by_the_parser(fmnist, tmp_path, capsys):
    # was: --threads 100000 ended in SIGSEGV
    from bhvit.cli import main

    train = ["train", "--data-dir", str(fmnist), "--out", str(tmp_path / "r")]
    for cmd in (train, ["eval", "x"], ["predict", "x", "y"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--threads", "100000"])
        assert "must be at most 4096, got 100000" in capsys.readouterr().err


def test_resume_refuses_other_data(fmnist, trained, tmp_path):
    # was: another --data-dir (other statistics) or renamed classes resumed silently
    run = _copy_run(trained, tmp_path / "run")
    other = make_fashion_mnist(tmp_path / "other", n_train=128, n_test=32)
    imgs = read_idx(other / "train-images-idx3-ubyte.gz")
    write_idx(other / "train-images-idx3-ubyte", (imgs // 2).astype(np.uint8))  # darker images
    cfg = TrainConfig(data_dir=str(other), out=str(run), epochs=2, resume=True, **TINY)
    message = r"--resume: the data differ from the run in .*\(train_mean: \[0\.\d+\] -> \[0\.\d+\]\)"
    with pytest.raises(CheckpointError, match=message):
        train(cfg)
    folder = make_imagefolder(tmp_path / "f", classes=("cat", "dog"))
    kw = dict(TINY, model="bhvit_micro_c32", data="imagefolder", subset=None, test_subset=None)
    train(TrainConfig(data_dir=str(folder), out=str(tmp_path / "r2"), epochs=1, **kw))
    for split in ("train", "test"):
        (folder / split / "dog").rename(folder / split / "wolf")
    with pytest.raises(CheckpointError, match=r"\(classes: \['cat', 'dog'\] -> \['cat', 'wolf'\]\)"):
        train(TrainConfig(data_dir=str(folder), out=str(tmp_path / "r2"), epochs=2, resume=True, **kw))


def test_resume_auto_restarts_a_run_killed_in_its_first_checkpoint(fmnist, trained, tmp_path):
    # the checkpoint files are written before last.json: a kill in between leaves them alone
    run = _copy_run(trained, tmp_path / "run")
    for name in ("last.json", "best.json", "metrics.jsonl", "final.json", "curves.png"):
        (run / name).unlink(missing_ok=True)
    assert any(p.name.startswith("epoch") for p in run.iterdir())
    train(TrainConfig(data_dir=str(fmnist), out=str(run), epochs=1, resume="auto", **TINY))
    assert (run / "last.json").is_file()

"""`bhvit convert`: the authors' released checkpoints in bhvit, proved equal to the release's own
code (``../shared/reference/authors-release``, imported by ``release_ref``).

For each configuration the release's model is built with its own ``get_model``, every
parameter and buffer randomised, saved as ``main_new.py`` saves it, converted, and both run in
eval mode on random and real images: the logits agree to 1e-4 (relative to the largest) except
where a binarizer's input lies within float rounding of its threshold, which each such input
shows (its first float32 binarizer decision that differs from float64's, and that decision's
margin); in float64 they agree to 1e-9. A training step (the release's engine with a teacher,
AdamW) gives the same loss and gradients in float64.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

import release_ref as R
from bhvit.checkpoint import CheckpointError, load_model
from bhvit.errors import ConfigError
from bhvit.model import BHViT
from bhvit.release import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RELEASE_EVAL,
    _release_shape,
    convert_release,
    release_config,
    release_key,
)

needs_release = pytest.mark.skipif(R.release_dir() is None, reason="../shared/reference/authors-release is absent")


# --- a release-format state dict without the release's code (for the refusals) --------------
def _release_state(cfg, seed=0):
    """A state dict in the release's names and layouts, made from a random bhvit model."""
    torch.manual_seed(seed)
    sd = BHViT(cfg).state_dict()
    out = {}
    for k, t in sd.items():
        names = release_key(k, cfg)
        if isinstance(names, tuple):
            out.update({n: t[i].clone() for i, n in enumerate(names)})
        elif k == "stem.pos_embed":
            out[names] = t.permute(0, 3, 1, 2).contiguous()
        else:
            out[names] = t.reshape(_release_shape(k, tuple(t.shape))).clone()
    return out


def _tiny_cfg(**opts):
    o = dict(replace_ln_bn=True, shift3=True, shift5=True, weight_bits=1, input_bits=1, input_size=224)
    o.update(opts)
    return release_config(o, (2, 2, 6, 2), 10)


def _save(tmp_path, sd, args=None, name="ck.pth"):
    p = tmp_path / name
    torch.save({"model": sd, "args": args, "epoch": 3} if args is not None else sd, p)
    return p


def test_converted_checkpoint_records_its_source_and_the_release_eval_transform(tmp_path):
    cfg = _tiny_cfg()
    p = _save(tmp_path, _release_state(cfg), R.release_args(nb_classes=10))
    res = convert_release(p, tmp_path / "out")
    assert res["model"] == "bhvit_tiny" and res["tensors"] == 1139 and res["shift_sizes"] == [1, 2]
    doc = json.loads((tmp_path / "out" / "best.json").read_text())
    src = doc["source"]
    assert src["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() and src["file"] == "ck.pth"
    assert src["epoch"] == 3 and src["model_config"] == "BHViT_tiny" and src["args"]["lr"] == 5e-4
    assert src["options"]["replace_ln_bn"] is True and src["options"]["weight_bits"] == 1
    assert doc["data"] == {
        "name": "imagefolder",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resize": 256,
        "interpolation": "bicubic",
    }
    assert doc["weights_only"] is True
    model, _ = load_model(tmp_path / "out")
    assert model.cfg == cfg
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        convert_release(p, tmp_path / "out")


def test_bare_state_dict_reads_options_from_names_and_needs_the_weight_bits(tmp_path):
    cfg = _tiny_cfg(replace_ln_bn=False, shift5=False, some_fp=True)
    p = _save(tmp_path, {"module." + k: v for k, v in _release_state(cfg).items()})  # saved from DDP
    with pytest.raises(ConfigError, match="bare state dict does not record the weights' bit width; pass --weight-bits"):
        convert_release(p, tmp_path / "a")
    with pytest.raises(ConfigError, match="--input-bits 32 contradicts the state dict"):
        convert_release(p, tmp_path / "a", weight_bits=1, input_bits=32)
    res = convert_release(p, tmp_path / "b", weight_bits=1)
    assert (res["norm"], res["fp_downsample"], res["shift_sizes"], res["binary_acts"]) == ("ln", True, [1], True)
    assert load_model(tmp_path / "b")[0].cfg == cfg


@pytest.mark.parametrize(
    "opts,message",
    [
        (dict(gsb=True), r"release option --gsb \(the GSB attention quantizer\) is not implemented in bhvit"),
        (dict(disable_layerscale=True), r"--disable-layerscale \(BHViT without LayerScale\) is not implemented"),
        (dict(weight_bits=2), r"release option --weight-bits 2 is not implemented in bhvit \(1: binary, 32"),
        (dict(input_size=256), r"--input-size 256: the release's downsampling layers are built for 224x224"),
        (dict(replace_ln_bn=False), r"saved by a model with --replace-ln-bn on, but the checkpoint's args say off"),
        (dict(shift3=False), r"saved by a model with --shift3 on, but the checkpoint's args say off"),
        (dict(nb_classes=1000), r"args say 1000 classes, its classifier has 10"),
    ],
)
def test_options_bhvit_does_not_implement_are_refused_by_name(tmp_path, opts, message):
    p = _save(tmp_path, _release_state(_tiny_cfg()), R.release_args(**{"nb_classes": 10, **opts}))
    with pytest.raises((CheckpointError, ConfigError), match=message):
        convert_release(p, tmp_path / "out")
    assert not (tmp_path / "out" / "best.json").exists()


def test_the_weights_decide_between_tiny_and_small(tmp_path):
    notes = []
    p = _save(tmp_path, _release_state(_tiny_cfg()), R.release_args(nb_classes=10, model="configs/BHVIT"))
    assert convert_release(p, tmp_path / "out", log=notes.append)["model"] == "bhvit_tiny"
    assert notes[0] == "note: the checkpoint's args name the model config 'configs/BHVIT'; its weights are bhvit_tiny's"


def test_state_dicts_that_do_not_fit_name_the_first_mismatch(tmp_path):
    sd = _release_state(_tiny_cfg())
    args = R.release_args(nb_classes=10)
    cases = [
        (
            "vit.encoder.layerB.3.attention.attention.movek2",
            None,
            "has no vit.encoder.layerB.3.attention.attention.movek2",
        ),
        (
            "vit.encoder.patch_embed1.position_embeddings",
            torch.zeros(1, 28, 28, 128),
            r"patch_embed1.position_embeddings: shape \(1, 28, 28, 128\), but stages.1.downsample.pos_embed needs "
            r"\(1, 784, 128\)",
        ),
        ("vit.encoder.layerA.0.GC.extra", torch.zeros(3), r"1 tensor\(s\) the model does not use, first vit.encoder"),
        ("classifier.bias", torch.full((10,), float("nan")), "classifier.bias holds NaN or infinite values"),
    ]
    for i, (key, value, message) in enumerate(cases):
        bad = dict(sd)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        with pytest.raises(CheckpointError, match=message):
            convert_release(_save(tmp_path, bad, args, f"c{i}.pth"), tmp_path / f"o{i}")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    sd = _release_state(_tiny_cfg())
    for i, save in enumerate(
        (
            lambda p: torch.save({"model": sd, "args": _RunsCode(marker)}, p),
            lambda p: p.write_bytes(pickle.dumps({"model": {}, "args": _RunsCode(marker)})),  # not a zip
        )
    ):
        p = tmp_path / f"evil{i}.pth"
        save(p)
        with pytest.raises(CheckpointError, match=r"refused|not a PyTorch checkpoint bhvit can read") as e:
            convert_release(p, tmp_path / f"out{i}")
        assert not marker.exists()
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        convert_release(fifo, tmp_path / "out")
    with pytest.raises(CheckpointError, match="cannot open"):
        convert_release(tmp_path / "missing.pth", tmp_path / "out")


# --- equal outputs, against the release's own code ---------------------------------------
def _converted(tmp_path, size, seed, **opts):
    """(release model, converted bhvit model), both in eval mode, from main_new.py's file."""
    args = R.release_args(size, **opts)
    rel = R.build_release(args)
    R.randomise(rel, seed)
    path = R.save_like_main_new(rel, args, tmp_path / f"{size}-{seed}.pth")
    convert_release(path, tmp_path / f"{size}-{seed}")
    ours, _ = load_model(tmp_path / f"{size}-{seed}")
    return rel.eval(), ours


def _real_images(tmp_path, n_per_class):
    """CIFAR-10 test photographs through the release's evaluation transform (bhvit's)."""
    from bhvit.runtime.image import prepare_image

    out = []
    for i, jpeg in enumerate(R.cifar_test_jpegs(n_per_class)):
        f = tmp_path / f"img{i}.jpg"
        f.write_bytes(jpeg)
        out.append(torch.from_numpy(prepare_image(f, 3, 224, RELEASE_EVAL())))
    return out


@needs_release
def test_tiny_binary_matches_the_release_on_random_and_real_images(tmp_path):
    rel, ours = _converted(tmp_path, "tiny", seed=1, nb_classes=10)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 224, 224, generator=g) for _ in range(3)] + _real_images(tmp_path, 1)[:3]
    R.check(R.compare(rel, ours, inputs))


CONFIGS = [
    ("tiny", dict(nb_classes=1000)),
    ("tiny", dict(nb_classes=1000, some_fp=True)),
    ("tiny", dict(nb_classes=10, some_fp=True)),
    ("small", dict(nb_classes=1000)),
    ("small", dict(nb_classes=1000, some_fp=True)),
    ("small", dict(nb_classes=10)),
    ("small", dict(nb_classes=10, some_fp=True)),
    ("tiny", dict(nb_classes=1000, weight_bits=32, input_bits=32)),  # full precision
    ("tiny", dict(nb_classes=10, replace_ln_bn=False, shift5=False)),  # LayerNorm, shift k=1 only
]


@needs_release
@pytest.mark.slow
@pytest.mark.parametrize(
    "size,opts", CONFIGS, ids=[f"{s}-" + "-".join(f"{k}{v}" for k, v in o.items()) for s, o in CONFIGS]
)
def test_release_configurations_match(tmp_path, size, opts):
    rel, ours = _converted(tmp_path, size, seed=2, **opts)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 224, 224, generator=g) for _ in range(4)] + _real_images(tmp_path, 1)[:4]
    R.check(R.compare(rel, ours, inputs))


# --- one training step, against the release's engine ----------------------------------------
def _as_bhvit(named, cfg, own_keys):
    """bhvit-named tensors from release-named ones (parameters' gradients or values)."""
    from bhvit.release import _to_bhvit

    out = {}
    for k, ref in own_keys.items():
        names = release_key(k, cfg)
        if isinstance(names, tuple):
            out[k] = torch.stack([named[n] for n in names])
        else:
            out[k] = _to_bhvit(k, named[names], tuple(ref.shape))
    return out


def _bhvit_step(model, teacher, x, y, lr, lam, beta, tmp_path):
    """One step of bhvit's training loop (its _Stepper: the recipe loss, AdamW)."""
    from bhvit.train import TrainConfig, _Stepper, make_optimizer

    cfg = TrainConfig(out=str(tmp_path / "run"), kd_lambda=lam, re_beta=beta, step_flips=False)
    st = _Stepper(cfg, model, teacher, make_optimizer(model.parameters(), lr, 0.0, "cpu"), None, "cpu", True, 0)
    st.begin_epoch(lam, beta)
    loss, _ = st.forward(x, y, eager=True)
    st.finish(loss)
    return float(loss.detach())


@needs_release
@pytest.mark.slow
@pytest.mark.parametrize("with_lre", [False, True], ids=["kd", "kd+lre"])
def test_one_training_step_matches_the_release(tmp_path, with_lre):
    """float64, from the same weights and batch: main_new.py's step (teacher, AdamW at the
    release's lr for batch 128 x 2) and bhvit's. KD only: the same loss, gradients and
    updated weights. With --regularization_loss: they differ by exactly bhvit's L_re
    counting the three binary downsampling convs, which the release's L_re leaves out."""
    from bhvit.losses import regularization_loss

    rel, ours = _converted(tmp_path, "tiny", seed=3, nb_classes=10)
    rel, ours = rel.double().train(), ours.double().train()
    teacher, x, y = R.step_batch(10, 4)
    lr = 5e-4 * 128 * 2 / 512
    start = copy.deepcopy(ours)
    extra = 0.0
    if with_lre:
        d = 0.1 * (regularization_loss(start) - R.release_lre(start))
        d.backward()
        extra = float(d)
    loss_r = R.release_train_step(rel, teacher, x, y, lr, regularization_loss=with_lre)
    loss_b = _bhvit_step(
        ours, teacher, x, y, lr, lam=0.9 if with_lre else 1.0, beta=0.1 if with_lre else 0.0, tmp_path=tmp_path
    )
    assert abs(loss_b - loss_r - extra) < 1e-12 * abs(loss_r)
    params = dict(ours.named_parameters())
    grads_r = _as_bhvit({n: p.grad for n, p in rel.named_parameters()}, ours.cfg, params)
    delta = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    for name, p in params.items():
        want = grads_r[name] + delta.get(name, 0.0)
        # (a bias followed by BatchNorm has a zero gradient: rounding noise of 1e-16)
        scale = float(grads_r[name].abs().max())
        assert float((p.grad - want).abs().max()) <= 1e-9 * scale + 1e-15, name
    state_r = _as_bhvit(dict(rel.state_dict()), ours.cfg, ours.state_dict())
    for name, t in ours.state_dict().items():
        if name in delta and with_lre:
            continue  # a different gradient: AdamW's first step moves these weights differently
        # AdamW's first step is lr * g / (|g| + eps): a rounding-size gradient (a bias before
        # BatchNorm) moves by up to lr, so the bound is in units of lr
        assert float((t.double() - state_r[name].double()).abs().max()) <= 1e-6 * lr, name


# --- the release's evaluation transform -------------------------------------------------------
def _photo(w, h, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(
    "w,h,resized,box",
    [
        # torchvision: the shorter side to 256, the longer int(256 * long / short); crop offsets
        # int(round((side - 224) / 2)), Python's round half to even
        (300, 257, (298, 256), (37, 16)),  # 256 * 300 / 257 = 298.8 -> 298; (298 - 224) / 2 = 37
        (257, 300, (256, 298), (16, 37)),  # portrait
        (257, 256, None, (16, 16)),  # already 256 on the shorter side: no resampling; 33 / 2 -> 16
        (259, 256, None, (18, 16)),  # 35 / 2 = 17.5 -> 18 (half to even)
        (640, 480, (341, 256), (58, 16)),  # 341.33 -> 341; 117 / 2 = 58.5 -> 58
    ],
)
def test_release_eval_transform_is_torchvisions_on_pil_images(w, h, resized, box):
    from PIL import Image

    from bhvit.runtime.image import resize_centre_crop

    im = _photo(w, h)
    ref = im.resize(resized, Image.BICUBIC) if resized else im  # torchvision's Resize on PIL: Image.resize
    left, top = box
    want = np.asarray(ref.crop((left, top, left + 224, top + 224)))
    got = np.asarray(resize_centre_crop(im, 224, 256, "bicubic"))
    assert got.shape == (224, 224, 3) and np.array_equal(got, want)


def test_release_eval_input_is_totensor_and_normalize(tmp_path):
    """``prepare_image`` with a converted checkpoint's data: ToTensor (/255) then Normalize with
    ImageNet's mean/std, to float32 rounding; greyscale files become RGB as the release's loader
    makes them."""
    from PIL import Image

    from bhvit.runtime.image import prepare_image

    assert RELEASE_EVAL(224)["resize"] == 256 and RELEASE_EVAL(384)["resize"] == 438  # int(256 / 224 * size)
    im = _photo(500, 375)
    im.save(tmp_path / "a.png")
    crop = np.asarray(im.resize((341, 256), Image.BICUBIC).crop((58, 16, 282, 240)), np.float32)
    want = (crop / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    got = prepare_image(tmp_path / "a.png", 3, 224, RELEASE_EVAL())
    assert np.abs(got.transpose(1, 2, 0) - want).max() < 1e-5
    im.convert("L").save(tmp_path / "g.png")
    grey = prepare_image(tmp_path / "g.png", 3, 224, RELEASE_EVAL())
    rgb = np.asarray(im.convert("L").convert("RGB").resize((341, 256), Image.BICUBIC).crop((58, 16, 282, 240)))
    assert np.abs(grey.transpose(1, 2, 0) - (rgb / 255 - IMAGENET_MEAN) / IMAGENET_STD).max() < 1e-5


@pytest.mark.slow
def test_a_converted_checkpoint_starts_and_teaches_a_bhvit_run(tmp_path, capsys):
    """``train --init-from`` and ``train --teacher`` take a converted checkpoint as it is: every
    tensor is copied (same model, same classes) and the teacher distils at 224."""
    from PIL import Image

    from bhvit.cli import main

    cfg = _tiny_cfg()
    convert_release(_save(tmp_path, _release_state(cfg), R.release_args(nb_classes=10)), tmp_path / "conv")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in range(10):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(px).save(tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    conv = str(tmp_path / "conv")
    argv = ["train", "--model", "bhvit_tiny", "--data", "imagefolder", "--data-dir", str(tmp_path / "data")]
    argv += ["--init-from", conv, "--teacher", conv, "--max-steps", "1", "--batch-size", "2", "--test-subset", "2"]
    argv += ["--epochs", "1", "--threads", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "initialised 1139 of 1139 tensors from" in out.out + out.err
    assert "normalising with the teacher's statistics (mean (0.485000, 0.456000, 0.406000)" in out.out + out.err


def test_eval_of_a_converted_checkpoint_uses_the_release_transform(tmp_path, capsys):
    """``bhvit eval CONVERTED --data-dir FOLDER`` needs no other flag: the logits it saves are the
    model's on ``prepare_image`` (the recorded resize 256, bicubic, crop, ImageNet statistics)."""
    from PIL import Image

    from bhvit.cli import main
    from bhvit.runtime.image import prepare_image

    convert_release(_save(tmp_path, _release_state(_tiny_cfg()), R.release_args(nb_classes=10)), tmp_path / "conv")
    files = []
    for c in range(10):
        d = tmp_path / "data" / "val" / f"c{c}"
        d.mkdir(parents=True)
        files.append(d / "a.png")
        _photo(300 + 7 * c, 257, seed=c).save(files[-1])
    args = ["eval", str(tmp_path / "conv"), "--data-dir", str(tmp_path / "data"), "--no-progress"]
    assert main(args + ["--save-logits", str(tmp_path / "l.npz"), "--batch-size", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["count"] == 10 and res["data"] == "imagefolder"
    model, doc = load_model(tmp_path / "conv")
    x = torch.from_numpy(np.stack([prepare_image(f, 3, 224, doc["data"]) for f in files]))
    with torch.no_grad():
        want = model(x).numpy()
    got = np.load(tmp_path / "l.npz")["logits"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert Image.open(files[0]).size == (300, 257)

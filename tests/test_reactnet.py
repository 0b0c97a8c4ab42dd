"""The ReActNet-style binary-CNN baseline: registry, counting, L_re, training and resuming."""

import json

import pytest
import torch

import bhvit
from bhvit.layers import binary_layers
from bhvit.reactnet import ReActNet, ReActNetConfig
from bhvit.train import TrainConfig, train
from synth import make_imagefolder


def test_registered_and_builds():
    assert "reactnet_c32" in bhvit.list_models() and "bhvit_nano_c32" in bhvit.list_models()
    torch.manual_seed(0)
    m = bhvit.create_model("reactnet_c32", num_classes=10)
    assert isinstance(m, ReActNet) and isinstance(m.cfg, ReActNetConfig)
    assert m.cfg.depths == (1, 2, 2, 1) and m.cfg.dims == (32, 64, 128, 256)
    y = m(torch.randn(3, 3, 32, 32))
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="expects a float tensor of shape"):
        m(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="unknown override"):
        bhvit.create_model("reactnet_c32", qd=False)
    with pytest.raises(ValueError, match="multiple of dims"):
        bhvit.create_model("reactnet_c32", dims=(32, 48, 96, 192))


def test_counts_match_the_bhvit_it_is_sized_to():
    r = bhvit.complexity(bhvit.create_model("reactnet_c32", num_classes=10))
    b = bhvit.complexity(bhvit.create_model("bhvit_nano_c32", num_classes=10))
    assert (r["params"], r["binary_params"], r["bops"], r["flops"]) == (1_560_330, 1_548_288, 6_193_152, 100_864)
    assert (b["params"], b["bops"], b["flops"]) == (1_532_026, 6_059_008, 100_864)
    assert r["ops"] == pytest.approx(197_632) and b["ops"] == pytest.approx(195_536)
    assert abs(r["bops"] / b["bops"] - 1) < 0.03 and abs(r["ops"] / b["ops"] - 1) < 0.02
    # The float twin: every MAC is a FLOP, no binary layer.
    fp = bhvit.create_model("reactnet_c32", num_classes=10, binary=False)
    c = bhvit.complexity(fp)
    assert c["bops"] == 0 and c["flops"] == 6_193_152 + 100_864
    assert not list(binary_layers(fp))
    with pytest.raises(ValueError, match="no layer with binarized weights"):
        bhvit.regularization_loss(fp)


def test_binary_layers_and_regularization():
    torch.manual_seed(0)
    m = bhvit.create_model("reactnet_c32", num_classes=10)
    layers = list(binary_layers(m))
    assert len(layers) == 12 and all(l.is_binary for l in layers)  # 6 blocks x 2 convs
    assert all(l.kernel_size == (3, 3) and l.input_bias is not None for l in layers)
    w = layers[0].effective_weight().reshape(32, -1)
    assert all(len(torch.unique(row)) == 2 for row in w)  # +-alpha per output channel
    for l in layers:
        torch.nn.init.constant_(l.weight, 0.5)
    assert bhvit.regularization_loss(m).item() == pytest.approx(0.5)
    from bhvit.costs import summary

    parts = [r["part"] for r in summary(m)]
    assert parts[:3] == ["stem", "stem_norm", "stages.0.blocks.0"] and parts[-1] == "total"


def test_trains_counts_flips_and_resumes(tmp_path):
    root = make_imagefolder(tmp_path / "img", classes=("a", "b", "c"), per_class=4)
    cfg = TrainConfig(
        model="reactnet_c32",
        data="imagefolder",
        data_dir=str(root),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=6,
        lr=1e-3,
        device="cpu",
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        threads=1,
    )
    torch.manual_seed(0)
    res = train(cfg, model=bhvit.create_model("reactnet_c32", num_classes=3))
    assert res["epoch"] == 1 and 0 <= res["test_top1"] <= 100
    assert res["flip_frac"] is not None and res["step_flip_frac"] >= res["flip_frac"] > 0
    assert res["beta"] == 0.1  # L_re in the last epoch
    doc = json.loads((tmp_path / "run" / "last.json").read_text())
    assert doc["model_config"]["depths"] == [1, 2, 2, 1] and doc["model_config"]["num_classes"] == 3
    # Resume: one more epoch from the checkpoint (the model config is checked against it).
    cfg.epochs, cfg.resume = 2, True
    res2 = train(cfg, model=bhvit.create_model("reactnet_c32", num_classes=3))
    assert res2["epoch"] == 2
    # A different baseline config is refused.
    cfg.epochs = 3
    with pytest.raises(Exception, match="model config differs"):
        train(cfg, model=bhvit.create_model("reactnet_c32", num_classes=3, depths=(1, 1, 1, 1)))

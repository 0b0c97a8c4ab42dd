"""save_pretrained / from_pretrained (Hugging Face's folder layout), timm's create_model
arguments, classifier access and pretrained_cfg. Nothing here contacts the network: the Hub
is replaced by a stand-in module."""

import json
import sys
import types

import pytest
import torch

import bhvit
from bhvit.checkpoint import save_checkpoint
from bhvit.errors import ConfigError

NAME = "bhvit_micro_c28"


def _model(num_classes=10):
    torch.manual_seed(0)
    return bhvit.create_model(NAME, num_classes=num_classes).eval()


def _x(n=2):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _trained_run(tmp_path, model):
    """A run directory as `bhvit train` leaves it, with data record and metrics."""
    run = tmp_path / "run"
    run.mkdir()
    data = {"name": "fashion-mnist", "classes": [f"c{i}" for i in range(10)], "mean": [0.286], "std": [0.353]}
    meta = {
        "train_config": {"model": NAME, "data": "fashion-mnist", "epochs": 3, "lr": 0.002, "batch_size": 64},
        "data": data,
        "metrics": {"epoch": 3, "test_top1": 81.25, "test_top5": 99.5},
    }
    save_checkpoint(run, 2, model, meta, is_best=True)
    return run


def test_save_pretrained_writes_the_hub_layout_and_loads_back_exactly(tmp_path):
    from safetensors import safe_open

    m = _model()
    out = m.save_pretrained(tmp_path / "pre")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # PyTorchModelHubMixin's
        assert set(f.keys()) == set(m.state_dict())
    doc = json.loads((out / "config.json").read_text())
    assert (doc["library_name"], doc["architecture"], doc["weights"]) == ("bhvit", NAME, "model.safetensors")
    assert doc["model_config"]["num_classes"] == 10 and doc["pretrained_cfg"]["input_size"] == [1, 28, 28]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: bhvit\n") and "# bhvit_micro_c28 (binary)" in card
    for load in (bhvit.from_pretrained, bhvit.BHViT.from_pretrained):
        m2 = load(out)
        assert not m2.training and m2.name == NAME
        assert torch.equal(m(_x()), m2(_x()))
    # the weights file itself names the folder, as a run's .safetensors names its JSON
    assert torch.equal(m(_x()), bhvit.from_pretrained(out / "model.safetensors")(_x()))


def test_a_trained_run_keeps_its_data_record_and_accuracy_through_the_folder(tmp_path):
    m = _model()
    run = _trained_run(tmp_path, m)
    loaded = bhvit.from_pretrained(run)
    pc = loaded.pretrained_cfg
    assert pc["mean"] == (0.286,) and pc["std"] == (0.353,) and pc["label_names"][3] == "c3"
    assert (pc["interpolation"], pc["crop_pct"], pc["dataset"]) == ("bilinear", 1.0, "fashion-mnist")
    out = loaded.save_pretrained(tmp_path / "pre", license="apache-2.0")
    card = (out / "README.md").read_text()
    assert 'license: "apache-2.0"' in card and '- "fashion-mnist"' in card
    assert "Top-1 81.25 %, top-5 99.50 % on the test split of `fashion-mnist`" in card
    assert "model `bhvit_micro_c28`, data `fashion-mnist`, 3 epochs, lr 0.002, batch 64, epoch 3." in card
    again = bhvit.from_pretrained(out)
    assert again.data == loaded.data and again.provenance["metrics"]["test_top1"] == 81.25
    assert torch.equal(m(_x()), again(_x()))


def test_a_corrupted_folder_is_refused(tmp_path):
    out = _model().save_pretrained(tmp_path / "pre")
    b = bytearray((out / "model.safetensors").read_bytes())
    b[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(b))
    with pytest.raises(ValueError, match="SHA-256"):
        bhvit.from_pretrained(out)


def test_hub_ids_need_huggingface_hub_and_fetch_only_the_three_files(tmp_path, monkeypatch):
    out = _model().save_pretrained(tmp_path / "pre")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ConfigError, match=r'pip install "bhvit\[hub\]"'):
        bhvit.from_pretrained("someone/bhvit-micro")
    with pytest.raises(ConfigError, match="no such file or folder"):
        bhvit.from_pretrained(str(tmp_path / "missing" / "deeper" / "x"))
    calls = []

    def snapshot_download(**kw):
        calls.append(kw)
        return str(out)

    class HfApi:
        def __init__(self, token=None):
            calls.append({"token": token})

        def create_repo(self, **kw):
            calls.append(kw)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls.append({"files": sorted(p.name for p in Path(folder_path).iterdir()), "repo": repo_id})
            return types.SimpleNamespace(commit_url="https://hub.example/commit/1")

    fake = types.SimpleNamespace(snapshot_download=snapshot_download, HfApi=HfApi)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    m = bhvit.from_pretrained("someone/bhvit-micro", revision="v1")
    assert calls[0]["repo_id"] == "someone/bhvit-micro" and calls[0]["revision"] == "v1"
    assert calls[0]["allow_patterns"] == ["config.json", "model.safetensors", "README.md"]
    assert m.name == NAME
    calls.clear()
    assert m.push_to_hub("someone/new", private=True, token="t") == "https://hub.example/commit/1"
    assert calls == [
        {"token": "t"},
        {"repo_id": "someone/new", "private": True, "exist_ok": True},
        {"files": ["README.md", "config.json", "model.safetensors"], "repo": "someone/new"},
    ]


def test_create_model_takes_timms_pretrained_and_checkpoint_path(tmp_path, monkeypatch):
    m = _model()
    out = m.save_pretrained(tmp_path / "pre")
    x = _x()
    assert torch.equal(bhvit.create_model(NAME, checkpoint_path=out).eval()(x), m(x))
    # pretrained=FOLDER with another class count: the same features, a new classifier
    ft = bhvit.create_model(NAME, pretrained=str(out), num_classes=4)
    assert ft(x).shape == (2, 4) and ft.cfg.num_classes == 4
    assert torch.equal(ft.forward_features(x), m.forward_features(x))
    with pytest.raises(ConfigError, match="classifies 10 classes, not 4"):
        bhvit.create_model(NAME, checkpoint_path=out, num_classes=4)
    with pytest.raises(ConfigError, match=r"qd=True \(asked False\)"):
        bhvit.create_model(NAME, checkpoint_path=out, qd=False)
    with pytest.raises(ConfigError, match="not both"):
        bhvit.create_model(NAME, pretrained=str(out), checkpoint_path=out)
    # pretrained=True: the folder in bhvit's cache directory, never a download
    monkeypatch.setenv("BHVIT_CACHE", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="ships and downloads none.*docs/PRETRAINED.md"):
        bhvit.create_model(NAME, pretrained=True)
    m.save_pretrained(tmp_path / "home" / "pretrained" / NAME)
    assert bhvit.pretrained_dir(NAME) == tmp_path / "home" / "pretrained" / NAME
    assert torch.equal(bhvit.create_model(NAME, pretrained=True).eval()(x), m(x))
    with pytest.raises(ConfigError, match="BHViT models only"):
        bhvit.create_model("reactnet_c32", pretrained=True)


def test_classifier_access_and_reset():
    m = _model()
    assert m.get_classifier() is m.head and m.num_features == 256 and m.num_classes == 10
    m.data = {"name": "x", "classes": [str(i) for i in range(10)], "mean": [0.5], "std": [0.5]}
    m.reset_classifier(3)
    assert m.get_classifier().out_features == 3 and m.cfg.num_classes == 3 and m(_x()).shape == (2, 3)
    assert "classes" not in m.data and m.pretrained_cfg["label_names"] is None and m.pretrained_cfg["mean"] == (0.5,)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            m.reset_classifier(bad)


def test_pretrained_cfg_of_the_registered_models():
    pc = bhvit.create_model("bhvit_tiny").pretrained_cfg  # the release's evaluation transform
    assert pc["input_size"] == (3, 224, 224) and pc["crop_pct"] == 0.875 and pc["interpolation"] == "bicubic"
    assert pc["mean"] == (0.485, 0.456, 0.406) and pc["std"] == (0.229, 0.224, 0.225)
    pc = _model().pretrained_cfg  # statistics come from the training data: none before training
    assert (pc["mean"], pc["crop_pct"], pc["num_classes"]) == (None, 1.0, 10)

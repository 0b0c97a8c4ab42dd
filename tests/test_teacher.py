"""--teacher-module / --teacher-weights: a teacher built by the user's code, weights from safetensors."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from bhvit.errors import ConfigError
from bhvit.train import TrainConfig, load_external_teacher, train
from synth import make_fashion_mnist

MODULE = """
import torch
from torch import nn


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
"""


@pytest.fixture
def teacher_module(tmp_path, monkeypatch):
    (tmp_path / "my_teachers.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_teachers", None)
    import my_teachers

    weights = tmp_path / "small.safetensors"
    model = my_teachers.small()
    with torch.no_grad():
        model[1].weight.mul_(3)  # not the factory's initialisation: the file's weights must be used
    save_file(model.state_dict(), str(weights))
    return "my_teachers:small", weights, model


def test_external_teacher_is_loaded_strictly_and_distils(teacher_module, tmp_path):
    spec, weights, ref = teacher_module
    t = load_external_teacher(spec, str(weights))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(t(x), ref(x))
    data = make_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    res = train(
        TrainConfig(
            model="bhvit_micro_c28",
            data_dir=str(data),
            out=str(tmp_path / "r"),
            epochs=1,
            batch_size=32,
            threads=1,
            progress=False,
            teacher_module=spec,
            teacher_weights=str(weights),
        )
    )
    hist = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert hist["kd_lambda"] == 0.8 and res["epoch"] == 1


def test_external_teacher_errors(teacher_module, tmp_path):
    spec, weights, _ = teacher_module
    with pytest.raises(ConfigError, match="expected PACKAGE.MODULE:FACTORY"):
        load_external_teacher("my_teachers", str(weights))
    with pytest.raises(ConfigError, match="needs --teacher-weights"):
        load_external_teacher(spec, None)
    with pytest.raises(ConfigError, match="cannot import it"):
        load_external_teacher("no_such_module_xyz:f", str(weights))
    bad = tmp_path / "bad.safetensors"
    save_file({"1.weight": torch.zeros(10, 5)}, str(bad))
    with pytest.raises(ConfigError, match="does not fit my_teachers:small"):
        load_external_teacher(spec, str(bad))
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ConfigError, match="cannot read it as safetensors"):
        load_external_teacher(spec, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ConfigError, match="one of --teacher"):
        train(TrainConfig(out=str(tmp_path / "x"), teacher="runs/t", teacher_module=spec))

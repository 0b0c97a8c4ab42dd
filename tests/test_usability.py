"""What a new user meets first: the install, subsets, --resume, predict's conversions,
messages and summaries."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bhvit
from bhvit.checkpoint import CheckpointError, load_model, resolve_checkpoint
from bhvit.cli import main
from bhvit.data import load_dataset
from bhvit.train import TrainConfig, read_metrics, resolve_test_subset, train
from synth import make_fashion_mnist, make_imagefolder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "64", "--no-progress", "--threads", "1", "--no-step-flips"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=160, n_test=96)


def test_a_script_beside_a_clone_named_bhvit_imports_the_package(tmp_path):
    (tmp_path / "bhvit").symlink_to(REPO, target_is_directory=True)  # ~/bhvit (the clone), ~/t.py
    (tmp_path / "t.py").write_text("import bhvit\nprint(bhvit.__file__, hasattr(bhvit, 'create_model'))\n")
    out = subprocess.run([sys.executable, "t.py"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(REPO / "bhvit" / "__init__.py"), "True"]


def test_test_subset_follows_subset_unless_given():
    assert resolve_test_subset(None, None) is None
    assert resolve_test_subset(50, None) == 50
    assert resolve_test_subset(50, 20) == 20
    assert resolve_test_subset(50, 0) is None  # --test-subset all


def test_subset_runs_evaluate_on_as_many_test_images(fmnist, tmp_path, capsys):
    assert (
        main(
            ["train", "--data-dir", str(fmnist), "--out", str(tmp_path / "a"), "--subset", "40", "--epochs", "1"] + FAST
        )
        == 0
    )
    assert "40 train / 40 test images" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(fmnist),
                "--out",
                str(tmp_path / "b"),
                "--subset",
                "40",
                "--test-subset",
                "all",
                "--epochs",
                "1",
            ]
            + FAST
        )
        == 0
    )
    assert "40 train / 96 test images" in capsys.readouterr().out
    doc = json.loads((tmp_path / "b" / "last.json").read_text())
    assert doc["train_config"]["test_subset"] is None and doc["data"]["test_size"] == 96


def test_imagefolder_subset_decodes_only_its_files(tmp_path, monkeypatch):
    import bhvit.data as data

    root = make_imagefolder(tmp_path / "if", per_class=6, size=32)
    full = load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "c"))
    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda p, *a: calls.append(p) or real(p, *a))
    sub = load_dataset("imagefolder", "train", str(root), size=32, cache_dir=str(tmp_path / "c2"), subset=5, seed=3)
    assert len(calls) == 5
    ref = full.subset(5, 3)  # the same images as a subset of the decoded whole
    assert sub.images.equal(ref.images) and sub.labels.equal(ref.labels)


def test_resume_of_a_directory_without_a_run_is_an_error_unless_auto(fmnist, tmp_path, capsys):
    args = ["train", "--data-dir", str(fmnist), "--subset", "40", "--epochs", "1"] + FAST
    missing = tmp_path / "typo"
    assert main(args + ["--out", str(missing), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {missing} holds no run to continue" in err and "--resume auto" in err
    assert not missing.exists()
    assert main(args + ["--out", str(missing), "--resume", "auto"]) == 0
    assert "starting fresh" in capsys.readouterr().out
    assert read_metrics(missing)[-1]["epoch"] == 1


def test_predict_says_which_images_it_converted(fmnist, tmp_path, capsys):
    from PIL import Image

    from bhvit.export import export_model

    cfg = TrainConfig(
        data_dir=str(fmnist),
        out=str(tmp_path / "r"),
        epochs=1,
        batch_size=64,
        subset=64,
        progress=False,
        threads=1,
        step_flips=False,
    )
    train(cfg)
    model, doc = load_model(tmp_path / "r")
    export_model(model, tmp_path / "exp", data=doc["data"])
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "same.png")
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(tmp_path / "big.png")
    assert main(["predict", str(tmp_path / "exp"), str(tmp_path / "same.png"), str(tmp_path / "big.png")]) == 0
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [
        f"{tmp_path / 'big.png'}: shorter side resized to 28 (bilinear) and centre-cropped from 56x40 RGB to 28x28 L"
    ]
    assert cap.out.count("same.png") == 1 and cap.out.count("big.png") == 1
    # --classes: one name per line for the model's classes (an ImageNet export has none)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"kind {i}\n" for i in range(10)))
    assert main(["predict", str(tmp_path / "exp"), str(tmp_path / "same.png"), "--classes", str(names)]) == 0
    out = capsys.readouterr().out
    assert out.count("  kind ") == 5 and "t-shirt" not in out
    for text, message in (
        ("a\nb\n", r"--classes .*names.txt: 2 lines, but the model has 10 classes \(one name per line\)"),
        ("x\n" * 9 + "evil\x1b[2J\n", r"--classes .*names.txt: line 10 holds a control character"),
    ):
        names.write_text(text)
        assert main(["predict", str(tmp_path / "exp"), str(tmp_path / "same.png"), "--classes", str(names)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and len(err.strip().splitlines()) == 1


def test_eval_on_a_recipe_root_points_at_its_stages(tmp_path):
    for stage in ("teacher", "student"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "best.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"a recipe run; its checkpoints are in .*teacher and .*student"):
        resolve_checkpoint(tmp_path)


def test_every_option_with_a_default_says_it_in_help():
    from bhvit.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    missing = [
        (name, a.option_strings[0])
        for name, sp in sub.items()
        for a in sp._actions
        if a.option_strings and a.default not in (None, False, [], "==SUPPRESS==") and "default" not in (a.help or "")
    ]
    assert missing == []


def test_complexity_prints_a_one_line_summary():
    c = bhvit.complexity(bhvit.create_model("bhvit_micro_c28", num_classes=10))
    text = str(c)
    assert text.startswith("Complexity(params=1,542,138, binary_params=1,468,160, bops=23.55M")
    assert "\n" not in text and len(text) < 200
    assert isinstance(c["per_module"], dict) and c["params"] == 1_542_138


def test_curves_of_one_epoch_put_the_point_in_the_middle(tmp_path):
    from PIL import Image

    from bhvit.plot import plot_history

    h = [{"epoch": 1, "train_loss": 2.0, "test_loss": 2.1, "train_top1": 10.0, "test_top1": 11.0}]
    img = np.asarray(Image.open(plot_history(h, tmp_path / "c.png")).convert("RGB")).astype(int)
    blue = np.abs(img - [31, 119, 180]).sum(-1) == 0  # train loss, left panel (x 60..430)
    xs = np.nonzero(blue[40:340, 60:430])[1] + 60
    xs = xs[xs < 300]  # leave out the legend in the panel's top right
    assert len(xs) and abs(xs.mean() - 245) < 4


def test_runtime_latency_without_onnxruntime_says_how_to_install_it(monkeypatch, capsys):
    from benchmark_module import load_benchmark

    bench = load_benchmark("runtime_latency")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.setattr(bench, "_said", set())
    assert bench._onnx_session(None, None, 1) is None and bench._onnx_session(None, None, 2) is None
    out = capsys.readouterr().out
    assert out.count("ONNX Runtime is not installed") == 1 and 'pip install -e ".[bench]"' in out
    med = {"runtime": 2.0, "capi": 1.0, "walker": 3.0, "fp32": 4.0}
    row = bench.format_row("bhvit_tiny", 1, 1, med)
    assert "nan" not in row and "onnxrt" not in row and row.endswith("fp32      4.0 (2.00x)")
    assert bench.format_row("bhvit_tiny", 1, 1, dict(med, onnxrt=1.0)).endswith("| onnxrt      1.0 (0.50x)")

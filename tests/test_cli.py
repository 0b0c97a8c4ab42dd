import json
import re

from bhvit.cli import main


def test_info_prints_counts(capsys):
    assert main(["info", "bhvit_tiny", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "13,275,226" in out and "12,630,016" in out


def test_info_json_and_overrides(capsys):
    assert main(["info", "bhvit_micro_c28", "--json", "--set", "binary=false"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["bops"] == 0 and c["input_size"] == [1, 1, 28, 28]


def test_info_bad_values_exit_2(capsys):
    assert main(["info", "bhvit_nope"]) == 2
    assert "unknown model 'bhvit_nope'" in capsys.readouterr().err
    assert main(["info", "bhvit_tiny", "--img-size", "100"]) == 2
    assert "img_size 100 is not supported" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    assert "bhvit_tiny_c32" in capsys.readouterr().out.split()


def test_set_parses_booleans_and_rejects_num_classes(capsys):
    from bhvit.cli import parse_overrides

    assert parse_overrides(["binary=False", "qd=false", "shift=TRUE", "windows=[8,8,4,2]"]) == {
        "binary": False,
        "qd": False,
        "shift": True,
        "windows": (8, 8, 4, 2),
    }
    assert main(["info", "bhvit_tiny", "--set", "num_classes=5"]) == 2
    assert "--set num_classes is not allowed" in capsys.readouterr().err
    assert main(["info", "bhvit_tiny", "--set", "binary=maybe"]) == 2
    assert "binary must be true or false, got 'maybe'" in capsys.readouterr().err


def test_train_flags_reach_the_config():
    from bhvit.cli import _train_config, build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--out",
            "r",
            "--no-step-flips",
            "--no-flip",
            "--crop-pad",
            "1",
            "--cuda-graph",
            "--eval-batch-size",
            "1024",
        ]
    )
    cfg = _train_config(args)
    assert (cfg.step_flips, cfg.flip, cfg.crop_pad, cfg.out) == (False, False, 1, "r")
    assert (cfg.cuda_graph, cfg.eval_batch_size) == (True, 1024)
    cfg = _train_config(build_parser().parse_args(["train", "--out", "r"]))
    assert (cfg.step_flips, cfg.flip, cfg.crop_pad) == (True, True, None)
    assert (cfg.cuda_graph, cfg.eval_batch_size) == (False, 256)
    rec = build_parser().parse_args(["recipe", "--out", "r", "--act-epochs", "3"])
    assert rec.act_epochs == 3


def test_recipe_rejects_negative_act_epochs(tmp_path, capsys):
    assert main(["recipe", "--out", str(tmp_path / "r"), "--act-epochs", "-1"]) == 2
    assert "--act-epochs must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_train_option_is_a_config_field_and_back():
    """The parser is generated from TrainConfig: defaults agree, every field but the
    recipe's own has an option, and a changed value of each field reaches the config."""
    import argparse
    import dataclasses

    from bhvit.cli import _train_config, build_parser
    from bhvit.config import RESUME_KEYS, TrainConfig

    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    train_dests = {a.dest for a in subs.choices["train"]._actions} - {"help"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert train_dests == fields
    recipe_dests = {a.dest for a in subs.choices["recipe"]._actions} - {"help"}
    assert recipe_dests == (
        fields - {"teacher", "init_from", "teacher_module", "teacher_weights"}
        | {"teacher_epochs", "init_from_teacher", "act_epochs"}
    )
    # defaults: the parser with only --out gives TrainConfig's defaults
    assert _train_config(top.parse_args(["train", "--out", "runs/bhvit"])) == TrainConfig()
    argv = [
        "train",
        "--out",
        "o",
        "--model",
        "m",
        "--data",
        "cifar10",
        "--data-dir",
        "d",
        "--epochs",
        "3",
        "--batch-size",
        "7",
        "--lr",
        "0.5",
        "--weight-decay",
        "0.1",
        "--warmup-epochs",
        "0.5",
        "--min-lr",
        "1e-6",
        "--kd-lambda",
        "0.5",
        "--re-beta",
        "0.2",
        "--re-last-frac",
        "0.3",
        "--teacher",
        "t",
        "--init-from",
        "i",
        "--resume",
        "auto",
        "--subset",
        "9",
        "--test-subset",
        "all",
        "--seed",
        "4",
        "--device",
        "cpu",
        "--amp",
        "--deterministic",
        "--threads",
        "2",
        "--set",
        "qd=false",
        "--skip-bad",
        "--cache-dir",
        "c",
        "--crop-pad",
        "2",
        "--no-flip",
        "--eval-batch-size",
        "8",
        "--no-progress",
        "--no-step-flips",
        "--compile",
        "--cuda-graph",
        "--data-in-memory",
        "no",
        "--workers",
        "2",
        "--augment",
        "rrc",
        "--max-steps",
        "5",
        "--teacher-module",
        "m:f",
        "--teacher-weights",
        "w",
    ]
    cfg = _train_config(top.parse_args(argv))
    changed = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(cfg, f.name) != f.default and not (f.name == "overrides" and cfg.overrides == {})
    }
    assert changed == fields
    assert (cfg.resume, cfg.test_subset, cfg.overrides, cfg.compile) == ("auto", 0, {"qd": False}, "inductor")
    assert set(RESUME_KEYS) == {
        "model",
        "data",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "min_lr",
        "kd_lambda",
        "re_beta",
        "re_last_frac",
        "teacher",
        "subset",
        "seed",
        "overrides",
        "crop_pad",
        "flip",
        "amp",
        "test_subset",
        "augment",
        "teacher_module",
        "teacher_weights",
    }


def test_set_accepts_comma_separated_lists(capsys):
    from bhvit.cli import parse_overrides

    assert parse_overrides(["windows=7,7,5,7", "dims=[32, 64, 128, 256]", "shift_sizes=2,", "heads=1, 2 ,4,8"]) == {
        "windows": (7, 7, 5, 7),
        "dims": (32, 64, 128, 256),
        "shift_sizes": (2,),
        "heads": (1, 2, 4, 8),
    }
    assert main(["info", "bhvit_micro_c32", "--json", "--set", "windows=8,4,4,2"]) == 0
    comma = json.loads(capsys.readouterr().out)
    assert main(["info", "bhvit_micro_c32", "--json", "--set", "windows=[8,4,4,2]"]) == 0
    assert json.loads(capsys.readouterr().out) == comma


def test_info_small_image_models_default_to_their_10_classes(capsys):
    from bhvit.model import create_model

    assert main(["info", "bhvit_tiny_c32", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["params"] == 12_927_322  # docs/MODELS.md's table, 10 classes
    assert c["params"] == sum(p.numel() for p in create_model("bhvit_tiny_c32").parameters())
    assert create_model("bhvit_micro_c28").cfg.num_classes == 10
    assert create_model("bhvit_tiny").cfg.num_classes == 1000
    assert main(["info", "bhvit_micro_c28", "--json", "--num-classes", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 1_542_138 + 90 * (256 + 1)


def test_info_of_a_run_directory_shows_its_model(tmp_path, capsys):
    from bhvit.checkpoint import save_checkpoint
    from bhvit.model import create_model

    model = create_model("bhvit_micro_c28", num_classes=7, binary=False)
    save_checkpoint(tmp_path / "run", 0, model, {"train_config": {"model": "bhvit_micro_c28"}}, is_best=True)
    assert main(["info", "bhvit_micro_c28", "--json", "--num-classes", "7", "--set", "binary=false"]) == 0
    named = json.loads(capsys.readouterr().out)
    for path in (tmp_path / "run", tmp_path / "run" / "best.json"):
        assert main(["info", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == named
    assert main(["info", str(tmp_path / "run"), "--layers"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run' / 'best.json'} (bhvit_micro_c28, 7 classes)" in out.splitlines()[0]
    # the per-layer table, with the checkpoint's 7-class head
    assert "stages.3.blocks.0" in out and re.search(r"^head\s+0\s+1,799\s", out, re.M)
    assert main(["info", str(tmp_path / "run"), "--set", "qd=false"]) == 2
    assert "apply to a named model" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_version_and_teacher_help(capsys):
    import pytest

    import bhvit
    from bhvit.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"bhvit {bhvit.__version__}\n" == "bhvit 0.1.0\n"
    tr = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = next(a.help for a in tr._actions if a.dest == "teacher")
    assert "run directory" in help_text and ".json" in help_text and ".safetensors" in help_text


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    # the reader is gone before bhvit writes anything: every write meets EPIPE
    p = subprocess.Popen(
        [sys.executable, "-m", "bhvit", "info", "bhvit_micro_c28", "--layers"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
    # as a user types it
    r = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m bhvit info bhvit_tiny --layers | head -3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout.splitlines()[0].split() == ["model", "bhvit_tiny"] and len(r.stdout.splitlines()) == 3
    assert r.stderr == "" and r.returncode in (0, 141)

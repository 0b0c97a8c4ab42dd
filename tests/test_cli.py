import json

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

    assert parse_overrides(["binary=False", "qd=false", "shift=TRUE", "windows=[8,8,4,2]"]) == \
        {"binary": False, "qd": False, "shift": True, "windows": (8, 8, 4, 2)}
    assert main(["info", "bhvit_tiny", "--set", "num_classes=5"]) == 2
    assert "--set num_classes is not allowed" in capsys.readouterr().err
    assert main(["info", "bhvit_tiny", "--set", "binary=maybe"]) == 2
    assert "binary must be true or false, got 'maybe'" in capsys.readouterr().err


def test_train_flags_reach_the_config():
    from bhvit.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--out", "r", "--no-step-flips", "--no-flip", "--crop-pad", "1",
                                      "--cuda-graph", "--eval-batch-size", "1024"])
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

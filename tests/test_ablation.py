"""experiments/ablation.py: a 2-variant, 1-epoch study on a tiny synthetic ImageFolder."""

import importlib.util
import json
import re
import sys
from pathlib import Path


from synth import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]


def _load():
    if "exp_ablation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("exp_ablation", ROOT / "experiments" / "ablation.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["exp_ablation"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["exp_ablation"]


def test_variants_are_the_papers_switches():
    ab = _load()
    assert list(ab.VARIANTS) == [
        "full",
        "no_qd",
        "no_shift",
        "no_msmha",
        "no_msgdc",
        "msgdc_only",
        "msmha_only",
        "fp_down",
        "reactnet",
    ]
    assert ab.VARIANTS["no_qd"][1] == {"qd": False} and ab.VARIANTS["fp_down"][1] == {"fp_downsample": True}
    assert ab.VARIANTS["reactnet"][1] is None
    args = ab.build_parser().parse_args([])
    assert (args.model, args.baseline, args.seeds, args.subset, args.threads) == (
        "bhvit_nano_c32",
        "reactnet_c32",
        [0, 1],
        10000,
        1,
    )


def test_subset_folder_is_balanced_and_stable(tmp_path):
    ab = _load()
    src = make_imagefolder(tmp_path / "src", classes=("a", "b", "c"), per_class=5)
    out = ab.make_subset_folder(src, tmp_path / "sub", 7, seed=0)
    counts = {c: len(list((out / "train" / c).iterdir())) for c in ("a", "b", "c")}
    assert counts == {"a": 3, "b": 2, "c": 2}
    assert (out / "test").resolve() == (src / "test").resolve()
    first = sorted(p.name for p in (out / "train" / "a").iterdir())
    mtime = (out / "subset.json").stat().st_mtime_ns
    ab.make_subset_folder(src, tmp_path / "sub", 7, seed=0)  # same choice: kept as is
    assert (out / "subset.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (out / "train" / "a").iterdir()) == first


def test_two_variant_study_runs_resumes_and_reports(tmp_path, capsys):
    ab = _load()
    src = make_imagefolder(tmp_path / "img", classes=("a", "b"), per_class=6)
    out = tmp_path / "study"
    argv = [
        "--data",
        "imagefolder",
        "--data-dir",
        str(src),
        "--out",
        str(out),
        "--variants",
        "full",
        "reactnet",
        "--seeds",
        "0",
        "--subset",
        "8",
        "--epochs",
        "1",
        "--teacher-epochs",
        "1",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert ab.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["full", "reactnet"]
    assert rows["full"]["model"] == "bhvit_nano_c32" and rows["reactnet"]["model"] == "reactnet_c32"
    assert (rows["full"]["bops"], rows["reactnet"]["bops"]) == (6_059_008, 6_193_152)
    for r in rows.values():
        assert list(r["runs"]) == ["0"] and r["top1"]["std"] == 0.0
        assert 0 <= r["top1"]["mean"] <= 100
    for run in ("teacher", "full/seed0", "reactnet/seed0"):
        assert json.loads((out / run / "final.json").read_text())["epoch"] == 1
    doc = json.loads((out / "reactnet" / "seed0" / "last.json").read_text())
    assert doc["train_config"]["teacher"] == str(out / "teacher") and doc["train_config"]["subset"] is None
    assert doc["data"]["train_size"] == 8 and doc["model_config"]["depths"] == [1, 2, 2, 1]
    md = (out / "results.md").read_text()
    assert "| BHViT (full) (`full`) |" in md and "| ReActNet binary CNN (`reactnet`) |" in md
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Again: finished runs are skipped. Without final.json a run resumes from its last epoch
    # (nothing left to train) instead of starting over.
    (out / "full" / "seed0" / "final.json").unlink()
    capsys.readouterr()
    assert ab.main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("finished, skipped") == 2
    assert "resumed" in log and json.loads((out / "results.json").read_text())["rows"] == res["rows"]


def test_documented_commands_use_existing_options():
    ab = _load()
    known = {s for a in ab.build_parser()._actions for s in a.option_strings}
    texts = [ab.__doc__]
    if (ROOT / "docs" / "ABLATION.md").is_file():
        texts.append((ROOT / "docs" / "ABLATION.md").read_text())
    cmds = [m for t in texts for m in re.findall(r"experiments/ablation\.py([^\n`]*)", t)]
    assert cmds
    bad = [o for c in cmds for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", c) if o not in known]
    assert not bad


def test_a_run_another_process_holds_is_skipped(tmp_path, capsys):
    from bhvit.rundir import RunLock

    ab = _load()
    args = ab.build_parser().parse_args(["--out", str(tmp_path)])
    cfg = ab._train_config(args, str(tmp_path / "data"), tmp_path / "full" / "seed0", "bhvit_nano_c32", {}, 0, 1, 1e-3)
    (tmp_path / "full" / "seed0").mkdir(parents=True)
    lock = RunLock(tmp_path / "full" / "seed0")
    lock.acquire()
    try:
        assert ab.run_one(cfg) is None
    finally:
        lock.release()
    assert re.search(r"seed0: skipped, .* in use by another bhvit run", capsys.readouterr().out)

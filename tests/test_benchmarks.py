"""Argument checks of the benchmark and experiment scripts (they stop before any training)."""

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, folder="benchmarks"):
    return subprocess.run(
        [sys.executable, str(ROOT / folder / script), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("setting", ["binary=false", "binary_acts=false"])
def test_paired_students_refuses_binarization_settings(tmp_path, setting):
    r = _run(
        "paired_students.py",
        "--teacher",
        str(tmp_path / "t"),
        "--out",
        str(tmp_path / "o"),
        "--set",
        setting,
        folder="experiments",
    )
    assert r.returncode == 2
    assert f"--set {setting.split('=')[0]}: both arms are binary students" in r.stderr
    assert not (tmp_path / "o").exists()


def test_paired_students_needs_a_variant(tmp_path):
    r = _run("paired_students.py", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "o"), folder="experiments")
    assert r.returncode == 2 and "give the variant" in r.stderr


def test_train_speed_cuda_graph_needs_cuda():
    r = _run("train_speed.py", "--cuda-graph")
    assert r.returncode == 2 and "--cuda-graph needs --device cuda" in r.stderr


def test_train_speed_times_the_shift_reference_side_by_side():
    r = _run(
        "train_speed.py",
        "--models",
        "bhvit_micro_c28",
        "--batch",
        "2",
        "--runs",
        "1",
        "--threads",
        "1",
        "--shift-reference",
        "--count-ops",
    )
    assert r.returncode == 0, r.stderr
    ops = {
        line.split(":")[0]: int(line.split()[1]) for line in r.stdout.splitlines() if " ops per training step " in line
    }
    # the reference twin really runs the rolls: 20 per block forward and 20 backward
    assert ops["bhvit_micro_c28+rolls"] - ops["bhvit_micro_c28"] > 5 * 40
    rows = [
        line.split()[0]
        for line in r.stdout.splitlines()
        if line.startswith("bhvit_micro_c28") and " ms" not in line and ":" not in line
    ]
    assert rows == ["bhvit_micro_c28", "bhvit_micro_c28+rolls"]
    assert "bhvit_micro_c28: shift branches as convolutions: step " in r.stdout

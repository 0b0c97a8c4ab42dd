"""Argument checks of the benchmark scripts (they stop before any training)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("setting", ["binary=false", "binary_acts=false"])
def test_paired_students_refuses_binarization_settings(tmp_path, setting):
    r = _run("paired_students.py", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "o"),
             "--set", setting)
    assert r.returncode == 2
    assert f"--set {setting.split('=')[0]}: both arms are binary students" in r.stderr
    assert not (tmp_path / "o").exists()


def test_paired_students_needs_a_variant(tmp_path):
    r = _run("paired_students.py", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "give the variant" in r.stderr


def test_earlier_runs_are_not_reported_as_new(tmp_path):
    (tmp_path / "runs" / "fm_teacher").mkdir(parents=True)
    r = _run("budget_recipe.py", "--out", str(tmp_path / "runs"), "--device", "cpu",
             "--fmnist-dir", str(tmp_path / "data"))
    assert r.returncode == 1 and "already holds run(s) fm_teacher" in r.stderr
    r = _run("gpu_checks.py", "--device", "cpu", "--work", str(tmp_path / "runs"))
    assert r.returncode == 1 and f"--work {tmp_path / 'runs'} is not empty" in r.stderr

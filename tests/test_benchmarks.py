"""Argument checks and plans of the benchmark scripts (they stop before any training)."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark_module import load_benchmark

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


def _budget_recipe_module():
    return load_benchmark("budget_recipe")


def test_compile_pays_only_when_more_epochs_fit():
    br = _budget_recipe_module()
    job = br.Job("fm_teacher", "fashion-mnist", "d", "bhvit_tiny_c28", False, 6e-3)
    key = br.probe_key(job)
    args = SimpleNamespace(batch_size=1024, slowdown=1.6, reserve_s=20, max_epochs=300, subset=None,
                           test_subset=None)
    # Measured on an H200: 180.9 ms eager, 108.3 ms compiled after 228 s of compilation.
    eager, compiled = {key: (0.1809, 0.0)}, {key: (0.1083, 228.0)}
    # An epoch of 58 full steps (59 eager) + eval (10 batches of 1024, forward only, eager in
    # both), x1.6 slowdown: 11.01 s compiled, 18.04 s eager.
    # 270 s: (270 - 20 - 228) / 11.01 -> 1 epoch compiled, (270 - 20) / 18.04 -> 13 eager.
    assert not br.compile_pays([job], eager, compiled, 270.0, args)
    assert (job.epochs, job.step_s, job.compile_s, job.drop_last) == (0, 0.0, 0.0, False)  # untouched
    assert br.compile_pays([job], eager, compiled, 3000.0, args)  # 249 epochs against 165
    copy = br.Job("t", "fashion-mnist", "d", "bhvit_tiny_c28", False, 6e-3)
    br.set_probes([copy], compiled, True, eager)
    assert br.plan_epoch_s(copy, 1024) == pytest.approx(58 * 0.1083 + 10 * 0.1809 / 3)
    # A graph costs no compile time, but graphed jobs sharing the GPU slow each other more.
    graphed = {key: (0.1083, 0.0)}
    assert br.compile_pays([job], eager, graphed, 270.0, args, what="--cuda-graph")  # 22 against 13
    assert not br.compile_pays([job], eager, graphed, 270.0, args, slowdown_with=3.0)  # 12 against 13


def test_budget_recipe_goes_on_eager_when_compiling_fails(tmp_path):
    r = _run("budget_recipe.py", "--out", str(tmp_path / "runs"), "--device", "cpu", "--fmnist-dir",
             str(tmp_path / "data"), "--batch-size", "4", "--probe-steps", "1", "--threads", "1",
             "--budget-s", "200", "--no-lre-ablation", "--compile", "no_such_backend", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "torch.compile: failed in the probe (" in r.stdout
    assert "going on without --compile" in r.stdout
    assert "plan fm_teacher: " in r.stdout and "(compiled)" not in r.stdout
    assert not (tmp_path / "runs" / "fm_teacher").exists()


def test_budget_recipe_goes_on_eager_when_cuda_graphs_fail(tmp_path):
    # On the CPU the graphed probe fails at its first step: the plan falls back to eager.
    r = _run("budget_recipe.py", "--out", str(tmp_path / "runs"), "--device", "cpu", "--fmnist-dir",
             str(tmp_path / "data"), "--batch-size", "4", "--probe-steps", "1", "--threads", "1",
             "--budget-s", "200", "--no-lre-ablation", "--cuda-graph", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "--cuda-graph: failed in the probe (" in r.stdout
    assert "going on without it" in r.stdout
    assert "plan fm_teacher: " in r.stdout and "(CUDA graph)" not in r.stdout
    r = _run("budget_recipe.py", "--out", str(tmp_path / "runs"), "--fmnist-dir", "x", "--cuda-graph",
             "--compile")
    assert r.returncode == 2 and "one of --compile and --cuda-graph" in r.stderr
    r = _run("train_speed.py", "--cuda-graph")
    assert r.returncode == 2 and "--cuda-graph needs --device cuda" in r.stderr


def test_phase_two_slowdown():
    br = _budget_recipe_module()
    assert br.phase_slowdown(2, 0, [], 1.6) == 1.6  # no teachers: the default, unscaled
    assert br.phase_slowdown(1, 1, [1.06], 1.15) == pytest.approx(1.2 * 1.06)  # at least 1.2x the ratio
    assert br.phase_slowdown(4, 2, [1.3, 1.5], 1.6) == pytest.approx(2 * 1.5)  # twice the jobs, worst ratio
    assert br.phase_slowdown(2, 1, [], 1.15) == pytest.approx(2.3)  # a dry run: the default as the ratio


def test_teacher_init_needs_a_checkpoint_and_no_fixed_teacher(tmp_path):
    r = _run("budget_recipe.py", "--out", str(tmp_path / "runs"), "--device", "cpu", "--fmnist-dir",
             str(tmp_path / "data"), "--fm-teacher-init", str(tmp_path / "missing"))
    assert r.returncode == 1 and f"--fm-teacher-init {tmp_path / 'missing'}: no such checkpoint" in r.stderr
    r = _run("budget_recipe.py", "--out", str(tmp_path / "runs"), "--device", "cpu", "--fmnist-dir",
             str(tmp_path / "data"), "--fm-teacher-init", str(tmp_path), "--fm-teacher", str(tmp_path))
    assert r.returncode == 1 and "--fm-teacher-init needs a single --fm-model and no --fm-teacher" in r.stderr


def test_train_speed_times_the_shift_reference_side_by_side():
    r = _run("train_speed.py", "--models", "bhvit_micro_c28", "--batch", "2", "--runs", "1",
             "--threads", "1", "--shift-reference", "--count-ops")
    assert r.returncode == 0, r.stderr
    ops = {line.split(":")[0]: int(line.split()[1]) for line in r.stdout.splitlines()
           if " ops per training step " in line}
    # the reference twin really runs the rolls: 20 per block forward and 20 backward
    assert ops["bhvit_micro_c28+rolls"] - ops["bhvit_micro_c28"] > 5 * 40
    rows = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("bhvit_micro_c28")
            and " ms" not in line and ":" not in line]
    assert rows == ["bhvit_micro_c28", "bhvit_micro_c28+rolls"]
    assert "bhvit_micro_c28: shift branches as convolutions: step " in r.stdout

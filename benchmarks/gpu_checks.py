"""CUDA checks of the training path: forward agreement with the CPU, a mixed-precision
run, kill-and-resume, and evaluation on both devices.

Needs a CUDA device and Fashion-MNIST. Prints one JSON object per check and a summary;
``--json FILE`` also writes them all.

    python benchmarks/gpu_checks.py --data-dir /usr/share/datasets/fashion-mnist --work runs/gpu_checks
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import bhvit
from bhvit.checkpoint import load_model
from bhvit.data import load_dataset
from bhvit.train import _tf32_switches, evaluate

RESULTS = []


def report(name: str, **kw) -> None:
    kw = {"check": name, **kw}
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def cli(*args: str, log: Path, wait: bool = True) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own handle
        p = subprocess.Popen([sys.executable, "-m", "bhvit", *args], stdout=f, stderr=subprocess.STDOUT)
    if wait:
        p.wait()
    return p


def forward_agreement(device: str, tf32: bool = True) -> None:
    """Same weights, same input: logits on the CPU and on the device (train-mode batch
    statistics and eval mode). ``tf32``: TF32 on for CUDA convolutions and matmuls (torch's
    default has it on for convolutions only), else off for both."""
    for obj, attr, exact in _tf32_switches():
        setattr(obj, attr, ("tf32" if attr == "fp32_precision" else True) if tf32 else exact)
    for name, binary in [("bhvit_micro_c28", True), ("bhvit_tiny_c32", True), ("bhvit_tiny_c32", False)]:
        torch.manual_seed(0)
        m = bhvit.create_model(name, num_classes=10, binary=binary)
        c = m.cfg
        x = torch.randn(64, c.in_chans, c.img_size, c.img_size)
        for mode in ("train", "eval"):
            m.train(mode == "train")
            with torch.no_grad():
                ref = m(x).double()
                got = m.to(device)(x.to(device)).double().cpu()
                m.cpu()
            rel = float((got - ref).norm() / ref.norm())
            report("forward_cpu_vs_device", model=name, binary=binary, mode=mode, tf32=tf32,
                   max_abs_diff=float((got - ref).abs().max()), rel_l2=rel,
                   argmax_agree=float((got.argmax(1) == ref.argmax(1)).double().mean()))


def train_runs(device: str, data_dir: str, work: Path, subset: int, deterministic: bool = False,
               amp: bool = True) -> None:
    common = ["train", "--data", "fashion-mnist", "--data-dir", data_dir, "--model", "bhvit_micro_c28",
              "--subset", str(subset), "--test-subset", "2000", "--batch-size", "256", "--lr", "1e-3",
              "--device", device, "--threads", "4", "--no-progress", "--seed", "3"]
    if deterministic:
        common.append("--deterministic")
    if amp:
        amp_runs(common, work)
    resume_runs(common, work, deterministic)
    eval_runs(device, data_dir, work)


def amp_runs(common, work: Path) -> None:
    """FP teacher and binary student with KD + L_re, mixed precision."""
    t0 = time.perf_counter()
    cli(*common, "--set", "binary=false", "--epochs", "2", "--amp", "--out", str(work / "amp_teacher"),
        log=work / "amp_teacher.log")
    cli(*common, "--epochs", "3", "--amp", "--teacher", str(work / "amp_teacher"), "--out",
        str(work / "amp_student"), log=work / "amp_student.log")
    for run in ("amp_teacher", "amp_student"):
        f = work / run / "final.json"
        if f.is_file():
            d = json.loads(f.read_text())
            report("amp_train", run=run, test_top1=d["test_top1"], train_loss=d["train_loss"],
                   flip_frac=d.get("flip_frac"), step_flip_frac=d.get("step_flip_frac"),
                   images_per_s=d["train_images_per_s"])
        else:
            report("amp_train", run=run, error=(work / f"{run}.log").read_text()[-2000:])
    report("amp_wall", seconds=time.perf_counter() - t0)


def resume_runs(common, work: Path, deterministic: bool) -> None:
    """Kill after the first epoch's checkpoint, resume, compare with an uninterrupted run
    (and, with --deterministic, with a second uninterrupted run)."""
    full = cli(*common, "--epochs", "2", "--out", str(work / "full"), log=work / "full.log", wait=False)
    again = None
    if deterministic:
        again = cli(*common, "--epochs", "2", "--out", str(work / "again"), log=work / "again.log", wait=False)
    part = cli(*common, "--epochs", "2", "--out", str(work / "killed"), log=work / "killed.log", wait=False)
    while part.poll() is None and not (work / "killed" / "last.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    killed_mid_run = part.poll() is None
    if killed_mid_run:
        os.kill(part.pid, signal.SIGKILL)
        part.wait()
    cli(*common, "--epochs", "2", "--resume", "--out", str(work / "killed"), log=work / "resumed.log")
    full.wait()
    keys = ("train_loss", "test_loss", "test_top1")
    warnings = sorted({line.strip()[:300] for f in work.glob("*.log") for line in f.read_text().splitlines()
                       if "deterministic" in line and "Warning" in line})
    try:
        a = json.loads((work / "full" / "final.json").read_text())
        b = json.loads((work / "killed" / "final.json").read_text())
        extra = {}
        if again is not None:
            again.wait()
            c = json.loads((work / "again" / "final.json").read_text())
            extra = {"repeat": {k: c[k] for k in keys}, "repeat_identical": all(a[k] == c[k] for k in keys)}
        report("resume_after_kill", deterministic=deterministic, killed_mid_run=killed_mid_run,
               full={k: a[k] for k in keys}, resumed={k: b[k] for k in keys},
               identical=all(a[k] == b[k] for k in keys), nondeterminism_warnings=warnings, **extra)
    except (OSError, KeyError, ValueError) as e:
        report("resume_after_kill", error=f"{e}: {(work / 'resumed.log').read_text()[-2000:]}")


def eval_runs(device: str, data_dir: str, work: Path) -> None:
    """The device-trained student evaluated on both devices."""
    if not (work / "amp_student").is_dir():
        return
    try:
        ds = None
        out = {}
        for dev in ("cpu", device):
            model, doc = load_model(work / "amp_student", map_location=dev)
            if ds is None:
                ds = load_dataset("fashion-mnist", "test", data_dir, channels=1, size=28).subset(2000, 3)
            out[dev] = evaluate(model, ds, doc["data"]["mean"], doc["data"]["std"], 256, dev)
        report("eval_cpu_vs_device", **{d: {k: v for k, v in r.items()} for d, r in out.items()})
    except Exception as e:  # report, keep going
        report("eval_cpu_vs_device", error=repr(e))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--work", default="runs/gpu_checks")
    p.add_argument("--subset", type=int, default=4096, help="training images per run")
    p.add_argument("--deterministic", action="store_true", help="train runs with --deterministic")
    p.add_argument("--no-amp", action="store_true", help="skip the mixed-precision runs")
    p.add_argument("--no-tf32", action="store_true", help="forward agreement without TF32 as well")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_checks: no CUDA device.")
    work = Path(args.work)
    if work.is_dir() and any(work.iterdir()):
        sys.exit(f"gpu_checks: --work {work} is not empty; its runs would be reported as this "
                 "session's. Give a new folder.")
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report("environment", torch=torch.__version__, device=name,
           cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    t = time.perf_counter()
    forward_agreement(args.device)
    if args.no_tf32:
        forward_agreement(args.device, tf32=False)
    train_runs(args.device, args.data_dir, work, args.subset, args.deterministic, not args.no_amp)
    report("total", seconds=time.perf_counter() - t)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()

"""CUDA checks of the training path: forward agreement with the CPU, a mixed-precision
run, kill-and-resume, evaluation on both devices, and the CUDA-graph step (`--cuda-graph`)
against eager steps.

Needs a CUDA device and Fashion-MNIST. Prints one JSON object per check and a summary;
``--json FILE`` also writes them all.

    python benchmarks/gpu_checks.py --data-dir /usr/share/datasets/fashion-mnist --work runs/gpu_checks
    python benchmarks/gpu_checks.py --only cuda-graph --data-dir DIR --work DIR   # about 2 minutes
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


def graph_step_agreement(device: str, steps: int = 10, batch: int = 128) -> None:
    """The same training steps (KD + L_re student, capturable AdamW, a changing learning
    rate, the per-step sign flips counted in place) eager and through ``GraphedStep``, from
    the same start on the same batches: losses, final weights and flip counts must be
    identical. Twice eager as the baseline of what this
    device repeats. Deterministic cuDNN (process-wide: run this check last)."""
    import torch.nn.functional as F

    from bhvit.cudagraph import GraphedStep
    from bhvit.quantizers import regularization_loss
    from bhvit.train import InPlaceFlipCount, kd_loss, make_optimizer, set_deterministic, set_lr

    set_deterministic()
    verdicts = []
    for name, over in (("bhvit_micro_c28", {}), ("bhvit_tiny_c28", {"fp_downsample": True})):
        runs = {}
        for mode in ("eager", "eager_again", "graph"):
            torch.manual_seed(0)
            m = bhvit.create_model(name, num_classes=10, **over).to(device).train()
            t = bhvit.create_model(name, num_classes=10, binary=False).to(device).eval()
            opt = make_optimizer(m.parameters(), 1e-3, 0.0, device, capturable=True)
            flips = InPlaceFlipCount(m, device)  # as training counts them, in the graph

            def fn(x, y, m=m, t=t, opt=opt, flips=flips):
                opt.zero_grad(set_to_none=True)
                logits = m(x)
                with torch.no_grad():
                    t_logits = t(x)
                loss = (0.1 * F.cross_entropy(logits, y) + 0.8 * kd_loss(logits, t_logits)
                        + 0.1 * regularization_loss(m))
                loss.backward()
                opt.step()
                flips.update(m)
                return loss.detach(), logits.detach()

            step = GraphedStep(fn) if mode == "graph" else fn
            gen = torch.Generator().manual_seed(1)
            c = m.cfg
            losses, t0 = [], time.perf_counter()
            try:
                for i in range(steps):
                    set_lr(opt, 1e-3 * (1 - i / (2 * steps)))
                    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=gen).to(device)
                    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
                    losses.append(step(x, y)[0].item())
            except Exception as e:  # report, keep going
                report("cuda_graph_steps", model=name, overrides=over, mode=mode,
                       error=f"{type(e).__name__}: {str(e)[:500]}")
                break
            state = {k: v.detach().clone() for k, v in m.state_dict().items()}
            state["step_flips"] = flips.count.clone()
            runs[mode] = (losses, state, time.perf_counter() - t0)
        if len(runs) < 3:
            verdicts.append(f"{name}: a mode failed")
            continue
        base_l, base_s, _ = runs["eager"]

        def diff(mode):
            losses, state, _ = runs[mode]
            return {"identical_losses": losses == base_l,
                    "max_weight_diff": max(float((state[k].double() - base_s[k].double()).abs().max())
                                           for k in base_s if state[k].is_floating_point()),
                    "identical_state": all(torch.equal(state[k], base_s[k]) for k in base_s),
                    "step_flips": [int(state["step_flips"]), int(base_s["step_flips"])]}

        again, graph = diff("eager_again"), diff("graph")
        report("cuda_graph_steps", model=name, overrides=over, steps=steps, batch=batch,
               eager_again=again, graph=graph, losses=base_l, graph_losses=runs["graph"][0])
        # Where eager steps repeat exactly, graphed ones must equal them; where they do not
        # (a nondeterministic kernel), graphed ones must stay within that noise.
        if again["identical_state"] and not graph["identical_state"]:
            verdicts.append(f"{name}: graphed steps differ from eager ones that repeat exactly")
        elif graph["max_weight_diff"] > 10 * again["max_weight_diff"]:
            verdicts.append(f"{name}: graphed steps differ from eager ones by more than eager repeats do")
    report("cuda_graph_verdict", ok=not verdicts, problems=verdicts)


def graph_train_runs(device: str, data_dir: str, work: Path, subset: int) -> None:
    """`bhvit train` with and without --cuda-graph, one after the other: a binary KD
    student (L_re in its last epoch, step flips counted) from a short FP teacher; top-1,
    step flips and images/s of both, and whether the graphed run fell back to eager."""
    common = ["train", "--data", "fashion-mnist", "--data-dir", data_dir, "--model", "bhvit_micro_c28",
              "--subset", str(subset), "--test-subset", "2000", "--batch-size", "256", "--lr", "2e-3",
              "--device", device, "--threads", "4", "--no-progress", "--seed", "3"]
    cli(*common, "--set", "binary=false", "--epochs", "2", "--out", str(work / "g_teacher"),
        log=work / "g_teacher.log")
    res = {}
    for mode, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        cli(*common, "--epochs", "3", "--teacher", str(work / "g_teacher"), *extra, "--out",
            str(work / f"g_{mode}"), log=work / f"g_{mode}.log")
        f = work / f"g_{mode}" / "metrics.jsonl"
        if not f.is_file():
            res[mode] = {"error": (work / f"g_{mode}.log").read_text()[-2000:]}
            continue
        hist = [json.loads(line) for line in f.read_text().splitlines()]
        res[mode] = {"test_top1": [h["test_top1"] for h in hist],
                     "step_flip_frac": [h["step_flip_frac"] for h in hist],
                     "images_per_s": [round(h["train_images_per_s"]) for h in hist]}
        if mode == "graph":
            res[mode]["fell_back_to_eager"] = ("Training goes on without CUDA graphs"
                                               in (work / f"g_{mode}.log").read_text())
    ok = all("error" not in r for r in res.values())
    speed = (sorted(res["graph"]["images_per_s"])[1] / sorted(res["eager"]["images_per_s"])[1]) if ok else None
    report("cuda_graph_train", subset=subset, batch=256, **res, median_speedup=speed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--work", default="runs/gpu_checks")
    p.add_argument("--subset", type=int, default=4096, help="training images per run")
    p.add_argument("--deterministic", action="store_true", help="train runs with --deterministic")
    p.add_argument("--no-amp", action="store_true", help="skip the mixed-precision runs")
    p.add_argument("--no-tf32", action="store_true", help="forward agreement without TF32 as well")
    p.add_argument("--only", choices=["cuda-graph", "cuda-graph-steps"], default=None,
                   help="run only the CUDA-graph checks: graphed vs eager steps and training runs "
                        "(about 2 minutes), or the steps alone (well under a minute)")
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
    if args.only is None:
        forward_agreement(args.device)
        if args.no_tf32:
            forward_agreement(args.device, tf32=False)
        train_runs(args.device, args.data_dir, work, args.subset, args.deterministic, not args.no_amp)
    if args.only != "cuda-graph-steps":
        graph_train_runs(args.device, args.data_dir, work, max(args.subset, 16384))
    graph_step_agreement(args.device)  # last: it makes cuDNN deterministic for the process
    report("total", seconds=time.perf_counter() - t)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()

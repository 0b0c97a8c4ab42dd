"""Run the BHViT recipe on Fashion-MNIST and CIFAR-10 side by side on one machine, each
run sized to a wall-clock budget from a measured training-step time.

Phase 1 trains the full-precision teachers, phase 2 the binary students distilled from
them (on Fashion-MNIST twice: with the regularization loss L_re and without, the L_re
ablation). With ``--act-frac`` phase 2 binarizes in two steps: binary activations with
float weights first, then the binary students start from there. The jobs of a phase run
as concurrent ``python -m bhvit train`` processes.
Before phase 1, every job's step time is measured on random data (``--probe-steps``
timed steps after warm-up) and its epoch count set so that
``epochs * (steps * step_time + eval) * slowdown`` fits the phase's share of
``--budget-s``; ``--slowdown`` accounts for the jobs sharing the machine in phase 1 and
for what the probe leaves out (evaluation, checkpoints), and
phase 2 uses the slowdown measured there. A job still running at its phase's end is
stopped and keeps its last finished epoch's checkpoint.

With ``--compile`` the probes are run a second time compiled, in a child process stopped
after ``--compile-max-frac`` of the budget; the jobs are compiled only when that finished
and more epochs of the first phase fit with the compile time taken off than without it.
A compilation can take minutes (tiny_c28 at batch 1024 on an H200: 228 s), so in a budget
of a few minutes the jobs usually run eager. With ``--cuda-graph`` the probes are run a
third time with the step replayed as a CUDA graph (capturing costs about a step); the jobs
train with ``--cuda-graph`` when those probes run and plan more epochs than eager.
``--dry-run`` probes and prints the plan without training.

Writes ``OUT/summary.json`` (plan, probes, per-epoch metrics of every run; not with
``--dry-run``) and prints a table. The exit status is 1 if a job failed or never started
(a job stopped at its phase's deadline has not failed); an ``--out`` that already holds one
of the runs is refused. Meant for an accelerator; on a CPU keep the budget and data small.

    python benchmarks/budget_recipe.py --out runs/budget --budget-s 420 --device cuda \\
        --fmnist-dir /usr/share/datasets/fashion-mnist --cifar-dir data/cifar10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

import bhvit
from bhvit.cli import parse_overrides
from bhvit.cudagraph import GraphedStep
from bhvit.data import augment_batch, normalize
from bhvit.layers import binary_layers
from bhvit.train import InPlaceFlipCount, kd_loss, make_optimizer, read_metrics

SIZES = {"fashion-mnist": (60000, 10000), "cifar10": (50000, 10000)}


@dataclass
class Job:
    name: str
    data: str
    data_dir: str
    model: str
    binary: bool
    lr: float
    teacher: Optional[str] = None  # job name
    teacher_ckpt: Optional[str] = None  # an existing teacher checkpoint instead of the job's
    re_beta: float = 0.1
    epochs: int = 0
    step_s: float = 0.0
    compile_s: float = 0.0  # the probe's first compiled step (--compile)
    drop_last: bool = False  # --compile and --cuda-graph drop each epoch's last partial batch
    eval_step_s: float = 0.0  # the eager step: evaluation is never compiled or graphed
    overrides: Dict[str, Any] = field(default_factory=dict)  # train --set KEY=VALUE
    init_from: Optional[str] = None  # job name: start from its last epoch's weights
    extra: List[str] = field(default_factory=list)


def probe(job: Job, batch: int, device: str, steps: int, compile_backend: Optional[str] = None,
          step_flips: bool = True, cuda_graph: bool = False):
    """Median seconds of one training step of ``job`` (teacher forward included), and the
    seconds of the first compiled step (0 without ``compile_backend``). ``cuda_graph``: the
    step replayed as a CUDA graph, as `bhvit train --cuda-graph` (capturing costs about a
    step, not counted)."""
    torch.manual_seed(0)
    m = bhvit.create_model(job.model, num_classes=10, binary=job.binary, **job.overrides).to(device).train()
    teacher = None
    if job.teacher:
        teacher = bhvit.create_model(job.model, num_classes=10, binary=False).to(device).eval()
    c = m.cfg
    # The host-side input pipeline of a training step is part of it: uint8 images are
    # cropped, flipped and normalised on the host, then copied to the device.
    images = torch.randint(0, 256, (batch, c.in_chans, c.img_size, c.img_size), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = make_optimizer(m.parameters(), 1e-4, 0.0, device, capturable=cuda_graph)  # as training's
    fwd, t_fwd = m, teacher
    if compile_backend:  # as `bhvit train --compile`: the first step eager, then compiled
        torch._dynamo.reset()  # fresh caches: dynamo keeps few versions of one forward
        fwd = torch.compile(m, dynamic=False, backend=compile_backend)
        if teacher is not None:
            t_fwd = torch.compile(teacher, dynamic=False, backend=compile_backend)
    # The per-step sign-flip count, as training does it (inside the graph with --cuda-graph).
    flips = InPlaceFlipCount(m, device) if step_flips and any(True for _ in binary_layers(m)) else None

    def step(x, y, first: bool = False):
        logits = (m if first else fwd)(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                t_logits = t_fwd(x)
            loss = loss + kd_loss(logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if flips is not None:
            flips.update(m)
        return (loss.detach(),)

    graphed = GraphedStep(step) if cuda_graph else None  # 3 eager steps, then the capture
    skip = 4 if cuda_graph else 3
    times, compile_s = [], 0.0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        for i in range(steps + skip):
            sync()
            t = time.perf_counter()
            x = augment_batch(images, c.img_size // 8, True, gen)
            x = normalize(x, [0.5] * c.in_chans, [0.25] * c.in_chans).to(device)
            loss = graphed(x, y)[0] if graphed is not None else step(x, y, first=(i == 0))[0]
            if not torch.isfinite(loss):
                raise RuntimeError("probe loss is not finite")
            sync()
            times.append(time.perf_counter() - t)
    finally:  # also after a failure: the jobs that train next need the device's memory
        m = teacher = opt = fwd = t_fwd = graphed = flips = step = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    med = sorted(times[skip:])[len(times[skip:]) // 2]
    if compile_backend:  # compilation happens in steps 0 (the teacher) and 1 (the student)
        compile_s = max(0.0, times[0] + times[1] - 2 * med)
    return med, compile_s


def probe_key(job: Job):
    return (job.model, job.binary, bool(job.teacher), json.dumps(job.overrides, sort_keys=True))


def probe_jobs(jobs: List[Job], args, compile_backend: Optional[str],
               cuda_graph: bool = False) -> Dict[Any, Any]:
    """``probe`` once per distinct (model, binary, teacher, overrides) among ``jobs``."""
    probes = {}
    for j in jobs:
        key = probe_key(j)
        if key not in probes:
            probes[key] = probe(j, args.batch_size, args.device, args.probe_steps, compile_backend,
                                not args.no_step_flips, cuda_graph)
            if compile_backend is None:
                print(f"probe {j.model} binary={j.binary} teacher={bool(j.teacher)} {j.overrides or ''}: "
                      f"{probes[key][0] * 1e3:.1f} ms/step at batch {args.batch_size}"
                      f"{' as a CUDA graph' if cuda_graph else ''}", flush=True)
    return probes


def set_probes(jobs: List[Job], probes: Dict[Any, Any], compiled: bool,
               eager: Optional[Dict[Any, Any]] = None) -> None:
    """Step times from ``probes``; ``eager``: the eager probes, for the evaluation's time
    (default ``probes``)."""
    for j in jobs:
        j.step_s, j.compile_s = probes[probe_key(j)]
        j.eval_step_s = (eager or probes)[probe_key(j)][0]
        j.drop_last = compiled


def _compiled_probe_child(jobs, args, conn) -> None:
    try:
        conn.send(("ok", probe_jobs(jobs, args, args.compile)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which goes on without --compile
        conn.send(("failed", f"{type(e).__name__}: {str(e)[:300]}"))
    conn.close()


def compiled_probes(jobs: List[Job], args, limit_s: float):
    """Probe ``jobs`` compiled in a child process, stopped after ``limit_s`` seconds.
    Returns ("ok", probes) or (why not, None)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    # Not a daemon: inductor may start worker processes of its own.
    child = ctx.Process(target=_compiled_probe_child, args=(jobs, args, send))
    child.start()
    send.close()
    try:
        if recv.poll(max(0.0, limit_s)):
            status, result = recv.recv()
            return (status, result) if status == "ok" else (f"failed in the probe ({result})", None)
        return (f"the compiled probes took over {limit_s:.0f}s (--compile-max-frac "
                f"{args.compile_max_frac} of --budget-s)", None)
    except EOFError:
        return ("the compiled probe's process died", None)
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def compile_pays(jobs: List[Job], eager: Dict[Any, Any], compiled: Dict[Any, Any], seconds: float, args,
                 what: str = "torch.compile", slowdown_with: Optional[float] = None) -> bool:
    """Whether ``jobs`` (the first phase) get more planned epochs in ``seconds`` compiled
    (or graphed), with their compilation taken off, than eager. ``slowdown_with``: the
    slowdown of the compiled (graphed) jobs, default ``args.slowdown``. ``jobs`` are left
    as they are."""
    def total(probes, drop_last, slowdown):
        copies = [dataclasses.replace(j) for j in jobs]
        set_probes(copies, probes, drop_last, eager)
        return sum(plan_epochs(j, args.batch_size, seconds, slowdown, args.reserve_s, args.max_epochs,
                               args.subset, args.test_subset) for j in copies)
    n_eager = total(eager, False, args.slowdown)
    n_compiled = total(compiled, True, slowdown_with or args.slowdown)
    print(f"{what}: {n_compiled} planned epochs in the first phase with it, {n_eager} eager",
          flush=True)
    return n_compiled > n_eager


def phase_slowdown(n_jobs: int, n_teachers: int, ratios: List[float], default: float) -> float:
    """Phase 2's slowdown: the teachers' measured epoch time over the predicted one (``ratios``;
    ``default`` before phase 1 has run, as in a dry run), times the ratio of job counts (at
    least 1.2), as phase 2 runs more jobs at once. Without teachers, ``default``."""
    if not n_teachers:
        return default
    return max(1.0, max(1.2, n_jobs / n_teachers) * (max(ratios) if ratios else default))


def eval_batch(batch: int) -> int:
    """The jobs' --eval-batch-size: at least the training batch, so that evaluating, which
    is launch-bound on a GPU like training, takes few steps."""
    return max(256, batch)


def plan_epoch_s(job: Job, batch: int, subset: Optional[int] = None,
                 test_subset: Optional[int] = None) -> float:
    """Predicted seconds of one epoch (training steps and the test-set evaluation) alone."""
    n_train, n_test = SIZES[job.data]
    n_train, n_test = min(n_train, subset or n_train), min(n_test, test_subset or n_test)
    steps = n_train // batch if job.drop_last and n_train >= batch else math.ceil(n_train / batch)
    eb = eval_batch(batch)  # forward only: about a third of a training step's time per image
    eval_s = math.ceil(n_test / eb) * (job.eval_step_s or job.step_s) * eb / batch / 3
    return steps * job.step_s + eval_s


def plan_epochs(job: Job, batch: int, seconds: float, slowdown: float, reserve: float,
                max_epochs: int, subset: Optional[int] = None, test_subset: Optional[int] = None) -> int:
    epoch_s = slowdown * plan_epoch_s(job, batch, subset, test_subset)
    return max(1, min(max_epochs, int((seconds - reserve - job.compile_s) / epoch_s)))


def launch(job: Job, args, out: Path, teacher_dir: Optional[Path]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bhvit", "train", "--data", job.data, "--data-dir", job.data_dir,
           "--model", job.model, "--epochs", str(job.epochs), "--batch-size", str(args.batch_size),
           "--lr", str(job.lr), "--warmup-epochs", str(args.warmup_epochs), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed), "--no-progress",
           "--re-beta", str(job.re_beta), "--eval-batch-size", str(eval_batch(args.batch_size)),
           "--out", str(out / job.name), *job.extra]
    if args.subset:
        cmd += ["--subset", str(args.subset)]
    if args.test_subset:
        cmd += ["--test-subset", str(args.test_subset)]
    if args.compile:
        cmd += ["--compile", args.compile]
    if args.cuda_graph:
        cmd += ["--cuda-graph"]
    if args.no_step_flips:
        cmd += ["--no-step-flips"]
    if not job.binary:
        cmd += ["--set", "binary=false"]
    for k, v in job.overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    if teacher_dir is not None:
        cmd += ["--teacher", str(teacher_dir)]
    if job.init_from:
        cmd += ["--init-from", str(out / job.init_from / "last.json")]
    elif teacher_dir is not None and args.init_from_teacher:
        cmd += ["--init-from", str(teacher_dir)]
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name}: {job.epochs} epochs", flush=True)
    with open(out / f"{job.name}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_phase(jobs: List[Job], args, out: Path, deadline: float) -> Dict[str, Dict]:
    procs = {}
    for j in jobs:
        tdir = Path(j.teacher_ckpt) if j.teacher_ckpt else (out / j.teacher if j.teacher else None)
        if tdir is not None and not (tdir / "best.json").is_file() and not tdir.is_file():
            print(f"skip {j.name}: teacher {tdir} has no checkpoint", flush=True)
            continue
        if j.init_from and not (out / j.init_from / "last.json").is_file():
            print(f"skip {j.name}: {j.init_from} has no checkpoint", flush=True)
            continue
        procs[j.name] = (launch(j, args, out, tdir), time.perf_counter())
    status = {}
    while procs:
        for name, (p, t0) in list(procs.items()):
            if p.poll() is not None:
                status[name] = {"returncode": p.returncode, "wall_s": time.perf_counter() - t0}
                print(f"[{time.strftime('%H:%M:%S')}] {name} finished rc={p.returncode} "
                      f"in {status[name]['wall_s']:.0f}s", flush=True)
                del procs[name]
        if procs and time.perf_counter() > deadline:
            for name, (p, t0) in procs.items():
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                status[name] = {"returncode": p.returncode, "wall_s": time.perf_counter() - t0,
                                "stopped_at_deadline": True}
                print(f"{name} stopped at the phase deadline", flush=True)
            procs = {}
        time.sleep(0.2)
    return status


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=420, help="seconds for both phases")
    p.add_argument("--teacher-frac", type=float, default=0.45, help="share of the budget for phase 1")
    p.add_argument("--device", default="cuda")
    p.add_argument("--fmnist-dir", default=None, help="Fashion-MNIST directory (omit to skip)")
    p.add_argument("--cifar-dir", default=None, help="CIFAR-10 directory (omit to skip)")
    p.add_argument("--fm-model", nargs="+", default=["bhvit_micro_c28"],
                   help="Fashion-MNIST model(s); runs of the first are fm_teacher/fm_student, of "
                        "the others fm_<name>_teacher/fm_<name>_student")
    p.add_argument("--fm-teacher", default=None, metavar="CKPT",
                   help="an already trained Fashion-MNIST teacher (run dir or .json, e.g. a `bhvit "
                        "strip` copy) for the --fm-model students: no FMNIST teacher in phase 1")
    p.add_argument("--fm-teacher-init", default=None, metavar="CKPT",
                   help="start the Fashion-MNIST teacher from these weights (train --init-from), e.g. "
                        "an earlier run's `bhvit strip` copy; it trains a new schedule from there")
    p.add_argument("--c10-model", default="bhvit_tiny_c32")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--student-lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=4, help="torch CPU threads per job")
    p.add_argument("--slowdown", type=float, default=None,
                   help="epoch time over the probe's prediction (sharing the machine, "
                        "checkpoints, start-up) for the first jobs to run (the teachers, or without "
                        "them the students); default 1.6 when several run at once (measured "
                        "1.35-1.85 on an H100 with two), 1.15 when one runs alone (1.06 on an H200)")
    p.add_argument("--reserve-s", type=float, default=20, help="start-up time per job")
    p.add_argument("--max-epochs", type=int, default=300)
    p.add_argument("--probe-steps", type=int, default=8)
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start each student from its teacher's weights (train --init-from)")
    p.add_argument("--no-lre-ablation", action="store_true", help="no second FMNIST student without L_re")
    p.add_argument("--act-frac", type=float, default=0.0,
                   help="two-step binarization: this share of phase 2 trains students with binary "
                        "activations and float weights (runs *_student_acts); the binary students "
                        "then start from their last weights")
    p.add_argument("--no-step-flips", action="store_true", help="train --no-step-flips")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="model setting of every binary student (repeatable), e.g. fp_downsample=true")
    p.add_argument("--subset", type=int, default=None, help="train on N images per dataset")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="train with torch.compile (train --compile) if it pays off: the probes "
                        "measure the compiled step and the compile time, which is taken off each "
                        "job's budget; when no more epochs would fit than eager, or the compiled "
                        "probes fail or take over --compile-max-frac of the budget, the jobs run eager")
    p.add_argument("--compile-max-frac", type=float, default=0.2,
                   help="share of --budget-s the compiled probes may take (default 0.2)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="train with --cuda-graph (the step replayed as one CUDA graph) if its probes "
                        "run and plan more epochs than eager; otherwise the jobs run eager")
    p.add_argument("--dry-run", action="store_true", help="probe and print the plan, train nothing")
    args = p.parse_args()
    if args.cuda_graph and args.compile:
        p.error("give one of --compile and --cuda-graph.")
    try:
        student_set = parse_overrides(args.student_set)
    except ValueError as e:
        p.error(str(e))
    if "binary" in student_set or any(isinstance(v, dict) for v in student_set.values()):
        p.error("--student-set takes model settings other than binary, with scalar or list values.")
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    teachers, students = [], []
    if args.fm_teacher and len(args.fm_model) > 1:
        sys.exit("budget_recipe: --fm-teacher needs a single --fm-model.")
    if args.fm_teacher_init and (args.fm_teacher or len(args.fm_model) > 1):
        sys.exit("budget_recipe: --fm-teacher-init needs a single --fm-model and no --fm-teacher.")
    if args.fm_teacher_init and not Path(args.fm_teacher_init).exists():
        sys.exit(f"budget_recipe: --fm-teacher-init {args.fm_teacher_init}: no such checkpoint.")
    for i, model in enumerate(args.fm_model if args.fmnist_dir else []):
        pre = "fm" if i == 0 else f"fm_{model.removeprefix('bhvit_')}"
        if not args.fm_teacher:
            teachers.append(Job(f"{pre}_teacher", "fashion-mnist", args.fmnist_dir, model, False,
                                args.teacher_lr,
                                extra=["--init-from", args.fm_teacher_init] if args.fm_teacher_init else []))
        students.append(Job(f"{pre}_student", "fashion-mnist", args.fmnist_dir, model, True,
                            args.student_lr, teacher=f"{pre}_teacher", teacher_ckpt=args.fm_teacher))
        if i == 0 and not args.no_lre_ablation:
            students.append(Job("fm_student_no_lre", "fashion-mnist", args.fmnist_dir, model, True,
                                args.student_lr, teacher="fm_teacher", teacher_ckpt=args.fm_teacher,
                                re_beta=0.0))
    if args.cifar_dir:
        teachers.append(Job("c10_teacher", "cifar10", args.cifar_dir, args.c10_model, False, args.teacher_lr))
        students.append(Job("c10_student", "cifar10", args.cifar_dir, args.c10_model, True,
                            args.student_lr, teacher="c10_teacher"))
    if not students:
        sys.exit("budget_recipe: give --fmnist-dir and/or --cifar-dir.")
    for s in students:
        s.overrides.update(student_set)
    if not 0 <= args.act_frac < 1:
        sys.exit(f"budget_recipe: --act-frac must be in [0, 1), got {args.act_frac}.")
    acts = []
    for s in students if args.act_frac else []:  # one step-1 job per teacher
        name = s.teacher.replace("_teacher", "_student_acts")
        if name not in [a.name for a in acts]:
            acts.append(Job(name, s.data, s.data_dir, s.model, True, args.student_lr, teacher=s.teacher,
                            teacher_ckpt=s.teacher_ckpt, re_beta=0.0,
                            overrides={**student_set, "binary_weights": False}))
        s.init_from = name

    stale = [j.name for j in teachers + acts + students if (out / j.name).exists()]
    if stale:
        sys.exit(f"budget_recipe: {out} already holds run(s) {', '.join(stale)}; their metrics would be "
                 "reported as this run's. Give a new --out.")

    jobs = teachers + acts + students
    # For the jobs planned before any has run: the teachers, or without them the concurrent
    # jobs of each step of phase 2.
    concurrent = len(teachers) if teachers else max(len(acts), len(students))
    graph_slowdown = args.slowdown
    if args.slowdown is None:
        args.slowdown = 1.6 if concurrent > 1 else 1.15
        # Replayed graphs keep the GPU busy instead of waiting on the host, so concurrent
        # graphed jobs share it about evenly (not measured yet: an assumption).
        graph_slowdown = max(args.slowdown, float(concurrent))
    def first_phase():  # the jobs planned before any has run, and their share of the time
        return ((teachers, args.teacher_frac) if teachers else
                (acts, args.act_frac) if acts else (students, 1.0))

    eager = probe_jobs(jobs, args, None)
    set_probes(jobs, eager, False)
    graph_info = None
    if args.cuda_graph:
        # Capturing costs about a step, so graphs pay whenever the replayed step is faster.
        try:
            graphed, status = probe_jobs(jobs, args, None, cuda_graph=True), "ok"
        except Exception as e:  # noqa: BLE001 - reported; the jobs then run eager
            graphed, status = None, f"failed in the probe ({type(e).__name__}: {str(e)[:300]})"
        use = False
        if graphed is not None:
            left = args.budget_s - (time.perf_counter() - t_start)
            first, share = first_phase()
            use = compile_pays(first, eager, graphed, left * share, args, what="--cuda-graph",
                               slowdown_with=graph_slowdown)
            status = "graphed" if use else "no more planned epochs than eager"
        graph_info = {"status": status,
                      "graph_probes": {j.name: list(graphed[probe_key(j)]) for j in jobs} if graphed else None}
        if use:
            set_probes(jobs, graphed, True, eager)
            args.slowdown = graph_slowdown
        else:
            print(f"--cuda-graph: {status}; going on without it", flush=True)
            args.cuda_graph = False
    compile_info = None
    if args.compile:
        # The compiled probes run in a child process under a deadline: one compilation can
        # take minutes (228 s for tiny_c28 on an H200), and all of it came off the budget.
        limit = args.compile_max_frac * args.budget_s
        status, compiled = compiled_probes(jobs, args, limit)
        use = False
        if status == "ok":
            for (model, binary, teacher, overrides), (step_s, compile_s) in compiled.items():
                print(f"probe {model} binary={binary} teacher={teacher} {overrides}: "
                      f"{step_s * 1e3:.1f} ms/step compiled, compilation {compile_s:.0f}s", flush=True)
            left = args.budget_s - (time.perf_counter() - t_start)
            first, share = first_phase()
            use = compile_pays(first, eager, compiled, left * share, args)
            status = "compiled" if use else ("compilation does not pay off in this budget (no more planned "
                                             "epochs than without it)")
        compile_info = {"requested": args.compile, "status": status,
                        "compiled_probes": {j.name: list(compiled[probe_key(j)]) for j in jobs} if compiled else None}
        if use:
            set_probes(jobs, compiled, True, eager)
        else:
            print(f"torch.compile: {status}; going on without --compile", flush=True)
            args.compile = None
    left = args.budget_s - (time.perf_counter() - t_start)
    if left < 2 * args.reserve_s:
        sys.exit(f"budget_recipe: {left:.0f}s of --budget-s {args.budget_s:.0f} left after the probes; "
                 "raise --budget-s.")
    t_phase1 = left * args.teacher_frac if teachers else 0.0
    for j in teachers:
        j.epochs = plan_epochs(j, args.batch_size, t_phase1, args.slowdown, args.reserve_s, args.max_epochs,
                               args.subset, args.test_subset)
    summary = {"args": vars(args), "probe_ms": {j.name: j.step_s * 1e3 for j in teachers + acts + students},
               "probe_compile_s": {j.name: j.compile_s for j in teachers + acts + students},
               "compile": compile_info, "cuda_graph": graph_info}
    if args.dry_run:  # phase 2 as planned before phase 1 measures its slowdown
        t2 = left - t_phase1
        for group, t in ((acts, t2 * args.act_frac), (students, t2 * (1 - args.act_frac))):
            for j in group:
                j.epochs = plan_epochs(j, args.batch_size, t,
                                       phase_slowdown(len(group), len(teachers), [], args.slowdown),
                                       args.reserve_s, args.max_epochs, args.subset, args.test_subset)
        for j in teachers + acts + students:
            how = " (compiled)" if args.compile else " (CUDA graph)" if args.cuda_graph else ""
            print(f"plan {j.name}: {j.epochs} epochs{how}", flush=True)
        return
    summary["phase1"] = run_phase(teachers, args, out, time.perf_counter() + t_phase1)

    # Phase 2 is sized with the time actually left and a slowdown measured in phase 1:
    # the teachers' real epoch times over the ones the probes predict, times the ratio
    # of job counts (at least 1.2), as phase 2 runs more jobs at once.
    ratios = []
    for j in teachers:
        h = read_metrics(out / j.name)
        if h:
            pred = plan_epoch_s(j, args.batch_size, args.subset, args.test_subset)
            times = sorted(e["epoch_time_s"] for e in (h[1:] if args.compile and len(h) > 1 else h))
            ratios.append(times[len(times) // 2] / pred)  # compilation is in epoch 1, and in compile_s

    def slowdown(n_jobs: int) -> float:
        return phase_slowdown(n_jobs, len(teachers), ratios, args.slowdown) if ratios else args.slowdown

    left = args.budget_s - (time.perf_counter() - t_start)
    summary["phase2_slowdown"] = {"teacher_ratios": ratios, "used": slowdown(len(students))}
    if acts:  # two-step binarization: the binary-activation step first
        t_acts = left * args.act_frac
        for j in acts:
            j.epochs = plan_epochs(j, args.batch_size, t_acts, slowdown(len(acts)), args.reserve_s,
                                   args.max_epochs, args.subset, args.test_subset)
        print(f"phase 2a: {t_acts:.0f}s for the binary-activation step", flush=True)
        summary["phase2_acts"] = run_phase(acts, args, out, time.perf_counter() + t_acts)
        left = args.budget_s - (time.perf_counter() - t_start)
    for j in students:
        j.epochs = plan_epochs(j, args.batch_size, left, slowdown(len(students)), args.reserve_s,
                               args.max_epochs, args.subset, args.test_subset)
    print(f"phase 2: {left:.0f}s left, slowdown {slowdown(len(students)):.2f} (teachers' measured/predicted "
          f"epoch time {[round(r, 2) for r in ratios]})", flush=True)
    summary["phase2"] = run_phase(students, args, out, time.perf_counter() + max(left, 30))
    summary["plan"] = {j.name: {"model": j.model, "epochs": j.epochs, "probe_step_ms": j.step_s * 1e3,
                                "lr": j.lr, "re_beta": j.re_beta, "overrides": j.overrides,
                                "init_from": j.init_from} for j in teachers + acts + students}
    summary["runs"] = {j.name: read_metrics(out / j.name) for j in teachers + acts + students}
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"\n{'run':<20} {'epochs':>9} {'best top-1':>10} {'last top-1':>10} {'img/s':>8} "
          f"{'flips (last 10%)':>18}")
    for j in teachers + acts + students:
        h = summary["runs"][j.name]
        if not h:
            print(f"{j.name:<20} {'-':>9}")
            continue
        k = max(1, math.ceil(0.1 * len(h)))
        fl = [e["step_flip_frac"] for e in h[-k:] if e.get("step_flip_frac") is not None]
        flips = f"{100 * sum(fl) / len(fl):.3f}%" if fl else "-"
        print(f"{j.name:<20} {len(h):>4}/{j.epochs:<4} {max(e['test_top1'] for e in h):>10.2f} "
              f"{h[-1]['test_top1']:>10.2f} {h[-1]['train_images_per_s']:>8.0f} {flips:>18}")
    print(f"wall {summary['wall_s']:.0f}s")
    failed = failed_jobs(summary, [j.name for j in teachers + acts + students])
    if failed:
        sys.exit(f"budget_recipe: failed or never started: {', '.join(failed)} (logs in {out}).")


def failed_jobs(summary: Dict[str, Any], names: List[str]) -> List[str]:
    """Jobs that did not start, or ended with an error rather than finishing or being stopped
    at their phase's deadline."""
    status = {k: v for phase in ("phase1", "phase2_acts", "phase2") for k, v in summary.get(phase, {}).items()}
    return [n for n in names if n not in status
            or (status[n]["returncode"] != 0 and not status[n].get("stopped_at_deadline"))]


if __name__ == "__main__":
    main()

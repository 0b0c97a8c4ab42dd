"""Training and evaluation: the BHViT recipe in one plain loop.

Stage 1 trains the full-precision twin (``binary=False``) with cross-entropy; it is
the teacher. Stage 2 trains the binary student with

    L = (1 - lambda - beta) * CE + lambda * KD + beta * L_re

where KD is the soft cross-entropy to the teacher's softmax (no temperature) and
``L_re`` (:func:`bhvit.regularization_loss`; both in :mod:`bhvit.losses`) is switched on in the last
``re_last_frac`` of the epochs. AdamW, lr ``5e-4 * global_batch / 512``, weight
decay 0, cosine schedule with optional linear warm-up, all per step.

Runs single-process or under ``torchrun`` (DistributedDataParallel, gloo on CPU,
nccl on GPU). Each epoch's data order and augmentation come from generators seeded
by ``(seed, epoch, rank)``, so a run resumed from its last checkpoint replays the
interrupted epoch exactly and ends with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import RESUME_KEYS, TrainConfig
from .checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_matching_weights,
    load_model,
    load_training_state,
    load_weights,
    owned_checkpoint_files,
    read_checkpoint_json,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .cudagraph import GraphCaptureError, GraphedStep
from .data import (
    DataError,
    Dataset,
    _list_images,
    _split_dir,
    augment_batch,
    count_images,
    image_folder_root,
    load_dataset,
    normalize,
)
from .errors import ConfigError, TrainingDiverged
from .layers import binary_layers
from .model import BHViT, get_config
from .losses import kd_loss, recipe_loss
from .rundir import RunLock, RunLocked, check_out_dir, remove_stale_temp, run_files
from .stream import StreamingImageFolder, StreamLoader, fits_in_memory
from .quantizers import centred_signs

__all__ = ["TrainConfig", "train", "evaluate", "TrainingDiverged", "kd_loss", "sign_snapshot"]


# On an accelerator the loss is checked for NaN/inf on the host every this many steps (the
# first bad step is recorded on the device, so the error still names it).
NONFINITE_CHECK_STEPS = 16


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6f}" for v in values) + ")"


def _nonfinite_check_steps(device: str) -> int:
    return 1 if torch.device(device).type == "cpu" else NONFINITE_CHECK_STEPS


def _restore_last_good(model: nn.Module, out: Path, history: List[Dict]) -> str:
    """Load the run's last checkpoint into ``model`` after a non-finite stop; says what it did."""
    if not history:
        return " The model object may hold non-finite values (no checkpoint yet to reset it to)."
    try:
        load_weights(model, out / "last.json")
    except (OSError, ValueError) as e:
        return f" The model object may hold non-finite values (could not reload the checkpoint: {e})."
    return " The model holds that checkpoint's weights again."


def read_metrics(run) -> List[Dict]:
    """The per-epoch metrics of a run directory (``metrics.jsonl``); [] before its first epoch."""
    f = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


@torch.no_grad()
def sign_snapshot(model: nn.Module) -> List[torch.Tensor]:
    """The binarized sign of every binary layer's latent weights (as bool tensors)."""
    return [centred_signs(layer.weight, as_bool=True) for layer in binary_layers(model)]


class FlipCounter:
    """Sign flips of the binary layers' latent weights (the quantity Larq's ``FlipRatio``
    tracks): per epoch (net, start against end) and, with ``per_step``, summed over the
    optimizer steps, where a weight that oscillates across zero counts at every flip.
    With ``in_place`` the per-step count lives in fixed buffers that :meth:`update` changes
    in place, so that a CUDA graph can record it: the previous step's signs (``prev``) and
    the running ``count`` (an int64 tensor on the device; no host synchronisation).
    Eager steps keep the new snapshot instead of copying it."""

    def __init__(self, model: nn.Module, device, per_step: bool = True, in_place: bool = True):
        self.per_step, self.in_place = per_step, in_place
        self.prev = sign_snapshot(model) if per_step else []
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.start: List[torch.Tensor] = []

    def begin_epoch(self, model: nn.Module) -> None:
        self.start = sign_snapshot(model)
        self.count.zero_()

    def update(self, model: nn.Module) -> None:
        if not self.per_step:
            return
        now = sign_snapshot(model)
        for prev, cur in zip(self.prev, now):
            self.count.add_((prev != cur).sum())
            if self.in_place:  # a CUDA graph replays into the same buffers
                prev.copy_(cur)
        if not self.in_place:  # eager: keep the new snapshot instead of copying it
            self.prev = now

    def epoch_fractions(self, model: nn.Module):
        """``(flip_frac, step_flip_frac)`` of the epoch so far, as fractions of the binary
        weights (``step_flip_frac`` None without ``per_step``)."""
        after = sign_snapshot(model)
        n = max(sum(a.numel() for a in after), 1)
        net = sum(int((a != b).sum()) for a, b in zip(self.start, after)) / n
        return net, (int(self.count) / n if self.per_step else None)


InPlaceFlipCount = FlipCounter  # the name the CUDA-graph checks use


def _tf32_switches():
    """(object, attribute, value for true float32) of each TF32 switch of this torch: the
    ``fp32_precision`` settings where they exist (torch mixes them badly with the older
    ``allow_tf32`` flags), else ``allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


def set_deterministic() -> None:
    """Make CUDA runs repeatable: deterministic cuDNN/cuBLAS and scatter kernels, no
    autotuning, no TF32. Ops without a deterministic CUDA kernel warn (once) rather than
    fail. CPU runs are deterministic without this. The settings are process-wide and stay
    on after training."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    for obj, attr, exact in _tf32_switches():
        setattr(obj, attr, exact)


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


class Progress:
    """A one-line progress bar on stderr (a line per ~10% when not a terminal)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_pct = -1
        self.last_t = 0.0

    def due(self, n: int) -> bool:
        """Whether :meth:`update` at step ``n`` would print (callers skip computing stats)."""
        if not self.enabled:
            return False
        if n == self.total:
            return True
        if self.tty:
            return time.perf_counter() - self.last_t >= 0.2
        return 10 * n // max(self.total, 1) != self.last_pct

    def update(self, n: int, images: int, **stats) -> None:
        if not self.enabled:
            return
        self.last_t = time.perf_counter()
        el = self.last_t - self.start
        ips = images / max(el, 1e-9)
        eta = el / max(n, 1) * (self.total - n)
        s = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        line = f"{self.desc} {n}/{self.total} {s} {ips:.1f} img/s ETA {eta:.0f}s"
        pct = 10 * n // max(self.total, 1)
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            if n == self.total:
                sys.stderr.write("\n")
        elif pct != self.last_pct or n == self.total:
            sys.stderr.write(line + "\n")
        self.last_pct = pct
        sys.stderr.flush()


def make_optimizer(params, lr: float, weight_decay: float, device, capturable: bool = False) -> torch.optim.AdamW:
    """The recipe's AdamW. Fused where PyTorch has the kernel (CPU, CUDA): one kernel for all
    parameters, 3-4x faster on the CPU than the default per-parameter loop, and fewer kernel
    launches on a GPU. ``capturable``: fused, with the learning rate held in a device tensor,
    so that ``step()`` can be recorded in a CUDA graph (set it with :func:`set_lr`)."""
    params = list(params)
    if capturable:
        return torch.optim.AdamW(
            params, lr=torch.tensor(float(lr), device=device), weight_decay=weight_decay, fused=True, capturable=True
        )
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # a PyTorch without the fused kernel for this device
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a capturable optimizer's stays a device tensor,
    written in place, so that a captured ``step()`` reads the new value."""
    for g in optimizer.param_groups:
        if not g.get("capturable"):
            g["lr"] = lr
        elif torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:  # e.g. a float from a loaded state dict
            g["lr"] = torch.tensor(float(lr), device=g["params"][0].device)


def _batches(
    n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int, shuffle: bool
) -> List[torch.Tensor]:
    """Index batches of this rank's shard, via DistributedSampler (also single-process)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
    return list(idx.split(batch_size))


def _n_unpadded(n: int, rank: int, world: int) -> int:
    """How many of this rank's shard are not the DistributedSampler's padding: it repeats
    the first samples so that every rank gets as many, appending them to the global order
    that rank ``r`` takes every ``world``-th of from position ``r``, so the repeats are at
    the end of a shard."""
    return max(0, -(-(n - rank) // world))


@contextlib.contextmanager
def exact_float32(enabled: bool = True):
    """No TF32 in CUDA convolutions and matmuls inside the block (the previous settings
    come back after it). Binary networks amplify TF32's rounding (a flipped sign changes a
    whole channel), so evaluation runs in true float32, as the CPU and the bit-packed
    runtime do."""
    if not enabled:
        yield
        return
    switches = _tf32_switches()
    saved = [getattr(obj, attr) for obj, attr, _ in switches]
    for obj, attr, exact in switches:
        setattr(obj, attr, exact)
    try:
        yield
    finally:
        for (obj, attr, _), value in zip(switches, saved):
            setattr(obj, attr, value)


# On the CPU the float simulation of a binary model is memory-bound: a batch whose largest
# activation outgrows the caches runs slower per image (bhvit_tiny_c32 on a 2-core Xeon, one
# thread: 108 images/s at batch 12, 68 at batch 256).
_CPU_EVAL_BATCH_BYTES = 6 << 20


def eval_batch_size(model: nn.Module, device: str = "cpu") -> int:
    """The default batch size of :func:`evaluate`: 256 on a GPU; on the CPU, as many images
    as keep the batch's largest activation (a BHViT's widest MLP hidden map) within 6 MiB,
    from 1 to 256: 12 for bhvit_tiny_c32, 24 for bhvit_micro_c32, 1 for bhvit_tiny at 224.
    Models without a bhvit config get 64."""
    if not str(device).startswith("cpu"):
        return 256
    cfg = getattr(model, "cfg", None)
    try:
        ratios = getattr(cfg, "mlp_ratios", (1,) * len(cfg.dims))
        largest = max(s * s * d * r for s, d, r in zip(cfg.map_sizes(), cfg.dims, ratios))
    except (AttributeError, TypeError, ValueError):
        return 64
    item = next((p.element_size() for p in model.parameters()), 4)
    return max(1, min(256, _CPU_EVAL_BATCH_BYTES // max(1, largest * item)))


def evaluate(
    model: nn.Module,
    ds: Dataset,
    mean,
    std,
    batch_size: Optional[int] = None,
    device: str = "cpu",
    progress: bool = False,
    return_logits: bool = False,
    loader: Optional[StreamLoader] = None,
) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (in %) of ``model`` on ``ds``.

    Under torch.distributed each rank evaluates a strided shard and the sums are reduced.
    ``return_logits``: also return this rank's logits (float32, on the CPU) as ``"logits"``.
    On CUDA it runs without TF32 (:func:`exact_float32`). A streamed ``ds``
    (:class:`bhvit.stream.StreamingImageFolder`) is read through ``loader`` (default: one
    without worker processes).

    It runs under ``torch.inference_mode()`` (no autograd bookkeeping), where binary layers
    reuse their binarized kernels from batch to batch (:class:`bhvit.layers.EvalCache`).
    ``batch_size`` None: :func:`eval_batch_size` (cache-sized on the CPU, 256 on a GPU).
    """
    if batch_size is None:
        batch_size = eval_batch_size(model, device)
    with exact_float32(str(device).startswith("cuda")), torch.inference_mode():
        res = _evaluate(model, ds, mean, std, batch_size, device, progress, return_logits, loader)
    if return_logits:
        res["logits"] = res["logits"].clone()  # an ordinary tensor (not an inference tensor)
    return res


def _evaluate(model, ds, mean, std, batch_size, device, progress, return_logits, loader):
    rank, world = _dist_info()
    was = model.training
    model.eval()
    idx = torch.arange(rank, len(ds), world)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    bar = Progress(math.ceil(len(idx) / batch_size), "eval", progress and rank == 0)
    kept: List[torch.Tensor] = []
    stream = None
    if getattr(ds, "streaming", False):
        stream = (loader or StreamLoader(ds, train=False, workers=0)).epoch(0, idx.split(batch_size))
    for i, b in enumerate(idx.split(batch_size)):
        x = normalize(next(stream)[0] if stream is not None else ds.images[b], mean, std).to(device)
        y = ds.labels[b].to(device)
        logits = model(x).float()
        if return_logits:
            kept.append(logits.cpu())
        # summed on the device; the host reads the sums only to print and at the end
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[1] += (top[:, 0] == y).sum()
        sums[2] += (top == y[:, None]).any(1).sum()
        sums[3] += len(b)
        if bar.due(i + 1):
            bar.update(i + 1, int(sums[3]))
    if world > 1:
        dist.all_reduce(sums)
    model.train(was)
    n = max(sums[3].item(), 1)
    res = {
        "loss": sums[0].item() / n,
        "top1": 100 * sums[1].item() / n,
        "top5": 100 * sums[2].item() / n,
        "count": int(sums[3].item()),
    }
    if return_logits:
        res["logits"] = torch.cat(kept) if kept else torch.zeros(0)
    return res


def _lr_at(step: int, total: int, warmup: int, base: float, min_lr: float) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics across ranks (each rank saw its own batches).

    Only state (buffers in the state dict): constants such as the shift taps are the same
    on every rank, and a float sum-then-divide could move them by a rounding step."""
    m = _unwrap(model)
    state = set(m.state_dict(keep_vars=True))
    for name, buf in m.named_buffers():
        if name in state and buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)


def _checksum(model: nn.Module) -> float:
    m = _unwrap(model)
    total = 0.0
    for i, t in enumerate(list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]):
        w = 1 + (torch.arange(t.numel(), device=t.device) % 7)
        total += float((t.detach().double().flatten() * w).sum()) * (i + 1)
    return total


# Training settings that must not change when a run is resumed (they change the result).
def _same_checkpoint(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two spellings name one checkpoint (a run directory and its best.json)."""
    from .checkpoint import CheckpointError, resolve_checkpoint

    if not a or not b:
        return a == b
    try:
        return resolve_checkpoint(a).resolve() == resolve_checkpoint(b).resolve()
    except CheckpointError:
        return False


def _write_metrics(out: Path, history: List[Dict]) -> None:
    atomic_write_text("".join(json.dumps(h) + "\n" for h in history), out / "metrics.jsonl")


def _repair_after_kill(out: Path, last_doc: Dict, history: List[Dict]) -> None:
    """Finish what a kill between the writes of an epoch's end left undone: ``best.json``
    (written after ``last.json``) when the last epoch was the best, and ``metrics.jsonl``
    (written after both)."""
    top1 = [h["test_top1"] for h in history]
    last_is_best = bool(top1) and (len(top1) == 1 or top1[-1] > max(top1[:-1]))  # as is_best in train
    best_path = out / "best.json"
    best_weights = json.loads(best_path.read_text()).get("weights") if best_path.is_file() else None
    if last_is_best and best_weights != last_doc["weights"]:
        atomic_write_json(last_doc, best_path)
    _write_metrics(out, history)


def _saved_data(out: Path) -> Dict:
    """The ``data`` entry of the run in ``out`` (its last checkpoint)."""
    return read_checkpoint_json(out / "last.json")[0].get("data") or {}


def _check_resume_data(now: Dict, saved: Dict, out: Path) -> None:
    """A resumed run must see the data it was trained on: the same class names, image counts
    and pixel statistics (another --data-dir or renamed classes resumed silently before)."""
    from .checkpoint import CheckpointError

    def close(a, b):
        return (
            a is None
            or b is None
            or (len(a) == len(b) and all(abs(x - y) <= 1e-4 * abs(y) + 1e-6 for x, y in zip(a, b)))
        )

    stats = saved.get("streamed", now.get("streamed")) == now.get("streamed")  # computed alike
    for key, same in (
        ("classes", lambda a, b: a == b),
        ("train_size", lambda a, b: a == b),
        ("test_size", lambda a, b: a == b),
        *((("train_mean", close), ("train_std", close)) if stats else ()),
    ):
        if key in saved and not same(saved[key], now.get(key)):
            was, got = _short_value(saved[key]), _short_value(now.get(key))
            raise CheckpointError(
                f"--resume: the data differ from the run in {out} ({key}: {was} -> {got}); resume with the "
                "data it was trained on (--data, --data-dir, --subset) or use another --out."
            )


def _short_value(v) -> str:
    r = repr([round(x, 4) for x in v] if isinstance(v, list) and v and isinstance(v[0], float) else v)
    return r if len(r) <= 120 else r[:117] + "..."


def _check_resume(doc: Dict, model: nn.Module, cfg: "TrainConfig", out: Path, world: int = 1) -> None:
    from .checkpoint import CheckpointError

    saved_world = doc.get("world_size")
    if saved_world is not None and saved_world != world:
        # --batch-size is per process: the global batch, the default lr, the steps per epoch
        # and each process's share of the data all depend on the number of processes.
        raise CheckpointError(
            f"--resume: the run in {out} was trained with {saved_world} process(es), "
            f"this is {world}; resume it with the same number (torchrun "
            "--nproc_per_node) or use another --out."
        )

    saved_model = doc.get("model_config", {})
    now_model = getattr(model, "cfg", None)
    if now_model is not None:
        now = json.loads(json.dumps(now_model.to_dict()))
        diff = sorted(k for k in set(now) | set(saved_model) if now.get(k) != saved_model.get(k))
        if diff:
            raise CheckpointError(
                f"--resume: the model config differs from the run in {out} in "
                f"{diff}; resume with the same --model/--set or use another --out."
            )
    saved = doc.get("train_config", {})
    now_t = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = sorted(
        k
        for k in RESUME_KEYS
        if k in saved and saved[k] != now_t.get(k) and not (k == "teacher" and _same_checkpoint(saved[k], now_t.get(k)))
    )
    if diff:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now_t.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"--resume: training settings differ from the run in {out} ({detail}); "
            "resume with the same settings or use another --out."
        )
    # The backend may change, and --compile and --cuda-graph may replace each other;
    # whether an epoch's last partial batch is dropped may not.
    drops = bool(saved.get("compile") or saved.get("cuda_graph"))
    if drops != bool(cfg.compile or cfg.cuda_graph):
        raise CheckpointError(
            f"--resume: the run in {out} was trained "
            f"{'with' if drops else 'without'} --compile or --cuda-graph, which "
            "decide whether the last partial batch of an epoch is dropped; resume "
            f"it {'with one of them' if drops else 'without either'}."
        )
    if saved.get("epochs") not in (None, cfg.epochs):
        print(
            f"warning: --epochs changed from {saved['epochs']} to {cfg.epochs}; the cosine "
            "schedule is recomputed for the new length",
            file=sys.stderr,
        )


def _check_cuda_graph(cfg: "TrainConfig", device: str, world: int) -> None:
    """--cuda-graph needs one CUDA process and a step without host-side decisions."""
    why = (
        "it needs a CUDA device"
        if not device.startswith("cuda")
        else "it runs in a single process (DistributedDataParallel's gradient hooks are not captured)"
        if world > 1
        else "--amp's gradient scaler reads its overflow check on the host every step"
        if cfg.amp
        else "use one of --compile and --cuda-graph"
        if cfg.compile
        else None
    )
    if why:
        raise ConfigError(f"--cuda-graph: {why}.")


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, flush=True)


def train(cfg: TrainConfig, teacher: Optional[nn.Module] = None, model: Optional[nn.Module] = None) -> Dict:
    """Train a BHViT as ``cfg`` says and return the final metrics.

    ``teacher``: any module mapping a normalised image batch to logits (used instead of
    ``cfg.teacher``; a tensor, an object with a ``.logits`` tensor or a tuple whose first
    element is the logits, see :func:`teacher_logits`; checked with one forward before the
    first epoch); it is put in eval mode and never updated. ``model``: train this
    module instead of building ``cfg.model`` (it must accept the dataset's images).
    """
    _check_counts(cfg)  # before anything acts on them (threads, seeds, process groups)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1 and not dist.is_initialized():
        on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        backend = "nccl" if on_cuda else "gloo"
        dist.init_process_group(backend=backend)
    rank, world = _dist_info()
    device = _resolve_device(cfg.device, rank, world)
    if cfg.cuda_graph:
        _check_cuda_graph(cfg, device, world)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # the graph's streams and the model on one device
    if cfg.deterministic:
        set_deterministic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.teacher and cfg.teacher_module:
        raise ConfigError("give one of --teacher (a bhvit run) and --teacher-module (your own model).")
    out = check_out_dir(cfg.out)
    if cfg.resume is True and not (out / "last.json").is_file():
        raise ConfigError(
            f"--resume: {out} holds no run to continue (no last.json); check the path, "
            "or pass --resume auto to start a fresh run when there is none."
        )
    _check_out_state(out, cfg.resume)  # before the lock: a refused run leaves nothing behind
    created = _missing_dirs(out)  # the directories taking the lock creates
    lock = _lock_run_dir(out, rank, world, device, created)
    try:
        return _train(cfg, teacher, model, out, rank, world, device)
    except BaseException:
        # a run that fails leaves no lock file, nor the directories it created if it wrote nothing there
        if rank == 0:
            _abandon(lock, created)
        raise
    finally:
        lock.release()


def _missing_dirs(out: Path) -> List[Path]:
    """``out`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _abandon(lock: RunLock, created: List[Path]) -> None:
    """Remove the lock file of a run that stopped with an error, then the directories that it
    created and left empty (innermost first)."""
    lock.release(remove=True)
    for d in created:
        try:
            d.rmdir()  # only an empty directory
        except OSError:
            break


def _resolve_device(name: str, rank: int, world: int) -> str:
    """'auto' -> cuda when present, else cpu; under DDP on CUDA each rank takes its LOCAL_RANK GPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine.")
        if world > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
        else:  # an explicit index: torch.cuda.set_device and the CUDA graph need one
            try:
                index = torch.device(device).index
            except RuntimeError:
                raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}.") from None
            index = torch.cuda.current_device() if index is None else index
            if not 0 <= index < torch.cuda.device_count():
                raise ConfigError(
                    f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                    f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})."
                )
            device = f"cuda:{index}"
    elif device != "cpu":
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}.")
    return device


def _check_counts(cfg: TrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}.")
    if cfg.subset is not None and cfg.subset < 1:
        raise ConfigError(f"subset must be None (all images) or >= 1, got {cfg.subset}.")
    if cfg.test_subset is not None and cfg.test_subset < 0:
        raise ConfigError(
            f"test_subset must be None (follow subset), 0 (all test images) or >= 1, got {cfg.test_subset}."
        )
    if cfg.resume not in (False, True, "auto"):
        raise ConfigError(f"resume must be False, True or 'auto', got {cfg.resume!r}.")
    _check_numbers(cfg)


def _check_numbers(cfg: TrainConfig) -> None:
    """The optimisation and loss settings: finite, in range (a NaN or negative learning rate
    would otherwise train into NaN or fail deep inside PyTorch)."""
    from .runtime.kernels import MAX_THREADS

    def bad(flag, value, allowed):
        raise ConfigError(f"{flag} must be {allowed}, got {value!r}.")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if cfg.lr is not None and not (number(cfg.lr) and cfg.lr > 0):
        bad("--lr", cfg.lr, "a finite number > 0")
    for flag, v in (
        ("--weight-decay", cfg.weight_decay),
        ("--warmup-epochs", cfg.warmup_epochs),
        ("--min-lr", cfg.min_lr),
        ("--kd-lambda", cfg.kd_lambda),
        ("--re-beta", cfg.re_beta),
    ):
        if not (number(v) and v >= 0):
            bad(flag, v, "a finite number >= 0")
    if not (number(cfg.re_last_frac) and 0 <= cfg.re_last_frac <= 1):
        bad("--re-last-frac", cfg.re_last_frac, "a number from 0 to 1")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 1 << 63:
        bad("--seed", cfg.seed, "an integer from 0 to 2^63 - 1")
    for flag, v in (("--threads", cfg.threads), ("--workers", cfg.workers)):
        if v is not None and not (isinstance(v, int) and v <= MAX_THREADS):
            bad(flag, v, f"at most {MAX_THREADS}")


def _lock_run_dir(out: Path, rank: int, world: int, device: str, created: Optional[List[Path]] = None) -> RunLock:
    """Rank 0 locks the run directory (and removes what a killed run's writes left); every
    rank learns whether it could, so that none waits for a rank that stopped (``created``:
    the directories locking creates, removed again then)."""
    lock, err = RunLock(out), None
    if rank == 0:
        try:
            lock.acquire()
            n = remove_stale_temp(out)
            if n:
                _log(f"removed {n} temporary file(s) left in {out} by an interrupted write", rank)
        except (RunLocked, OSError) as e:
            err = e
    if world > 1:
        flag = torch.tensor([0 if err is not None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) == 0 and err is None:
            _abandon(lock, created or [])
            err = RunLocked(f"{out} is in use by another bhvit run (rank 0 could not lock it).")
    if err is not None:
        raise err
    return lock


def resolve_test_subset(subset: Optional[int], test_subset: Optional[int]) -> Optional[int]:
    """How many test images a run evaluates on (None: all): ``test_subset`` if given (0 means
    all), else the training ``subset`` (a fixed random subset of that many test images, or all
    of them if there are fewer), else all."""
    if test_subset is None:
        return subset
    return test_subset or None


def _check_out_state(out: Path, resume: bool) -> None:
    """Refuse an --out that holds a run (unless resuming it) or a checkpoint copy."""
    if (out / "last.json").exists() and not resume:
        raise ConfigError(
            f"{out} already holds a run (last.json); pass --resume to continue it or choose another --out."
        )
    if (out / "best.json").exists() and not (out / "last.json").exists():
        raise ConfigError(
            f"{out} holds a checkpoint (best.json) but no run to resume (last.json), "
            "e.g. a copy from `bhvit strip`; choose another --out."
        )
    if not (resume and (out / "last.json").exists()):
        # a fresh run: it would overwrite or prune files of these names that it did not write
        # (under --resume, a killed write's temporary files are a run's own and are removed)
        taken = run_files(out, temp=not resume)
        if resume and taken:  # a run killed while writing its first checkpoint: those files are its own
            own = {f.name for files in owned_checkpoint_files(out).values() for f in files}
            taken = [n for n in taken if n not in own]
        if taken:
            more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
            raise ConfigError(
                f"{out} holds {taken[0]}{more}, names a bhvit run writes, but no run to resume (last.json); "
                "move them away or choose another --out."
            )


def _train(
    cfg: TrainConfig,
    teacher: Optional[nn.Module],
    model: Optional[nn.Module],
    out: Path,
    rank: int,
    world: int,
    device: str,
) -> Dict:
    _check_out_state(out, cfg.resume)  # again, now that this run holds the lock
    model_cfg = get_config(cfg.model, **cfg.overrides)
    cfg, train_ds, test_ds = _load_data(cfg, model_cfg, rank)
    mean, std = train_ds.channel_stats()
    data_stats = (list(mean), list(std))  # the data's own, before a teacher's replace them

    torch.manual_seed(cfg.seed)
    if model is None:
        model = BHViT(dataclasses.replace(model_cfg, num_classes=train_ds.num_classes))
    if cfg.init_from and not (cfg.resume and (out / "last.json").exists()):
        n_init, n_all = load_matching_weights(model, cfg.init_from)
        _log(f"initialised {n_init} of {n_all} tensors from {cfg.init_from}", rank)
    model = model.to(device)
    t_label = (
        f"the teacher ({type(teacher).__name__})"
        if teacher is not None
        else f"--teacher {cfg.teacher}"
        if cfg.teacher
        else f"--teacher-module {cfg.teacher_module}"
    )
    teacher, mean, std = _frozen_teacher(cfg, model_cfg, teacher, train_ds.num_classes, mean, std, device, rank)
    if teacher is not None:
        n = min(cfg.batch_size, len(train_ds))  # a training batch
        _check_teacher(teacher, t_label, train_ds.image_shape, n, train_ds.num_classes, device)
    is_binary = any(True for _ in binary_layers(model))
    plan = _Plan.of(cfg, len(train_ds), world, model_cfg.img_size)
    optimizer = make_optimizer(model.parameters(), plan.base_lr, cfg.weight_decay, device, capturable=cfg.cuda_graph)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.startswith("cuda")) else None
    start_epoch, history, best = _resume(cfg, out, model, optimizer, scaler, world, rank)
    if world > 1:
        ddp_kw = {"device_ids": [torch.device(device).index]} if device.startswith("cuda") else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kw)
    data_meta = {"name": cfg.data, "classes": train_ds.classes, "mean": mean, "std": std}
    data_meta.update(
        train_size=len(train_ds), test_size=len(test_ds), train_mean=data_stats[0], train_std=data_stats[1]
    )
    data_meta["streamed"] = bool(getattr(train_ds, "streaming", False))  # (estimated statistics)
    if start_epoch:
        _check_resume_data(data_meta, _saved_data(out), out)
    if getattr(test_ds, "resize", model_cfg.img_size) != model_cfg.img_size:  # streamed with --augment rrc
        data_meta["resize"] = test_ds.resize  # so that eval, export and predict crop as this run does
    meta_base = {"train_config": dataclasses.asdict(cfg), "data": data_meta, "world_size": world}
    _log(
        f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} params, binary={is_binary}, "
        f"{len(train_ds)} train / {len(test_ds)} test images, {world} process(es), device {device}, "
        f"lr {plan.base_lr:.2e}, {plan.steps_per_epoch} steps/epoch",
        rank,
    )
    stepper = _Stepper(cfg, model, teacher, optimizer, scaler, device, is_binary, rank)
    run = _Run(cfg, plan, stepper, train_ds, None, mean, std, out, history, rank, world, device)
    test_loader = None
    if getattr(train_ds, "streaming", False):
        pin = device.startswith("cuda")
        run.loader = StreamLoader(train_ds, True, cfg.workers, cfg.seed, plan.crop_pad, cfg.flip, pin)
        test_loader = StreamLoader(test_ds, False, cfg.workers, pin_memory=pin)

    last = history[-1] if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        beta = cfg.re_beta if (is_binary and epoch >= plan.re_start) else 0.0
        lam = cfg.kd_lambda if teacher is not None else 0.0
        steps = plan.steps_per_epoch
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps - epoch * plan.steps_per_epoch)
            if steps <= 0:
                break
        sums, lr = _train_epoch(run, epoch, lam, beta, steps, first_epoch=epoch == start_epoch)
        train_time = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(sums)
            _average_buffers(model, world)
        flips, step_flips = stepper.flips.epoch_fractions(_unwrap(model)) if is_binary else (None, None)
        ev = evaluate(_unwrap(model), test_ds, mean, std, cfg.eval_batch_size, device, loader=test_loader)
        loss, correct, count = sums.tolist()
        last = {
            "epoch": epoch + 1,
            "train_loss": loss / count,
            "train_top1": 100 * correct / count,
            "test_loss": ev["loss"],
            "test_top1": ev["top1"],
            "test_top5": ev["top5"],
            "lr": lr,
            "beta": beta,
            "kd_lambda": lam,
            "flip_frac": flips,
            "step_flip_frac": step_flips,
            "epoch_time_s": time.perf_counter() - t0,
            "train_images_per_s": count / train_time,
        }
        history.append(last)
        is_best = ev["top1"] > best
        best = max(best, ev["top1"])
        if rank == 0:
            scaler_state = scaler.state_dict() if scaler is not None else None
            meta = dict(meta_base, metrics=last, history=history, best_top1=best, rng=rng_state(), scaler=scaler_state)
            save_checkpoint(out, epoch, model, meta, optimizer, is_best=is_best)
            _write_metrics(out, history)
        _log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['train_loss']:.4f} top-1 "
            f"{last['train_top1']:.2f} | test loss {ev['loss']:.4f} top-1 {ev['top1']:.2f} top-5 "
            f"{ev['top5']:.2f} | beta {beta} flips {flips if flips is None else round(flips, 5)} | "
            f"{last['epoch_time_s']:.0f}s",
            rank,
        )
        if steps < plan.steps_per_epoch:
            _log(f"stopped after --max-steps {cfg.max_steps} optimizer steps", rank)
            break
    return _finish(cfg, out, model, last, best, history, rank, world)


def teacher_logits(out):
    """The logits of a KD teacher's output: a tensor, an object with a ``.logits`` tensor (a
    Hugging Face ``ImageClassifierOutput``; a dict with a ``"logits"`` key too), or a tuple or
    list whose first element is the logits tensor (``return_dict=False``). Anything else is a
    ConfigError."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"the teacher returned a {type(out).__name__}; it must return the logits: a tensor, an object "
            "with a .logits tensor (Hugging Face) or a tuple whose first element is the logits tensor."
        )
    return logits


@torch.no_grad()
def _check_teacher(teacher: nn.Module, label: str, image_shape, batch_size: int, num_classes: int, device: str):
    """One forward of the teacher on a batch shaped as training's (``batch_size`` images of
    ``image_shape``), before the first epoch: its output must hold (batch, classes) logits
    (else a one-line ConfigError that starts with ``label``, not an error mid-epoch)."""
    n = batch_size
    x = torch.zeros((n, *image_shape), device=device)
    try:
        logits = teacher_logits(teacher(x))
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    except Exception as e:  # the user's module: whatever it raises, one line naming it
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"{label}: its forward on a batch of {n}x{'x'.join(map(str, image_shape))} images failed "
            f"({type(e).__name__}: {first})."
        ) from None
    if tuple(logits.shape) != (n, num_classes):
        raise ConfigError(
            f"{label}: the teacher returned logits of shape {tuple(logits.shape)}, the student "
            f"{(n, num_classes)}; it must predict the dataset's {num_classes} classes."
        )


def _frozen_teacher(cfg, model_cfg, teacher, num_classes: int, mean, std, device: str, rank: int):
    """The KD teacher on ``device`` with frozen weights (None without one), and the data
    statistics to normalise with (a bhvit teacher's own, see _load_teacher)."""
    if teacher is None and cfg.teacher:
        teacher, mean, std = _load_teacher(cfg, model_cfg, num_classes, mean, std, device, rank)
    elif teacher is None and cfg.teacher_module:
        teacher = load_external_teacher(cfg.teacher_module, cfg.teacher_weights)
        _log(f"teacher: {cfg.teacher_module} with {cfg.teacher_weights}", rank)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return teacher, mean, std


@dataclass
class _Run:
    """What every epoch of a run uses."""

    cfg: TrainConfig
    plan: "_Plan"
    stepper: "_Stepper"
    train_ds: Dataset
    loader: Optional[StreamLoader]  # streamed training data, else None
    mean: list
    std: list
    out: Path
    history: List[Dict]
    rank: int
    world: int
    device: str


def _train_epoch(run: _Run, epoch: int, lam: float, beta: float, steps: int, first_epoch: bool):
    """``steps`` optimizer steps of an epoch. Returns the summed (loss, correct, count) of
    the samples that are not DistributedSampler padding, and the last step's learning rate.
    In-memory data is augmented here as batched tensor ops; streamed data arrives augmented
    from ``run.loader``'s workers (per-sample, seeded by (seed, epoch, index))."""
    cfg, plan, stepper, train_ds = run.cfg, run.plan, run.stepper, run.train_ds
    rank, world, device = run.rank, run.world, run.device
    model = stepper.model
    stepper.begin_epoch(lam, beta)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + rank)
    batches = _batches(len(train_ds), cfg.batch_size, epoch, cfg.seed, rank, world, True)
    batches = batches[:steps]  # drop_last: the partial batch; --max-steps
    stream = run.loader.epoch(epoch, batches) if run.loader is not None else None
    n_real, seen = _n_unpadded(len(train_ds), rank, world), 0  # train metrics skip the padding
    guard = _NonFiniteGuard(device, world)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    bar = Progress(len(batches), f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and rank == 0)
    lr = plan.base_lr
    for i, idx in enumerate(batches):
        lr = _lr_at(epoch * plan.steps_per_epoch + i, plan.total_steps, plan.warmup_steps, plan.base_lr, cfg.min_lr)
        set_lr(stepper.optimizer, lr)
        if stream is not None:
            x = next(stream)[0]
        else:
            x = augment_batch(train_ds.images[idx], plan.crop_pad, cfg.flip, gen)
        x = normalize(x, run.mean, run.std).to(device, non_blocking=True)
        y = train_ds.labels[idx].to(device, non_blocking=True)
        # The run's first step is eager: it initialises QD from data (host-side control flow).
        loss, logits = stepper.forward(x, y, eager=first_epoch and i == 0)
        guard.note(i, loss)
        if (i + 1) % guard.every == 0 or i + 1 == len(batches):
            first = guard.first_bad()
            if first >= 0:
                where = f"{run.out / 'last.json'} (epoch {run.history[-1]['epoch']})" if run.history else "none yet"
                what = guard.bad_loss.item() if int(guard.bad_step) >= 0 else "non-finite on another rank"
                # The bad step's forward ran in train mode (BatchNorm statistics) and, with a
                # deferred check, optimizer steps ran after it: put the checkpoint back.
                note = _restore_last_good(model, run.out, run.history)
                raise TrainingDiverged(
                    f"loss became {what} at epoch {epoch + 1}, step {first + 1}; "
                    f"stopping. Last good checkpoint: {where}.{note} Try a lower --lr."
                )
        stepper.finish(loss)
        # The batch's samples that are not padding. Top-1 counts exactly these; the loss is the
        # batch mean weighted by k (a rank's last batch holds at most one repeat when n >= world).
        k = min(len(idx), max(0, n_real - seen))
        seen += len(idx)
        sums[0] += loss.detach().double() * k
        sums[1] += (logits.detach().argmax(1)[:k] == y[:k]).sum()
        sums[2] += k
        if bar.due(i + 1):
            s_loss, s_correct, s_count = sums.tolist()
            bar.update(i + 1, int(s_count), loss=s_loss / s_count, acc=100 * s_correct / s_count)
    return sums, lr


@dataclass
class _Plan:
    """Steps, schedule and augmentation of a run, from its config and data size."""

    base_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    re_start: int  # first epoch with L_re
    crop_pad: int

    @classmethod
    def of(cls, cfg: TrainConfig, n_train: int, world: int, img_size: int) -> "_Plan":
        base_lr = cfg.lr if cfg.lr is not None else 5e-4 * cfg.batch_size * world / 512
        n_local = math.ceil(n_train / world)
        # compiled and graphed steps take one fixed shape: no partial batch
        drop_last = bool(cfg.compile or cfg.cuda_graph) and n_local >= cfg.batch_size
        steps = n_local // cfg.batch_size if drop_last else math.ceil(n_local / cfg.batch_size)
        re_start = cfg.epochs - max(1, math.ceil(cfg.re_last_frac * cfg.epochs)) if cfg.re_last_frac > 0 else cfg.epochs
        return cls(
            base_lr,
            steps,
            steps * cfg.epochs,
            int(round(cfg.warmup_epochs * steps)),
            re_start,
            cfg.crop_pad if cfg.crop_pad is not None else img_size // 8,
        )


class _Stepper:
    """The training step: forward with the recipe loss, backward, AdamW step and the
    per-step sign-flip count; eager, compiled (``--compile``) or replayed as one CUDA
    graph (``--cuda-graph``, falling back to eager if capture fails)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        teacher: Optional[nn.Module],
        optimizer,
        scaler,
        device: str,
        is_binary: bool,
        rank: int,
    ):
        self.cfg, self.model, self.teacher, self.optimizer, self.scaler = cfg, model, teacher, optimizer, scaler
        self.device, self.rank = device, rank
        self.amp_dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
        self.fwd, self.t_fwd = model, teacher
        if cfg.compile:
            # One fixed shape (dynamic=False, no partial batches): compiled once. Evaluation
            # and checkpoints use the module itself.
            self.fwd = torch.compile(model, dynamic=False, backend=cfg.compile)
            if teacher is not None:
                self.t_fwd = torch.compile(teacher, dynamic=False, backend=cfg.compile)
            _log(f"torch.compile (backend {cfg.compile}): the first steps include compilation", rank)
        # Sign flips per step, counted in fixed buffers updated in place (also inside a graph).
        self.flips = FlipCounter(_unwrap(model), device, per_step=is_binary and cfg.step_flips, in_place=cfg.cuda_graph)
        self.graphed, self.graphed_for, self.graph_failed = None, None, False
        self.lam = self.beta = 0.0

    def begin_epoch(self, lam: float, beta: float) -> None:
        self.lam, self.beta = lam, beta
        self.flips.begin_epoch(_unwrap(self.model))
        if self.cfg.cuda_graph and not self.graph_failed and self.graphed_for != (lam, beta):
            # The loss weights are part of the graph: a new graph when they change (L_re's
            # epochs), after one eager step (three before the run's first capture).
            self.graphed = GraphedStep(
                functools.partial(self._whole_step, lam=lam, beta=beta), warmup=3 if self.graphed is None else 1
            )
            self.graphed_for = (lam, beta)

    def _forward_loss(self, x, y, lam: float, beta: float, eager: bool = False):
        with torch.autocast(device_type=torch.device(self.device).type, dtype=self.amp_dtype, enabled=self.cfg.amp):
            logits = (self.model if eager else self.fwd)(x)
            t_logits = None
            if lam:
                with torch.no_grad():
                    t_logits = teacher_logits(self.t_fwd(x))  # recipe_loss widens half-precision logits
            loss = recipe_loss(logits, y, lam, beta, t_logits, _unwrap(self.model))
        return loss, logits

    def _backward_step(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.flips.update(_unwrap(self.model))

    def _whole_step(self, x, y, lam: float, beta: float):
        loss, logits = self._forward_loss(x, y, lam, beta)
        self._backward_step(loss)
        return loss.detach(), logits.detach()

    def forward(self, x, y, eager: bool = False):
        """Loss and logits of a batch. A graphed step has also stepped the optimizer; an
        eager one steps in :meth:`finish`, after the caller's non-finite check."""
        if self.graphed is not None:
            try:
                return self.graphed(x, y)
            except GraphCaptureError as e:
                # Nothing of the captured step ran: this step and the rest go eager.
                _log(f"warning: {e} Training goes on without CUDA graphs.", self.rank)
                self.graphed, self.graph_failed = None, True
        return self._forward_loss(x, y, self.lam, self.beta, eager=eager)

    def finish(self, loss) -> None:
        if self.graphed is None:
            self._backward_step(loss)


class _NonFiniteGuard:
    """A non-finite loss is noted on the device and read every ``every`` steps (every step
    on the CPU), so that the host need not wait for each step; under DDP every rank stops
    at the same check (none waits in a collective)."""

    def __init__(self, device: str, world: int):
        self.every, self.world = _nonfinite_check_steps(device), world
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, i: int, loss: torch.Tensor) -> None:
        first = torch.isfinite(loss.detach()).logical_not() & (self.bad_step < 0)
        self.bad_step = torch.where(first, i, self.bad_step)
        self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)

    def first_bad(self) -> int:
        """The first step with a non-finite loss on any rank, or -1."""
        first = self.bad_step.clone()
        if self.world > 1:
            big = torch.iinfo(torch.int64).max
            first = torch.where(first >= 0, first, big)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == big, -1, first)
        return int(first)


def _load_data(cfg: TrainConfig, model_cfg, rank: int):
    """The training and test sets the run uses, checked against the model; ``cfg`` with its
    test subset resolved (the value the run records and a resume compares)."""
    load_kw = dict(
        channels=model_cfg.in_chans,
        size=model_cfg.img_size,
        skip_bad=cfg.skip_bad,
        cache_dir=cfg.cache_dir,
        progress=cfg.progress and rank == 0,
    )
    # --test-subset follows --subset unless given (0: the whole test set)
    cfg = dataclasses.replace(cfg, test_subset=resolve_test_subset(cfg.subset, cfg.test_subset))
    folder = image_folder_root(cfg.data, cfg.data_dir)
    stream = _streams(cfg, folder, model_cfg)
    if stream:
        kw = dict(
            channels=model_cfg.in_chans,
            size=model_cfg.img_size,
            seed=cfg.seed,
            skip_bad=cfg.skip_bad,
            augment=cfg.augment,
        )
        train_ds = StreamingImageFolder(folder, "train", subset=cfg.subset, **kw)
        test_ds = StreamingImageFolder(folder, "test", classes=train_ds.classes, subset=cfg.test_subset, **kw)
        _log(f"streaming {folder}: decoding per sample in {cfg.workers or 'the training'} process(es)", rank)
    else:
        if folder is not None:  # a class mismatch between the splits, before anything is decoded
            _list_images(_split_dir(folder, "test"), _list_images(_split_dir(folder, "train"), None)[0])
        train_ds = load_dataset(cfg.data, "train", cfg.data_dir, subset=cfg.subset, seed=cfg.seed, **load_kw)
        test_ds = load_dataset(
            cfg.data, "test", cfg.data_dir, classes=train_ds.classes, subset=cfg.test_subset, seed=cfg.seed, **load_kw
        )
    if train_ds.skipped or test_ds.skipped:
        _log(f"skipped unreadable images: train {train_ds.skipped}, test {test_ds.skipped}", rank)
    for split, ds in (("training", train_ds), ("test", test_ds)):
        if len(ds) == 0:
            raise DataError(f"{ds.source or cfg.data}: the {split} set has no images.")
    want = (model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size)
    if train_ds.image_shape != want:
        c, h, w = train_ds.image_shape
        raise ConfigError(
            f"dataset images are {c}x{h}x{w} but {cfg.model} expects "
            f"{want[0]}x{want[1]}x{want[2]}; pick a matching model (e.g. a *_c28 model "
            "for Fashion-MNIST, *_c32 for CIFAR-10) or override in_chans/img_size."
        )
    return cfg, train_ds, test_ds


def _streams(cfg: TrainConfig, folder: Optional[Path], model_cfg) -> bool:
    """Whether the run streams its data (``--data-in-memory``, ``--augment``, the set's size)."""
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {cfg.workers}.")
    if cfg.data_in_memory not in ("auto", "yes", "no"):
        raise ConfigError(f"data_in_memory must be 'auto', 'yes' or 'no', got {cfg.data_in_memory!r}.")
    if folder is None:
        if cfg.data_in_memory == "no" or cfg.augment == "rrc":
            raise ConfigError(
                f"{cfg.data} is read whole into memory (only ImageFolder datasets stream), "
                "so --data-in-memory no and --augment rrc do not apply to it."
            )
        return False
    if cfg.augment == "rrc":
        if cfg.data_in_memory == "yes":
            raise ConfigError(
                "--augment rrc crops the full-size images, so it streams them: pass --data-in-memory auto or no."
            )
        return True
    if cfg.data_in_memory != "auto":
        return cfg.data_in_memory == "no"
    n = count_images(folder, "train") if cfg.subset is None else cfg.subset
    n += count_images(folder, "test") if not cfg.test_subset else cfg.test_subset
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # each decodes its own copy
    stream = not fits_in_memory(n, model_cfg.in_chans, model_cfg.img_size, processes)
    if dist.is_available() and dist.is_initialized():  # one decision for every rank (memory varies)
        flag = torch.tensor([int(stream)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stream = bool(flag.item())
    return stream


def _load_teacher(cfg: TrainConfig, model_cfg, num_classes: int, mean, std, device: str, rank: int):
    """The ``--teacher`` checkpoint, checked against this run's data, and the input
    normalisation to use: the teacher's, since it sees the student's inputs."""
    teacher, tdoc = load_model(cfg.teacher, map_location=device)
    tc = teacher.cfg
    if (tc.num_classes, tc.in_chans, tc.img_size) != (num_classes, model_cfg.in_chans, model_cfg.img_size):
        raise ConfigError(
            f"--teacher {cfg.teacher}: it takes {tc.in_chans}x{tc.img_size}x{tc.img_size} images and "
            f"predicts {tc.num_classes} classes, but this run has {model_cfg.in_chans}x"
            f"{model_cfg.img_size}x{model_cfg.img_size} images and {num_classes} classes; "
            "distil from a teacher trained on this dataset."
        )
    tdata = tdoc.get("data", {})
    t_mean, t_std = tdata.get("mean"), tdata.get("std")
    if t_mean and t_std and len(t_mean) == len(mean) == len(t_std):
        # (its statistics differ from these when e.g. --subset changes them)
        diff = max(abs(a - b) for a, b in zip(t_mean + t_std, mean + std))
        if diff > 5e-7:  # printed to 6 decimals: a difference shows in the numbers
            _log(
                f"normalising with the teacher's statistics (mean {_fmt(t_mean)}, std {_fmt(t_std)}) "
                f"instead of this training set's (mean {_fmt(mean)}, std {_fmt(std)}; largest "
                f"difference {diff:.2g})",
                rank,
            )
        mean, std = list(t_mean), list(t_std)
    return teacher, mean, std


def load_external_teacher(spec: str, weights: Optional[str]) -> nn.Module:
    """``PACKAGE.MODULE:FACTORY`` called without arguments, with the state dict of the
    safetensors file ``weights`` loaded strictly (``--teacher-module``, ``--teacher-weights``)."""
    import importlib

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name.isidentifier():
        raise ConfigError(f"--teacher-module {spec!r}: expected PACKAGE.MODULE:FACTORY, e.g. myteachers:deit_small.")
    if not weights:
        raise ConfigError(
            f"--teacher-module {spec}: needs --teacher-weights FILE.safetensors (the trained teacher's state dict)."
        )
    # As `python -m` does: the working directory is searched first, so a my_teachers.py
    # beside the run is found when bhvit runs as the console script too.
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"--teacher-module {spec}: cannot import it ({e}); it is looked for in the working "
            f"directory ({cwd}), on the PYTHONPATH and among the installed packages."
        ) from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"--teacher-module {spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module."
        )
    try:
        state = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"--teacher-weights {weights}: cannot read it as safetensors ({e}).") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(
            f"--teacher-weights {weights} does not fit {spec}: {' '.join(line.strip() for line in first[:3])[:400]}"
        ) from None
    return model


def _resume(cfg: TrainConfig, out: Path, model: nn.Module, optimizer, scaler, world: int, rank: int):
    """``(start epoch, history, best top-1)``: of the run in ``out`` when resuming one (its
    weights, optimizer, scaler and RNG state restored), else of a fresh run."""
    if not (cfg.resume and (out / "last.json").exists()):
        if cfg.resume:
            _log(f"--resume: no checkpoint in {out}, starting fresh", rank)
        return 0, [], -1.0
    doc, _ = read_checkpoint_json(out / "last.json")
    _check_resume(doc, _unwrap(model), cfg, out, world)
    load_training_state(doc, out, model, optimizer)
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    if "rng" in doc:
        set_rng_state(doc["rng"], out / "last.json")
    history, best = doc.get("history", []), doc.get("best_top1", -1.0)
    if rank == 0:
        _repair_after_kill(out, doc, history)
    _log(f"resumed {out} at epoch {doc['epoch'] + 1} (best top-1 {best:.2f})", rank)
    return doc["epoch"] + 1, history, best


def _finish(
    cfg: TrainConfig, out: Path, model: nn.Module, last: Dict, best: float, history: List[Dict], rank: int, world: int
) -> Dict:
    """final.json (with the ranks' weight checksums under DDP) and curves.png."""
    result = dict(last, best_top1=best, run_dir=str(out), world_size=world)
    if world > 1:
        sums = [None] * world
        dist.all_gather_object(sums, _checksum(model))
        result["rank_checksums"] = sums
        result["ranks_identical"] = all(s == sums[0] for s in sums)
    if rank == 0:
        atomic_write_json(result, out / "final.json")
        try:
            from .plot import plot_history

            plot_history(history, out / "curves.png", title=f"{cfg.model} on {cfg.data}")
        except Exception as e:  # a plot must never fail a finished run
            print(f"warning: could not draw curves.png: {e}", file=sys.stderr)
    return result

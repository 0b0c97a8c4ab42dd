"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is three files sharing a stem in the run directory::

    epoch0005.safetensors        model state dict
    epoch0005.optim.safetensors  optimizer state tensors (training checkpoints only)
    epoch0005.json               config, epoch, metrics, scheduler state, RNG state,
                                 optimizer hyper-parameters, names of the two files above

``last.json`` and ``best.json`` are copies of the JSON of the latest and the best
epoch. Every file is written to a temporary name and renamed into place, and the
pointer JSONs are written last, so a run killed at any moment leaves the previous
complete checkpoint loadable.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .quantizers import binary_sign

FORMAT = "bhvit-checkpoint"
FORMAT_VERSION = 1

__all__ = ["atomic_save_safetensors", "atomic_write_json", "save_checkpoint", "read_checkpoint_json",
           "load_model", "load_weights", "load_training_state", "resolve_checkpoint", "strip_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: Union[str, Path],
                            metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_json(obj: Any, path: Union[str, Path]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    _atomic(Path(path), write)


def atomic_write_text(text: str, path: Union[str, Path]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(Path(path), write)


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file.")
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e.__class__.__name__}: {e}); "
                              "the file is truncated or corrupt.") from None


# --- optimizer state <-> flat tensors ----------------------------------------------
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    # A capturable optimizer holds its learning rate in a tensor; JSON takes the number.
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: Dict[str, torch.Tensor], meta: Dict) -> Dict:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> Dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(d: Dict[str, str]) -> None:
    import numpy as np

    if "torch" in d:
        arr = np.frombuffer(base64.b64decode(d["torch"]), dtype=np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(arr))


# --- save / load -----------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(run_dir: Union[str, Path], epoch: int, model: torch.nn.Module, meta: Dict,
                    optimizer: Optional[torch.optim.Optimizer] = None, is_best: bool = False,
                    keep: Tuple[str, ...] = ()) -> Path:
    """Write ``epochNNNN.*`` and update ``last.json`` (and ``best.json``)."""
    run_dir = Path(run_dir)
    stem = f"epoch{epoch:04d}"
    model = _unwrap(model)
    doc = dict(meta)
    doc.update(format=FORMAT, version=FORMAT_VERSION, epoch=epoch, weights=f"{stem}.safetensors")
    if getattr(model, "cfg", None) is not None:
        doc["model_config"] = model.cfg.to_dict()
    atomic_save_safetensors(model.state_dict(), run_dir / doc["weights"])
    if optimizer is not None:
        tensors, opt_meta = optimizer_to_tensors(optimizer)
        doc["optimizer"] = dict(opt_meta, file=f"{stem}.optim.safetensors")
        atomic_save_safetensors(tensors, run_dir / doc["optimizer"]["file"])
    atomic_write_json(doc, run_dir / f"{stem}.json")
    atomic_write_json(doc, run_dir / "last.json")  # first: a run killed in between can resume
    if is_best:
        atomic_write_json(doc, run_dir / "best.json")
    _prune(run_dir, keep)
    return run_dir / f"{stem}.json"


def _prune(run_dir: Path, keep: Tuple[str, ...]) -> None:
    """Delete epoch files referenced by neither last.json nor best.json."""
    wanted = set(keep)
    for ptr in ("last.json", "best.json"):
        p = run_dir / ptr
        if p.is_file():
            d = json.loads(p.read_text())
            wanted.add(d["weights"].split(".")[0])
    for f in run_dir.glob("epoch*"):
        if f.name.split(".")[0] not in wanted:
            f.unlink()


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A run directory (its best.json, else last.json), a .json, or a weights file."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.json", "last.json"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: no best.json or last.json in this run directory.")
    if p.suffix == ".safetensors":
        p = p.with_name(p.name.split(".")[0] + ".json")
    if not p.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    return p


def read_checkpoint_json(path: Union[str, Path]) -> Tuple[Dict, Path]:
    p = resolve_checkpoint(path)
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e}); the file is truncated or corrupt.") from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a bhvit checkpoint (format {doc.get('format')!r}).")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint version {doc.get('version')} is not supported "
                              f"(this bhvit reads version {FORMAT_VERSION}).")
    return doc, p


def load_model(path: Union[str, Path], map_location: str = "cpu") -> Tuple[torch.nn.Module, Dict]:
    """Build the BHViT described by a checkpoint and load its weights (no pickle).

    The model is returned in eval mode (BatchNorm uses its running statistics).
    """
    from .model import BHViT, BHViTConfig

    doc, p = read_checkpoint_json(path)
    if "model_config" not in doc:
        raise CheckpointError(f"{p}: no model_config; cannot rebuild the model.")
    model = BHViT(BHViTConfig.from_dict(doc["model_config"]))
    _load_state(model, p.parent / doc["weights"])
    return model.to(map_location).eval(), doc


def _load_state(model: torch.nn.Module, file: Path) -> None:
    state = _load_safetensors(file)
    try:
        _unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: weights do not match the model: {e}") from None


def load_weights(model: torch.nn.Module, path: Union[str, Path]) -> Dict:
    """Load the weights of checkpoint ``path`` (a run directory or its JSON) into ``model``,
    which must have the same configuration; returns the checkpoint's JSON document."""
    doc, p = read_checkpoint_json(path)
    _load_state(model, p.parent / doc["weights"])
    return doc


def load_training_state(doc: Dict, run_dir: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
    if doc.get("weights_only"):
        raise CheckpointError(f"{run_dir}: a weights-only copy (bhvit strip) has no optimizer or RNG "
                              "state; a run cannot be resumed from it. Use it with --teacher or "
                              "--init-from, or resume from the original run.")
    _load_state(model, run_dir / doc["weights"])
    if "optimizer" in doc:
        tensors = _load_safetensors(run_dir / doc["optimizer"]["file"])
        state = optimizer_from_tensors(tensors, doc["optimizer"])
        # load_state_dict takes every group setting from the file; the implementation (fused,
        # foreach) stays this optimizer's, so a run saved by another one resumes fused.
        for group in state["param_groups"]:
            for key in ("fused", "foreach", "capturable", "differentiable"):
                if key in optimizer.defaults:
                    group[key] = optimizer.defaults[key]
        optimizer.load_state_dict(state)


# The two kinds of downsampling layer (binary conv with a real-valued shortcut, or the
# dagger models' float conv) hold a 2x2 conv and a norm of the same shapes under different
# names; a model with either kind can start from a checkpoint with the other.
_DOWNSAMPLE_ALIASES = ((".downsample.conv.conv.weight", ".downsample.reduce.op.conv.weight"),
                       (".downsample.norm.", ".downsample.reduce.norm."))


def _aliases(key: str):
    for a, b in _DOWNSAMPLE_ALIASES:
        for x, y in ((a, b), (b, a)):
            if x in key:
                yield key.replace(x, y)


def load_matching_weights(model: torch.nn.Module, path: Union[str, Path]) -> Tuple[int, int]:
    """Copy into ``model`` every tensor of a checkpoint (run dir, .json or .safetensors)
    whose name and shape match; the rest keep their values. Returns (copied, total in model).

    Used to start a binary student from its full-precision twin: both share names, and
    the binary layers' latent weights start at the twin's float weights. The downsampling
    conv and norm also match across ``fp_downsample`` settings (a dagger student can start
    from a twin trained with binary-style downsampling, and the reverse).
    """
    p = Path(path)
    if p.suffix == ".safetensors" and p.is_file():
        file = p  # a bare weights file
    else:
        doc, p = read_checkpoint_json(p)
        file = p.parent / doc["weights"]
    state = _load_safetensors(file)
    own = _unwrap(model).state_dict()
    hits = {}
    for k, mine in own.items():
        for name in (k, *_aliases(k)):
            if name in state and tuple(state[name].shape) == tuple(mine.shape) and (name == k or name not in own):
                hits[k] = state[name]
                break
    if not hits:
        raise CheckpointError(f"{file}: no tensor matches the model by name and shape; nothing to "
                              "initialise from.")
    _unwrap(model).load_state_dict(hits, strict=False)
    return len(hits), len(own)


_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def strip_checkpoint(src: Union[str, Path], dst: Union[str, Path],
                     dtype: Optional[str] = None) -> Dict[str, Any]:
    """Write a weights-only copy of a checkpoint to the directory ``dst``.

    The copy holds the model weights and the JSON document (config, data statistics,
    metrics) without optimizer state, RNG state or history, as ``dst/best.json``. With
    ``dtype`` "float16" or "bfloat16" the floating-point tensors are stored in 16 bits
    (half the size); a tensor that does not fit float16's range stays float32. A binary
    layer's latent weight whose sign relative to its output channel's mean (what the
    binarizer takes) would change by the rounding is moved just past that mean, so that the
    copy has exactly the original's binary weight signs (``sign_kept_by_nudging`` counts them).
    The copy loads like any checkpoint (``load_model``, ``--teacher``, ``--init-from``,
    ``bhvit eval``/``export``); 16-bit weights are widened to float32 on loading.
    It cannot be resumed. Returns a summary (sizes, tensors kept in float32).
    """
    if dtype is not None and dtype not in _HALF:
        raise ValueError(f"dtype must be one of {sorted(_HALF)} or None, not {dtype!r}")
    doc, p = read_checkpoint_json(src)
    src_file = p.parent / doc["weights"]
    state = _load_safetensors(src_file)
    kept, nudged = [], 0
    if dtype is not None:
        half = _HALF[dtype]
        limit = torch.finfo(half).max
        latent = _binary_weight_names(doc)
        for k, v in state.items():
            if not v.is_floating_point() or v.dtype == half:
                continue
            if v.numel() and v.abs().max() > limit:
                kept.append(k)
                continue
            h = v.to(half)
            if k in latent:
                h, n = _keep_binary_signs(v, h)
                nudged += n
                if h is None:
                    kept.append(k)
                    continue
            state[k] = h
    dst = Path(dst)
    if (dst / "best.json").exists() or (dst / "last.json").exists():
        raise CheckpointError(f"{dst} already holds a checkpoint; choose an empty directory.")
    out_doc = {k: v for k, v in doc.items() if k not in ("optimizer", "rng", "history", "scaler")}
    stem = src_file.name.split(".")[0]
    out_doc.update(weights=f"{stem}.safetensors", weights_only=True, weights_dtype=dtype or "float32",
                   stripped_from=str(p))
    atomic_save_safetensors(state, dst / out_doc["weights"])
    atomic_write_json(out_doc, dst / "best.json")
    return {"out": str(dst), "weights": str(dst / out_doc["weights"]), "dtype": dtype or "float32",
            "bytes": (dst / out_doc["weights"]).stat().st_size, "source_bytes": src_file.stat().st_size,
            "kept_float32": kept, "sign_kept_by_nudging": nudged}


def _centred_signs(w: torch.Tensor) -> torch.Tensor:
    """The signs a binary layer uses: ``sign(W - mean(W))`` per output channel (rows of the view)."""
    flat = w.float().reshape(w.shape[0], -1)
    return binary_sign(flat - flat.mean(1, keepdim=True))


def _keep_binary_signs(v: torch.Tensor, h: torch.Tensor, tries: int = 4):
    """Make the 16-bit copy ``h`` of a binary layer's latent weight ``v`` binarise to the same
    signs (the binarizer centres each output channel on its mean, and rounding moves both the
    weights and the mean). A weight whose sign would change is moved just past its channel's
    new mean, on its original side. Returns ``(h, weights moved)``; ``h`` is None if the signs
    could not be kept in ``tries`` rounds (the caller keeps float32)."""
    want = _centred_signs(v)
    flat = h.reshape(h.shape[0], -1).clone()
    moved = 0
    for _ in range(tries):
        hf = flat.float()
        mean = hf.mean(1, keepdim=True)
        bad = binary_sign(hf - mean) != want
        if not bad.any():
            return flat.view_as(h), moved
        moved += int(bad.sum())
        # 2^-5 of the mean is several 16-bit steps, so the rounded value lands strictly on
        # the wanted side; a zero mean gets the least normal 16-bit value.
        step = (mean.abs() * 2.0 ** -5).clamp_min(torch.finfo(h.dtype).smallest_normal)
        flat = torch.where(bad, (mean + want * step).to(h.dtype), flat)
    return None, moved


def _binary_weight_names(doc: Dict) -> set:
    """Names of the latent weights of the binary layers of the model a checkpoint holds."""
    from .layers import binary_layers
    from .model import BHViT, BHViTConfig

    if "model_config" not in doc:
        return set()
    with torch.device("meta"):
        model = BHViT(BHViTConfig.from_dict(doc["model_config"]))
    layers = set(binary_layers(model))
    return {f"{n}.weight" for n, m in model.named_modules() if m in layers}

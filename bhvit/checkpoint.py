"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is three files sharing a stem in the run directory::

    epoch0005.safetensors        model state dict
    epoch0005.optim.safetensors  optimizer state tensors (training checkpoints only)
    epoch0005.json               config, epoch, metrics, scheduler state, RNG state,
                                 optimizer hyper-parameters, names of the two files above

``last.json`` and ``best.json`` are copies of the JSON of the latest and the best
epoch. Every file is written to a temporary name and renamed into place, and the
pointer JSONs are written last, so a run killed at any moment leaves the previous
complete checkpoint loadable. The JSON records the SHA-256 of both tensor files, and
every load checks it, so a corrupted or swapped file is an error, not a silent NaN.
Pruning deletes only checkpoint files that a bhvit run wrote (:mod:`bhvit.rundir`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .errors import BhvitError, ConfigError
from .quantizers import centred_signs
from .files import open_regular, read_regular
from .rundir import CHECKPOINT_NAME
from .runtime.format import MIN_STD, config_problem, preprocess_problem

FORMAT = "bhvit-checkpoint"
FORMAT_VERSION = 1

__all__ = [
    "atomic_save_safetensors",
    "atomic_write_json",
    "save_checkpoint",
    "read_checkpoint_json",
    "load_model",
    "load_weights",
    "load_training_state",
    "resolve_checkpoint",
    "strip_checkpoint",
    "CheckpointError",
]


class CheckpointError(BhvitError, ValueError):
    """A checkpoint file is missing, truncated or inconsistent."""


# A checkpoint JSON larger than this is refused unread (a real one is a few hundred KB).
MAX_JSON_BYTES = 64 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temporary file in the same directory, renamed into place.
    The file gets the usual mode of a new file (0644 under umask 022), not mkstemp's 0600."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # e.g. a full disk: say which file could not be written
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def atomic_save_safetensors(
    tensors: Dict[str, torch.Tensor],
    path: Union[str, Path],
    metadata: Optional[Dict[str, str]] = None,
    info: Optional[Dict[str, int]] = None,
) -> str:
    """Write ``tensors`` to ``path`` atomically; returns the SHA-256 (hex) of the bytes written
    (``info["bytes"]`` receives their count), not of a re-read file another process may have
    replaced."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = save(tensors, metadata=metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(blob)

    _atomic(Path(path), write)
    if info is not None:
        info["bytes"] = len(blob)
    return hashlib.sha256(blob).hexdigest()


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


# A weights or optimizer file larger than this is refused unread (bhvit_small's weights take
# 90 MB); where the model is known, the bound is its own size (_size_bound).
MAX_TENSOR_FILE_BYTES = 4 << 30
_HEADER_ALLOWANCE = 100 << 20  # safetensors' own limit on its JSON header


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _unwrap(model).state_dict().values())


def _load_safetensors(
    path: Path, sha256: Optional[str] = None, max_bytes: int = MAX_TENSOR_FILE_BYTES, json_file: Optional[Path] = None
) -> Dict[str, torch.Tensor]:
    """The tensors of ``path``, a file of at most ``max_bytes`` (checked before reading it); with
    ``sha256`` (the checkpoint JSON's record) the file's digest must match it. A file that bhvit
    wrote (its header carries bhvit's mark) must have that record when it is read through a
    checkpoint JSON (``json_file``): deleting it from the JSON does not switch the check off."""
    from safetensors.torch import load

    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file.")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(
            f"{path}: {size:,} bytes, more than the {max_bytes:,} its checkpoint's model can take; "
            "the file is corrupt or does not belong to this checkpoint."
        )
    if sha256 is None and json_file is not None and _marked(path):
        raise CheckpointError(
            f"{json_file}: no SHA-256 of {path.name}, which bhvit records for every checkpoint it writes; "
            "the JSON was edited, so the weights cannot be verified."
        )
    blob = read_regular(path)
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise CheckpointError(
            f"{path}: SHA-256 does not match the checkpoint's record; the file is "
            "corrupt or was replaced (resume from, or evaluate, another checkpoint)."
        )
    try:
        return load(blob)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read safetensors ({e.__class__.__name__}: {e}); the file is truncated or corrupt."
        ) from None


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
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
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


def set_rng_state(d: Dict[str, str], source: Union[str, Path] = "checkpoint") -> None:
    import numpy as np

    if "torch" in d:
        try:
            arr = np.frombuffer(base64.b64decode(d["torch"], validate=True), dtype=np.uint8).copy()
            if arr.size != torch.get_rng_state().numel():
                raise ConfigError(f"{arr.size} bytes, expected {torch.get_rng_state().numel()}")
            torch.set_rng_state(torch.from_numpy(arr))
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{source}: the saved random-number state is corrupt ({e}); the run "
                "cannot be resumed exactly from this checkpoint."
            ) from None


# --- save / load -----------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    run_dir: Union[str, Path],
    epoch: int,
    model: torch.nn.Module,
    meta: Dict,
    optimizer: Optional[torch.optim.Optimizer] = None,
    is_best: bool = False,
    keep: Tuple[str, ...] = (),
) -> Path:
    """Write ``epochNNNN.*`` and update ``last.json`` (and ``best.json``)."""
    run_dir = Path(run_dir)
    stem = f"epoch{epoch:04d}"
    model = _unwrap(model)
    doc = dict(meta)
    doc.update(format=FORMAT, version=FORMAT_VERSION, epoch=epoch, weights=f"{stem}.safetensors")
    if getattr(model, "cfg", None) is not None:
        doc["model_config"] = model.cfg.to_dict()
    mark = {"format": FORMAT}  # in the safetensors header: pruning deletes only marked files
    doc["weights_sha256"] = atomic_save_safetensors(model.state_dict(), run_dir / doc["weights"], mark)
    if optimizer is not None:
        tensors, opt_meta = optimizer_to_tensors(optimizer)
        doc["optimizer"] = dict(opt_meta, file=f"{stem}.optim.safetensors")
        doc["optimizer"]["sha256"] = atomic_save_safetensors(tensors, run_dir / doc["optimizer"]["file"], mark)
    atomic_write_json(doc, run_dir / f"{stem}.json")
    atomic_write_json(doc, run_dir / "last.json")  # first: a run killed in between can resume
    if is_best:
        atomic_write_json(doc, run_dir / "best.json")
    _prune(run_dir, keep)
    return run_dir / f"{stem}.json"


def _read_json(p: Path):
    """A JSON file's value, or None if it is not readable JSON (or too large)."""
    try:
        if p.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(read_regular(p))
    except (OSError, ValueError, RecursionError):
        return None


def _marked(f: Path) -> bool:
    """Whether the safetensors header of ``f`` carries bhvit's checkpoint mark."""
    import struct

    try:
        with open_regular(f) as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > 1 << 20:
                return False
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError, RecursionError):
        return False
    return meta.get("format") == FORMAT


def owned_checkpoint_files(run_dir: Path) -> Dict[str, list]:
    """The checkpoint files in ``run_dir`` that a bhvit run wrote, by stem (``epoch0003``):
    names of the exact checkpoint form that are a bhvit checkpoint JSON, a tensor file
    with bhvit's mark, or a tensor file such a JSON names. Nothing else is ever pruned."""
    owned: Dict[str, list] = {}
    for f in run_dir.iterdir():
        if not CHECKPOINT_NAME.match(f.name) or f.is_symlink() or not f.is_file():
            continue
        stem = f.name.split(".")[0]
        if f.suffix == ".json":
            d = _read_json(f)
            if not (isinstance(d, dict) and d.get("format") == FORMAT):
                continue
            owned.setdefault(stem, []).append(f)
            opt = d.get("optimizer")
            for name in (d.get("weights"), opt.get("file") if isinstance(opt, dict) else None):
                g = run_dir / name if isinstance(name, str) and CHECKPOINT_NAME.match(name) else None
                if g is not None and name.split(".")[0] == stem and g.is_file() and not g.is_symlink():
                    owned[stem].append(g)
        elif _marked(f):
            owned.setdefault(stem, []).append(f)
    return owned


def _prune(run_dir: Path, keep: Tuple[str, ...]) -> None:
    """Delete the checkpoints this run wrote that neither last.json nor best.json names."""
    wanted = set(keep)
    for ptr in ("last.json", "best.json"):
        p = run_dir / ptr
        if p.is_file():
            d = _read_json(p)
            if not (isinstance(d, dict) and isinstance(d.get("weights"), str)):
                return  # cannot tell what is in use: delete nothing
            wanted.add(d["weights"].split(".")[0])
    for stem, files in owned_checkpoint_files(run_dir).items():
        if stem not in wanted:
            for f in set(files):
                f.unlink(missing_ok=True)


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A run directory (its best.json, else last.json), a pretrained folder (config.json), a
    .json, or a weights file."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.json", "last.json", "config.json"):  # config.json: a save_pretrained folder
            if (p / name).is_file():
                return p / name
        stages = [
            d
            for d in ("teacher", "student_acts", "student")
            if (p / d / "best.json").is_file() or (p / d / "last.json").is_file()
        ]
        if stages:  # the root of a `bhvit recipe` run
            raise CheckpointError(
                f"{p}: a recipe run; its checkpoints are in {' and '.join(str(p / d) for d in stages)}."
            )
        raise CheckpointError(f"{p}: no best.json or last.json (a run) or config.json (a pretrained folder) in it.")
    if p.suffix == ".safetensors":
        pretrained = p.name == "model.safetensors" and (p.parent / "config.json").is_file()
        p = p.parent / "config.json" if pretrained else p.with_name(p.name.split(".")[0] + ".json")
    if not p.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    return p


def _check_doc(doc: Any, p: Path) -> None:
    """The shape of a checkpoint JSON: what loading relies on, with the file named."""

    def bad(what):
        raise CheckpointError(f"{p}: {what}; the file is corrupt or was not written by bhvit.")

    def file_name(v, key):
        if not isinstance(v, str) or not v or Path(v).name != v or not v.endswith(".safetensors"):
            bad(f"{key!r} must be the name of a .safetensors file beside it, got {v!r}")

    if not isinstance(doc, dict):
        raise CheckpointError(f"{p}: not a bhvit checkpoint (a JSON {type(doc).__name__}, not an object).")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a bhvit checkpoint (format {doc.get('format')!r}).")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint version {doc.get('version')} is not supported "
            f"(this bhvit reads version {FORMAT_VERSION})."
        )
    if "weights" not in doc:
        bad("no 'weights' entry")
    file_name(doc["weights"], "weights")
    if "epoch" in doc and (isinstance(doc["epoch"], bool) or not isinstance(doc["epoch"], int) or doc["epoch"] < 0):
        bad(f"'epoch' must be a non-negative integer, got {doc['epoch']!r}")
    for key in ("weights_sha256",):
        if key in doc and not (isinstance(doc[key], str) and len(doc[key]) == 64):
            bad(f"{key!r} must be a SHA-256 in hex, got {doc[key]!r}")
    for key, kind in (
        ("model_config", dict),
        ("data", dict),
        ("train_config", dict),
        ("optimizer", dict),
        ("rng", dict),
        ("history", list),
        ("metrics", dict),
    ):
        if key in doc and doc[key] is not None and not isinstance(doc[key], kind):
            bad(f"{key!r} must be a JSON {'object' if kind is dict else 'array'}, got {type(doc[key]).__name__}")
    opt = doc.get("optimizer")
    if isinstance(opt, dict):
        file_name(opt.get("file"), "optimizer.file")
        if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars", {}), dict):
            bad("the optimizer entry needs a 'param_groups' array and a 'scalars' object")
        if "sha256" in opt and not (isinstance(opt["sha256"], str) and len(opt["sha256"]) == 64):
            bad(f"'optimizer.sha256' must be a SHA-256 in hex, got {opt['sha256']!r}")
    if isinstance(doc.get("history"), list) and not all(isinstance(h, dict) for h in doc["history"]):
        bad("'history' must be an array of objects")
    data = doc.get("data") or {}
    if "mean" in data or "std" in data:
        mean, std = data.get("mean"), data.get("std")
        ok = (
            isinstance(mean, list)
            and isinstance(std, list)
            and len(mean) == len(std) >= 1
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean + std)
        )
        if not ok:
            bad(f"the data statistics must be two equally long lists of finite numbers, got mean {mean!r}, std {std!r}")
        if min(std) < MIN_STD:
            bad(f"the data std must be >= {MIN_STD}, got {std}")
    mc = doc.get("model_config") if isinstance(doc.get("model_config"), dict) else {}
    size = mc.get("img_size") if isinstance(mc.get("img_size"), int) and not isinstance(mc.get("img_size"), bool) else 1
    problem = preprocess_problem(data, size) if isinstance(data, dict) else None
    if problem:
        bad(problem)
    if "classes" in data and not (
        isinstance(data["classes"], list) and all(isinstance(c, str) for c in data["classes"])
    ):
        bad("'data.classes' must be a list of class names")


def read_checkpoint_json(path: Union[str, Path]) -> Tuple[Dict, Path]:
    p = resolve_checkpoint(path)
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{p}: {size} bytes, more than a checkpoint JSON holds "
            f"({MAX_JSON_BYTES >> 20} MiB at most); not a bhvit checkpoint."
        )
    try:
        doc = json.loads(read_regular(p))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise CheckpointError(f"{p}: not valid JSON ({e}); the file is truncated or corrupt.") from None
    except RecursionError:
        raise CheckpointError(f"{p}: JSON nested too deeply; not a bhvit checkpoint.") from None
    _check_doc(doc, p)
    return doc, p


def model_config_of(doc: Dict, p: Path):
    """The BHViTConfig a checkpoint JSON describes (errors name the file)."""
    from .model import BHViTConfig

    if "model_config" not in doc:
        raise CheckpointError(f"{p}: no model_config; cannot rebuild the model.")
    try:
        cfg = BHViTConfig.from_dict(doc["model_config"])
        # the export's bounds first (a list of 10^7 shift sizes would build 3 x 10^7 modules)
        problem = config_problem(json.loads(json.dumps(cfg.to_dict())))
        if problem:
            raise ConfigError(problem)
        cfg.validate()
        return cfg
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: bad model_config ({e}).") from None


def _size_bound(cfg, file: Path) -> int:
    """The largest weights file of the model ``cfg`` (its tensors plus a header), built on the
    meta device (nothing allocated); a smaller file than the tensors take is refused too."""
    from .model import BHViT

    with torch.device("meta"):
        need = _state_bytes(BHViT(cfg))
    if file.is_file() and file.stat().st_size < need // 2:  # (a 16-bit copy takes half)
        raise CheckpointError(
            f"{file}: {file.stat().st_size:,} bytes, too few for the {need:,} bytes of weights its model "
            "config describes; the file is truncated or the config was edited."
        )
    return need + 8 + _HEADER_ALLOWANCE


def load_model(path: Union[str, Path], map_location: str = "cpu") -> Tuple[torch.nn.Module, Dict]:
    """Build the BHViT described by a checkpoint and load its weights (no pickle).

    The model is returned in eval mode (BatchNorm uses its running statistics).
    """
    from .model import BHViT

    doc, p = read_checkpoint_json(path)
    cfg = model_config_of(doc, p)
    file = p.parent / doc["weights"]
    bound = _size_bound(cfg, file)  # before the model is allocated
    model = BHViT(cfg)
    _load_state(model, file, doc.get("weights_sha256"), p, bound)
    model.data = doc.get("data") or None
    model.name = doc.get("architecture") or doc.get("model") or (doc.get("train_config") or {}).get("model")
    model.provenance = {k: doc[k] for k in PROVENANCE if doc.get(k) is not None}
    return model.to(map_location).eval(), doc


# what a loaded model keeps of its checkpoint JSON, and bhvit.hub.save_pretrained writes back
PROVENANCE = ("epoch", "metrics", "train_config", "source", "weights_only")


def _load_state(
    model: torch.nn.Module, file: Path, sha256: Optional[str], json_file: Path, max_bytes: Optional[int] = None
) -> None:
    if max_bytes is None:
        max_bytes = _state_bytes(model) + 8 + _HEADER_ALLOWANCE
    state = _load_safetensors(file, sha256, max_bytes, json_file)
    try:
        _unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: weights do not match the model: {e}") from None


def load_weights(model: torch.nn.Module, path: Union[str, Path]) -> Dict:
    """Load the weights of checkpoint ``path`` (a run directory or its JSON) into ``model``,
    which must have the same configuration; returns the checkpoint's JSON document."""
    doc, p = read_checkpoint_json(path)
    _load_state(model, p.parent / doc["weights"], doc.get("weights_sha256"), p)
    return doc


def load_training_state(doc: Dict, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if doc.get("weights_only"):
        raise CheckpointError(
            f"{run_dir}: a weights-only copy (bhvit strip) has no optimizer or RNG "
            "state; a run cannot be resumed from it. Use it with --teacher or "
            "--init-from, or resume from the original run."
        )
    json_file = run_dir / "last.json"
    _load_state(model, run_dir / doc["weights"], doc.get("weights_sha256"), json_file)
    if "optimizer" in doc:
        bound = 3 * _state_bytes(model) + _HEADER_ALLOWANCE  # AdamW: two moments (+ steps) per parameter
        opt = doc["optimizer"]
        tensors = _load_safetensors(run_dir / opt["file"], opt.get("sha256"), bound, json_file)
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
_DOWNSAMPLE_ALIASES = (
    (".downsample.conv.conv.weight", ".downsample.reduce.op.conv.weight"),
    (".downsample.norm.", ".downsample.reduce.norm."),
)


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
        file, sha = p, None  # a bare weights file
    else:
        doc, p = read_checkpoint_json(p)
        file, sha = p.parent / doc["weights"], doc.get("weights_sha256")
    state = _load_safetensors(file, sha, json_file=None if sha is None and p.suffix == ".safetensors" else p)
    own = _unwrap(model).state_dict()
    hits = {}
    for k, mine in own.items():
        for name in (k, *_aliases(k)):
            if name in state and tuple(state[name].shape) == tuple(mine.shape) and (name == k or name not in own):
                hits[k] = state[name]
                break
    if not hits:
        raise CheckpointError(f"{file}: no tensor matches the model by name and shape; nothing to initialise from.")
    _unwrap(model).load_state_dict(hits, strict=False)
    return len(hits), len(own)


_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def strip_checkpoint(src: Union[str, Path], dst: Union[str, Path], dtype: Optional[str] = None) -> Dict[str, Any]:
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
        raise ConfigError(f"dtype must be one of {sorted(_HALF)} or None, not {dtype!r}")
    doc, p = read_checkpoint_json(src)
    src_file = p.parent / doc["weights"]
    bound = _size_bound(model_config_of(doc, p), src_file) if "model_config" in doc else MAX_TENSOR_FILE_BYTES
    state = _load_safetensors(src_file, doc.get("weights_sha256"), bound, p)
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
    out_doc.update(
        weights=f"{stem}.safetensors", weights_only=True, weights_dtype=dtype or "float32", stripped_from=str(p)
    )
    out_doc["weights_sha256"] = atomic_save_safetensors(state, dst / out_doc["weights"])
    atomic_write_json(out_doc, dst / "best.json")
    return {
        "out": str(dst),
        "weights": str(dst / out_doc["weights"]),
        "dtype": dtype or "float32",
        "bytes": (dst / out_doc["weights"]).stat().st_size,
        "source_bytes": src_file.stat().st_size,
        "kept_float32": kept,
        "sign_kept_by_nudging": nudged,
    }


def _centred_signs(w: torch.Tensor) -> torch.Tensor:
    """The signs a binary layer uses: ``sign(W - mean(W))`` per output channel (rows of the view)."""
    return centred_signs(w.float()).reshape(w.shape[0], -1)


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
        bad = centred_signs(hf) != want
        if not bad.any():
            return flat.view_as(h), moved
        moved += int(bad.sum())
        # 2^-5 of the mean is several 16-bit steps, so the rounded value lands strictly on
        # the wanted side; a zero mean gets the least normal 16-bit value.
        step = (mean.abs() * 2.0**-5).clamp_min(torch.finfo(h.dtype).smallest_normal)
        flat = torch.where(bad, (mean + want * step).to(h.dtype), flat)
    return None, moved


def _binary_weight_names(doc: Dict) -> set:
    """Names of the latent weights of the binary layers of the model a checkpoint holds."""
    from .layers import binary_layers
    from .model import BHViT, BHViTConfig

    if "model_config" not in doc:
        return set()
    with torch.device("meta"):
        model = BHViT(BHViTConfig.from_dict(doc["model_config"]))  # already checked by the caller
    layers = set(binary_layers(model))
    return {f"{n}.weight" for n, m in model.named_modules() if m in layers}

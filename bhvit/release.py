"""The authors' released BHViT checkpoints, read into bhvit (``bhvit convert``).

The release (Gao et al., CVPR 2025; MIT licence) trains with its ``main_new.py``, which saves
``torch.save({"model", "optimizer", "lr_scheduler", "epoch", "scaler", "args"})``: a pickle.
bhvit reads it with PyTorch's weights-only unpickler, which rebuilds tensors and plain
containers only; ``argparse.Namespace`` (the training options in ``args``) is the one class
added to it. Anything else in the file (a class whose unpickling could run code) is refused.

The architecture comes from the release's options: ``replace_ln_bn`` (BatchNorm or
LayerNorm), ``some_fp`` (full-precision downsampling), ``shift3`` / ``shift5`` (the shift
branches), ``weight_bits`` / ``input_bits`` (1 or 32), ``nb_classes``, ``input_size`` and the
model config (BHViT-Tiny or BHViT-Small, told apart by the layers the weights hold). Options
bhvit does not implement (``gsb``, ``disable_layerscale``, other bit widths, another input size)
are refused with the option named. A bare state dict has no options: everything that shapes
the weights is read off their names, and the bit widths are given by the caller.

The state dict is translated name by name (:func:`release_key`), with the layout changes
(channels-last position embeddings, Q/K/V biases stacked into one tensor, per-channel
parameters stored as ``(1, C, 1, 1)`` in the release) checked shape by shape. The result is a
weights-only bhvit checkpoint (``best.json`` + safetensors) that records where it came from
and the release's evaluation transform (:data:`RELEASE_EVAL`).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, atomic_save_safetensors, atomic_write_json, FORMAT, FORMAT_VERSION
from .errors import ConfigError
from .files import open_regular
from .model import BHViT, BHViTConfig, get_config

__all__ = [
    "RELEASE_EVAL",
    "ReleaseOptions",
    "read_release_file",
    "release_options",
    "release_config",
    "release_key",
    "convert_state_dict",
    "convert_release",
]

# A release checkpoint holds the model, AdamW's two moments and small extras: about 170 MB
# for BHViT-Tiny and 280 MB for BHViT-Small. Larger files are refused before they are read.
MAX_RELEASE_BYTES = 4 << 30

# The release's evaluation transform (DeiT's ``build_transform``): the shorter side resized
# to int(256 / 224 * input_size) with bicubic interpolation, the centre input_size x
# input_size crop, and timm's fixed ImageNet mean and std (not statistics of the data).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def RELEASE_EVAL(input_size: int = 224) -> Dict[str, Any]:
    """The ``data`` entry of a converted checkpoint: the release's evaluation transform."""
    return {
        "name": "imagefolder",  # ImageNet-1k's val/ in class folders, as the release reads it
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize": int((256 / 224) * input_size),
        "interpolation": "bicubic",
    }


# --- reading the file ----------------------------------------------------------------
def _open_regular(path: Path, limit: int):
    """``path`` opened without blocking (:func:`bhvit.files.open_regular`: a FIFO or device is
    refused), if it is a regular file of at most ``limit`` bytes; and its size."""
    try:
        f = open_regular(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e}).") from None
    size = os.fstat(f.fileno()).st_size
    if size > limit:
        f.close()
        raise CheckpointError(
            f"{path}: {size:,} bytes, more than a BHViT release checkpoint holds ({limit:,} at most)."
        )
    return f, size


def read_release_file(path: Union[str, Path], limit: int = MAX_RELEASE_BYTES) -> Tuple[Any, str, int]:
    """The unpickled content of a release checkpoint, its SHA-256 and its size.

    PyTorch's weights-only unpickler builds tensors and plain containers only, plus
    ``argparse.Namespace``; a file that names any other class or function is refused
    without running it."""
    import pickle

    path = Path(path)
    f, size = _open_regular(path, limit)
    with f:
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        f.seek(0)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
            raise CheckpointError(
                f"{path}: refused: the file holds more than tensors, plain containers and "
                f"argparse.Namespace ({why.strip()}); bhvit does not unpickle other objects."
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint bhvit can read ({e.__class__.__name__}: {str(e)[:300]})."
            ) from None
    return obj, digest.hexdigest(), size


# --- options ---------------------------------------------------------------------------
# main_new.py's defaults for the options that shape the model (an older file may lack some).
_DEFAULTS = dict(
    replace_ln_bn=False,
    some_fp=False,
    shift3=False,
    shift5=False,
    gsb=False,
    recu=False,
    disable_layerscale=False,
    enable_cls_token=False,
    weight_bits=32,
    input_bits=32,
    input_size=224,
    nb_classes=None,
    model="",
)
_BITS = (1, 32)


class ReleaseOptions(dict):
    """The release options that shape the model, by their ``main_new.py`` names."""

    @property
    def flag_names(self) -> List[str]:
        return [k for k in _DEFAULTS if k not in ("nb_classes", "model")]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-") if name != "regularization_loss" else "--regularization_loss"


def release_options(args: Any) -> ReleaseOptions:
    """The model-shaping options of a checkpoint's ``args`` (a Namespace or a dict), with
    main_new.py's defaults for missing ones, checked for type."""
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    opts = ReleaseOptions()
    for k, default in _DEFAULTS.items():
        v = d.get(k, default)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise CheckpointError(f"release option {_flag(k)} must be true or false, got {v!r}.")
        if k in ("weight_bits", "input_bits", "input_size") and (isinstance(v, bool) or not isinstance(v, int)):
            raise CheckpointError(f"release option {_flag(k)} must be an integer, got {v!r}.")
        opts[k] = v
    if opts["nb_classes"] is not None and (
        isinstance(opts["nb_classes"], bool) or not isinstance(opts["nb_classes"], int) or opts["nb_classes"] < 1
    ):
        raise CheckpointError(f"release option nb_classes must be a positive integer, got {opts['nb_classes']!r}.")
    if not isinstance(opts["model"], str):
        opts["model"] = str(opts["model"])
    return opts


def options_from_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What the names of a release state dict say about its options (all but the bit widths
    of the weights, which leave no trace in the names)."""
    keys = list(sd)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(k) for k in keys)

    opts = dict(
        replace_ln_bn=has(r"\.running_mean$"),
        some_fp=has(r"^vit\.encoder\.patch_embed\d\.proj\.weight$") and not has(r"^vit\.encoder\.patch_embed\d\.move$"),
        shift3=has(r"\.layerscale_h3\."),
        shift5=has(r"\.layerscale_h5\."),
        gsb=has(r"\.att_prob_clip"),
        disable_layerscale=not has(r"\.output\.layerscale\."),
    )
    if has(r"\.att_prob_quantizer\.") or opts["gsb"]:
        opts["input_bits"] = 1
    elif has(r"^vit\.encoder\.layerB\."):
        opts["input_bits"] = 32
    w = sd.get("classifier.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        opts["nb_classes"] = int(w.shape[0])
    return opts


def _depths(sd: Dict[str, torch.Tensor]) -> Tuple[int, int, int, int]:
    """Blocks per stage: layerA/layerB indices, split into stages by their channel counts."""
    stages: Dict[int, int] = {}
    for part, probe in (("A", "layernorm_before.weight"), ("B", "layernorm_before.weight")):
        i = 0
        while f"vit.encoder.layer{part}.{i}.{probe}" in sd:
            width = int(sd[f"vit.encoder.layer{part}.{i}.{probe}"].numel())
            stages[width] = stages.get(width, 0) + 1
            i += 1
    widths = sorted(stages)
    if len(widths) != 4:
        raise CheckpointError(
            f"the state dict's blocks have {len(widths)} distinct widths {widths}, not the four stages of a BHViT; "
            "not a checkpoint of the BHViT release."
        )
    return tuple(stages[w] for w in widths)


_RELEASE_MODELS = {(2, 2, 6, 2): ("bhvit_tiny", "BHViT_tiny"), (3, 4, 8, 4): ("bhvit_small", "BHViT")}


def refuse_unsupported(opts: Dict[str, Any]) -> None:
    """A one-line refusal for the first release option bhvit does not implement."""
    for flag, why in (
        ("gsb", "the GSB attention quantizer"),
        ("disable_layerscale", "BHViT without LayerScale"),
    ):
        if opts.get(flag):
            raise CheckpointError(f"release option {_flag(flag)} ({why}) is not implemented in bhvit.")
    for flag in ("weight_bits", "input_bits"):
        if opts.get(flag) not in _BITS:
            raise CheckpointError(
                f"release option {_flag(flag)} {opts.get(flag)} is not implemented in bhvit "
                "(1: binary, 32: full precision)."
            )
    if opts.get("input_size", 224) != 224:
        raise CheckpointError(
            f"release option --input-size {opts['input_size']}: the release's downsampling layers are "
            "built for 224x224 inputs; bhvit converts only those."
        )


def release_config(opts: Dict[str, Any], depths: Tuple[int, ...], num_classes: int) -> BHViTConfig:
    """The bhvit config of a release model, or a one-line refusal naming the option."""
    if depths not in _RELEASE_MODELS:
        raise CheckpointError(
            f"blocks per stage {list(depths)} are neither BHViT-Tiny's [2, 2, 6, 2] nor BHViT-Small's "
            "[3, 4, 8, 4], the release's two model configs."
        )
    name = _RELEASE_MODELS[depths][0]
    refuse_unsupported(opts)
    sizes = tuple(k for k, on in ((1, opts.get("shift3")), (2, opts.get("shift5"))) if on)
    wb, ab = opts["weight_bits"] == 1, opts["input_bits"] == 1
    return get_config(
        name,
        num_classes=num_classes,
        norm="bn" if opts.get("replace_ln_bn") else "ln",
        fp_downsample=bool(opts.get("some_fp")),
        shift=bool(sizes),
        shift_sizes=sizes or (1, 2),
        binary=wb and ab,
        binary_weights=wb,
        binary_acts=ab,
    )


# --- names -----------------------------------------------------------------------------
# bhvit's leaf names in a module of each kind -> the release's.
_RPRELU = {"move1": "move1", "move2": "move2", "slope": "prelu.weight"}
_SCALE = {"scale": "alpha", "bias": "move"}


def _block_key(rest: str, msmha: bool, sizes: Tuple[int, ...]) -> Optional[str]:
    """A block's tensor, by its name inside ``stages.i.blocks.j.``, in the release's layer."""
    for b, r in (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after.")):
        if rest.startswith(b):  # norms keep their leaf names
            return r + rest[len(b) :]
    m = re.fullmatch(r"mlp\.(up|down)\.(op\.weight|op\.input_bias|norm\..+|act\..+)", rest)
    if m:
        part = "intermediate" if m.group(1) == "up" else "output"
        return f"{part}.{_residual_part(m.group(2), 'dense.weight', 'move')}"
    m = re.fullmatch(r"mlp\.layer_scale\.(scale|bias)", rest)
    if m:
        return "output.layerscale." + _SCALE[m.group(1)]
    m = re.fullmatch(r"shift\.scales\.(\d+)\.(scale|bias)", rest)
    if m:
        k = int(m.group(1))
        if k >= 3 * len(sizes):
            return None
        axis, size = ("h", "w", "ch")[k % 3], sizes[k // 3]
        return f"layerscale_{axis}{2 * size + 1}.{_SCALE[m.group(2)]}"
    if not rest.startswith("mixer."):
        return None
    rest = rest[len("mixer.") :]
    return _msmha_key(rest) if msmha else _msgdc_key(rest)


def _residual_part(rest: str, weight: str, move: str, suffix: str = "") -> str:
    """A layer-wise residual's tensor (``op.weight``, ``op.input_bias``, ``norm.*``, ``act.*``)."""
    if rest == "op.weight":
        return weight
    if rest == "op.input_bias":
        return move
    if rest.startswith("norm."):
        return f"norm{suffix}." + rest[len("norm.") :]
    return f"rprelu{suffix}." + _RPRELU[rest[len("act.") :]]


def _msgdc_key(rest: str) -> Optional[str]:
    if rest == "input_bias":
        return "GC.move.bias"
    m = re.fullmatch(r"convs\.(\d+)\.(weight|bias)", rest)
    if m:
        return f"GC.cov{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.fullmatch(r"acts\.(\d+)\.(.+)", rest)
    if m:
        return f"GC.act{int(m.group(1)) + 1}.{_RPRELU[m.group(2)]}"
    if rest.startswith("norm."):
        return "GC." + rest
    return None


_QKV = {"q": "query", "k": "key", "v": "value"}


def _msmha_key(rest: str) -> Optional[str]:
    a = "attention.attention."
    m = re.fullmatch(r"([qkv])_proj\.(.+)", rest)
    if m:
        x = m.group(1)
        return a + _residual_part(m.group(2), f"{_QKV[x]}.weight", f"move{x}", suffix=x)
    m = re.fullmatch(r"out_proj\.(.+)", rest)
    if m:
        return "attention.output." + _residual_part(m.group(1), "dense.weight", "move")
    if rest.startswith("layer_scale."):
        return "attention.output.layerscale." + _SCALE[rest[len("layer_scale.") :]]
    fixed = {
        "pool_mix": "token_FA.a1",
        "out_mix": "parm",
        "core.qd.step": "att_prob_quantizer.alpha",
        "core.qd.zero_point": "att_prob_quantizer.zero_point",
        "core.qd.initialized": "att_prob_quantizer.init_state",
    }
    if rest in fixed:
        return a + fixed[rest]
    for b, r in (("token_norm.", "token_FA.norm."), ("ctx_norm.", "norm_context.")):
        if rest.startswith(b):
            return a + r + rest[len(b) :]
    if rest.startswith("ctx_act."):
        return a + "rprelu_context." + _RPRELU[rest[len("ctx_act.") :]]
    return None


def release_key(key: str, cfg: BHViTConfig) -> Optional[Union[str, Tuple[str, ...]]]:
    """The release's name of bhvit's tensor ``key`` (three names for the stacked Q/K/V
    biases), or None if the release has no such tensor."""
    if key == "stem.pos_embed":
        return "vit.embeddings.position_embeddings"
    for b, r in (("stem.", "vit.embeddings.patch_embeddings."), ("norm.", "vit.layernorm."), ("head.", "classifier.")):
        if key.startswith(b):
            return r + key[len(b) :]
    m = re.fullmatch(r"stages\.(\d)\.downsample\.(.+)", key)
    if m:
        p, rest = f"vit.encoder.patch_embed{m.group(1)}.", m.group(2)
        table = {
            "pos_embed": "position_embeddings",
            "reduce.op.conv.weight": "proj.weight",
            "reduce.op.conv.input_bias": "move",
            "conv.conv.weight": "proj.weight",
        }
        if rest in table:
            return p + table[rest]
        for b, r in (("norm0.", "norm0."), ("reduce.norm.", "norm."), ("norm.", "norm.")):
            if rest.startswith(b):
                return p + r + rest[len(b) :]
        if rest.startswith("reduce.act."):
            return p + "rprelu." + _RPRELU[rest[len("reduce.act.") :]]
        return None
    m = re.fullmatch(r"stages\.(\d)\.blocks\.(\d+)\.(.+)", key)
    if not m:
        return None
    s, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    layer = sum(cfg.depths[:s]) + j
    n_a = cfg.depths[0] + cfg.depths[1]
    prefix = f"vit.encoder.layerA.{layer}." if layer < n_a else f"vit.encoder.layerB.{layer - n_a}."
    if rest == "mixer.qkv_bias":
        return tuple(prefix + f"attention.attention.move{x}2" for x in "qkv")
    sizes = tuple(cfg.shift_sizes) if cfg.shift else ()
    r = _block_key(rest, layer >= n_a, sizes)
    return None if r is None else prefix + r


def _release_shape(key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape the release stores bhvit's tensor ``key`` (of ``shape``) in."""
    if key == "stem.pos_embed":
        return (1, shape[3], shape[1], shape[2])
    if key.endswith("downsample.pos_embed"):
        return (1, shape[1] * shape[2], shape[3])
    if key.endswith(("mixer.input_bias", "reduce.op.conv.input_bias", "mixer.out_mix")):
        return (1, shape[0], 1, 1)
    if key.endswith("mixer.pool_mix"):
        return (1, 1, shape[0])
    return shape


def _to_bhvit(key: str, t: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    if key == "stem.pos_embed":
        return t.permute(0, 2, 3, 1).contiguous()
    return t.reshape(shape).contiguous()


def convert_state_dict(sd: Dict[str, torch.Tensor], cfg: BHViTConfig) -> Dict[str, torch.Tensor]:
    """bhvit's state dict of ``cfg`` from the release's ``sd``; every tensor of each must be
    used, with the shapes the layout change implies, or the first mismatch is named."""
    with torch.device("meta"):
        own = BHViT(cfg).state_dict()
    out, used = {}, set()
    for key, ref in own.items():
        names = release_key(key, cfg)
        if names is None:
            raise CheckpointError(f"bhvit tensor {key} has no counterpart in the release (a bhvit bug).")
        group = names if isinstance(names, tuple) else (names,)
        parts = []
        for name in group:
            if name not in sd:
                raise CheckpointError(
                    f"the release state dict has no {name} (needed for {key}); it does not fit the model "
                    f"its options describe ({_describe(cfg)})."
                )
            t = sd[name]
            want = tuple(ref.shape[1:]) if len(group) > 1 else _release_shape(key, tuple(ref.shape))
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(f"{name}: shape {got}, but {key} needs {want} ({_describe(cfg)}).")
            if t.dtype != ref.dtype and not (t.is_floating_point() and ref.is_floating_point()):
                raise CheckpointError(f"{name}: dtype {t.dtype}, but {key} is {ref.dtype}.")
            parts.append(t)
            used.add(name)
        t = torch.stack(parts) if len(parts) > 1 else _to_bhvit(key, parts[0], tuple(ref.shape))
        out[key] = t.to(ref.dtype)
    extra = [k for k in sd if k not in used]
    if extra:
        raise CheckpointError(
            f"the release state dict has {len(extra)} tensor(s) the model does not use, first {extra[0]}; "
            f"it does not fit the model its options describe ({_describe(cfg)})."
        )
    return out


def _describe(cfg: BHViTConfig) -> str:
    sizes = list(cfg.shift_sizes) if cfg.shift else []
    return (
        f"depths {list(cfg.depths)}, norm {cfg.norm}, fp_downsample {cfg.fp_downsample}, shift sizes {sizes}, "
        f"binary weights {cfg.quant.weights}, binary activations {cfg.quant.acts}, {cfg.num_classes} classes"
    )


# --- the whole conversion --------------------------------------------------------------
def _state_dict_of(obj: Any, path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Any], Optional[int]]:
    """(state dict, args or None, epoch or None) of what the file held."""
    args = epoch = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, args, epoch = obj["model"], obj.get("args"), obj.get("epoch")
    elif (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        sd = obj
    else:
        what = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: neither main_new.py's checkpoint (a dict with 'model' and 'args') nor a bare state dict "
            f"(found {what})."
        )
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: the state dict holds entries that are not named tensors.")
    if sd and all(k.startswith("module.") for k in sd):  # saved from the DDP wrapper
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if args is not None and not isinstance(args, (argparse.Namespace, dict)):
        raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, not the release's argparse.Namespace.")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        epoch = None
    return sd, args, epoch


def _jsonable(v: Any, depth: int = 0) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v[:1000] if isinstance(v, str) else v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (list, tuple)) and depth < 2:
        return [_jsonable(x, depth + 1) for x in v[:64]]
    return repr(v)[:200]


def _resolve_options(src: Path, args: Any, inferred: Dict[str, Any], weight_bits, input_bits) -> ReleaseOptions:
    """The release options of the model: the checkpoint's ``args`` (which the state dict's
    names must agree with), or for a bare state dict its names and the given bit widths."""
    given = {k: v for k, v in (("weight_bits", weight_bits), ("input_bits", input_bits)) if v is not None}
    for k, v in given.items():
        if v not in _BITS:
            raise ConfigError(f"--{k.replace('_', '-')} must be 1 or 32, got {v}.")
    if args is not None:
        opts = release_options(args)
        for k, v in given.items():
            if opts[k] != v:
                raise ConfigError(
                    f"--{k.replace('_', '-')} {v} contradicts the checkpoint's args ({_flag(k)} {opts[k]})."
                )
        refuse_unsupported(opts)
        # what the names say must agree with the options (a clearer message than a missing key)
        for k, v in inferred.items():
            if k != "nb_classes" and opts.get(k) != v:
                raise CheckpointError(
                    f"{src}: the weights were saved by a model with {_flag(k)} {_optval(v)}, but the checkpoint's "
                    f"args say {_optval(opts.get(k))}."
                )
        return opts
    if "weight_bits" not in given:
        raise ConfigError(
            f"{src}: a bare state dict does not record the weights' bit width; pass --weight-bits 1 "
            "(binary) or 32 (full precision), as the model was trained."
        )
    if "input_bits" in given and inferred.get("input_bits", given["input_bits"]) != given["input_bits"]:
        raise ConfigError(
            f"--input-bits {given['input_bits']} contradicts the state dict, whose attention "
            f"{'has' if inferred['input_bits'] == 1 else 'has no'} activation quantizer."
        )
    opts = ReleaseOptions(_DEFAULTS)
    opts.update(inferred)
    opts.update(given)
    return opts


def convert_release(
    src: Union[str, Path],
    out: Union[str, Path],
    weight_bits: Optional[int] = None,
    input_bits: Optional[int] = None,
    log: Callable[[str], None] = lambda s: None,
) -> Dict[str, Any]:
    """Convert the release checkpoint ``src`` into the bhvit checkpoint directory ``out``
    (``best.json`` + ``release.safetensors``); returns a summary.

    ``weight_bits`` / ``input_bits`` (1 or 32) are needed for a bare state dict, which has no
    ``args``; with ``args`` they must agree with it."""
    src, out = Path(src), Path(out)
    if (out / "best.json").exists() or (out / "last.json").exists():
        raise CheckpointError(f"{out} already holds a checkpoint; choose another output directory.")
    obj, sha, size = read_release_file(src)
    sd, args, epoch = _state_dict_of(obj, src)
    inferred = options_from_keys(sd)
    opts = _resolve_options(src, args, inferred, weight_bits, input_bits)
    classes = inferred.get("nb_classes")
    if classes is None:
        raise CheckpointError(f"{src}: the state dict has no classifier.weight; not a BHViT release checkpoint.")
    if opts.get("nb_classes") not in (None, classes):
        raise CheckpointError(
            f"{src}: the checkpoint's args say {opts['nb_classes']} classes, its classifier has {classes}."
        )
    depths = _depths(sd)
    cfg = release_config(opts, depths, classes)
    name = _RELEASE_MODELS[depths][0]
    config_name = Path(opts.get("model") or "").name
    if config_name and config_name.lower() != _RELEASE_MODELS[depths][1].lower():
        # the config file lives on the machine that trained; the weights decide
        log(f"note: the checkpoint's args name the model config {opts['model']!r}; its weights are {name}'s")
    state = convert_state_dict(sd, cfg)
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{src}: tensor {release_key(k, cfg)} holds NaN or infinite values.")
    model = BHViT(cfg)
    model.load_state_dict(state)  # the names and shapes were checked above
    source = {
        "kind": "BHViT release (main_new.py)" if args is not None else "BHViT release state dict",
        "file": src.name,
        "bytes": size,
        "sha256": sha,
        "model_config": config_name or None,
        "options": {k: opts[k] for k in opts.flag_names},
    }
    if epoch is not None:
        source["epoch"] = epoch
    if args is not None:
        raw = vars(args) if isinstance(args, argparse.Namespace) else args
        source["args"] = {str(k)[:100]: _jsonable(v) for k, v in list(raw.items())[:500]}
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weights": "release.safetensors",
        "weights_only": True,
        "model": name,
        "model_config": cfg.to_dict(),
        "data": RELEASE_EVAL(opts["input_size"]),
        "source": source,
    }
    out.mkdir(parents=True, exist_ok=True)
    doc["weights_sha256"] = atomic_save_safetensors(model.state_dict(), out / doc["weights"], {"format": FORMAT})
    atomic_write_json(doc, out / "best.json")
    log(f"converted {src.name} ({name}, {_describe(cfg)}) -> {out / 'best.json'}")
    return {
        "out": str(out),
        "model": name,
        "num_classes": classes,
        "binary_weights": cfg.quant.weights,
        "binary_acts": cfg.quant.acts,
        "norm": cfg.norm,
        "fp_downsample": cfg.fp_downsample,
        "shift_sizes": list(cfg.shift_sizes) if cfg.shift else [],
        "tensors": len(state),
        "source_sha256": sha,
    }


def _optval(v: Any) -> str:
    return "on" if v is True else "off" if v is False else str(v)

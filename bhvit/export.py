"""Export a trained BHViT to a bit-packed file for the XNOR/popcount runtime.

An export is a directory with two files:

* ``model.safetensors``: every binary layer's weight signs packed 64 per ``uint64``
  word along the reduction dim (bit 1 = +1), its per-output-channel affine (the weight
  scale ``alpha`` and, where BatchNorm follows, the folded BatchNorm), and the
  full-precision rest (stem, position embeddings, norms folded to affines, RPReLU,
  LayerScale, QD step and zero point, head) as float32 (float16 optional).
* ``manifest.json``: format name and version, the model config, data normalisation
  and class names, the name/dtype/shape of every tensor, the SHA-256 and size of the
  safetensors file, and a size breakdown.

``bhvit.runtime.load`` validates all of it before running anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from .blocks import MSGDC, MSMHA, BinaryDownsample, FPDownsample
from .checkpoint import atomic_save_safetensors, atomic_write_json
from .rundir import RunLock, remove_stale_temp
from .layers import BinaryConv2d, ChannelBatchNorm, LayerwiseResidual
from .model import BHViT

from .runtime.format import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    config_problem,
    data_problem,
    manifest_digest,
    safe_class_name,
)
from .errors import ConfigError

__all__ = ["export_model", "EXPORT_FORMAT", "EXPORT_VERSION", "pack_sign_bits"]


def pack_sign_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` along the last dim, 64 per word, little-endian bits (as int64 words)."""
    bits = (x >= 0).to(torch.uint8).cpu().numpy()
    k = bits.shape[-1]
    words = -(-k // 64)
    padded = np.zeros(bits.shape[:-1] + (words * 64,), dtype=np.uint8)
    padded[..., :k] = bits
    packed = np.packbits(padded.reshape(bits.shape[:-1] + (words, 8, 8)), axis=-1, bitorder="little")
    # packed: (..., words, 8 bytes) little-endian -> one uint64 per word
    out = packed.reshape(bits.shape[:-1] + (words * 8,)).view("<u8").reshape(bits.shape[:-1] + (words,))
    return torch.from_numpy(out.astype(np.uint64).view(np.int64).copy())


class _Writer:
    def __init__(self, float16: bool):
        self.tensors: Dict[str, torch.Tensor] = {}
        self.float16 = float16
        self.binary_weights = 0
        self.float_params = 0
        self.f16_overflow = set()  # finite float32 values too large for float16

    def f(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().float().cpu().contiguous()
        self.float_params += t.numel()
        if self.float16 and bool(torch.isfinite(t).all()) and not bool(torch.isfinite(t.half()).all()):
            self.f16_overflow.add(name)
        self.tensors[name] = t.half() if self.float16 else t

    def packed(self, name: str, t: torch.Tensor, n_weights: int) -> None:
        self.tensors[name] = t
        self.binary_weights += n_weights


def _bn_affine(norm: ChannelBatchNorm):
    s = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return s, norm.bias - norm.running_mean * s


def _norm(w: _Writer, prefix: str, norm: nn.Module, kinds: Dict[str, str]) -> None:
    if isinstance(norm, ChannelBatchNorm):
        s, t = _bn_affine(norm)
        w.f(prefix + ".scale", s)
        w.f(prefix + ".shift", t)
        kinds[prefix] = "affine"
    elif isinstance(norm, nn.LayerNorm):
        w.f(prefix + ".weight", norm.weight)
        w.f(prefix + ".bias", norm.bias)
        kinds[prefix] = f"ln:{norm.eps}"
    else:
        raise ConfigError(f"cannot export norm {type(norm).__name__} at {prefix}.")


def _binary(
    w: _Writer, prefix: str, layer: nn.Module, kinds: Dict[str, str], follow: Optional[nn.Module] = None
) -> None:
    """Packed signs + per-channel affine ``dot * scale + shift`` (+ folded BN ``follow``)."""
    if not getattr(layer, "is_binary", False):
        raise ConfigError(
            f"{prefix}: only fully binary layers (binary weights and activations) can be "
            "exported to the XNOR runtime; this model has a full-precision or "
            "weight-only binary layer here."
        )
    alpha, sign = layer.kernel_quantizer.scale_and_sign(layer.weight)
    if isinstance(layer, BinaryConv2d):
        sign = sign.permute(0, 2, 3, 1)  # (out, kh, kw, cin/groups): reduction innermost
    w.packed(prefix + ".wbits", pack_sign_bits(sign), layer.weight.numel())
    scale = alpha.clone()
    shift = layer.bias.detach().clone() if layer.bias is not None else torch.zeros_like(alpha)
    if isinstance(follow, ChannelBatchNorm):
        s, t = _bn_affine(follow)
        scale, shift = scale * s, shift * s + t
        kinds[prefix] = "binary+bn"
    else:
        kinds[prefix] = "binary"
    w.f(prefix + ".scale", scale)
    w.f(prefix + ".shift", shift)
    if getattr(layer, "input_bias", None) is not None:
        w.f(prefix + ".input_bias", layer.input_bias)


def _rprelu(w: _Writer, prefix: str, act: nn.Module) -> None:
    w.f(prefix + ".move1", act.move1)
    w.f(prefix + ".slope", act.slope)
    w.f(prefix + ".move2", act.move2)


def _residual(w: _Writer, prefix: str, r: LayerwiseResidual, kinds: Dict[str, str]) -> None:
    op = r.op.conv if hasattr(r.op, "conv") else r.op
    if isinstance(r.norm, ChannelBatchNorm):
        _binary(w, prefix + ".op", op, kinds, follow=r.norm)
    else:
        _binary(w, prefix + ".op", op, kinds)
        _norm(w, prefix + ".norm", r.norm, kinds)
    _rprelu(w, prefix + ".act", r.act)


def _layerscale(w: _Writer, prefix: str, ls: nn.Module) -> None:
    w.f(prefix + ".scale", ls.scale)
    w.f(prefix + ".bias", ls.bias)


def _collect(model: BHViT, float16: bool):
    w = _Writer(float16)
    kinds: Dict[str, str] = {}
    st = model.stem
    # stem conv as a (k*k*cin, dim) matrix over non-overlapping patches, (kh, kw, cin) order
    w.f("stem.proj.weight", st.proj.weight.permute(0, 2, 3, 1).reshape(st.proj.weight.shape[0], -1))
    w.f("stem.proj.bias", st.proj.bias)
    _norm(w, "stem.norm", st.norm, kinds)
    w.f("stem.pos_embed", st.pos_embed[0])
    for i, stage in enumerate(model.stages):
        p = f"stages.{i}"
        d = stage.downsample
        if isinstance(d, BinaryDownsample):
            _norm(w, p + ".downsample.norm0", d.norm0, kinds)
            _residual(w, p + ".downsample.reduce", d.reduce, kinds)
            w.f(p + ".downsample.pos_embed", d.pos_embed[0])
        elif isinstance(d, FPDownsample):
            _norm(w, p + ".downsample.norm0", d.norm0, kinds)
            cw = d.conv.conv.weight
            w.f(p + ".downsample.conv.weight", cw.permute(0, 2, 3, 1).reshape(cw.shape[0], -1))
            _norm(w, p + ".downsample.norm", d.norm, kinds)
            w.f(p + ".downsample.pos_embed", d.pos_embed[0])
        for j, blk in enumerate(stage.blocks):
            b = f"{p}.blocks.{j}"
            _norm(w, b + ".norm1", blk.norm1, kinds)
            _norm(w, b + ".norm2", blk.norm2, kinds)
            mx = blk.mixer
            if isinstance(mx, MSGDC):
                w.f(b + ".mixer.input_bias", mx.input_bias)
                for k, (conv, act) in enumerate(zip(mx.convs, mx.acts)):
                    _binary(w, f"{b}.mixer.convs.{k}", conv, kinds)
                    _rprelu(w, f"{b}.mixer.acts.{k}", act)
                _norm(w, b + ".mixer.norm", mx.norm, kinds)
            elif isinstance(mx, MSMHA):
                if mx.window is not None:
                    w.f(b + ".mixer.pool_mix", mx.pool_mix)
                    w.f(b + ".mixer.out_mix", mx.out_mix)
                w.f(b + ".mixer.token_norm.weight", mx.token_norm.weight)
                w.f(b + ".mixer.token_norm.bias", mx.token_norm.bias)
                for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    _residual(w, f"{b}.mixer.{name}", getattr(mx, name), kinds)
                w.f(b + ".mixer.qkv_bias", mx.qkv_bias)
                core = mx.core
                if core.act_quantizer is None or core.qd is None:
                    raise ConfigError(f"{b}: attention without binary activations cannot be exported.")
                w.f(b + ".mixer.core.qd.step", core.qd.step)
                w.f(b + ".mixer.core.qd.zero_point", core.qd.zero_point)
                _norm(w, b + ".mixer.ctx_norm", mx.ctx_norm, kinds)
                _rprelu(w, b + ".mixer.ctx_act", mx.ctx_act)
                _layerscale(w, b + ".mixer.layer_scale", mx.layer_scale)
            else:
                raise ConfigError(f"{b}: cannot export mixer {type(mx).__name__}.")
            _residual(w, b + ".mlp.up", blk.mlp.up, kinds)
            _residual(w, b + ".mlp.down", blk.mlp.down, kinds)
            _layerscale(w, b + ".mlp.layer_scale", blk.mlp.layer_scale)
            if blk.shift is not None:
                for k, ls in enumerate(blk.shift.scales):
                    _layerscale(w, f"{b}.shift.scales.{k}", ls)
    _norm(w, "norm", model.norm, kinds)
    w.f("head.weight", model.head.weight)
    w.f("head.bias", model.head.bias)
    return w, kinds


def export_model(model: BHViT, out_dir: Union[str, Path], data: Optional[Dict] = None, float16: bool = False) -> Dict:
    """Write ``out_dir/model.safetensors`` and ``out_dir/manifest.json``; return the manifest.

    ``data``: what the runtime needs to prepare inputs, ``{"mean": [...], "std": [...],
    "classes": [...]}`` (a checkpoint's ``data`` entry, as ``bhvit export`` passes it);
    ``bhvit predict`` refuses an export without mean and std.
    """
    out = Path(out_dir)
    data = _checked_export_inputs(model, out, data)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            w, kinds = _collect(model, float16)
    finally:
        model.train(was_training)
    _check_tensors(w, out)
    # one export at a time per directory (two at once could pair one's manifest with the
    # other's weights); a killed export's temporary files are removed
    with RunLock(out):
        remove_stale_temp(out, EXPORT_FILES)
        return _write(model, out, w, kinds, data, float16)


EXPORT_FILES = ("model.safetensors", "manifest.json")


def _write(model, out: Path, w, kinds, data, float16) -> Dict:
    wpath = out / "model.safetensors"
    written = {}
    digest = atomic_save_safetensors(w.tensors, wpath, info=written)  # of the bytes written
    packed_bytes = sum(t.numel() * 8 for k, t in w.tensors.items() if k.endswith(".wbits"))
    float_bytes = sum(t.numel() * t.element_size() for k, t in w.tensors.items() if not k.endswith(".wbits"))
    manifest = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "config": model.cfg.to_dict(),
        "data": data,
        "kinds": kinds,
        "float16": float16,
        "tensors": {
            k: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)} for k, t in w.tensors.items()
        },
        "file": {"name": wpath.name, "bytes": written["bytes"], "sha256": digest},
        "size": {
            "binary_weights": w.binary_weights,
            "packed_bytes": packed_bytes,
            "float_values": w.float_params,
            "float_bytes": float_bytes,
            "file_bytes": written["bytes"],
            "float32_checkpoint_bytes": 4 * sum(p.numel() for p in model.parameters()),
        },
    }
    manifest = json.loads(json.dumps(manifest))  # as it reads back (tuples become lists)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_json(manifest, out / "manifest.json")
    return manifest


def _checked_export_inputs(model, out: Path, data) -> Dict:
    """What bhvit.runtime.load would refuse is not written: the runtime's checks of the model
    and ``data``, before any file. Returns ``data`` as it will read back from JSON."""
    if not isinstance(model, BHViT):
        raise ConfigError(f"export_model needs a bhvit BHViT model, got {type(model).__name__}.")
    if model.cfg.qd_levels < 1:
        raise ConfigError("export needs qd_levels >= 1.")
    q = model.cfg.quant
    if not (q.weights and q.acts):
        raise ConfigError(
            "only fully binary models can be exported to the XNOR runtime; this one has "
            f"binary weights {q.weights}, binary activations {q.acts} (binary / "
            "binary_weights / binary_acts in its config). Export the binary student."
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a directory for the export.")
    cfg = json.loads(json.dumps(model.cfg.to_dict()))
    problem = config_problem(cfg)
    if problem:
        raise ConfigError(f"cannot export to {out}: the runtime does not accept this model ({problem}).")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"cannot export to {out}: data must be a dict (mean, std, classes), got {type(data).__name__}."
        )
    data = dict(data or {})
    if isinstance(data.get("classes"), list):  # names as the runtime prints them (no control characters)
        data["classes"] = [safe_class_name(c) if isinstance(c, str) else c for c in data["classes"]]
    try:
        data = json.loads(json.dumps(data, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot export to {out}: data is not JSON-serialisable ({e}).") from None
    problem = data_problem(data, cfg)
    if problem:
        raise ConfigError(f"cannot export to {out}: {problem}.")
    return data


def _check_tensors(w, out: Path) -> None:
    """No NaN or infinite float tensor and no zero QD step (the runtime refuses both)."""
    for name, t in w.tensors.items():
        if name.endswith(".wbits"):
            continue
        if not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            why = (
                " (they overflow float16, which holds up to 65504: export without float16)"
                if name in w.f16_overflow
                else ""
            )
            raise ConfigError(
                f"cannot export to {out}: {name} has {n_bad} NaN or infinite value(s){why}; "
                "the runtime refuses them (did training diverge?)."
            )
        if name.endswith(".core.qd.step") and not bool(t.all()):
            raise ConfigError(
                f"cannot export to {out}: {name} (the QD step) has a zero value; the QD levels divide by it."
            )

"""Complexity accounting: parameters, BOPs, FLOPs, OPs and model size in bits.

Convention (the one used by Bi-Real, ReActNet and BHViT):

* A multiply-accumulate whose two operands are both 1-bit is a **BOP** (it runs as
  XNOR/AND + popcount). Binary convolutions and linears with binarized weights and
  activations count here, and so do the attention matmuls of a binary model:
  ``sign(Q) sign(K)^T`` is one BOP per MAC, and ``A_q sign(V)`` with Quantization
  Decomposition is ``levels`` BOPs per MAC (one AND/popcount product per binary plane).
* Every other multiply-accumulate of a convolution, linear or attention matmul is a
  **FLOP** (the stem conv, the classifier, full-precision downsampling, and every
  layer of a full-precision model). Element-wise work (norms, activations, shifts,
  pooling, softmax) is not counted, as in the paper.
* ``OPs = BOPs / 64 + FLOPs``: a 64-bit CPU word does 64 binary MACs per instruction.
* Size: weights of binarized kernels at 1 bit, every other parameter at 32 bits
  (BatchNorm running statistics are not parameters: at deployment they fold into
  per-channel affines).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConfigError
from .blocks import AttentionCore
from .layers import binary_layers

__all__ = ["complexity", "format_complexity", "summary", "format_summary"]


class Complexity(dict):
    """The counts of :func:`complexity` (a dict); printed, a one-line summary (the
    per-module counts stay in ``["per_module"]``)."""

    def __repr__(self) -> str:
        return (
            f"Complexity(params={self['params']:,}, binary_params={self['binary_params']:,}, "
            f"bops={self['bops'] / 1e6:.2f}M, flops={self['flops'] / 1e6:.2f}M, ops={self['ops'] / 1e6:.2f}M, "
            f"size={self['size_bytes'] / 1e6:.3f}MB, input={'x'.join(map(str, self['input_size']))})"
        )

    __str__ = __repr__


def complexity(model: nn.Module, input_size: Optional[Union[int, Sequence[int]]] = None) -> Dict[str, float]:
    """Count parameters, BOPs, FLOPs, OPs and size of ``model`` for one input.

    ``input_size`` is an image side, a ``(C, H, W)`` or a ``(B, C, H, W)`` shape;
    default: the model's own ``(1, in_chans, img_size, img_size)``. MACs are per batch. A
    BHViT's image size is fixed by its config (position embeddings, windows): for one, only
    the batch may differ; build the model with ``img_size=`` to count another size.
    """
    input_size = _input_shape(model, input_size)
    counts, per_module = _count_macs(model, input_size)
    params = sum(p.numel() for p in model.parameters())
    binary_params = sum(layer.weight.numel() for layer in binary_layers(model))
    fp_params = params - binary_params
    return Complexity(
        {
            "params": params,
            "binary_params": binary_params,
            "fp_params": fp_params,
            "bops": counts["bops"],
            "flops": counts["flops"],
            "binary_macs": counts["binary_macs"],
            "attn_macs": counts["attn_macs"],
            "ops": counts["bops"] / 64 + counts["flops"],
            "size_bytes": binary_params / 8 + fp_params * 4,
            "fp32_size_bytes": params * 4,
            "input_size": input_size,
            "per_module": per_module,
        }
    )


def _input_shape(model: nn.Module, input_size) -> tuple:
    """``complexity``'s input_size as a checked (B, C, H, W)."""
    cfg = getattr(model, "cfg", None)
    if input_size is None:
        if cfg is None:
            raise ConfigError("complexity: input_size is required for a model without .cfg.")
        input_size = (1, cfg.in_chans, cfg.img_size, cfg.img_size)
    elif isinstance(input_size, int):
        if cfg is None:
            raise ConfigError("complexity: an int input_size needs a BHViT model (for in_chans).")
        input_size = (1, cfg.in_chans, input_size, input_size)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) == 3:
        input_size = (1,) + input_size
    if len(input_size) != 4:
        raise ConfigError(f"complexity: input_size must be an int, (C, H, W) or (B, C, H, W), got {input_size}.")
    if cfg is not None and input_size[1:] != (cfg.in_chans, cfg.img_size, cfg.img_size):
        raise ConfigError(
            f"complexity: this model takes {cfg.in_chans}x{cfg.img_size}x{cfg.img_size} images, "
            f"got input_size {input_size}; build it with img_size={input_size[-1]} to count "
            "that size."
        )
    return input_size


def _count_macs(model: nn.Module, input_size: tuple):
    """BOPs, FLOPs, binary and attention MACs of one forward pass at ``input_size``, in all
    and per module, counted by forward hooks on the convolutions, linears and attention cores."""
    counts = {"bops": 0, "flops": 0, "binary_macs": 0, "attn_macs": 0}
    per_module: Dict[str, Dict[str, int]] = {}

    def add(name, key, n):
        counts[key] += n
        per_module.setdefault(name, {"bops": 0, "flops": 0})
        if key in ("bops", "flops"):
            per_module[name][key] += n

    def layer_hook(name):
        def hook(m, inputs, output):
            per_out = m.weight[0].numel()  # in_features, or in/groups * kh * kw
            macs = output.numel() * per_out
            if getattr(m, "is_binary", False):
                add(name, "bops", macs)
                counts["binary_macs"] += macs
            else:
                add(name, "flops", macs)

        return hook

    def attn_hook(name):
        def hook(m, inputs, output):
            q, k, _ = inputs
            B, N, C = q.shape
            macs = B * N * k.shape[1] * C  # per matmul: QK^T and AV have the same count
            counts["attn_macs"] += 2 * macs
            if m.acts_binary:
                levels = m.qd.levels if m.qd is not None else None
                add(name, "bops", macs)  # sign(Q) sign(K)^T
                if levels is None:  # context matmul with a float attention matrix
                    add(name, "flops", macs)
                else:
                    add(name, "bops", levels * macs)
            else:
                add(name, "flops", 2 * macs)

        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(layer_hook(name)))
        elif isinstance(m, AttentionCore):
            handles.append(m.register_forward_hook(attn_hook(name)))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(input_size, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts, per_module


def _group(name: str) -> str:
    """Top-level part of the model a parameter or layer belongs to."""
    parts = name.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        if parts[2] == "blocks" and len(parts) >= 4:
            return ".".join(parts[:4])
        return ".".join(parts[:3])
    return parts[0]


def summary(model: nn.Module, input_size=None) -> List[Dict]:
    """Larq-style per-part summary: binary and float parameters, memory in bits, BOPs, FLOPs.

    One row per stem, downsampling, block, final norm and head, plus a total row.
    """
    c = complexity(model, input_size)
    binary_names = set()
    for name, m in model.named_modules():
        if getattr(m, "weights_binary", False):
            binary_names.add(name + ".weight")
    rows: Dict[str, Dict] = {}
    for name, p in model.named_parameters():
        r = rows.setdefault(
            _group(name), {"part": _group(name), "binary_params": 0, "fp_params": 0, "bops": 0, "flops": 0}
        )
        r["binary_params" if name in binary_names else "fp_params"] += p.numel()
    for name, mac in c["per_module"].items():
        r = rows.setdefault(
            _group(name), {"part": _group(name), "binary_params": 0, "fp_params": 0, "bops": 0, "flops": 0}
        )
        r["bops"] += mac["bops"]
        r["flops"] += mac["flops"]
    out = list(rows.values())
    for r in out:
        r["memory_bits"] = r["binary_params"] + 32 * r["fp_params"]
    total = {
        "part": "total",
        **{k: sum(r[k] for r in out) for k in ("binary_params", "fp_params", "bops", "flops", "memory_bits")},
    }
    return out + [total]


def format_summary(rows: List[Dict]) -> str:
    head = (
        f"{'part':<22} {'binary params':>14} {'float params':>13} {'memory (KiB)':>13} "
        f"{'BOPs (M)':>10} {'FLOPs (M)':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["part"] == "total":
            lines.append("-" * len(head))
        lines.append(
            f"{r['part']:<22} {r['binary_params']:>14,} {r['fp_params']:>13,} "
            f"{r['memory_bits'] / 8 / 1024:>13.1f} {r['bops'] / 1e6:>10.2f} {r['flops'] / 1e6:>10.2f}"
        )
    return "\n".join(lines)


def format_complexity(name: str, c: Dict[str, float]) -> str:
    def g(x):
        return f"{x / 1e9:.3f} G" if x >= 1e8 or x == 0 else f"{x / 1e6:.2f} M"

    def mb(x):
        return f"{x / 1e6:.2f} MB"

    rows = [
        ("model", name),
        ("input", "x".join(str(s) for s in c["input_size"])),
        ("parameters", f"{c['params']:,}"),
        ("  binary (1-bit)", f"{c['binary_params']:,}"),
        ("  full precision", f"{c['fp_params']:,}"),
        ("BOPs (1-bit MACs)", g(c["bops"])),
        ("  binary conv/linear MACs", g(c["binary_macs"])),
        ("FLOPs (float MACs)", g(c["flops"])),
        ("attention matmul MACs", g(c["attn_macs"])),
        ("OPs = BOPs/64 + FLOPs", g(c["ops"])),
        ("size (1-bit binary weights)", mb(c["size_bytes"])),
        ("size (all float32)", mb(c["fp32_size_bytes"])),
        ("compression", f"{c['fp32_size_bytes'] / c['size_bytes']:.1f}x"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

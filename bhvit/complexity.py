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

from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .blocks import AttentionCore
from .layers import binary_layers

__all__ = ["complexity", "format_complexity"]


def complexity(model: nn.Module, input_size: Optional[Union[int, Sequence[int]]] = None) -> Dict[str, float]:
    """Count parameters, BOPs, FLOPs, OPs and size of ``model`` for one input.

    ``input_size`` is an image side, a ``(C, H, W)`` or a ``(B, C, H, W)`` shape;
    default: the model's own ``(1, in_chans, img_size, img_size)``. MACs are per batch.
    """
    cfg = getattr(model, "cfg", None)
    if input_size is None:
        if cfg is None:
            raise ValueError("complexity: input_size is required for a model without .cfg.")
        input_size = (1, cfg.in_chans, cfg.img_size, cfg.img_size)
    elif isinstance(input_size, int):
        if cfg is None:
            raise ValueError("complexity: an int input_size needs a BHViT model (for in_chans).")
        input_size = (1, cfg.in_chans, input_size, input_size)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) == 3:
        input_size = (1,) + input_size
    if len(input_size) != 4:
        raise ValueError(f"complexity: input_size must be an int, (C, H, W) or (B, C, H, W), got {input_size}.")

    counts = {"bops": 0, "flops": 0, "binary_macs": 0, "attn_macs": 0}

    def layer_hook(m, inputs, output):
        per_out = m.weight[0].numel()  # in_features, or in/groups * kh * kw
        macs = output.numel() * per_out
        if getattr(m, "is_binary", False):
            counts["bops"] += macs
            counts["binary_macs"] += macs
        else:
            counts["flops"] += macs

    def attn_hook(m, inputs, output):
        q, k, _ = inputs
        B, N, C = q.shape
        macs = B * N * k.shape[1] * C  # per matmul: QK^T and AV have the same count
        counts["attn_macs"] += 2 * macs
        if m.acts_binary:
            levels = m.qd.levels if m.qd is not None else None
            counts["bops"] += macs  # sign(Q) sign(K)^T
            if levels is None:  # context matmul with a float attention matrix
                counts["flops"] += macs
            else:
                counts["bops"] += levels * macs
        else:
            counts["flops"] += 2 * macs

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, AttentionCore):
            handles.append(m.register_forward_hook(attn_hook))
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

    params = sum(p.numel() for p in model.parameters())
    binary_params = sum(layer.weight.numel() for layer in binary_layers(model))
    fp_params = params - binary_params
    return {
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
    }


def format_complexity(name: str, c: Dict[str, float]) -> str:
    def g(x):
        return f"{x / 1e9:.3f} G"

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

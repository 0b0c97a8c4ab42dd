"""Quantization Decomposition (QD) of the attention matrix.

A single sign/threshold of a softmax output keeps only "attended or not" and loses
the relative importance of tokens. QD quantizes ``levels * A`` to ``levels + 1``
values with a learnable per-head step and zero point (LSQ-style)::

    q   = clamp(round(levels * A / step + zero_point), 0, levels)
    A_q = step * q

and, since ``q = sum_{s=1..levels} [q >= s]``, ``A_q @ sign(V)`` becomes
``step * sum_s A^s @ sign(V)``: ``levels`` binary (0/1) matrices, each multiplied with
the +-1 values by AND/popcount. BHViT uses ``levels = 3`` (2 bits, three planes).
``levels = 1`` is the single-plane (1-bit) attention of the ablation.

As in the BHViT release, ``A_q`` approximates ``levels * A`` (the softmax scaled by
the number of levels), not ``A``; the norm that follows the context removes the scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["QuantizationDecomposition"]


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Value of x, gradient of scale * x: LSQ's step-size gradient scaling.
    return (x - x * scale).detach() + x * scale


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class QuantizationDecomposition(nn.Module):
    """Quantize an attention matrix ``(B, heads, N, M)`` into ``levels`` binary planes."""

    def __init__(self, num_heads: int, levels: int = 3):
        super().__init__()
        if levels < 1:
            raise ConfigError(f"QD levels must be >= 1, got {levels}.")
        self.num_heads = num_heads
        self.levels = levels
        self.step = nn.Parameter(torch.ones(num_heads))
        self.zero_point = nn.Parameter(torch.zeros(num_heads))
        # 0 until the step is initialised from the first training batch.
        self.register_buffer("initialized", torch.zeros(1))
        # Host-side copy of "initialized is 1", so that a training step does not read the
        # buffer (a device sync on a GPU, a graph break under torch.compile) once set.
        self._ready = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # re-read the loaded buffer at the next training step

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, levels={self.levels}"

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        # Step from the first batch: 2 * mean|levels * A| / sqrt(levels), per head.
        self.step.copy_(2 * x.abs().mean(dim=(-1, -2)).mean(dim=0) / math.sqrt(self.levels))
        head_min = x.amin(dim=(-1, -2)).amin(dim=0)
        self.zero_point.copy_(0.9 * self.zero_point + 0.1 * head_min)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            # Data-parallel ranks see different first batches: agree on their mean so
            # every replica starts from the same step and zero point.
            both = torch.cat([self.step.data, self.zero_point.data])
            dist.all_reduce(both)
            both /= dist.get_world_size()
            self.step.copy_(both[: self.num_heads])
            self.zero_point.copy_(both[self.num_heads :])
        self.initialized.fill_(1)

    def _check(self, attn: torch.Tensor) -> None:
        if attn.dim() != 4 or attn.shape[1] != self.num_heads:
            raise ConfigError(f"QD expects attention of shape (B, {self.num_heads}, N, M), got {tuple(attn.shape)}.")

    def levels_of(self, attn: torch.Tensor) -> torch.Tensor:
        """Integer levels ``q`` in ``{0..levels}`` (as float) of an attention matrix."""
        self._check(attn)
        x = attn * self.levels
        step = self.step.view(1, -1, 1, 1)
        zp = self.zero_point.view(1, -1, 1, 1)
        return (x / step + zp).round().clamp(0, self.levels)

    def planes(self, attn: torch.Tensor) -> torch.Tensor:
        """The binary planes ``A^s = [q >= s]``, shape ``(levels, B, heads, N, M)``, 0/1."""
        q = self.levels_of(attn)
        thresholds = torch.arange(1, self.levels + 1, dtype=q.dtype, device=q.device)
        return (q.unsqueeze(0) >= thresholds.view(-1, 1, 1, 1, 1)).to(attn.dtype)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        self._check(attn)
        x = attn * self.levels
        if self.training and not self._ready:
            if self.initialized.item() == 0:
                self._initialize(x)
            self._ready = True
        n = x.numel() * self.levels
        if isinstance(n, int) or not torch.onnx.is_in_onnx_export():
            g = self.num_heads / math.sqrt(n)
        else:
            # ONNX export with a dynamic batch: n is symbolic (math.sqrt would fix the batch size),
            # g a float64 tensor (its sqrt may differ from math.sqrt's by an ulp; g only shapes
            # the gradient, and the value below by at most a rounding)
            f64 = dict(dtype=torch.float64, device=x.device)
            g = torch.scalar_tensor(self.num_heads, **f64) / torch.scalar_tensor(n, **f64).sqrt()
        step = _grad_scale(self.step, g).view(1, -1, 1, 1)
        zp = _grad_scale(self.zero_point, g).view(1, -1, 1, 1)
        q = _round_pass(x / step + zp).clamp(0, self.levels)
        return q * step

"""Quantizers: the functions that turn latent floats into 1-bit values.

A quantizer is a small ``nn.Module`` whose forward is the binarization and whose
backward is an explicit surrogate gradient, so binary layers can take them as
arguments (``input_quantizer``, ``kernel_quantizer``) and a full-precision twin is
the same layer with ``None`` in their place.

Convention used everywhere in bhvit, training model and runtime alike:
``sign(0) = +1``. ``torch.sign`` maps 0 to 0, which would make the float simulation
ternary and unreproducible by XNOR/popcount kernels, so it is never used directly.
"""

from __future__ import annotations

import torch
from torch import nn


__all__ = [
    "binary_sign",
    "centred_signs",
    "ApproxSign",
    "SignActivation",
    "WeightBinarizer",
    "binarize_rows",
]


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with ``sign(0) = +1``: the output holds exactly two values, -1 and +1."""
    # sign() maps {-, 0, +} to {-1, 0, +1}; adding 0.5 and signing again sends 0 (and
    # -0.0) to +1. Three cheap elementwise passes; torch.where is far slower on CPU.
    return x.sign().add_(0.5).sign_()


class _ApproxSignFn(torch.autograd.Function):
    """Forward ``sign(x)``; backward the Bi-Real ApproxSign gradient.

    The surrogate is the derivative of the piecewise quadratic
    ``2x + x^2`` (x in [-1, 0]) / ``2x - x^2`` (x in (0, 1]): ``2 + 2x`` on [-1, 0],
    ``2 - 2x`` on (0, 1], 0 elsewhere. It is closer to the true sign than a clipped
    identity, which the Bi-Real paper found to train binary nets better.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        # 2 - 2|x| equals 2 + 2x on [-1, 0] and 2 - 2x on (0, 1]; negative outside.
        return x.abs().mul_(-2.0).add_(2.0).clamp_min_(0.0).mul_(grad_out)


class ApproxSign:
    """Functional access: ``ApproxSign.apply(x)``."""

    apply = staticmethod(_ApproxSignFn.apply)


def _needs_autograd(x: torch.Tensor) -> bool:
    """Whether a quantizer must run through its autograd Function (for the surrogate
    gradient). Otherwise the same forward value comes from plain tensor ops, which skip
    the Function's overhead and which tracers and the ONNX exporters understand."""
    return torch.is_grad_enabled() and x.requires_grad and not torch.onnx.is_in_onnx_export()


class SignActivation(nn.Module):
    """Activation quantizer: ``sign(x)`` with the ApproxSign surrogate gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_autograd(x):
            return _ApproxSignFn.apply(x)
        return binary_sign(x)  # the Function's forward, without the Function


def centred_signs(w: torch.Tensor, as_bool: bool = False) -> torch.Tensor:
    """The signs a binary layer's kernel uses: ``sign(W - mean(W))`` per output channel
    (the mean over each channel's fan-in), with ``sign(0) = +1``, in ``w``'s shape. This
    is the one definition the binarizer, the sign-flip counts, 16-bit checkpoint copies
    and the export share. ``as_bool``: ``True`` where the sign is +1 (cheaper)."""
    flat = w.reshape(w.shape[0], -1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return (centred >= 0 if as_bool else binary_sign(centred)).view(w.shape)


def binarize_rows(flat: torch.Tensor) -> torch.Tensor:
    """The forward value of :class:`WeightBinarizer` on a 2-D ``(out, fan_in)`` weight,
    without autograd: ``alpha * sign(W - mean(W))`` per row with ``sign(0) = +1``.

    Bit for bit the value of the training path (``copysign(alpha, centred + 0.0)``):
    ``alpha >= 0`` times exactly +-1 is exactly +-alpha. Made of ReduceMean, Sub, Abs,
    Sign, Add and Mul, which the ONNX exporters translate (copysign has no ONNX op).
    """
    centred = flat - flat.mean(dim=1, keepdim=True)
    alpha = flat.abs().mean(dim=1, keepdim=True)
    return alpha * binary_sign(centred)


class _WeightBinarizeFn(torch.autograd.Function):
    """``alpha * sign(W - mean(W))`` per output channel (rows of a 2-D view), exactly two
    values per row; backward: the clipped straight-through estimator through the centring.

    One Function instead of a chain of autograd ops: the forward value is exactly
    ``+-alpha`` (not up to a rounding error, as ``(b - clip).detach() + clip`` would
    give), and a training step launches fewer kernels.
    """

    @staticmethod
    def forward(ctx, flat):
        centred = flat - flat.mean(dim=1, keepdim=True)
        ctx.save_for_backward(centred)
        alpha = flat.abs().mean(dim=1, keepdim=True)  # of the uncentred weight; no gradient
        # (binarize_rows computes the same values with ops that tracers and ONNX know)
        # +-alpha with the sign of centred; + 0.0 turns -0.0 into +0.0, so sign(0) = +1
        # as in binary_sign (two passes instead of binary_sign's three and a multiply).
        return torch.copysign(alpha, centred + 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        (centred,) = ctx.saved_tensors
        # STE: the gradient passes where |centred| <= 1; then through centred = W - mean(W),
        # whose Jacobian is I - 1/n over each row.
        g = grad_out * (centred.abs() <= 1.0)
        return g - g.mean(dim=1, keepdim=True)


class WeightBinarizer(nn.Module):
    """Kernel quantizer: ``alpha * sign(W - mean(W))`` per output channel.

    ``alpha = mean(|W|)`` over each output channel's fan-in, detached, as in the BHViT
    release (the mean of the *uncentred* latent weight). The centring lets every output
    channel use both signs evenly; the scale keeps the output magnitude of the float
    layer so BatchNorm statistics stay meaningful. The gradient is the straight-through
    estimator through ``clamp(W - mean(W), -1, 1)``: latent weights outside [-1, 1]
    receive no gradient from the task loss.
    """

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(w.shape[0], -1)
        out = _WeightBinarizeFn.apply(flat) if _needs_autograd(w) else binarize_rows(flat)
        return out.view(w.shape)

    @torch.no_grad()
    def scale_and_sign(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-channel ``alpha`` (shape ``[out]``) and the +-1 sign tensor."""
        alpha = w.reshape(w.shape[0], -1).abs().mean(dim=1)
        return alpha, centred_signs(w)

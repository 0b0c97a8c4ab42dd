"""BHViT's training losses: knowledge distillation, the weight regularization ``L_re`` and
the recipe's combination of both with cross-entropy,

    L = (1 - lambda - beta) * CE + lambda * KD + beta * L_re

(Gao et al., CVPR 2025). KD is the soft cross-entropy to the teacher's softmax (no
temperature); ``L_re`` pulls latent binary weights towards +-1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .layers import binary_layers

__all__ = ["kd_loss", "regularization_loss", "recipe_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy between the teacher's softmax and the student's log-softmax."""
    return -(teacher_logits.softmax(-1) * student_logits.log_softmax(-1)).sum(-1).mean()


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """BHViT's ``L_re``: mean over binary layers of ``mean(| |w| - 1 |)``.

    Under Adam, a latent weight that oscillates around 0 sees gradients of alternating
    sign: the first moment cancels while the second keeps growing, so its step shrinks
    and it stays stuck flipping. Pulling latent weights towards +-1 moves them out of
    that zone. Only layers whose kernel is binarized count.
    """
    terms = [(layer.weight.abs() - 1.0).abs().mean() for layer in binary_layers(model)]
    if not terms:
        raise ConfigError("regularization_loss: the model has no layer with binarized weights.")
    return torch.stack(terms).mean()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) in float32; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def recipe_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lam: float = 0.0,
    beta: float = 0.0,
    teacher_logits: Optional[torch.Tensor] = None,
    model: Optional[nn.Module] = None,
) -> torch.Tensor:
    """``(1 - lam - beta) CE + lam KD + beta L_re``, in float32 at least (half-precision
    logits are widened).
    ``teacher_logits`` is needed when ``lam`` is nonzero, ``model`` when ``beta`` is."""
    loss = (1.0 - lam - beta) * F.cross_entropy(_wide(logits), targets)
    if lam:
        if teacher_logits is None:
            raise ConfigError("recipe_loss: lam > 0 needs the teacher's logits.")
        if teacher_logits.shape != logits.shape:
            raise ConfigError(
                f"the teacher returned logits of shape {tuple(teacher_logits.shape)}, "
                f"the student {tuple(logits.shape)}; it must predict the same classes."
            )
        loss = loss + lam * kd_loss(_wide(logits), _wide(teacher_logits))
    if beta:
        if model is None:
            raise ConfigError("recipe_loss: beta > 0 needs the model (for L_re).")
        loss = loss + beta * regularization_loss(model)
    return loss

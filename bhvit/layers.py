"""Binary layers and the small pieces every BHViT binary layer is built from.

Token tensors in bhvit are channels-last, ``(..., C)``: a feature map is
``(B, H, W, C)`` and a token sequence ``(B, N, C)``. Linears, norms, RPReLU and
LayerScale act on the last dim directly; convolutions see an NCHW *view* of the same
memory (``channels_last`` format), so no permute/contiguous round trip is needed.
"""

from __future__ import annotations

import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import ConfigError


__all__ = [
    "BinaryLinear",
    "BinaryConv2d",
    "binary_layers",
    "RPReLU",
    "LayerScale",
    "ChannelBatchNorm",
    "make_norm",
    "channel_shortcut",
    "LayerwiseResidual",
    "conv_nhwc",
    "EvalCache",
]


# Bumped after every optimizer step: fused optimizers (torch.optim.AdamW(fused=True), as
# bhvit trains) update parameters without bumping their version counters.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class EvalCache:
    """A value computed from parameters, reused in eval mode with autograd off while
    those parameters are unchanged.

    Used only when the owning module is in eval mode, autograd is off, and no tracer,
    compiler or ONNX export is running; any other call recomputes and drops the cached
    value (a training step, even in eval mode, starts with such a forward). The value is
    recomputed when a parameter is replaced (another object, storage, dtype, device or
    shape), written in place (its version counter: ``copy_``, ``load_state_dict``,
    ``torch.no_grad()`` updates, unfused optimizers) or after any optimizer step (a fused
    optimizer does not bump version counters); ``module.train()`` clears it. Writes that
    bypass autograd's version counter (``param.data.copy_(...)``, raw storage) are not
    seen: call ``model.train(False)`` (or ``.eval()``) after such a write.
    """

    __slots__ = ("key", "refs", "value")

    def __init__(self):
        self.clear()

    def __reduce__(self):  # copies and pickles start empty: the key names this process's tensors
        return (EvalCache, ())

    def clear(self) -> None:
        self.key = self.refs = self.value = None

    @staticmethod
    def usable(module: nn.Module) -> bool:
        return not (
            module.training
            or torch.is_grad_enabled()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export()
        )

    def get(self, module: nn.Module, tensors, compute):
        if not self.usable(module) or any(t.is_inference() for t in tensors):
            self.clear()
            return compute()
        key = (_optimizer_steps[0],) + tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
        # identity through weak references: a freed tensor's id may be reused by another one
        refs = self.refs
        if key != self.key or len(refs) != len(tensors) or any(r() is not t for r, t in zip(refs, tensors)):
            self.value = compute()
            self.key, self.refs = key, [weakref.ref(t) for t in tensors]
        return self.value


class _BinaryMixin:
    """Shared state of BinaryLinear and BinaryConv2d."""

    input_quantizer: Optional[nn.Module]
    kernel_quantizer: Optional[nn.Module]

    def _setup(self, in_features, input_quantizer, kernel_quantizer, input_bias, binary_input):
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        # RSign-like learnable threshold: shifts the zero crossing of sign() per channel.
        self.input_bias = nn.Parameter(torch.zeros(in_features)) if input_bias else None
        # binary_input: the caller already binarized the input (e.g. MSGDC signs once
        # for its three branches); only used for operation counting.
        self._binary_input = binary_input

    @property
    def weights_binary(self) -> bool:
        return self.kernel_quantizer is not None

    @property
    def acts_binary(self) -> bool:
        if self._binary_input is not None:
            return self._binary_input
        return self.input_quantizer is not None

    @property
    def is_binary(self) -> bool:
        """Both operands are 1-bit: the layer is an XNOR/popcount layer."""
        return self.weights_binary and self.acts_binary

    def effective_weight(self) -> torch.Tensor:
        """The kernel the layer computes with: ``kernel_quantizer(weight)``, or ``weight``.

        In eval mode with autograd off (``torch.no_grad``/``torch.inference_mode``) the
        binarized kernel is computed once and reused (:class:`EvalCache`) while the
        weight is unchanged: recomputing it is most of the cost of a small-batch forward.
        The cached tensor is the very value the quantizer returns; do not modify it.
        """
        quantizer = self.kernel_quantizer
        if quantizer is None:
            return self.weight
        if torch.compiler.is_compiling():  # no Python-side state inside a compiled graph
            return quantizer(self.weight)
        cache = self.__dict__.get("_kernel_cache")
        if cache is None:
            cache = self.__dict__["_kernel_cache"] = EvalCache()
        tensors = (self.weight, *quantizer.parameters(), *quantizer.buffers())
        return cache.get(self, tensors, lambda: quantizer(self.weight))

    def train(self, mode: bool = True):
        cache = self.__dict__.get("_kernel_cache")
        if cache is not None:
            cache.clear()
        return super().train(mode)


class BinaryLinear(_BinaryMixin, nn.Linear):
    """Linear layer over the last dim with swappable quantizers.

    ``y = (input_quantizer(x + input_bias)) @ kernel_quantizer(W)^T (+ bias)``.
    With both quantizers ``None`` it is the full-precision twin with the same parameters.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=False,
        *,
        input_quantizer=None,
        kernel_quantizer=None,
        input_bias=True,
        binary_input=None,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self._setup(in_features, input_quantizer, kernel_quantizer, input_bias, binary_input)
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_bias is not None:
            x = x + self.input_bias
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.effective_weight(), self.bias)


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """Conv2d (NCHW interface, groups and dilation supported) with swappable quantizers.

    Zero padding is applied *after* the input sign, so padded positions contribute 0
    (neither +1 nor -1), exactly as a float conv on a +-1 map would.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        *,
        input_quantizer=None,
        kernel_quantizer=None,
        input_bias=True,
        binary_input=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self._setup(in_channels, input_quantizer, kernel_quantizer, input_bias, binary_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_bias is not None:
            x = x + self.input_bias.view(1, -1, 1, 1)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.effective_weight(), self.bias)


def binary_layers(model: nn.Module) -> Iterator[_BinaryMixin]:
    """Every BinaryLinear/BinaryConv2d of ``model`` whose kernel is binarized."""
    for m in model.modules():
        if isinstance(m, _BinaryMixin) and m.weights_binary:
            yield m


def conv_nhwc(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an NCHW conv to a ``(B, H, W, C)`` tensor without copying layouts."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RPReLU(nn.Module):
    """``RPReLU(x) = PReLU(x - gamma) + zeta`` with per-channel gamma, zeta and slope.

    Learnable shifts of the activation's kink move the distribution of the binary
    layer's output, which ReActNet found to matter for 1-bit networks.
    """

    def __init__(self, dim: int, init_slope: float = 0.25):
        super().__init__()
        self.move1 = nn.Parameter(torch.zeros(dim))
        self.slope = nn.Parameter(torch.full((dim,), init_slope))
        self.move2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # F.prelu treats dim 1 as channels: a 2-D (tokens, C) view puts C there for free.
        y = F.prelu((x - self.move1).reshape(-1, shape[-1]), self.slope)
        return (y + self.move2).view(shape)


class LayerScale(nn.Module):
    """Per-channel scale and bias on the last dim: ``x * scale + bias``."""

    def __init__(self, dim: int, init: float = 0.1):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.scale)


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dim of a channels-last tensor of any rank.

    The BHViT release replaces LayerNorm by BatchNorm ("replace-ln-bn"): at
    deployment BN folds into a per-channel affine, LayerNorm does not.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).view(shape)


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``'bn'`` (ChannelBatchNorm, the release default) or ``'ln'`` (LayerNorm)."""
    if kind == "bn":
        return ChannelBatchNorm(dim, eps=eps)
    if kind == "ln":
        return nn.LayerNorm(dim, eps=eps)
    raise ConfigError(f"norm must be 'bn' or 'ln', got {kind!r}.")


def channel_shortcut(x: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Real-valued shortcut between channel counts on the last dim.

    Identity when equal; the input tiled ``k`` times when ``out = k * in``; the mean
    over groups of ``k`` consecutive channels when ``in = k * out``.
    """
    in_dim = x.shape[-1]
    if in_dim == out_dim:
        return x
    if out_dim % in_dim == 0:
        return x.repeat(*([1] * (x.dim() - 1)), out_dim // in_dim)
    if in_dim % out_dim == 0:
        return x.view(*x.shape[:-1], out_dim, in_dim // out_dim).mean(-1)
    raise ConfigError(f"channel shortcut needs one channel count to divide the other, got {in_dim} -> {out_dim}.")


class LayerwiseResidual(nn.Module):
    """BHViT's binary layer shape: ``y = RPReLU(norm(op(x)) + shortcut(x))``.

    The real-valued shortcut turns the backward factor ``G * dB/dQ`` of a stacked
    clip/sign into ``1 + G * dB/dQ``, so gradients survive many binary layers.
    ``op`` maps ``(..., in_dim)`` to ``(..., out_dim)`` (a BinaryLinear, or a conv
    applied through :func:`conv_nhwc`). ``shortcut_pool`` > 1 average-pools a
    ``(B, H, W, C)`` input by that factor first (the binary downsampling).
    """

    def __init__(
        self, op: nn.Module, in_dim: int, out_dim: int, norm: str = "bn", shortcut_pool: int = 1, eps: float = 1e-5
    ):
        super().__init__()
        if not (in_dim == out_dim or out_dim % in_dim == 0 or in_dim % out_dim == 0):
            raise ConfigError(f"LayerwiseResidual needs one of in_dim={in_dim}, out_dim={out_dim} to divide the other.")
        self.op = op
        self.out_dim = out_dim
        self.shortcut_pool = shortcut_pool
        self.norm = make_norm(norm, out_dim, eps)
        self.act = RPReLU(out_dim)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_pool > 1:
            k = self.shortcut_pool
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), k, k).permute(0, 2, 3, 1)
        return channel_shortcut(x, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.op(x)) + self.shortcut(x))


class NHWCConv(nn.Module):
    """Adapter: runs an NCHW conv on a channels-last ``(B, H, W, C)`` tensor."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_nhwc(self.conv, x)

"""A small ReActNet-style binary ResNet: the binary-CNN baseline of the ablation study.

Gao et al. (CVPR 2025) compare BHViT with binary CNNs such as ReActNet-ResNet18 (Liu et
al., ECCV 2020; 92.31 % on CIFAR-10). This module builds that kind of network from bhvit's
own binary layers, so that it is counted, regularised and trained exactly like a BHViT:

* every 3x3 conv is a :class:`~bhvit.layers.BinaryConv2d` with a learnable input threshold
  (ReActNet's RSign: ``sign(x + b)``) and a binarized kernel (``alpha * sign(W - mean W)``);
* each binary conv is its own residual unit (Bi-Real / ReActNet):
  ``RPReLU(BN(BinaryConv(RSign(x))) + shortcut(x))`` with a **real-valued** shortcut
  (:class:`~bhvit.layers.LayerwiseResidual`);
* a basic block is two such units; the first unit of stages 2-4 has stride 2, and its
  shortcut is the 2x2-average-pooled input tiled along channels (parameter-free, so the
  network stays fully binary apart from stem and head, like BHViT's binary downsampling;
  ReActNet-ResNet18 uses a float 1x1 conv there);
* a float patchify stem (conv k x k, stride k, norm) and a float classifier, both the
  same shapes as BHViT's stem and head.

``binary=False`` gives the full-precision twin with the same parameters.
:func:`bhvit.complexity`, :func:`bhvit.regularization_loss`, :func:`bhvit.binary_layers`
and ``bhvit.train.train(cfg, model=create_model("reactnet_c32", num_classes=10))``
(with ``cfg.model = "reactnet_c32"``) all work with it. ``bhvit eval``, ``bhvit export``
and ``--teacher`` load BHViT checkpoints only: they do not load a ReActNet run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .blocks import QuantSpec
from .layers import BinaryConv2d, LayerwiseResidual, NHWCConv, make_norm
from .errors import ConfigError
from .model import DictConfig

__all__ = ["ReActNetConfig", "ReActNet"]


@dataclass
class ReActNetConfig(DictConfig):
    """Everything that defines a :class:`ReActNet`; registered names are instances."""

    KIND = "ReActNet"

    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    stem_stride: int = 4
    dims: Tuple[int, int, int, int] = (32, 64, 128, 256)
    depths: Tuple[int, int, int, int] = (1, 1, 1, 1)  # basic blocks (two binary convs each)
    norm: str = "bn"
    binary: bool = True
    binary_weights: Optional[bool] = None  # None: follow ``binary``
    binary_acts: Optional[bool] = None  # None: follow ``binary``

    @property
    def quant(self) -> QuantSpec:
        bw = self.binary if self.binary_weights is None else self.binary_weights
        ba = self.binary if self.binary_acts is None else self.binary_acts
        return QuantSpec(weights=bool(bw), acts=bool(ba), norm=self.norm)

    def map_sizes(self):
        g = self.img_size // self.stem_stride
        return [g >> i for i in range(4)]

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true or false, got {v!r}.")
            if f.type == "Optional[bool]" and v is not None and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true, false or None, got {v!r}.")
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{f.name} must be a positive integer, got {v!r}.")
        for name in ("dims", "depths"):
            v = getattr(self, name)
            if len(v) != 4 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ConfigError(f"{name} must be 4 positive integers (one per stage), got {v!r}.")
        if self.norm not in ("bn", "ln"):
            raise ConfigError(f"norm must be 'bn' or 'ln', got {self.norm!r}.")
        if self.img_size % (self.stem_stride * 8):
            raise ConfigError(
                f"img_size {self.img_size} must be a multiple of 8*stem_stride = "
                f"{8 * self.stem_stride} so that all four stages have integer map sizes."
            )
        for i in range(3):
            if self.dims[i + 1] % self.dims[i]:
                raise ConfigError(
                    f"dims[{i + 1}]={self.dims[i + 1]} must be a multiple of dims[{i}]="
                    f"{self.dims[i]} (the downsampling shortcut tiles channels)."
                )

    def build(self) -> "ReActNet":
        return ReActNet(self)


def binary_conv_unit(in_dim: int, out_dim: int, stride: int, q: QuantSpec) -> LayerwiseResidual:
    """``RPReLU(BN(BinaryConv3x3(sign(x + b))) + shortcut(x))`` on a ``(B, H, W, C)`` map."""
    conv = BinaryConv2d(
        in_dim, out_dim, 3, stride=stride, padding=1, input_quantizer=q.act(), kernel_quantizer=q.kernel()
    )
    return LayerwiseResidual(NHWCConv(conv), in_dim, out_dim, norm=q.norm, shortcut_pool=stride)


class BasicBlock(nn.Module):
    """Two binary conv units, each with its own real-valued shortcut."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, q: QuantSpec):
        super().__init__()
        self.conv1 = binary_conv_unit(in_dim, out_dim, stride, q)
        self.conv2 = binary_conv_unit(out_dim, out_dim, 1, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ReActStage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class ReActNet(nn.Module):
    """ReActNet-style binary ResNet on channels-last maps; ``forward`` takes NCHW images."""

    def __init__(self, cfg: ReActNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        q = cfg.quant
        self.stem = nn.Conv2d(cfg.in_chans, cfg.dims[0], cfg.stem_stride, stride=cfg.stem_stride)
        self.stem_norm = make_norm(cfg.norm, cfg.dims[0])
        stages, prev = [], cfg.dims[0]
        for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(prev, dim, 2 if (i > 0 and j == 0) else 1, q))
                prev = dim
            stages.append(ReActStage(blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if (
            not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() != 4
            or tuple(x.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size)
            or x.shape[0] == 0
        ):
            raise ConfigError(
                f"ReActNet expects a float tensor of shape (B, {cfg.in_chans}, "
                f"{cfg.img_size}, {cfg.img_size}) with B >= 1, got "
                f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x))}."
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        x = self.stem_norm(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(1, 2)))

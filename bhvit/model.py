"""The BHViT model, its configuration and the registry of named configurations."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .blocks import MSGDC, MSMHA, BHViTBlock, BinaryDownsample, FPDownsample, QuantSpec, Stem
from .layers import make_norm
from .errors import ConfigError
from .layout import HYBRID_MIXERS, stage_mixers
from .runtime.format import config_problem

__all__ = ["BHViTConfig", "BHViT", "register_model", "create_model", "list_models", "get_config", "pretrained_dir"]

HYBRID = tuple(HYBRID_MIXERS)  # ("hybrid", "msgdc", "msmha")


class DictConfig:
    """A config dataclass's JSON form: ``to_dict``, and ``from_dict`` that names unknown keys
    and turns JSON lists back into tuples. ``KIND`` names the config in messages."""

    KIND = "model"

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.KIND} config keys {unknown}; allowed: {sorted(names)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class BHViTConfig(DictConfig):
    """Everything that defines a BHViT. Named models are instances of this; overrides
    passed to :func:`create_model` replace fields.

    Ablation switches (the paper's ablation): ``msgdc=False`` (single plain binary
    3x3 conv mixer instead of MSGDC), ``msmha=False`` (plain global attention without
    windows or pooled tokens), ``qd=False`` (single-plane 1-bit attention instead of
    three QD planes), ``shift=False`` (no shift branches), ``hybrid='msgdc'`` or
    ``'msmha'`` (one mixer in all four stages).
    """

    KIND = "BHViT"

    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    stem_stride: int = 4
    stem_pad: int = 0
    dims: Tuple[int, int, int, int] = (64, 128, 256, 512)
    depths: Tuple[int, int, int, int] = (2, 2, 6, 2)
    mlp_ratios: Tuple[int, int, int, int] = (8, 8, 4, 4)
    heads: Tuple[int, int, int, int] = (1, 2, 4, 8)
    windows: Tuple[int, int, int, int] = (7, 7, 7, 7)
    msgdc_dilations: Tuple[int, ...] = (1, 3, 5)
    msgdc_groups: int = 4
    shift_sizes: Tuple[int, ...] = (1, 2)
    qd_levels: int = 3
    norm: str = "bn"
    binary: bool = True
    binary_weights: Optional[bool] = None  # None: follow ``binary``
    binary_acts: Optional[bool] = None  # None: follow ``binary``
    fp_downsample: bool = False
    # ablation switches
    hybrid: str = "hybrid"
    msgdc: bool = True
    msmha: bool = True
    qd: bool = True
    shift: bool = True

    # --- derived ---------------------------------------------------------------
    @property
    def quant(self) -> QuantSpec:
        bw = self.binary if self.binary_weights is None else self.binary_weights
        ba = self.binary if self.binary_acts is None else self.binary_acts
        return QuantSpec(weights=bool(bw), acts=bool(ba), norm=self.norm)

    @property
    def grid(self) -> int:
        """Side of the stage-1 token map."""
        return (self.img_size + 2 * self.stem_pad) // self.stem_stride

    def map_sizes(self) -> List[int]:
        return [self.grid >> i for i in range(4)]

    def stage_mixers(self) -> List[str]:
        return stage_mixers(self.hybrid, self.msgdc, self.msmha)

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool",) and not isinstance(v, bool):
                bad(f"{f.name} must be true or false, got {v!r}.")
            if f.type in ("Optional[bool]",) and v is not None and not isinstance(v, bool):
                bad(f"{f.name} must be true, false or None, got {v!r}.")
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                bad(f"{f.name} must be an integer, got {v!r}.")
        for name in ("dims", "depths", "mlp_ratios", "heads", "windows"):
            v = getattr(self, name)
            if len(v) != 4 or any((not isinstance(x, int)) or x < 1 for x in v):
                bad(f"{name} must be 4 positive integers (one per stage), got {v!r}.")
        if self.hybrid not in HYBRID:
            bad(f"hybrid must be one of {HYBRID}, got {self.hybrid!r}.")
        if self.norm not in ("bn", "ln"):
            bad(f"norm must be 'bn' or 'ln', got {self.norm!r}.")
        if self.in_chans < 1:
            bad(f"in_chans must be >= 1, got {self.in_chans}.")
        if self.num_classes < 1:
            bad(f"num_classes must be >= 1, got {self.num_classes}.")
        if self.msgdc_groups < 1:
            bad(f"msgdc_groups must be >= 1, got {self.msgdc_groups}.")
        for name in ("msgdc_dilations", "shift_sizes"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v
            ):
                bad(f"{name} must be a list of positive integers, got {v!r}.")
        if not self.msgdc_dilations:
            bad("msgdc_dilations must name at least one dilation, e.g. [1, 3, 5].")
        if self.qd_levels < 1:
            bad(f"qd_levels must be >= 1, got {self.qd_levels}.")
        if self.stem_stride < 1 or self.stem_pad < 0:
            bad(f"stem_stride must be >= 1 and stem_pad >= 0, got {self.stem_stride}, {self.stem_pad}.")
        side = self.img_size + 2 * self.stem_pad
        if self.img_size < 1 or side % (self.stem_stride * 8):
            bad(
                f"img_size {self.img_size} is not supported: img_size + 2*stem_pad "
                f"({side}) must be a multiple of 8*stem_stride = {8 * self.stem_stride} "
                "so that all four stages have integer map sizes."
            )
        for i in range(3):
            if self.dims[i + 1] % self.dims[i]:
                bad(
                    f"dims[{i + 1}]={self.dims[i + 1]} must be a multiple of dims[{i}]="
                    f"{self.dims[i]} (the downsampling shortcut repeats channels)."
                )
        for i, (dim, mixer, size) in enumerate(zip(self.dims, self.stage_mixers(), self.map_sizes())):
            if self.shift and self.shift_sizes and dim % 4:
                bad(f"dims[{i}]={dim} must be divisible by 4 for the shift channel mix.")
            if mixer == "msgdc" and dim % self.msgdc_groups:
                bad(f"dims[{i}]={dim} must be divisible by msgdc_groups={self.msgdc_groups}.")
            if mixer in ("msmha", "attn") and dim % self.heads[i]:
                bad(f"dims[{i}]={dim} must be divisible by heads[{i}]={self.heads[i]}.")
            if mixer == "msmha" and size % self.windows[i]:
                bad(
                    f"windows[{i}]={self.windows[i]} must divide the stage-{i + 1} map size "
                    f"{size}x{size} (img_size={self.img_size}); allowed: divisors of {size}."
                )
        # the bounds every reader applies (checkpoints, exports, the runtime): a model trained
        # here must load there
        problem = config_problem(json.loads(json.dumps(self.to_dict())))
        if problem:
            bad(f"{problem}; bhvit's checkpoint and export readers refuse such a model.")


class BHViTStage(nn.Module):
    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class BHViT(nn.Module):
    """Binarized Hybrid Vision Transformer.

    ``forward_features`` returns the final ``(B, H, W, C)`` map (normed);
    ``forward_head`` pools tokens and classifies.
    """

    def __init__(self, cfg: BHViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        q = cfg.quant
        sizes = cfg.map_sizes()
        self.stem = Stem(cfg.in_chans, cfg.dims[0], cfg.stem_stride, cfg.stem_pad, sizes[0], cfg.norm)
        shifts = tuple(cfg.shift_sizes) if cfg.shift else ()
        stages = []
        for i, mixer_name in enumerate(cfg.stage_mixers()):
            dim = cfg.dims[i]
            down = None
            if i > 0:
                cls = FPDownsample if cfg.fp_downsample else BinaryDownsample
                down = cls(cfg.dims[i - 1], dim, sizes[i], q)
            blocks = [
                BHViTBlock(dim, self._mixer(mixer_name, i, q), cfg.mlp_ratios[i], q, shifts)
                for _ in range(cfg.depths[i])
            ]
            stages.append(BHViTStage(down, blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = make_norm(cfg.norm, cfg.dims[-1])
        self.head = self._new_head(cfg.num_classes)
        # what a checkpoint records beside the weights (bhvit.checkpoint.load_model fills them)
        self.name: Optional[str] = None  # the registered name, where known
        self.data: Optional[Dict] = None  # the data record: dataset, classes, mean/std, eval transform
        self.provenance: Dict = {}  # metrics, train_config, source (bhvit convert), epoch

    def _new_head(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.cfg.dims[-1], num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    # --- timm's interface --------------------------------------------------------
    @property
    def num_features(self) -> int:
        """The width of the pooled features the classifier reads."""
        return self.cfg.dims[-1]

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def pretrained_cfg(self) -> Dict:
        """timm's preprocessing record (input size, mean/std, interpolation, crop_pct, class
        names) from the data record of the checkpoint the model came from; mean and std are
        None for a model no checkpoint describes and that no registered default covers."""
        from .runtime.image import pretrained_cfg

        return pretrained_cfg(self.cfg.in_chans, self.cfg.img_size, self.cfg.num_classes, self.data)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` classes (fine-tuning on
        another dataset); the model's config and its recorded class names follow."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}.")
        cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        cfg.validate()
        p = self.head.weight
        self.cfg = cfg
        self.head = self._new_head(num_classes).to(device=p.device, dtype=p.dtype)
        if self.data and self.data.get("classes") and len(self.data["classes"]) != num_classes:
            self.data = {k: v for k, v in self.data.items() if k != "classes"}
        self.provenance = {k: v for k, v in self.provenance.items() if k != "metrics"}  # no longer this model's

    # --- Hugging Face's interface ------------------------------------------------
    def save_pretrained(self, save_directory, license: Optional[str] = None, card: bool = True):
        """config.json + model.safetensors + README.md (:func:`bhvit.hub.save_pretrained`)."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, license=license, card=card)

    @classmethod
    def from_pretrained(cls, source, map_location: str = "cpu", **hub_kwargs) -> "BHViT":
        """A folder, run directory, checkpoint or Hub id (:func:`bhvit.hub.from_pretrained`)."""
        from .hub import from_pretrained

        return from_pretrained(source, map_location=map_location, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload as a pretrained folder (:func:`bhvit.hub.push_to_hub`; needs huggingface_hub)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def _mixer(self, name: str, i: int, q: QuantSpec) -> nn.Module:
        cfg, dim = self.cfg, self.cfg.dims[i]
        qd_levels = cfg.qd_levels if cfg.qd else 1
        if name == "msgdc":
            return MSGDC(dim, q, cfg.msgdc_dilations, cfg.msgdc_groups)
        if name == "conv":
            return MSGDC(dim, q, dilations=(1,), groups=1)
        if name == "msmha":
            return MSMHA(dim, cfg.heads[i], q, window=cfg.windows[i], qd_levels=qd_levels)
        return MSMHA(dim, cfg.heads[i], q, window=None, qd_levels=qd_levels)

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ConfigError(
                f"BHViT expects a float tensor of shape (B, {cfg.in_chans}, "
                f"{cfg.img_size}, {cfg.img_size}), got {getattr(x, 'dtype', type(x))}."
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ConfigError(
                f"BHViT expects input of shape (B, {cfg.in_chans}, {cfg.img_size}, "
                f"{cfg.img_size}), got {tuple(x.shape)}."
            )
        if x.shape[0] == 0:
            raise ConfigError("BHViT got an empty batch (B = 0).")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- registry -------------------------------------------------------------------
_REGISTRY: Dict[str, Callable[[], BHViTConfig]] = {}


def register_model(fn: Callable[[], BHViTConfig]) -> Callable[[], BHViTConfig]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def get_config(name: str, **overrides):
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}.")
    cfg = _REGISTRY[name]()
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown override(s) {unknown} for {name}; allowed: {sorted(names)}.")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


def create_model(
    name: str,
    pretrained: Union[bool, str, os.PathLike] = False,
    num_classes: Optional[int] = None,
    checkpoint_path: Union[None, str, os.PathLike] = None,
    **overrides,
) -> nn.Module:
    """Build a named model, e.g. ``create_model("bhvit_tiny", binary=False)``, as timm's
    ``create_model`` does.

    - ``num_classes``: default the config's (or, with weights, the checkpoint's).
    - ``pretrained``: ``True`` loads the weights kept in :func:`pretrained_dir` (default
      ``~/.cache/bhvit/pretrained/NAME``; bhvit downloads none, see docs/PRETRAINED.md); a folder, run
      directory, checkpoint or Hugging Face Hub id loads those. With another ``num_classes``
      the classifier is replaced by a fresh one (fine-tuning).
    - ``checkpoint_path``: weights loaded strictly (same classes) after the model is built.

    The checkpoint's model config must be the named one with ``overrides`` applied (a
    difference is an error naming the fields). ``reactnet_*`` names are the binary-CNN
    baseline (:mod:`bhvit.reactnet`), whose config builds its own model.
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = get_config(name, **overrides)
    source = checkpoint_path if pretrained is False or pretrained is None else pretrained
    if source is not None and not isinstance(cfg, BHViTConfig):
        raise ConfigError(f"{name}: pretrained weights are supported for BHViT models only.")
    if pretrained is True:
        source = pretrained_dir(name)
        if not source.exists():
            raise ConfigError(
                f"create_model({name!r}, pretrained=True): no weights in {source}. bhvit ships and downloads "
                "none: convert the authors' checkpoint there (bhvit convert FILE.pth "
                f"{source}; docs/PRETRAINED.md), save a model there with save_pretrained, or pass "
                "pretrained=FOLDER or checkpoint_path=."
            )
    elif pretrained is not False and pretrained is not None and checkpoint_path is not None:
        raise ConfigError("give pretrained=FOLDER or checkpoint_path=, not both.")
    if source is None:
        model = BHViT(cfg) if isinstance(cfg, BHViTConfig) else cfg.build()
        if isinstance(model, BHViT):
            model.name = name
            model.data = _DEFAULT_DATA[name](cfg) if name in _DEFAULT_DATA and cfg.in_chans == 3 else None
        return model
    from .checkpoint import load_model
    from .hub import _local_folder

    model, _ = load_model(_local_folder(source, None, None, None))
    want = dataclasses.replace(cfg, num_classes=model.cfg.num_classes)
    have, asked = model.cfg.to_dict(), want.to_dict()
    diff = [f"{k}={have[k]!r} (asked {asked[k]!r})" for k in have if have[k] != asked[k]]
    if diff:
        raise ConfigError(
            f"{source}: its model is {name} with {', '.join(diff)}; pass those as overrides, or load it "
            "with bhvit.from_pretrained, which takes the checkpoint's config."
        )
    model.name = name
    if cfg.num_classes != model.cfg.num_classes and "num_classes" in overrides:
        if source is checkpoint_path:
            raise ConfigError(
                f"{source} classifies {model.cfg.num_classes} classes, not {cfg.num_classes}: "
                f"use pretrained={str(source)!r} for a new classifier, or reset_classifier()."
            )
        model.reset_classifier(cfg.num_classes)
    return model


def pretrained_dir(name: str) -> Path:
    """Where ``create_model(name, pretrained=True)`` looks: ``pretrained/NAME`` in bhvit's
    cache directory (``$BHVIT_CACHE``, else ``~/.cache/bhvit``)."""
    from .data import default_cache_dir

    return default_cache_dir().expanduser() / "pretrained" / name


def _release_eval(cfg: BHViTConfig) -> Dict:
    from .release import RELEASE_EVAL

    return RELEASE_EVAL(cfg.img_size)


# the preprocessing a named model's pretrained_cfg reports before any checkpoint says otherwise
_DEFAULT_DATA: Dict[str, Callable[[BHViTConfig], Dict]] = {"bhvit_tiny": _release_eval, "bhvit_small": _release_eval}


# ImageNet-size models (Gao et al., CVPR 2025, and the authors' release: 224x224, 4x4 stem, windows 7).
@register_model
def bhvit_tiny() -> BHViTConfig:
    return BHViTConfig(depths=(2, 2, 6, 2))


@register_model
def bhvit_small() -> BHViTConfig:
    return BHViTConfig(depths=(3, 4, 8, 4))


# 32x32 (CIFAR) models: 2x2 stem -> maps 16, 8, 4, 2. Windows sized to the maps:
# stage 3 (4x4) and 4 (2x2) attend within one window plus one pooled token.
def _c32(depths, dims=(64, 128, 256, 512), heads=(1, 2, 4, 8), **kw) -> BHViTConfig:
    kw.setdefault("img_size", 32)
    kw.setdefault("num_classes", 10)  # CIFAR-10, Fashion-MNIST: the default of create_model and `bhvit info`
    return BHViTConfig(stem_stride=2, dims=dims, depths=depths, heads=heads, windows=(8, 8, 4, 2), **kw)


@register_model
def bhvit_tiny_c32() -> BHViTConfig:
    return _c32((2, 2, 6, 2))


@register_model
def bhvit_small_c32() -> BHViTConfig:
    return _c32((3, 4, 8, 4))


@register_model
def bhvit_micro_c32() -> BHViTConfig:
    """A half-width, shallow BHViT for quick CPU experiments on 32x32 images."""
    return _c32((1, 1, 2, 1), dims=(32, 64, 128, 256), heads=(1, 1, 2, 4))


# 28x28 greyscale (Fashion-MNIST): zero-padded by 2 in the stem to 32x32.
@register_model
def bhvit_tiny_c28() -> BHViTConfig:
    return _c32((2, 2, 6, 2), img_size=28, in_chans=1, stem_pad=2)


@register_model
def bhvit_micro_c28() -> BHViTConfig:
    return _c32((1, 1, 2, 1), dims=(32, 64, 128, 256), heads=(1, 1, 2, 4), img_size=28, in_chans=1, stem_pad=2)


@register_model
def bhvit_nano_c32() -> BHViTConfig:
    """bhvit_micro_c32 with a 4x4 stem (maps 8, 4, 2, 1, as the 224 models' 56 ... 7 scaled
    down), windows (4, 2, 2, 1): about a quarter of micro_c32's cost, for CPU ablation studies
    (experiments/ablation.py)."""
    return BHViTConfig(
        img_size=32,
        stem_stride=4,
        dims=(32, 64, 128, 256),
        depths=(1, 1, 2, 1),
        heads=(1, 1, 2, 4),
        windows=(4, 2, 2, 1),
        num_classes=10,
    )


# Binary-CNN baseline (bhvit.reactnet): a ReActNet-style binary ResNet at the BOPs of bhvit_nano_c32.
@register_model
def reactnet_c32():
    """ReActNet-style binary ResNet for 32x32 images, sized to bhvit_nano_c32's BOPs and OPs."""
    from .reactnet import ReActNetConfig

    return ReActNetConfig(img_size=32, stem_stride=4, dims=(32, 64, 128, 256), depths=(1, 2, 2, 1))

"""bhvit: BHViT (Binarized Hybrid Vision Transformer) in PyTorch.

The training-side names below are imported lazily, so ``import bhvit.runtime`` (the
bit-packed inference runtime) loads neither PyTorch nor the model code.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "complexity": "costs",
    "BinaryConv2d": "layers",
    "BinaryLinear": "layers",
    "ChannelBatchNorm": "layers",
    "LayerScale": "layers",
    "LayerwiseResidual": "layers",
    "RPReLU": "layers",
    "binary_layers": "layers",
    "channel_shortcut": "layers",
    "BHViT": "model",
    "BHViTConfig": "model",
    "create_model": "model",
    "get_config": "model",
    "list_models": "model",
    "register_model": "model",
    "from_pretrained": "hub",
    "push_to_hub": "hub",
    "save_pretrained": "hub",
    "pretrained_dir": "model",
    "QuantizationDecomposition": "qd",
    "ReActNet": "reactnet",
    "ReActNetConfig": "reactnet",
    "ApproxSign": "quantizers",
    "SignActivation": "quantizers",
    "WeightBinarizer": "quantizers",
    "binary_sign": "quantizers",
    "kd_loss": "losses",
    "recipe_loss": "losses",
    "regularization_loss": "losses",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bhvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""bhvit: BHViT (Binarized Hybrid Vision Transformer) in PyTorch."""
from .complexity import complexity
from .layers import (BinaryConv2d, BinaryLinear, ChannelBatchNorm, LayerScale, LayerwiseResidual,
                     RPReLU, binary_layers, channel_shortcut)
from .model import BHViT, BHViTConfig, create_model, get_config, list_models, register_model
from .qd import QuantizationDecomposition
from .quantizers import (ApproxSign, SignActivation, WeightBinarizer, binary_sign,
                         regularization_loss)

__version__ = "0.1.0"

"""bhvit runtime: run an exported, bit-packed BHViT with XNOR/popcount kernels.

import bhvit.runtime
rt = bhvit.runtime.load("exported/")   # directory written by `bhvit export`
logits = rt(images)                    # (B, C, H, W) float, normalised -> (B, classes)
"""

from .engine import BHViTRuntime, RuntimeFormatError, load

__all__ = ["load", "BHViTRuntime", "RuntimeFormatError"]

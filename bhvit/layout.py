"""Facts about a BHViT config's layout that the PyTorch model, the export and the
bit-packed runtime share (no torch, no numpy: ``bhvit.runtime`` imports it too).
"""

from __future__ import annotations

from typing import List

# The token mixer of each of the four stages for each ``hybrid`` setting: MSGDC in the
# early stages and MSMHA in the late ones, as in the paper, or one of them throughout.
HYBRID_MIXERS = {"hybrid": ["msgdc", "msgdc", "msmha", "msmha"], "msgdc": ["msgdc"] * 4, "msmha": ["msmha"] * 4}
MIXERS = ("msgdc", "conv", "msmha", "attn")


def stage_mixers(hybrid: str, msgdc: bool, msmha: bool) -> List[str]:
    """Token mixer per stage: 'msgdc', 'conv' (``msgdc`` off: a plain binary 3x3 conv),
    'msmha' or 'attn' (``msmha`` off: plain global binary attention)."""
    swap = {"msgdc": "msgdc" if msgdc else "conv", "msmha": "msmha" if msmha else "attn"}
    return [swap[m] for m in HYBRID_MIXERS[hybrid]]

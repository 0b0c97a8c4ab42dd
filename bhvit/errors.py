"""Exceptions shared by the training stack and the CLI (no PyTorch import, so that
``bhvit predict`` stays a runtime-only process)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

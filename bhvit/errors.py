"""Exceptions shared by the training stack, the runtime and the CLI (no PyTorch import, so
that ``bhvit predict`` stays a runtime-only process).

Every error bhvit raises for bad input derives from :class:`BhvitError`; the CLI prints
those (and ``OSError``) as one line and lets anything else show its traceback, since
that is a bug. The ones about values also derive from ``ValueError``.
"""


class BhvitError(Exception):
    """An error in what bhvit was given (a file, a setting, a run directory)."""


class ConfigError(BhvitError, ValueError):
    """A setting, argument or configuration value is not allowed."""


class TrainingDiverged(BhvitError, RuntimeError):
    """The loss became NaN or infinite."""

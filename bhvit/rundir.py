"""A run directory's housekeeping: one run at a time, and no file of anyone else touched.

* :class:`RunLock` takes an exclusive ``fcntl.flock`` on ``RUN/.bhvit.lock`` for as long
  as a run trains there. The kernel drops the lock when the process ends, however it
  ends, so a killed run never leaves a stale lock; a second run on the same directory
  fails at once, naming the holder's PID.
* :func:`remove_stale_temp` deletes the temporary files (``.NAME.XXXX.tmp``) that a run
  killed in the middle of writing one of its own files left behind.
* :func:`owned_checkpoint_files` tells which ``epochNNNN.*`` files a bhvit run wrote, so
  that pruning old checkpoints never deletes a user's ``epoch_notes.txt``.

Every name a run writes is listed here (:data:`RUN_FILES`, :data:`CHECKPOINT_NAME`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Union

from .errors import BhvitError, ConfigError

__all__ = [
    "RunLock",
    "RunLocked",
    "LOCK_NAME",
    "RUN_FILES",
    "CHECKPOINT_NAME",
    "run_files",
    "remove_stale_temp",
    "check_out_dir",
]

LOCK_NAME = ".bhvit.lock"
# The files of a run directory besides the checkpoints.
RUN_FILES = ("last.json", "best.json", "final.json", "metrics.jsonl", "curves.png")
# A checkpoint's files: epochNNNN.safetensors, epochNNNN.optim.safetensors, epochNNNN.json.
CHECKPOINT_NAME = re.compile(r"epoch\d{4}(\.optim)?\.(safetensors|json)\Z")
# The temporary names of bhvit.checkpoint's atomic writes (and plot.py's .curves.png.tmp).
_TEMP_NAME = re.compile(r"\.(?P<png>curves\.png)\.tmp\Z|\.(?P<name>[^/]+)\.[A-Za-z0-9_]+\.tmp\Z")


class RunLocked(BhvitError, RuntimeError):
    """Another process trains in this run directory."""


class RunLock:
    """An exclusive lock on a run directory, held from ``acquire`` to ``release`` (or the
    end of the process). The lock file records the holder's PID for the error message;
    the lock itself is the kernel's ``flock``, so a stale PID in the file means nothing.
    Where ``fcntl`` is missing (Windows) the lock is a no-op."""

    def __init__(self, run_dir: Union[str, Path]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLocked(
                    f"{self.run_dir} is in use by another bhvit run (PID {holder}); wait for it "
                    "to finish or choose another --out."
                ) from None
            if self._is_current(fd):
                break
            os.close(fd)  # a run that failed removed the file after this one opened it: open it anew
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is the file at :attr:`path` now (not one removed since it was opened)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def release(self, remove: bool = False) -> None:
        """Drop the lock; with ``remove``, delete the lock file first (while still holding it,
        so that no other run can hold a lock on it meanwhile)."""
        if self._fd is not None:
            if remove and self._is_current(self._fd):
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_out_dir(run_dir: Union[str, Path]) -> Path:
    """``run_dir`` as a Path, refused at once if it exists and is not a directory."""
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file, not a directory; choose a directory for the run.")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {p}: {parent} is a file, not a directory.")
            break
    return p


def _ours(name: str) -> bool:
    return bool(CHECKPOINT_NAME.match(name)) or name in RUN_FILES


def run_files(run_dir: Union[str, Path], temp: bool = True) -> List[str]:
    """The names in ``run_dir`` that a bhvit run writes (checkpoints, the run files and, with
    ``temp``, the temporary names of their writes), sorted; the lock file is not one of them."""
    p = Path(run_dir)
    if not p.is_dir():
        return []
    names = []
    for f in p.iterdir():
        m = _TEMP_NAME.match(f.name)
        if _ours(f.name) or (temp and m is not None and _ours(m.group("name") or m.group("png"))):
            names.append(f.name)
    return sorted(names)


def remove_stale_temp(run_dir: Union[str, Path], names: Optional[tuple] = None) -> int:
    """Delete the temporary files of a run's own writes that a killed process left in
    ``run_dir`` (only names of the form bhvit's atomic writes make, for files a run writes,
    or for ``names``: an export's). Returns how many were removed. Call it with the lock held."""
    ours = _ours if names is None else names.__contains__
    removed = 0
    p = Path(run_dir)
    if not p.is_dir():
        return 0
    for f in p.iterdir():
        m = _TEMP_NAME.match(f.name)
        if m is None or not ours(m.group("name") or m.group("png")):
            continue
        if f.is_file() and not f.is_symlink():
            f.unlink()
            removed += 1
    return removed

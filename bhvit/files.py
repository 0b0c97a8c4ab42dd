"""Opening the files bhvit reads (torch-free, shared with the runtime).

``open(path)`` on a FIFO waits for a writer forever, and reading a device or a socket can too.
Every reader of an export, a checkpoint, a dataset file or an image opens it here: without
blocking, then refuses anything but a regular file before reading a byte.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Union

from .errors import BhvitError


class NotARegularFile(BhvitError, OSError):
    """A path names a FIFO, a device, a socket or a directory where bhvit reads a file."""


def open_regular(path: Union[str, Path]) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file (links followed); raises
    :class:`NotARegularFile` otherwise and ``OSError`` for what ``open`` itself refuses."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise NotARegularFile(errno.EINVAL, f"{kind}, not a regular file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Union[str, Path], limit: int = -1) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit + 1`` of them with a limit, so
    that the caller can tell a larger file)."""
    with open_regular(path) as f:
        return f.read(limit + 1) if limit >= 0 else f.read()

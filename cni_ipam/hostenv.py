"""What the plugin needs from its host: a log file and the host-wide lock."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time

from .log import log


class LockTimeout(Exception):
    pass


class LockUnusable(Exception):
    """The lock file cannot be opened.  ``transient``: a condition that may pass (out of file
    descriptors or disk space: try again later); else the configured path is unusable (a
    directory, under a regular file, read-only, not permitted: fix ``lock_file``)."""

    def __init__(self, msg: str, transient: bool):
        super().__init__(msg)
        self.transient = transient


#: errnos that may pass by themselves; anything else about the lock path is configuration
_TRANSIENT_ERRNOS = frozenset({"EMFILE", "ENFILE", "ENOSPC", "EDQUOT", "EAGAIN", "EINTR", "ENOMEM", "EIO",
                               "ENOLCK", "EBUSY"})


def setup_logging(log_file: str | None, level: str = "info", tag: str = "") -> None:
    """Log to ``log_file`` (created 0600) at ``level`` and to stderr at warning.
    stdout is the CNI protocol: nothing is ever logged there."""
    log.configure(log_file, level, tag)


@contextlib.contextmanager
def host_lock(path: str, timeout: float):
    """Hold the host-wide lock (flock on ``path``): one node never fights itself
    with CAS conflicts.  Raises LockTimeout after ``timeout`` seconds."""
    try:
        if not path:
            raise IsADirectoryError(21, "empty path")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        import errno
        name = errno.errorcode.get(e.errno or 0, "")
        transient = name in _TRANSIENT_ERRNOS
        raise LockUnusable(f"cannot open the host lock file {path!r} (ipam.lock_file): {e.strerror or e}"
                           + ("" if transient else "; set lock_file to a writable file path"),
                           transient) from None
    try:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"could not take the host lock {path} within {timeout:g}s") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
        yield
    finally:
        os.close(fd)  # closing releases the lock

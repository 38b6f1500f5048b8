"""What the plugin needs from its host: a log file and the host-wide lock."""
from __future__ import annotations

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


class _Alarm(Exception):
    """SIGALRM while waiting for the host lock: the timeout."""


def _on_alarm(signum, frame):
    raise _Alarm


def _wait_blocking(fd: int, timeout: float) -> bool | None:
    """Wait for the lock in the kernel (woken the moment it is released) under a SIGALRM
    timer.  True: locked; False: timed out; None: no signals here (not the main thread)."""
    import _signal
    try:
        old = _signal.signal(_signal.SIGALRM, _on_alarm)
    except ValueError:
        return None
    try:
        try:
            _signal.setitimer(_signal.ITIMER_REAL, timeout)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            _signal.signal(_signal.SIGALRM, old)
    except _Alarm:
        return False
    return True


class host_lock:
    """``with host_lock(path, timeout):`` hold the host-wide lock (flock on ``path``): one
    node never fights itself with CAS conflicts.  Raises LockTimeout after ``timeout``
    seconds.  (A class, not ``@contextlib.contextmanager``: contextlib is ~5% of an exec.)"""

    __slots__ = ("path", "timeout", "fd")

    def __init__(self, path: str, timeout: float):
        self.path, self.timeout, self.fd = path, timeout, -1

    def __enter__(self):
        path, timeout = self.path, self.timeout
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
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # contended (a burst of pods): sleep in flock() until the holder lets go, rather
                # than polling -- a poll's sleep leaves the lock idle after every release
                got = _wait_blocking(fd, timeout) if timeout > 0 else False
                if got is None:
                    self._poll(fd, path, timeout)
                elif not got:
                    raise LockTimeout(f"could not take the host lock {path} within {timeout:g}s") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return None

    @staticmethod
    def _poll(fd: int, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"could not take the host lock {path} within {timeout:g}s") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    def __exit__(self, *exc):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # closing releases the lock
        return False

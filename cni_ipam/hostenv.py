"""What the plugin needs from its host: a log file and the host-wide lock."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time

log = logging.getLogger("cni_ipam")


class LockTimeout(Exception):
    pass


def setup_logging(log_file: str | None, level: str = "info", tag: str = "") -> None:
    """Log to ``log_file`` (created 0600) at ``level`` and to stderr at warning.
    stdout is the CNI protocol: nothing is ever logged there."""
    root = logging.getLogger("cni_ipam")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        if getattr(h, "_cni_ipam_log_file", False):  # ours: close the file (in-process callers repeat this)
            h.close()
            h.stream.close()
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [%(process)d]{(' ' + tag) if tag else ''} %(message)s")
    err = logging.StreamHandler()  # stderr
    err.setLevel(logging.WARNING)
    err.setFormatter(fmt)
    root.addHandler(err)
    if log_file:
        try:
            os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            fh = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
            fh._cni_ipam_log_file = True
            fh.setFormatter(fmt)
            root.addHandler(fh)
        except OSError as e:
            root.warning("cannot open log file %s: %s", log_file, e.strerror)


@contextlib.contextmanager
def host_lock(path: str, timeout: float):
    """Hold the host-wide lock (flock on ``path``): one node never fights itself
    with CAS conflicts.  Raises LockTimeout after ``timeout`` seconds."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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

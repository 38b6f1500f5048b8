"""When may a node take over another node's empty block?  Measured by THIS node's clock only.

A block of another node may be reclaimed when it has been empty for ``RECLAIM_EMPTY_AFTER``
seconds.  The block's own ``emptySince`` is stamped by the node that released its last
address, with that node's clock: comparing it with ours makes the rule depend on the skew
between two machines (a reclaimer whose clock runs ahead would take a block the moment it
empties).  So the rule is: the reclaimer has seen the block empty, at the SAME etcd mod
revision (nothing written to it since), twice, ``RECLAIM_EMPTY_AFTER`` apart on its own
monotonic clock.  The observations are node-local (the plugin keeps them in a 0600 file next
to its lock file, read and written under the host lock; a reboot, seen as a new boot id,
starts them over).  Standard library only: on the exec path.
"""
from __future__ import annotations

from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
import os
import time

#: a block of another node that has been empty this long may be taken over when a pool
#: has no unclaimed block left (Calico reclaims empty blocks of other hosts likewise)
RECLAIM_EMPTY_AFTER = 60.0
#: observations older than this are forgotten (the block was reclaimed, reused or deleted)
FORGET_AFTER = 3600.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


class EmptyBlockWatch:
    """``seen``: ``{block key: (mod_revision, first seen empty at that revision, monotonic s)}``."""

    def __init__(self, seen: dict | None = None, clock=time.monotonic, after: float = RECLAIM_EMPTY_AFTER):
        self.seen: dict[str, tuple[int, float]] = {} if seen is None else seen
        self.clock = clock
        self.after = after
        self.changed = False

    def ripe(self, key: str, mod_revision: int) -> bool:
        """Record that ``key`` is empty at ``mod_revision`` now; True when it was already seen
        empty at that very revision at least ``after`` seconds ago (by this clock)."""
        now = self.clock()
        prev = self.seen.get(key)
        if prev is None or prev[0] != mod_revision or now < prev[1]:
            self.seen[key] = (mod_revision, now)
            self.changed = True
            return False
        return now - prev[1] >= self.after

    def waited(self, key: str) -> float:
        prev = self.seen.get(key)
        return self.clock() - prev[1] if prev else 0.0

    def forget(self, key: str) -> None:
        if self.seen.pop(key, None) is not None:
            self.changed = True


def file_path(lock_file: str) -> str:
    return os.path.join(os.path.dirname(lock_file) or ".", "empty-blocks-seen.json")


def load(path: str, clock=time.monotonic) -> EmptyBlockWatch:
    """The observations in ``path`` (none when missing, malformed, not ours, or from before a reboot)."""
    from .snapshot import read_private
    watch = EmptyBlockWatch(clock=clock)
    data = read_private(path, 4 * 1024 * 1024)
    if data is None:
        return watch
    try:
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("boot") != _boot_id():
            return watch
        now = clock()
        for key, (rev, t) in d.get("seen", {}).items():
            if isinstance(key, str) and isinstance(rev, int) and isinstance(t, (int, float)) \
                    and 0 <= now - t < FORGET_AFTER:
                watch.seen[key] = (rev, float(t))
    except (ValueError, TypeError, AttributeError, RecursionError):
        watch.seen.clear()
    return watch


def save(path: str, watch: EmptyBlockWatch) -> None:
    """Write the observations (0600, replaced by rename) when they changed; failures are quiet
    (the next ADD starts its observations over: a reclaim is only delayed)."""
    if not watch.changed:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        data = json.dumps({"boot": _boot_id(), "seen": watch.seen}, separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        watch.changed = False
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass

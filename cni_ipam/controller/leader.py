"""One leader among controller replicas, elected through etcd.

The leadership key (``<prefix>/v1/controller/leader``) is created with
``txn(version(key) == 0 -> put(key, identity, lease))``; the lease has the
controller's ``--lease-ttl``.  The leader renews the lease every TTL/4; when it
cannot (it died, was paused, lost etcd) the lease expires, etcd deletes the key,
and a follower -- which polls the key several times a second -- creates it anew.

The guard: the leader remembers the key's mod revision from its own create.  Every
write the controller makes carries a revision guard on it (``store.revision_guard``): once the key
has expired or belongs to another replica, that compare fails and nothing is
written, however late a paused former leader wakes up (see ipam/gc.py).
"""
from __future__ import annotations

import os
import socket
import threading
import time

from ..datastore import DatastoreError
from ..ipam.store import Conflict, Txn, commit, revision_guard
from ..log import log


def default_identity() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class LeaderElector:
    def __init__(self, ds, key: str, *, ttl: int = 15, identity: str | None = None, on_change=None):
        self.ds = ds
        self.key = key
        self.ttl = max(2, int(ttl))
        # etcd's lease is a second shorter than --lease-ttl: etcd expires leases on a 500 ms tick and
        # followers poll every 0.25 s, so a follower takes over within --lease-ttl of the leader's death
        self.lease_ttl = max(1, self.ttl - 1)
        self.identity = identity or default_identity()
        self.on_change = on_change or (lambda leader: None)
        self._lease: int | None = None
        self._rev = 0                 # mod revision of our leadership key (0: not the leader)
        self._renewed = 0.0           # monotonic time of the last successful renewal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.healthy = False          # etcd answered the last round
        self.last_error = ""
        self.holder = ""              # the identity that holds the key, as last read

    # -- state ---------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        with self._lock:
            # also when the renewals stopped working: the lease may have expired already
            return bool(self._rev) and time.monotonic() - self._renewed < self.lease_ttl * 2 / 3

    def guard(self):
        """The guard (a revision compare on the key) every write must carry (None when not the leader)."""
        with self._lock:
            return revision_guard(self.key, self._rev) if self._rev else None

    def lost(self, why: str) -> None:
        """A write found the guard broken: step down at once."""
        self._set(0, why)

    def _set(self, rev: int, why: str = "") -> None:
        with self._lock:
            was = bool(self._rev)
            self._rev = rev
            if rev:
                self._renewed = time.monotonic()
        if was != bool(rev):
            if rev:
                log.info("controller: became the leader (%s, key %s at revision %d)", self.identity, self.key, rev)
            else:
                log.warning("controller: no longer the leader: %s", why or "stepped down")
            self.on_change(bool(rev))

    # -- one round -------------------------------------------------------------------
    def step(self) -> None:
        """One round: renew (leader) or try to take the key (follower)."""
        if self._rev:
            ttl = self.ds.lease_keepalive(self._lease) if self._lease else 0
            if ttl <= 0:
                self._lease = None
                self._set(0, "the leader lease expired")
                return
            kv = self.ds.get(self.key)
            if kv is None or kv.mod_revision != self._rev:
                self._set(0, "the leadership key changed")
                return
            with self._lock:
                self._renewed = time.monotonic()
            self.holder = self.identity
            return
        kv = self.ds.get(self.key)
        if kv is not None:
            self.holder = kv.value.decode("utf-8", "replace")
            return
        if self._lease is None or self.ds.lease_keepalive(self._lease) <= 0:
            self._lease, _ = self.ds.lease_grant(self.lease_ttl)
        txn = Txn()
        txn.absent(self.key)
        txn.put(self.key, self.identity.encode(), lease=self._lease)
        try:
            commit(self.ds, txn)
        except Conflict:
            return   # another controller took it first
        self.holder = self.identity
        self._set(self.ds.last_revision)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
                self.healthy, self.last_error = True, ""
            except DatastoreError as e:
                self.healthy, self.last_error = False, str(e)
                log.warning("controller: leader election: %s", e)
                if self._rev and time.monotonic() - self._renewed >= self.lease_ttl * 2 / 3:
                    self._set(0, "cannot renew the leader lease")
            # the leader renews 4x per TTL; a follower polls often (a dead leader's lease expires
            # at most one TTL after its last renewal: takeover within TTL + this poll)
            self._stop.wait(self.lease_ttl / 4 if self._rev else min(0.25, self.ttl / 8))

    def start(self) -> "LeaderElector":
        self._thread = threading.Thread(target=self.run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def stop(self, resign: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
        if resign and self._lease is not None and self._rev:
            try:   # a follower takes over at once instead of after the TTL
                self.ds.lease_revoke(self._lease)
            except DatastoreError as e:
                log.warning("controller: could not revoke the leader lease: %s", e)
            self._lease = None
        self._set(0, "shutting down")

    def wait_leader(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.is_leader:
                return True
            time.sleep(0.05)
        return self.is_leader

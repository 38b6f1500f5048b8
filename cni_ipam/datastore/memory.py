"""An in-memory ``Datastore`` with etcd's semantics, for fast deterministic tests.

Not a transport: nothing here talks to etcd, and no product code path opens it.  It honours
what the engine relies on -- one global revision bumped once per applied write txn; per key
a create revision, a mod revision and a version (reset when a key is re-created); range reads
with ``limit``/``keys_only``/``count_only`` and multi-reads at ONE revision; compares on a mod
revision (``EQUAL``/``LESS``/``GREATER``/``NOT_EQUAL``; 0 + ``EQUAL`` = absent), on a value, and
over a range (``range_end``: every key in the range must hold; an empty range is compared as
one absent key, as etcd does); atomic commits with etcd's refusals (more than ``MAX_TXN_OPS``
compares or ops, the same key written twice); leases (a key put with a lease goes when the
lease is revoked or expires, by ``clock``).

Several clients may share one ``MemoryStore`` (``MemoryDatastore(store)``), like several
processes sharing one etcd; each client counts its own ``requests`` and ``last_revision``.
Thread-safe (one lock per store).

Test hooks, to drive conflict paths deterministically:

* ``store.before_commit = fn`` -- ``fn(ds, compares, ops)`` runs before EVERY commit of any
  client of the store (outside the lock; commits made inside ``fn`` do not run it again), so it
  can change the store the way a concurrent writer would and make the commit fail for real.
* ``store.fail_next_commits(n, when=None)`` -- the next ``n`` commits (those for which
  ``when(compares, ops)`` is true) are refused as conflicts (``commit`` returns False, nothing
  is written) without changing the store.
* ``store.commits`` / ``store.refused`` -- how many commits were attempted / answered False.
"""
from __future__ import annotations

import threading
import time

from .base import (MAX_TXN_OPS, KV, Compare, Datastore, DatastoreError, Delete, Put, RangeResult, Read)

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Sequence

_RESULTS = frozenset({"EQUAL", "GREATER", "LESS", "NOT_EQUAL"})


class _Entry:
    __slots__ = ("value", "create_revision", "mod_revision", "version", "lease")

    def __init__(self, value: bytes, create_revision: int, mod_revision: int, version: int, lease: int):
        self.value, self.create_revision, self.mod_revision = value, create_revision, mod_revision
        self.version, self.lease = version, lease


class MemoryStore:
    """The shared state: keys, revision, leases (what one etcd cluster holds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.lock = threading.RLock()
        self.clock = clock
        self.revision = 1          # etcd starts at revision 1 with an empty keyspace
        self.data: dict[str, _Entry] = {}
        self._sorted: list[str] | None = []   # sorted keys, rebuilt lazily after a create/delete
        self.leases: dict[int, tuple[int, float]] = {}   # id -> (granted TTL, expires at)
        self._next_lease = 0x1000
        self.before_commit: Callable | None = None
        self._hook_thread: int | None = None
        self._fail: list = []      # [[count, when], ...]
        self.commits = 0
        self.refused = 0

    # -- hooks -------------------------------------------------------------------
    def fail_next_commits(self, n: int = 1, when: Callable | None = None) -> None:
        """Refuse the next ``n`` commits (matching ``when(compares, ops)``) as conflicts."""
        with self.lock:
            self._fail.append([n, when])

    def _forced_failure(self, compares, ops) -> bool:
        for rule in self._fail:
            if rule[0] > 0 and (rule[1] is None or rule[1](compares, ops)):
                rule[0] -= 1
                if rule[0] == 0:
                    self._fail.remove(rule)
                return True
        return False

    # -- keyspace ----------------------------------------------------------------
    def _keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.data)
        return self._sorted

    def _range_keys(self, start: str, end: str | None) -> list[str]:
        if end is None:
            return [start] if start in self.data else []
        keys = self._keys()
        from bisect import bisect_left
        lo = bisect_left(keys, start)
        if end == "\0":   # etcd: every key >= start
            return keys[lo:]
        if end <= start:
            return []
        return keys[lo:bisect_left(keys, end, lo)]

    def _expire(self) -> None:
        now = self.clock()
        gone = [lid for lid, (_, at) in self.leases.items() if at <= now]
        for lid in gone:
            self._drop_lease(lid)

    def _drop_lease(self, lid: int) -> None:
        del self.leases[lid]
        keys = [k for k, e in self.data.items() if e.lease == lid]
        if keys:
            self.revision += 1
            for k in keys:
                del self.data[k]
            self._sorted = None

    def _kv(self, key: str, e: _Entry, keys_only: bool) -> KV:
        return KV(key=key, value=b"" if keys_only else e.value, mod_revision=e.mod_revision, version=e.version)

    def range(self, r: Read) -> RangeResult:
        keys = self._range_keys(r.start, r.end)
        count = len(keys)
        if r.count_only:
            return RangeResult(kvs=[], count=count, more=False)
        more = bool(r.limit) and count > r.limit
        if more:
            keys = keys[:r.limit]
        return RangeResult(kvs=[self._kv(k, self.data[k], r.keys_only) for k in keys], count=count, more=more)

    def compare(self, c: Compare) -> bool:
        if c.range_end is None:
            entries = [self.data[c.key]] if c.key in self.data else []
        else:
            entries = [self.data[k] for k in self._range_keys(c.key, c.range_end)]
        if c.value is not None:
            return bool(entries) and all(e.value == c.value for e in entries)
        if c.mod_revision == 0 and c.result == "EQUAL":
            return not entries     # etcd: VERSION == 0
        revs = [e.mod_revision for e in entries] or [0]   # an empty range: one absent key
        want = c.mod_revision
        if c.result == "EQUAL":
            return all(r == want for r in revs)
        if c.result == "NOT_EQUAL":
            return all(r != want for r in revs)
        if c.result == "LESS":
            return all(r < want for r in revs)
        return all(r > want for r in revs)

    def apply(self, ops: Sequence[Put | Delete]) -> None:
        """Apply ``ops`` at one new revision (none when nothing changes); caller holds the lock."""
        rev = self.revision + 1
        changed = False
        for op in ops:
            if isinstance(op, Put):
                old = self.data.get(op.key)
                if old is None:
                    self.data[op.key] = _Entry(bytes(op.value), rev, rev, 1, op.lease)
                    self._sorted = None
                else:
                    old.value, old.mod_revision, old.version, old.lease = bytes(op.value), rev, old.version + 1, op.lease
                changed = True
            elif op.key in self.data:
                del self.data[op.key]
                self._sorted = None
                changed = True
        if changed:
            self.revision = rev

    def check_txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> None:
        """etcd's refusals of a malformed txn (before anything is compared)."""
        for c in compares:
            if c.result not in _RESULTS:
                raise ValueError(f"unknown compare result {c.result!r}")
        if len(compares) > MAX_TXN_OPS or len(ops) > MAX_TXN_OPS:
            raise DatastoreError("etcd refused the txn: etcdserver: too many operations in txn request")
        puts: set[str] = set()
        deletes: set[str] = set()
        for op in ops:
            if isinstance(op, Put):
                dup = op.key in puts or op.key in deletes
                puts.add(op.key)
            elif isinstance(op, Delete):
                dup = op.key in puts     # (etcd: deleting a key twice is fine, put + delete is not)
                deletes.add(op.key)
            else:
                raise TypeError(f"not a Put or Delete: {op!r}")
            if dup:
                raise DatastoreError("etcd refused the txn: etcdserver: duplicate key given in txn request")
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self.leases:
                raise DatastoreError("etcd refused the txn: etcdserver: requested lease not found")

    # -- inspection (tests) --------------------------------------------------------
    def dump(self, prefix: str = "") -> dict[str, bytes]:
        """Every key (under ``prefix``) and its value."""
        with self.lock:
            self._expire()
            return {k: self.data[k].value for k in self._keys() if k.startswith(prefix)}


class MemoryDatastore(Datastore):
    """A client of a ``MemoryStore`` (a new private store when none is given)."""

    def __init__(self, store: MemoryStore | None = None):
        self.store = store if store is not None else MemoryStore()
        self.requests = 0
        self.last_revision = 0
        self.closed = False

    @property
    def endpoints(self) -> list[str]:
        return ["memory://"]

    def read(self, reads: Sequence[Read]) -> list[RangeResult]:
        if not reads:
            return []
        s = self.store
        with s.lock:
            s._expire()
            self.requests += 1 if len(reads) == 1 else -(-len(reads) // MAX_TXN_OPS)
            out = [s.range(r) for r in reads]
            self.last_revision = s.revision
        return out

    def commit(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> bool:
        s = self.store
        hook = s.before_commit
        me = threading.get_ident()
        if hook is not None and s._hook_thread != me:
            with s.lock:   # one hook run at a time; its own commits skip the hook
                s._hook_thread = me
                try:
                    hook(self, compares, ops)
                finally:
                    s._hook_thread = None
        with s.lock:
            s._expire()
            s.check_txn(compares, ops)
            self.requests += 1
            s.commits += 1
            ok = not s._forced_failure(compares, ops) and all(s.compare(c) for c in compares)
            if ok:
                s.apply(ops)
            else:
                s.refused += 1
            self.last_revision = s.revision
            return ok

    # -- leases --------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> tuple[int, int]:
        s = self.store
        with s.lock:
            s._expire()
            self.requests += 1
            s._next_lease += 1
            lid = s._next_lease
            s.leases[lid] = (int(ttl), s.clock() + int(ttl))
            return lid, int(ttl)

    def lease_keepalive(self, lease_id: int) -> int:
        s = self.store
        with s.lock:
            s._expire()
            self.requests += 1
            got = s.leases.get(lease_id)
            if got is None:
                return 0
            s.leases[lease_id] = (got[0], s.clock() + got[0])
            return got[0]

    def lease_revoke(self, lease_id: int) -> bool:
        s = self.store
        with s.lock:
            s._expire()
            self.requests += 1
            if lease_id not in s.leases:
                return False
            s._drop_lease(lease_id)
            return True

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<MemoryDatastore revision {self.store.revision}, {len(self.store.data)} keys>"

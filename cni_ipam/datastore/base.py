"""The one small interface between the IPAM engine and etcd.

Two primitives, implemented by each transport:

* ``read(reads)``   -- several range reads answered in ONE request at one revision.
* ``commit(compares, ops)`` -- one atomic compare-and-swap transaction.

Everything else here is sugar built on those two.  Keys are ``str`` (UTF-8 on
the wire); values are ``bytes``.
"""
from __future__ import annotations

import time
from cni_ipam._records import dataclass
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Sequence

#: etcd's default ``--max-txn-ops``; batches are cut to this size.
MAX_TXN_OPS = 128
#: the shortest time one endpoint is given before failing over to the next
MIN_ATTEMPT_TIMEOUT = 0.2


class DatastoreError(Exception):
    """etcd answered, but refused the request (bad request, auth, too many ops...)."""


class DatastoreUnavailable(DatastoreError):
    """No endpoint answered in time (connection refused, timeout, no leader).

    The plugin maps this to CNI error code 11 ("try again later").  ``commit_sent`` (set by
    ``commit``): the txn reached an endpoint whose answer was lost, so it may have been
    applied -- False only when no attempt got as far as sending it.  ``unreachable``: every
    endpoint failed at once in a way waiting does not mend (connection refused, a host
    name that does not resolve, not an etcd client URL), so the endpoints are probably
    wrong -- the CLI then says how to set them."""

    commit_sent = False
    unreachable = False


class Unreachable(str):
    """An attempt's error text (see ``with_failover``) when the endpoint cannot be reached at
    all -- connection refused, name does not resolve, no route, not an etcd client URL: when
    every endpoint fails like this in one round, waiting for the deadline would not help."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    version: int


@dataclass(frozen=True, slots=True)
class Read:
    """A range read: one key (``end`` None), or keys in ``[start, end)``."""
    start: str
    end: str | None = None
    keys_only: bool = False
    count_only: bool = False
    limit: int = 0


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KV]
    count: int  # total keys in the range (may exceed len(kvs) with a limit)
    more: bool = False


@dataclass(frozen=True, slots=True)
class Compare:
    """A guard on one key's mod revision: ``mod_revision == 0`` means the key must not exist.

    With ``range_end``: a guard on every key in ``[key, range_end)`` (etcd >= 3.3); an empty
    range holds.  ``result`` is ``"EQUAL"`` (default), ``"LESS"``, ``"GREATER"`` or
    ``"NOT_EQUAL"`` (a key's ``mod_revision`` against the given one; etcd's names).  The usual
    range guard: ``Compare(prefix, rev + 1, range_end=prefix_end(prefix), result="LESS")``
    -- nothing in the range was created or modified after revision ``rev`` (deletions are
    not seen: guard each known key as well).

    With ``value`` (bytes): a guard on the key's CONTENT instead -- it exists and holds exactly
    ``value`` (``mod_revision`` and ``result`` are then ignored).  Proves content where revision
    numbers cannot (a store restored from a backup reuses them)."""
    key: str
    mod_revision: int = 0
    range_end: str | None = None
    result: str = "EQUAL"
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``value``; with ``lease`` (an id from ``lease_grant``) the key is deleted when the
    lease expires or is revoked."""
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


def client_endpoints(endpoints, username: str | None, password: str | None) -> list[str]:
    """The endpoint list of a transport's constructor (a list or a comma-separated string),
    checked together with the auth arguments both transports take."""
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    if (username is None) != (password is None):
        raise ValueError("etcd username and password go together")
    return list(endpoints)


def with_failover(urls: Sequence[str], start: int, deadline: float, timeout: float,
                  attempt: Callable[[int, float], tuple[bool, object]]) -> tuple[int, object]:
    """Ask endpoints round robin, starting at ``start``, until one answers or ``deadline``.

    ``attempt(idx, attempt_timeout)`` returns ``(True, value)`` for an answer, or
    ``(False, error text)`` to try the next endpoint (it raises for errors no other
    endpoint can mend).  Each attempt gets the remaining time divided by the
    endpoints not yet tried in this round; after a full failed round it pauses
    briefly (exponential, at most 0.5 s).  Returns ``(idx, value)`` of the answer;
    raises ``DatastoreUnavailable`` naming every endpoint tried."""
    n = len(urls)
    idx = start % n
    tried_in_pass = 0
    tried: list[str] = []
    last = "no attempt made"
    backoff = 0.05
    hard: dict[str, str] = {}   # endpoint -> why it cannot be reached (this round)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and tried:
            break
        attempt_timeout = max(MIN_ATTEMPT_TIMEOUT, remaining / (n - tried_in_pass))
        if urls[idx] not in tried:
            tried.append(urls[idx])
        ok, value = attempt(idx, attempt_timeout)
        if ok:
            return idx, value
        last = f"{urls[idx]}: {value}"
        if isinstance(value, Unreachable):
            hard[urls[idx]] = str(value)
        idx = (idx + 1) % n
        tried_in_pass += 1
        if tried_in_pass >= n:  # a full round failed: breathe before the next one
            if len(hard) == n:   # ... unless no endpoint can be reached at all: say so now
                e = DatastoreUnavailable(
                    "etcd unavailable: cannot reach " + "; ".join(f"{u} ({why})" for u, why in hard.items())
                    + " -- is etcd running there, and are these its client URLs?")
                e.unreachable = True
                raise e
            hard.clear()
            tried_in_pass = 0
            pause = min(backoff, deadline - time.monotonic())
            if pause > 0:
                time.sleep(pause)
            backoff = min(backoff * 2, 0.5)
    raise DatastoreUnavailable(f"etcd unavailable: no answer within {timeout:g}s from "
                               f"{', '.join(tried)}; last error: {last}{_tls_hint(last)}")


def _tls_hint(last: str) -> str:
    """A plain http:// URL whose server closes every connection without answering is usually an
    etcd that serves TLS there."""
    if last.startswith("http://") and any(m in last for m in ("closed the connection without answering",
                                                                  "Socket closed")):
        return (" (if etcd serves TLS on that port, use an https:// URL and give the CA with "
                "--etcd-ca-cert-file / etcd_ca_cert_file)")
    return ""


def prefix_end(prefix: str) -> str:
    """The exclusive end of a prefix range (etcd's rule: last byte + 1).

    Keys are ASCII by construction (names are percent-encoded), so the last
    character never overflows."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def read_key(key: str) -> Read:
    return Read(key)


def read_prefix(prefix: str, *, keys_only: bool = False, limit: int = 0) -> Read:
    return Read(prefix, prefix_end(prefix), keys_only=keys_only, limit=limit)


class Datastore:
    """Base class: transports implement ``read``, ``commit`` and ``close``."""

    #: how many requests this client sent (benchmarks and tests count them)
    requests: int = 0
    #: etcd's header revision of the last ``read`` (the revision it read at) or ``commit``
    #: (after a successful txn: the revision its writes got); 0 when unknown
    last_revision: int = 0

    def read(self, reads: Sequence[Read]) -> list[RangeResult]:  # pragma: no cover
        raise NotImplementedError

    def commit(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> bool:  # pragma: no cover
        """Apply ``ops`` atomically iff every compare holds.  True when applied."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        pass

    # -- leases (long-running code: leader election) ------------------------
    def lease_grant(self, ttl: int) -> tuple[int, int]:  # pragma: no cover
        """A new lease of ``ttl`` seconds: returns (lease id, granted TTL)."""
        raise NotImplementedError(f"{type(self).__name__} has no lease support (use the grpc transport)")

    def lease_keepalive(self, lease_id: int) -> int:  # pragma: no cover
        """Renew a lease; returns its new TTL in seconds, 0 when it has expired (or never existed)."""
        raise NotImplementedError(f"{type(self).__name__} has no lease support (use the grpc transport)")

    def lease_revoke(self, lease_id: int) -> bool:  # pragma: no cover
        """Revoke a lease (its keys are deleted at once).  False when it did not exist."""
        raise NotImplementedError(f"{type(self).__name__} has no lease support (use the grpc transport)")

    # -- sugar ------------------------------------------------------------
    def get(self, key: str) -> KV | None:
        kvs = self.read([Read(key)])[0].kvs
        return kvs[0] if kvs else None

    def get_many(self, keys: Sequence[str]) -> list[KV | None]:
        out: list[KV | None] = []
        for res in self.read([Read(k) for k in keys]):
            out.append(res.kvs[0] if res.kvs else None)
        return out

    def get_prefix(self, prefix: str, *, keys_only: bool = False) -> list[KV]:
        return self.range(prefix, prefix_end(prefix), keys_only=keys_only)

    def range(self, start: str, end: str, *, keys_only: bool = False, limit: int = 0) -> list[KV]:
        """All keys in [start, end), paging through large ranges."""
        out: list[KV] = []
        page = 1000 if limit == 0 else min(limit, 1000)
        while True:
            res = self.read([Read(start, end, keys_only=keys_only, limit=page)])[0]
            out.extend(res.kvs)
            if limit and len(out) >= limit:
                return out[:limit]
            if not res.more or not res.kvs:
                return out
            start = res.kvs[-1].key + "\0"

    def count(self, start: str, end: str) -> int:
        return self.read([Read(start, end, count_only=True)])[0].count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""The one small interface between the IPAM engine and etcd.

Two primitives:

* ``read(reads)``   -- several range reads answered in ONE request at one revision.
* ``commit(compares, ops)`` -- one atomic compare-and-swap transaction.

Everything else here is sugar built on those two.  Keys are ``str`` (UTF-8 on
the wire); values are ``bytes``.

``Datastore`` is also the template of the etcd transports (gateway.py, grpc.py): it owns
what they share -- the deadline, the auth / re-auth loop, multi-reads at one revision,
compare validation, the endpoint URL rule, the failover bookkeeping -- and each transport
supplies only its wire calls: ``_range``, ``_read_txn``, ``_txn``, ``_auth`` (each raising
``Refused`` for an answer that is a refusal).
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


#: error texts meaning "this member cannot serve now: try another / later" (both transports)
UNAVAILABLE_MARKERS = ("no leader", "leader changed", "request timed out", "too many requests",
                       "not capable", "server stopped", "unhealthy cluster", "connection lost")
#: error texts meaning "authenticate again" (token expired, member restarted)
TOKEN_MARKERS = ("invalid auth token", "revision of auth store is old")


class Refused(Exception):
    """Internal to the transports: etcd at ``url`` answered ``what`` with a refusal (not an
    availability problem); ``code`` names it in etcd's terms (``HTTP 400``, ``INVALID_ARGUMENT``)."""

    def __init__(self, url: str, text: str, code: str = ""):
        super().__init__(url, text, code)
        self.url, self.text, self.code = url, text, code


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


#: compare results (etcd's names)
RESULTS = ("EQUAL", "GREATER", "LESS", "NOT_EQUAL")


def compare_target(c: Compare) -> tuple[str, str, object]:
    """What ``c`` compares, in etcd's terms: ``("VALUE", "EQUAL", value)``, ``("VERSION", "EQUAL",
    0)`` (the key is absent) or ``("MOD", result, mod_revision)``.  ValueError for an unknown result."""
    if c.result not in RESULTS:
        raise ValueError(f"unknown compare result {c.result!r}")
    if c.value is not None:
        return "VALUE", "EQUAL", c.value
    if c.mod_revision == 0 and c.result == "EQUAL":
        return "VERSION", "EQUAL", 0
    return "MOD", c.result, c.mod_revision


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


class Endpoint:
    """An etcd client URL, parsed: ``http(s)://host[:port][/path]``.  (A plain class: a record
    class costs more at import, and this module is on the plugin's exec path.)"""
    __slots__ = ("scheme", "host", "port", "path", "given")

    def __init__(self, scheme: str, host: str, port: int, path: str = "", given: str = ""):
        self.scheme = scheme
        self.host = host      # an IPv6 address without its brackets
        self.port = port
        self.path = path      # "" or "/some/prefix" (a gateway behind a path)
        self.given = given    # host[:port] as written (names the endpoint in messages)

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"

    @property
    def https(self) -> bool:
        return self.scheme == "https"

    @property
    def bracketed_host(self) -> str:
        """The host as it goes before ``:port`` (``[v6]``)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def url(self) -> str:
        """The URL as given (scheme lower case, no trailing slash)."""
        return f"{self.scheme}://{self.given or self.bracketed_host + ':' + str(self.port)}{self.path}"


class EndpointError(ValueError):
    """A malformed endpoint URL; ``str()`` completes "etcd endpoint ..." and never holds
    credentials (``credentials``: the URL had some -- it is not quoted then)."""
    credentials = False


def parse_endpoint(url: str, default_https: bool | None = None) -> Endpoint:
    """The ONE rule for an etcd endpoint URL (the transports, the CNI config, the CLI).

    ``default_https``: the scheme of a URL given without one (None: a scheme is required)."""
    raw = url.strip()
    if "://" not in raw and default_https is not None:
        raw = ("https://" if default_https else "http://") + raw
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise EndpointError(f"{url!r} is not an http:// or https:// URL")
    hostport, slash, path = rest.partition("/")
    if "@" in hostport:   # never echo this URL: it holds credentials
        e = EndpointError("URL with credentials in it: not allowed")
        e.credentials = True
        raise e
    if hostport.startswith("["):  # [v6]:port
        host, close, port = hostport[1:].partition("]")
        if not close or (port and not port.startswith(":")):
            raise EndpointError(f"{url!r} is not a valid URL")
        port = port[1:]
    else:
        host, _, port = hostport.partition(":")
    if not host:
        raise EndpointError(f"{url!r} has no host")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise EndpointError(f"{url!r} has an invalid port")
    if not port:
        from cni_ipam.constants import DEFAULT_ETCD_PORT   # (already loaded on the exec path: config)
    return Endpoint(scheme, host, int(port) if port else DEFAULT_ETCD_PORT,
                    ("/" + path).rstrip("/") if slash else "", hostport)


def client_endpoints(endpoints, username: str | None, password: str | None,
                     default_https: bool = False) -> list[Endpoint]:
    """The endpoints of a transport's constructor (a list or a comma-separated string), parsed
    (``parse_endpoint``; ValueError naming the bad one), checked together with the auth
    arguments both transports take."""
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    if (username is None) != (password is None):
        raise ValueError("etcd username and password go together")
    out = []
    for url in endpoints:
        try:
            out.append(parse_endpoint(url, default_https))
        except EndpointError as e:
            if e.credentials:
                raise ValueError("put etcd credentials in username/password, not in the endpoint URL") from None
            raise ValueError(f"etcd endpoint {e}") from None
    return out


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
    """The interface (``read``, ``commit``, ``close``, leases, sugar) and the etcd transports'
    template: ``read`` and ``commit`` here do what every transport must (one revision for a
    multi-read, compare validation, ``commit_sent``), ``_call`` runs a request with a deadline,
    authenticating (again, once, when the token went stale) -- a transport supplies
    ``_range``, ``_read_txn``, ``_txn`` and ``_auth``, each one wire call that raises
    ``Refused`` for a refusal and ``DatastoreUnavailable`` (``with_failover``) when no
    endpoint answered.  A datastore that is no etcd client (memory.py) overrides
    ``read``/``commit`` instead."""

    #: how many requests this client sent (benchmarks and tests count them)
    requests: int = 0
    #: etcd's header revision of the last ``read`` (the revision it read at) or ``commit``
    #: (after a successful txn: the revision its writes got); 0 when unknown
    last_revision: int = 0
    timeout: float = 10.0
    _cur = 0                       # the endpoint to ask first (the last that answered)
    _username: str | None = None
    _password: str | None = None
    _token: str | None = None
    _posted = False                # whether the current commit got as far as being sent

    # -- what a transport supplies ------------------------------------------------------
    def _range(self, read: Read, deadline: float, token: str | None) -> tuple[RangeResult, int]:  # pragma: no cover
        """One range request: the result and the header revision."""
        raise NotImplementedError

    def _read_txn(self, reads: Sequence[Read], revision: int, deadline: float,
                  token: str | None) -> tuple[list[RangeResult], int]:  # pragma: no cover
        """At most MAX_TXN_OPS range reads in one txn, at ``revision`` (0: the current one)."""
        raise NotImplementedError

    def _txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete], deadline: float,
             token: str | None) -> tuple[bool, int]:  # pragma: no cover
        """One compare-and-swap txn: (succeeded, header revision)."""
        raise NotImplementedError

    def _auth(self, deadline: float) -> str | None:  # pragma: no cover
        """Authenticate as ``_username``: the token (Refused when etcd says no)."""
        raise NotImplementedError

    # -- the template -------------------------------------------------------------------
    def _authenticate(self, deadline: float) -> None:
        try:
            token = self._auth(deadline)
        except Refused as r:
            raise DatastoreError(f"etcd authentication as user {self._username!r} at {r.url} failed: "
                                 f"{r.text}") from None
        if not token:
            raise DatastoreError(f"etcd authentication as user {self._username!r}: no token returned")
        self._token = token

    def _call(self, what: str, fn: Callable, *args):
        """``fn(*args, deadline, token)`` within this client's timeout, authenticated when a
        user is set (again, once, when etcd says the token is stale)."""
        deadline = time.monotonic() + self.timeout
        if self._username is not None and self._token is None:
            self._authenticate(deadline)
        reauthenticated = False
        while True:
            try:
                return fn(*args, deadline, self._token)
            except Refused as r:
                if (self._username is not None and not reauthenticated
                        and any(m in r.text for m in TOKEN_MARKERS)):
                    reauthenticated = True   # token expired / member restarted: once more with a new one
                    self._token = None
                    self._authenticate(deadline)
                    continue
                raise DatastoreError(f"etcd at {r.url} refused {what}: {r.text} ({r.code})") from None

    def _failover(self, urls: Sequence[str], deadline: float,
                  attempt: Callable[[int, float], tuple[bool, object]]):
        """``with_failover`` from the endpoint that answered last; the next call after a
        failure starts at the next endpoint."""
        try:
            self._cur, value = with_failover(urls, self._cur, deadline, self.timeout, attempt)
        except DatastoreUnavailable:
            self._cur += 1
            raise
        return value

    def read(self, reads: Sequence[Read]) -> list[RangeResult]:
        """One range request for one read; one txn per MAX_TXN_OPS reads, all at the first
        txn's revision (one consistent view)."""
        if not reads:
            return []
        if len(reads) == 1:
            res, self.last_revision = self._call("range", self._range, reads[0])
            return [res]
        out: list[RangeResult] = []
        revision = 0
        for i in range(0, len(reads), MAX_TXN_OPS):
            chunk = reads[i:i + MAX_TXN_OPS]
            results, rev = self._call("txn", self._read_txn, chunk, revision)
            if len(results) != len(chunk):
                raise DatastoreError(f"etcd answered {len(results)} of {len(chunk)} reads")
            revision = revision or rev
            out.extend(results)
        self.last_revision = revision
        return out

    def commit(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> bool:
        """Apply ``ops`` atomically iff every compare holds.  True when applied."""
        for c in compares:
            compare_target(c)   # an unknown result: ValueError before anything is sent
        self._posted = False
        try:
            ok, self.last_revision = self._call("txn", self._txn, compares, ops)
        except DatastoreUnavailable as e:
            e.commit_sent = self._posted
            raise
        return ok

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

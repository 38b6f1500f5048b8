"""etcd v3 over gRPC, using python3-etcd3 (``import etcd3``).

For the CLI and long-running code: importing grpc + protobuf costs ~0.1 s, which
is why the plugin's exec path uses ``gateway`` instead.  Same semantics as the
gateway transport: ``read`` is one ``Range`` (one key/range) or one ``Txn`` of
range ops per ``MAX_TXN_OPS`` reads; ``commit`` is one ``Txn``.

python3-etcd3's own multi-endpoint failover (``MultiEndpointEtcd3Client(failover=True)``)
does not retry a failed call and benches a failed endpoint for 300 s, so this
module keeps one ``etcd3.Endpoint`` (i.e. one gRPC channel) per endpoint and
does its own deadline-bounded round-robin failover with the ``etcdrpc`` stubs.
"""
from __future__ import annotations

import time
from typing import Sequence

import etcd3
import grpc
from etcd3 import etcdrpc

from .base import (MAX_TXN_OPS, KV, Compare, Datastore, DatastoreError, DatastoreUnavailable, Delete,
                   Put, RangeResult, Read, Unreachable, with_failover, client_endpoints)


_FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.CANCELLED})
_UNAVAILABLE_MARKERS = ("no leader", "leader changed", "request timed out", "too many requests",
                        "not capable", "server stopped", "unhealthy cluster", "connection lost")
_TOKEN_MARKERS = ("invalid auth token", "revision of auth store is old")
# a TLS mismatch is configuration, not availability: say so at once
# (TSI_DATA_CORRUPTED: with TLS 1.3 the server rejects our client certificate after the handshake;
# grpc reports the server's alert -- bad certificate, unknown CA, certificate required -- only as this)
_TLS_CONFIG_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed",
                       "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "WRONG_VERSION_NUMBER",
                       "TSI_DATA_CORRUPTED")

_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
    # come back quickly after a member restarts (the default backoff grows to 120 s)
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _range_request(r: Read, revision: int = 0):
    req = etcdrpc.RangeRequest(key=_b(r.start), limit=r.limit, keys_only=r.keys_only,
                               count_only=r.count_only, revision=revision)
    if r.end is not None:
        req.range_end = _b(r.end)
    return req


def _range_result(resp) -> RangeResult:
    kvs = [KV(key=kv.key.decode("utf-8", "surrogateescape"), value=bytes(kv.value),
              mod_revision=kv.mod_revision, version=kv.version) for kv in resp.kvs]
    return RangeResult(kvs=kvs, count=resp.count, more=resp.more)


_RESULTS = {"EQUAL": etcdrpc.Compare.EQUAL, "GREATER": etcdrpc.Compare.GREATER,
            "LESS": etcdrpc.Compare.LESS, "NOT_EQUAL": etcdrpc.Compare.NOT_EQUAL}


def _compare(c: Compare):
    result = _RESULTS.get(c.result)
    if result is None:
        raise ValueError(f"unknown compare result {c.result!r}")
    if c.value is not None:
        out = etcdrpc.Compare(key=_b(c.key), target=etcdrpc.Compare.VALUE, result=etcdrpc.Compare.EQUAL,
                              value=bytes(c.value))
    elif c.mod_revision == 0 and c.result == "EQUAL":
        out = etcdrpc.Compare(key=_b(c.key), target=etcdrpc.Compare.VERSION,
                              result=etcdrpc.Compare.EQUAL, version=0)
    else:
        out = etcdrpc.Compare(key=_b(c.key), target=etcdrpc.Compare.MOD, result=result,
                              mod_revision=c.mod_revision)
    if c.range_end is not None:
        out.range_end = _b(c.range_end)
    return out


def _op(op: Put | Delete):
    if isinstance(op, Put):
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=_b(op.key), value=op.value, lease=op.lease))
    if isinstance(op, Delete):
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=_b(op.key)))
    raise TypeError(f"not a Put or Delete: {op!r}")


# failures no wait mends (grpc's texts differ between versions: match the OS / resolver part)
_UNREACHABLE = (("Connection refused", "connection refused"),
                ("DNS resolution failed", "host name does not resolve"),
                ("errors resolving", "host name does not resolve"),
                ("Name or service not known", "host name does not resolve"),
                ("No route to host", "no route to host"),
                ("Network is unreachable", "no route to host"))


def _unreachable(text: str, secure: bool) -> "Unreachable | None":
    for marker, why in _UNREACHABLE:
        if marker in text:
            return Unreachable(why)
    if secure and "Handshake read failed" in text:
        return Unreachable("no TLS handshake: the server speaks plain HTTP there? then use an http:// URL")
    return None


def _details(exc: grpc.RpcError) -> str:
    try:
        return exc.details() or str(exc.code())
    except Exception:  # pragma: no cover - not a grpc.Call
        return str(exc)


def _is_failover(exc: grpc.RpcError) -> bool:
    try:
        code = exc.code()
    except Exception:  # pragma: no cover
        return True
    if code in _FAILOVER_CODES:
        return True
    text = _details(exc)
    return any(m in text for m in _UNAVAILABLE_MARKERS)


def _parse_endpoint(url: str, default_secure: bool) -> tuple[str, int, bool, str]:
    raw = url.strip()
    if "://" not in raw:
        raw = ("https://" if default_secure else "http://") + raw
    scheme, _, rest = raw.partition("://")
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint must be http:// or https://, got {url!r}")
    hostport = rest.partition("/")[0]
    if "@" in hostport:
        raise ValueError("put etcd credentials in username/password, not in the endpoint URL")
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        host, port = f"[{host}]", port.lstrip(":")
    else:
        host, _, port = hostport.partition(":")
    if not host:
        raise ValueError(f"etcd endpoint without a host: {url!r}")
    return host, int(port) if port else 2379, scheme == "https", f"{scheme}://{hostport}"


class GrpcDatastore(Datastore):
    """A ``Datastore`` over etcd's gRPC API (python3-etcd3 channels and stubs)."""

    def __init__(self, endpoints: Sequence[str] | str, *, timeout: float = 10.0,
                 ca_cert: str | None = None, cert: str | None = None, key: str | None = None,
                 username: str | None = None, password: str | None = None):
        endpoints = client_endpoints(endpoints, username, password)
        if (cert is None) != (key is None):
            raise ValueError("a client cert and its key go together")
        self.timeout = float(timeout)
        self.requests = 0
        self._cur = 0
        self._username, self._password = username, password
        self._token: str | None = None
        parsed = [_parse_endpoint(e, bool(ca_cert or cert)) for e in endpoints]
        creds = None
        if any(secure for _, _, secure, _ in parsed):
            if ca_cert is not None:
                # etcd3's helper reads the files (CA, then client key and cert)
                creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(ca_cert, key, cert)
            else:  # system roots
                pair = [None, None]
                if cert is not None:
                    with open(key, "rb") as f:
                        pair[0] = f.read()
                    with open(cert, "rb") as f:
                        pair[1] = f.read()
                creds = grpc.ssl_channel_credentials(None, pair[0], pair[1])
        opts = list(_CHANNEL_OPTIONS.items())
        self._urls = [url for _, _, _, url in parsed]
        self._eps = [etcd3.Endpoint(host, port, secure=secure, creds=creds if secure else None,
                                    opts=opts) for host, port, secure, _ in parsed]
        self._kv = [etcdrpc.KVStub(ep.channel) for ep in self._eps]

    @property
    def endpoints(self) -> list[str]:
        return list(self._urls)

    # -- transport -------------------------------------------------------------
    def _rpc(self, method: str, request, deadline: float, metadata):
        """Call ``method`` on the current endpoint, failing over round robin until ``deadline``."""
        def attempt(idx: int, attempt_timeout: float):
            url = self._urls[idx]
            if method == "Authenticate":
                fn = etcdrpc.AuthStub(self._eps[idx].channel).Authenticate
            elif method.startswith("Lease"):
                fn = getattr(etcdrpc.LeaseStub(self._eps[idx].channel), method)
                if method == "LeaseKeepAlive":   # a bidirectional stream: send one request, take one answer
                    stream = fn
                    fn = lambda req, timeout, metadata: next(stream(iter([req]), timeout=timeout,  # noqa: E731
                                                                    metadata=metadata))
            else:
                fn = getattr(self._kv[idx], method)
            try:
                self.requests += 1
                return True, fn(request, timeout=attempt_timeout, metadata=metadata)
            except grpc.RpcError as e:
                text = _details(e)
                if any(m in text for m in _TLS_CONFIG_MARKERS):
                    raise DatastoreError(f"TLS with etcd at {url} failed: {text}") from None
                if not _is_failover(e):
                    self._cur = idx
                    raise _Refused(url, e) from None
                return False, (_unreachable(text, url.startswith("https://"))
                               or f"{e.code().name}: {text}")

        try:
            self._cur, resp = with_failover(self._urls, self._cur, deadline, self.timeout, attempt)
        except DatastoreUnavailable:
            self._cur += 1   # start the next call elsewhere
            raise
        return resp

    def _authenticate(self, deadline: float) -> None:
        req = etcdrpc.AuthenticateRequest(name=self._username, password=self._password)
        try:
            resp = self._rpc("Authenticate", req, deadline, None)
        except _Refused as r:
            raise DatastoreError(f"etcd authentication as user {self._username!r} at {r.url} failed: "
                                 f"{_details(r.exc)}") from None
        if not resp.token:
            raise DatastoreError(f"etcd authentication as user {self._username!r}: no token returned")
        self._token = resp.token

    def _call(self, method: str, request):
        deadline = time.monotonic() + self.timeout
        if self._username is not None and self._token is None:
            self._authenticate(deadline)
        reauthenticated = False
        while True:
            metadata = (("token", self._token),) if self._token else None
            try:
                return self._rpc(method, request, deadline, metadata)
            except _Refused as r:
                text = _details(r.exc)
                if (self._username is not None and not reauthenticated
                        and any(m in text for m in _TOKEN_MARKERS)):
                    reauthenticated = True
                    self._token = None
                    self._authenticate(deadline)
                    continue
                raise DatastoreError(f"etcd at {r.url} refused {method}: {text} "
                                     f"({r.exc.code().name})") from None

    # -- Datastore -------------------------------------------------------------
    def read(self, reads: Sequence[Read]) -> list[RangeResult]:
        if not reads:
            return []
        if len(reads) == 1:
            resp = self._call("Range", _range_request(reads[0]))
            self.last_revision = resp.header.revision
            return [_range_result(resp)]
        out: list[RangeResult] = []
        revision = 0  # later chunks read at the first chunk's revision
        for i in range(0, len(reads), MAX_TXN_OPS):
            chunk = reads[i:i + MAX_TXN_OPS]
            req = etcdrpc.TxnRequest(success=[etcdrpc.RequestOp(request_range=_range_request(r, revision))
                                              for r in chunk])
            resp = self._call("Txn", req)
            if not revision:
                revision = resp.header.revision
            if len(resp.responses) != len(chunk):
                raise DatastoreError(f"etcd answered {len(resp.responses)} of {len(chunk)} reads")
            out.extend(_range_result(r.response_range) for r in resp.responses)
        self.last_revision = revision
        return out

    def commit(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> bool:
        req = etcdrpc.TxnRequest(compare=[_compare(c) for c in compares], success=[_op(o) for o in ops])
        try:
            resp = self._call("Txn", req)
        except DatastoreUnavailable as e:
            e.commit_sent = True   # (gRPC does not tell whether a failed call reached the server)
            raise
        self.last_revision = resp.header.revision
        return bool(resp.succeeded)

    # -- leases ------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> tuple[int, int]:
        resp = self._call("LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=int(ttl), ID=0))
        if resp.error:
            raise DatastoreError(f"etcd refused a lease of {ttl}s: {resp.error}")
        return int(resp.ID), int(resp.TTL)

    def lease_keepalive(self, lease_id: int) -> int:
        resp = self._call("LeaseKeepAlive", etcdrpc.LeaseKeepAliveRequest(ID=int(lease_id)))
        return max(0, int(resp.TTL))

    def lease_revoke(self, lease_id: int) -> bool:
        try:
            self._call("LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=int(lease_id)))
        except DatastoreError as e:
            if "lease not found" in str(e):
                return False
            raise
        return True

    def close(self) -> None:
        for ep in self._eps:
            ep.close()

    def __repr__(self) -> str:
        return f"<GrpcDatastore {','.join(self._urls)}>"


class _Refused(Exception):
    """Internal: an endpoint answered with a non-availability error."""

    def __init__(self, url: str, exc: grpc.RpcError):
        super().__init__(url)
        self.url, self.exc = url, exc

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

from typing import Sequence

import etcd3
import grpc
from etcd3 import etcdrpc

from .base import (KV, UNAVAILABLE_MARKERS, Compare, Datastore, DatastoreError, Delete, Put, RangeResult, Read,
                   Refused, Unreachable, client_endpoints, compare_target)


_FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.CANCELLED})
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
# base.compare_target's target -> (the proto's enum, its operand field)
_TARGETS = {"VALUE": (etcdrpc.Compare.VALUE, "value"), "VERSION": (etcdrpc.Compare.VERSION, "version"),
            "MOD": (etcdrpc.Compare.MOD, "mod_revision")}


def _compare(c: Compare):
    target, result, operand = compare_target(c)
    enum, field = _TARGETS[target]
    out = etcdrpc.Compare(key=_b(c.key), target=enum, result=_RESULTS[result], **{field: operand})
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
    return any(m in text for m in UNAVAILABLE_MARKERS)


class GrpcDatastore(Datastore):
    """A ``Datastore`` over etcd's gRPC API (python3-etcd3 channels and stubs)."""

    def __init__(self, endpoints: Sequence[str] | str, *, timeout: float = 10.0,
                 ca_cert: str | None = None, cert: str | None = None, key: str | None = None,
                 username: str | None = None, password: str | None = None):
        parsed = client_endpoints(endpoints, username, password, default_https=bool(ca_cert or cert))
        if (cert is None) != (key is None):
            raise ValueError("a client cert and its key go together")
        self.timeout = float(timeout)
        self.requests = 0
        self._cur = 0
        self._username, self._password = username, password
        self._token: str | None = None
        creds = None
        if any(e.https for e in parsed):
            if ca_cert is not None:
                # etcd3's helper reads the files (CA, then client key and cert)
                creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(ca_cert, key, cert)
            else:  # system roots
                pair: list[bytes | None] = [None, None]
                if cert is not None and key is not None:
                    with open(key, "rb") as f:
                        pair[0] = f.read()
                    with open(cert, "rb") as f:
                        pair[1] = f.read()
                creds = grpc.ssl_channel_credentials(None, pair[0], pair[1])
        opts = list(_CHANNEL_OPTIONS.items())
        self._urls = [e.scheme + "://" + e.given for e in parsed]
        self._eps = [etcd3.Endpoint(e.bracketed_host, e.port, secure=e.https, creds=creds if e.https else None,
                                    opts=opts) for e in parsed]
        self._kv = [etcdrpc.KVStub(ep.channel) for ep in self._eps]

    @property
    def endpoints(self) -> list[str]:
        return list(self._urls)

    # -- transport -------------------------------------------------------------
    def _rpc(self, method: str, request, deadline: float, token: str | None):
        """Call ``method`` on the current endpoint, failing over round robin until ``deadline``;
        a refusal raises ``Refused``."""
        metadata = (("token", token),) if token else None

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
                self._posted = True   # (gRPC does not tell whether a failed call reached the server)
                return True, fn(request, timeout=attempt_timeout, metadata=metadata)
            except grpc.RpcError as e:
                text = _details(e)
                if any(m in text for m in _TLS_CONFIG_MARKERS):
                    raise DatastoreError(f"TLS with etcd at {url} failed: {text}") from None
                if not _is_failover(e):
                    self._cur = idx
                    raise Refused(url, text, e.code().name) from None
                return False, (_unreachable(text, url.startswith("https://"))
                               or f"{e.code().name}: {text}")

        return self._failover(self._urls, deadline, attempt)

    # -- the template's wire calls (base.Datastore) -----------------------------------
    def _auth(self, deadline: float) -> str:
        return self._rpc("Authenticate", etcdrpc.AuthenticateRequest(name=self._username, password=self._password),
                         deadline, None).token

    def _range(self, r: Read, deadline: float, token: str | None) -> tuple[RangeResult, int]:
        resp = self._rpc("Range", _range_request(r), deadline, token)
        return _range_result(resp), resp.header.revision

    def _read_txn(self, reads: Sequence[Read], revision: int, deadline: float,
                  token: str | None) -> tuple[list[RangeResult], int]:
        req = etcdrpc.TxnRequest(success=[etcdrpc.RequestOp(request_range=_range_request(r, revision))
                                          for r in reads])
        resp = self._rpc("Txn", req, deadline, token)
        return [_range_result(r.response_range) for r in resp.responses], resp.header.revision

    def _txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete], deadline: float,
             token: str | None) -> tuple[bool, int]:
        req = etcdrpc.TxnRequest(compare=[_compare(c) for c in compares], success=[_op(o) for o in ops])
        resp = self._rpc("Txn", req, deadline, token)
        return bool(resp.succeeded), resp.header.revision

    # -- leases ------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> tuple[int, int]:
        resp = self._call("LeaseGrant", self._rpc, "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=int(ttl), ID=0))
        if resp.error:
            raise DatastoreError(f"etcd refused a lease of {ttl}s: {resp.error}")
        return int(resp.ID), int(resp.TTL)

    def lease_keepalive(self, lease_id: int) -> int:
        resp = self._call("LeaseKeepAlive", self._rpc, "LeaseKeepAlive",
                          etcdrpc.LeaseKeepAliveRequest(ID=int(lease_id)))
        return max(0, int(resp.TTL))

    def lease_revoke(self, lease_id: int) -> bool:
        try:
            self._call("LeaseRevoke", self._rpc, "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=int(lease_id)))
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

"""etcd v3 through its JSON gateway (``POST /v3/kv/range``, ``/v3/kv/txn``), stdlib only.

This module is on the plugin's exec path: it imports only ``_socket`` (through ``_netio``),
``_json`` (through ``cni_ipam._json``) and ``binascii``.  HTTP is a minimal HTTP/1.1 keep-alive client (``_Conn``): ``http.client``
would pull in ``email``, ``urllib`` and ``ssl`` (about a third of an ADD's import
time) and parses each response's headers through ``email.parser``.  ``ssl`` is
imported only for https endpoints.

Wire notes (etcd 3.4 gateway = grpc-gateway v1 + jsonpb):
* keys and values are base64 strings; int64 fields (``count``, revisions) are
  JSON *strings*; fields at their default are omitted (``succeeded`` is absent
  when false, ``kvs`` absent when empty, ``value`` absent with ``keys_only``);
* most messages use the proto field names (``mod_revision``, ``response_range``),
  a few come back in lowerCamelCase (``raftIndex``), so both spellings are read;
* errors are ``{"error": msg, "message": msg, "code": grpc_code}`` with an HTTP
  status derived from the gRPC code (Unavailable -> 503, InvalidArgument -> 400,
  Unauthenticated -> 401, ...).
"""
from __future__ import annotations

import binascii
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from . import _netio as socket  # create_connection on _socket: no `socket` import (issue 17)
import sys

from .base import (KV, UNAVAILABLE_MARKERS, Compare, Datastore, DatastoreError, Delete, Endpoint, Put,
                   RangeResult, Read, Refused, Unreachable, client_endpoints, compare_target)

TYPE_CHECKING = False  # (typing is not imported at run time: annotations are strings here)
if TYPE_CHECKING:  # pragma: no cover
    import ssl
    from typing import Sequence


# gRPC codes meaning "try elsewhere / later": CANCELLED, DEADLINE_EXCEEDED,
# RESOURCE_EXHAUSTED is *not* here (also "database space exceeded"), UNAVAILABLE
_UNAVAILABLE_CODES = frozenset({1, 4, 14})
_TLS_CONFIG_REASONS = frozenset({"CERTIFICATE_VERIFY_FAILED", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                                 "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
                                 "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "WRONG_VERSION_NUMBER"})


def _b64(b: bytes) -> str:
    return binascii.b2a_base64(b, newline=False).decode("ascii")


def _enc(s: str) -> str:
    return _b64(s.encode("utf-8", "surrogateescape"))


def _dec(s: str | None) -> bytes:
    return binascii.a2b_base64(s) if s else b""


def _g(d: dict, snake: str, camel: str, default=None):
    v = d.get(snake)
    if v is None:
        v = d.get(camel, default)
    return v


def _range_json(r: Read, revision: int = 0) -> dict:
    d: dict = {"key": _enc(r.start)}
    if r.end is not None:
        d["range_end"] = _enc(r.end)
    if r.limit:
        d["limit"] = r.limit
    if r.keys_only:
        d["keys_only"] = True
    if r.count_only:
        d["count_only"] = True
    if revision:
        d["revision"] = revision
    return d


def _range_result(d: dict) -> RangeResult:
    kvs = [KV(key=_dec(kv.get("key")).decode("utf-8", "surrogateescape"),
              value=_dec(kv.get("value")),
              mod_revision=int(_g(kv, "mod_revision", "modRevision", 0)),
              version=int(kv.get("version", 0)))
           for kv in d.get("kvs") or ()]
    return RangeResult(kvs=kvs, count=int(d.get("count", 0)), more=bool(d.get("more", False)))


_TARGET_FIELD = {"VALUE": "value", "VERSION": "version", "MOD": "mod_revision"}


def _compare_json(c: Compare) -> dict:
    target, result, operand = compare_target(c)
    if isinstance(operand, bytes):
        operand = _b64(operand)
    d = {"key": _enc(c.key), "target": target, "result": result, _TARGET_FIELD[target]: operand}
    if c.range_end is not None:
        d["range_end"] = _enc(c.range_end)
    return d


def _op_json(op: Put | Delete) -> dict:
    if isinstance(op, Put):
        put = {"key": _enc(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _enc(op.key)}}
    raise TypeError(f"not a Put or Delete: {op!r}")


def _err_text(obj: dict) -> str:
    return str(obj.get("error") or obj.get("message") or obj.get("_raw") or "no error message")


def _is_unavailable(status: int, obj: dict) -> bool:
    if status >= 500 or status in (408, 429):
        return True
    code = obj.get("code")
    if code in _UNAVAILABLE_CODES:
        return True
    text = _err_text(obj)
    return any(m in text for m in UNAVAILABLE_MARKERS)


def _describe(exc: BaseException, attempt_timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {attempt_timeout:.2f}s"
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if exc.__class__.__name__ not in text else text


def _ssl_eof() -> tuple:
    """``(ssl.SSLEOFError,)`` once ssl is loaded (https endpoints), else ``()``."""
    ssl = sys.modules.get("ssl")
    return (ssl.SSLEOFError,) if ssl is not None else ()


def _is_tls_config_error(e: OSError) -> bool:
    """A TLS failure that retrying cannot fix (bad CA, rejected client cert, plain http)."""
    ssl = sys.modules.get("ssl")
    if ssl is None or not isinstance(e, ssl.SSLError):
        return False
    return isinstance(e, ssl.SSLCertVerificationError) or e.reason in _TLS_CONFIG_REASONS


def _file_error(e: OSError) -> str:
    """What went wrong loading a certificate/key file, without any of the file's content."""
    return e.strerror or getattr(e, "reason", None) or e.__class__.__name__


class _BadResponse(OSError):
    """The server's answer is not HTTP/1.x as we know it."""


class _NoTLS(OSError):
    """An https:// endpoint accepted the connection but ended the TLS handshake (plain HTTP there)."""


_NO_ROUTE = frozenset({101, 113})   # ENETUNREACH, EHOSTUNREACH


def _unreachable(e: OSError, https: bool) -> "Unreachable | None":
    """Failures no wait mends (refused, unresolvable, no route, no TLS there), as a short reason."""
    if isinstance(e, ConnectionRefusedError):
        return Unreachable("connection refused")
    if isinstance(e, socket.gaierror):
        return Unreachable("host name does not resolve")
    if isinstance(e, _NoTLS):
        return Unreachable("no TLS handshake: the server speaks plain HTTP there? then use an http:// URL")
    if e.errno in _NO_ROUTE:
        return Unreachable("no route to host")
    return None


class _Disconnected(ConnectionResetError):
    """The server closed the connection before answering (e.g. an idle keep-alive timeout)."""


class _Conn:
    """One HTTP/1.1 keep-alive connection: POST with a body, read status + body.

    Only what etcd's gateway (Go net/http) needs: ``Content-Length`` or chunked
    response bodies, ``Connection: close``, interim 1xx answers skipped."""

    __slots__ = ("sock", "_rfile", "_host")

    def __init__(self, host: str, port: int, timeout: float, ssl_context: "ssl.SSLContext | None"):
        try:  # an ASCII host as bytes: getaddrinfo would otherwise import the idna codec
            addr_host: str | bytes = host.encode("ascii")
        except UnicodeEncodeError:
            addr_host = host
        sock = socket.create_connection((addr_host, port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                try:
                    sock = ssl_context.wrap_socket(sock, server_hostname=host)
                except _ssl_eof() as e:
                    raise _NoTLS(str(e)) from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._rfile = sock.makefile("rb")
        self._host = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                self._rfile.close()
            finally:
                sock.close()

    def post(self, path: str, payload: bytes, token: str | None) -> tuple[int, bytes, bool]:
        """Returns ``(status, body, will_close)``."""
        head = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n" % (path.encode("ascii"), self._host, len(payload)))
        if token:
            head += b"Authorization: " + token.encode("latin-1") + b"\r\n"
        self.sock.sendall(head + b"\r\n" + payload)  # one write: no Nagle/delayed-ACK stall
        rfile = self._rfile
        while True:
            line = rfile.readline(65537)
            if not line:
                raise _Disconnected("etcd closed the connection without answering")
            version, _, rest = line.partition(b" ")
            try:
                status = int(rest[:3])
            except ValueError:
                raise _BadResponse(f"bad HTTP status line {line[:80]!r}") from None
            if not version.startswith(b"HTTP/1."):
                raise _BadResponse(f"bad HTTP status line {line[:80]!r}")
            length, chunked, will_close = -1, False, version == b"HTTP/1.0"
            while True:
                h = rfile.readline(65537)
                if h in (b"\r\n", b"\n"):
                    break
                if not h:
                    raise _BadResponse("connection closed inside the HTTP headers")
                name, _, value = h.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        raise _BadResponse(f"bad Content-Length {value.strip()[:40]!r}") from None
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    v = value.strip().lower()
                    will_close = v == b"close" or (will_close and v != b"keep-alive")
            if 100 <= status < 200:
                continue  # interim answer (100 Continue): the real one follows
            break
        if chunked:
            parts = []
            while True:
                size_line = rfile.readline(1026)
                try:
                    size = int(size_line.split(b";", 1)[0], 16)
                except ValueError:
                    raise _BadResponse(f"bad chunk size line {size_line[:40]!r}") from None
                if size == 0:
                    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                data = rfile.read(size + 2)
                if len(data) != size + 2:
                    raise _BadResponse("connection closed inside a chunked body")
                parts.append(data[:size])
            body = b"".join(parts)
        elif length >= 0:
            body = rfile.read(length)
            if len(body) != length:
                raise _BadResponse(f"connection closed after {len(body)} of {length} body bytes")
        else:
            body, will_close = rfile.read(), True
        return status, body, will_close


class _Endpoint:
    __slots__ = ("url", "https", "host", "port", "prefix", "conn")

    def __init__(self, e: Endpoint):
        self.https = e.https
        self.host = e.host
        self.port = e.port
        self.prefix = e.path
        self.url = e.url
        self.conn: _Conn | None = None

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


class GatewayDatastore(Datastore):
    """A ``Datastore`` over etcd's JSON gateway with one keep-alive connection per endpoint.

    Not thread-safe: use one instance per thread (it is cheap)."""

    def __init__(self, endpoints: Sequence[str] | str, *, timeout: float = 10.0,
                 ca_cert: str | None = None, cert: str | None = None, key: str | None = None,
                 username: str | None = None, password: str | None = None):
        parsed = client_endpoints(endpoints, username, password, default_https=bool(ca_cert or cert))
        if key is not None and cert is None:
            raise ValueError("a client key needs its client cert")
        self._eps = [_Endpoint(e) for e in parsed]
        self.timeout = float(timeout)
        self.requests = 0
        self._cur = 0
        self._ca_cert, self._cert, self._key = ca_cert, cert, key
        self._ssl_ctx: ssl.SSLContext | None = None
        self._username, self._password = username, password
        self._token: str | None = None
        self._posted = False   # whether a request got as far as being sent (commit_sent)

    @property
    def endpoints(self) -> list[str]:
        return [ep.url for ep in self._eps]

    # -- transport -------------------------------------------------------------
    def _ssl_context(self) -> "ssl.SSLContext":
        if self._ssl_ctx is None:
            import ssl  # only for https endpoints
            # a missing / unreadable / not-PEM / mismatched file is configuration, not availability:
            # say so at once, naming the file (never its contents), instead of retrying until the deadline
            try:
                ctx = ssl.create_default_context(cafile=self._ca_cert)
            except OSError as e:  # ssl.SSLError is an OSError
                raise DatastoreError(f"cannot load the etcd CA certificate {self._ca_cert}: "
                                     f"{_file_error(e)}") from None
            if self._cert:
                try:
                    ctx.load_cert_chain(self._cert, self._key)
                except OSError as e:
                    raise DatastoreError(f"cannot load the etcd client certificate {self._cert} with key "
                                         f"{self._key or self._cert}: {_file_error(e)}") from None
            self._ssl_ctx = ctx
        return self._ssl_ctx

    def _send(self, ep: _Endpoint, path: str, payload: bytes, timeout: float,
              token: str | None) -> tuple[int, bytes]:
        for second_try in (False, True):
            conn = ep.conn
            reused = conn is not None
            self.requests += 1  # every attempt counts, connecting included
            try:
                if conn is None:
                    conn = _Conn(ep.host, ep.port, timeout, self._ssl_context() if ep.https else None)
                    ep.conn = conn
                else:
                    conn.settimeout(timeout)
                self._posted = True
                status, data, will_close = conn.post(ep.prefix + path, payload, token)
            except (BrokenPipeError, ConnectionResetError) + _ssl_eof() as e:
                ep.close()
                if reused and not second_try:
                    continue  # the server dropped our idle keep-alive connection: reconnect once
                raise e from None
            except BaseException:
                ep.close()
                raise
            if will_close:
                ep.close()
            return status, data
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict, deadline: float, token: str | None) -> dict:
        """POST ``body`` to the current endpoint, failing over round robin until ``deadline``.

        Returns the JSON of a success; raises ``Refused`` (a refusal: any other answer that
        is not about availability) or ``DatastoreUnavailable``."""
        payload = json.dumps(body, separators=(",", ":")).encode()

        def attempt(idx: int, attempt_timeout: float):
            ep = self._eps[idx]
            try:
                status, data = self._send(ep, path, payload, attempt_timeout, token)
            except OSError as e:  # socket errors, timeouts, TLS errors (ssl.SSLError), _BadResponse
                if _is_tls_config_error(e):
                    hint = (" (the server speaks plain HTTP there? then use an http:// URL)"
                            if getattr(e, "reason", None) == "WRONG_VERSION_NUMBER" else "")
                    raise DatastoreError(f"TLS with etcd at {ep.url} failed: "
                                         f"{getattr(e, 'verify_message', None) or getattr(e, 'reason', None) or e}{hint}") from None
                return False, _unreachable(e, ep.https) or _describe(e, attempt_timeout)
            try:
                obj = json.loads(data) if data else {}
                if not isinstance(obj, dict):
                    raise ValueError
            except ValueError:
                obj = {"_raw": data[:200].decode("utf-8", "replace")}
            if status == 404:   # etcd's peer port (or some other web server) answers 404
                return False, Unreachable("HTTP 404: not an etcd client URL -- etcd's peer port? clients use "
                                          "the client port, 2379 by default")
            if status == 400 and "HTTP request to an HTTPS server" in _err_text(obj):
                raise DatastoreError(f"etcd at {ep.url} serves TLS: use an https:// URL (and give the CA "
                                     f"with --etcd-ca-cert-file / etcd_ca_cert_file)")
            if status == 200 or not _is_unavailable(status, obj):
                return True, (status, obj, ep.url)
            return False, f"HTTP {status}: {_err_text(obj)}"

        status, obj, url = self._failover(self.endpoints, deadline, attempt)
        if status != 200:
            raise Refused(url, _err_text(obj), f"HTTP {status}")
        return obj

    # -- the template's wire calls (base.Datastore) -----------------------------------
    def _auth(self, deadline: float) -> str | None:
        return self._post("/v3/auth/authenticate", {"name": self._username, "password": self._password},
                          deadline, None).get("token")

    def _range(self, r: Read, deadline: float, token: str | None) -> tuple[RangeResult, int]:
        resp = self._post("/v3/kv/range", _range_json(r), deadline, token)
        return _range_result(resp), _revision(resp)

    def _read_txn(self, reads: Sequence[Read], revision: int, deadline: float,
                  token: str | None) -> tuple[list[RangeResult], int]:
        resp = self._post("/v3/kv/txn", {"success": [{"request_range": _range_json(r, revision)} for r in reads]},
                          deadline, token)
        return ([_range_result(_g(r, "response_range", "responseRange", None) or {})
                 for r in resp.get("responses") or []], _revision(resp))

    def _txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete], deadline: float,
             token: str | None) -> tuple[bool, int]:
        body: dict = {}
        if compares:
            body["compare"] = [_compare_json(c) for c in compares]
        if ops:
            body["success"] = [_op_json(op) for op in ops]
        resp = self._post("/v3/kv/txn", body, deadline, token)
        return bool(resp.get("succeeded", False)), _revision(resp)

    def close(self) -> None:
        for ep in self._eps:
            ep.close()

    def __repr__(self) -> str:
        return f"<GatewayDatastore {','.join(self.endpoints)}>"


def _revision(resp: dict) -> int:
    return int((resp.get("header") or {}).get("revision", 0))

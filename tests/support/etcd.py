"""Throw-away etcd processes on loopback, for tests, benchmarks and demos.

* ``EtcdServer``  -- one single-member etcd (optionally TLS with client-cert auth).
* ``EtcdCluster`` -- N members with a static ``--initial-cluster``; each member is an
  ``EtcdServer`` that can be ``kill()``-ed, ``restart()``-ed, ``pause()``-d, ``resume()``-d.
* ``make_test_certs(dir)`` -- a CA plus server/client certificates (openssl CLI).

Every process started here is SIGKILLed and its temp dir removed on ``stop()``;
an ``atexit`` hook does the same for anything left over, and (when started from
the main thread) the child also gets ``PR_SET_PDEATHSIG`` so it dies with us
(``die_with_us``: set by ``setpriv`` after the exec, never by a ``preexec_fn`` -- see there).

Standard library only; readiness is polled on the ``/health`` HTTP endpoint.
"""
from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ETCD_BIN", "EtcdCluster", "EtcdError", "EtcdServer", "TestCerts", "delete_prefix", "die_with_us",
           "free_port", "make_test_certs", "post_json"]

ETCD_BIN = os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"
HOST = "127.0.0.1"


class EtcdError(RuntimeError):
    """An etcd process could not be started / did not become healthy."""


# ----------------------------------------------------------------------------- ports
_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (and not handed out before by us)."""
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise EtcdError("could not find a free port")


# ----------------------------------------------------------------------------- HTTP
def _b64(s: str | bytes) -> str:
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode("ascii")


def _connection(endpoint: str, timeout: float, ssl_context: ssl.SSLContext | None):
    scheme, _, hostport = endpoint.partition("://")
    host, _, port = hostport.rstrip("/").rpartition(":")
    if scheme == "https":
        return http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                           context=ssl_context or ssl.create_default_context())
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _http(endpoint: str, method: str, path: str, body: dict | None = None, *, timeout: float = 2.0,
          ssl_context: ssl.SSLContext | None = None, token: str | None = None) -> tuple[int, dict]:
    conn = _connection(endpoint, timeout, ssl_context)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else {}
        except ValueError:
            return resp.status, {"error": data.decode(errors="replace")}
    finally:
        conn.close()


def post_json(endpoint: str, path: str, body: dict, *, timeout: float = 5.0,
              ssl_context: ssl.SSLContext | None = None, token: str | None = None) -> dict:
    """POST to etcd's JSON gateway (``path`` like ``/v3/kv/put``); raise on non-200."""
    status, obj = _http(endpoint, "POST", path, body, timeout=timeout, ssl_context=ssl_context,
                        token=token)
    if status != 200:
        raise EtcdError(f"{endpoint}{path}: HTTP {status}: {obj.get('error') or obj}")
    return obj


def delete_prefix(endpoint: str, prefix: str, *, timeout: float = 5.0,
                  ssl_context: ssl.SSLContext | None = None, token: str | None = None) -> int:
    """Delete every key starting with ``prefix``; returns how many were deleted."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    obj = post_json(endpoint, "/v3/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(end)},
                    timeout=timeout, ssl_context=ssl_context, token=token)
    return int(obj.get("deleted", 0))


# ----------------------------------------------------------------------------- certs
@dataclass(frozen=True)
class TestCerts:
    __test__ = False  # not a pytest test class
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_test_certs(directory: str, *, client_cn: str | None = None) -> TestCerts:
    """A throw-away CA, a server cert for 127.0.0.1/localhost and a client cert (openssl CLI).

    Neither leaf has a CommonName by default: with ``--client-cert-auth`` *and* RBAC
    enabled, etcd's JSON gateway answers HTTP 400 "CommonName of client sending a
    request against gateway will be ignored" to any client cert that has one (and
    over gRPC a CN would be taken as the etcd user name).  Both carry clientAuth.
    """
    os.makedirs(directory, exist_ok=True)
    p = lambda name: os.path.join(directory, name)  # noqa: E731

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", p("ca.key"), "-out", p("ca.crt"), "-days", "2",
        "-subj", "/O=cni-ipam-test/CN=cni-ipam-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, subj, ext in (
            ("server", "/O=cni-ipam-test-server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                  "extendedKeyUsage=serverAuth,clientAuth\n"),
            ("client", f"/O=cni-ipam-test-client{f'/CN={client_cn}' if client_cn else ''}",
             "extendedKeyUsage=clientAuth\n")):
        run("req", *ec, "-keyout", p(f"{name}.key"), "-out", p(f"{name}.csr"), "-subj", subj)
        with open(p(f"{name}.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + ext)
        run("x509", "-req", "-in", p(f"{name}.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"),
            "-CAcreateserial", "-out", p(f"{name}.crt"), "-days", "2", "-extfile", p(f"{name}.ext"))
    return TestCerts(ca=p("ca.crt"), server_cert=p("server.crt"), server_key=p("server.key"),
                     client_cert=p("client.crt"), client_key=p("client.key"))


# ----------------------------------------------------------------------------- processes
_live_lock = threading.Lock()
_live: dict[int, "EtcdServer"] = {}


def _cleanup_all() -> None:
    with _live_lock:
        servers = list(_live.values())
    for s in servers:
        try:
            s.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_cleanup_all)


#: util-linux's setpriv (Debian: essential): sets PR_SET_PDEATHSIG, then execs the command
SETPRIV = shutil.which("setpriv")


def die_with_us(argv: Sequence[str]) -> list[str]:
    """``argv`` such that the process gets SIGKILL when the thread that spawns it ends
    (``PR_SET_PDEATHSIG``): only from the main thread (another thread's end would kill it).

    Set by ``setpriv`` in the new process, NOT by a ``preexec_fn``: a ``preexec_fn`` makes
    CPython ``fork()`` where it otherwise ``vfork()``s, and ``fork()`` runs every
    ``pthread_atfork`` handler -- grpcio (the gRPC transport, in the test process) registers
    handlers that pause its EventEngine threads in the parent and start them again in the
    child between fork and exec.  With a gRPC channel in use, about one such child in ten
    aborts before its exec (measured: 34 of 300 ``Popen(["true"], preexec_fn=...)``; 0 of 300
    without), and a child stuck there leaves ``Popen`` waiting for the exec with no time limit
    (the likely cause of the 5-minute hang of ``test_member_restart_is_transparent[grpc]`` under
    load; not reproduced).
    ``vfork()`` runs no fork handlers."""
    argv = list(argv)
    if SETPRIV and threading.current_thread() is threading.main_thread():
        return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    return argv


def _child_env() -> dict[str, str]:
    # etcd reads ETCD_* variables as flags: keep the environment's out of our processes
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH"}


class EtcdServer:
    """One etcd process on 127.0.0.1 (a single-member cluster, or a member of an ``EtcdCluster``).

    ``cert_file``/``key_file`` switch the client URL to https; ``ca_file`` adds
    ``--trusted-ca-file`` and (unless ``client_cert_auth=False``) ``--client-cert-auth``.
    ``client_cert_file``/``client_key_file`` are what the helper itself presents when
    polling (default: the server cert/key, which ``make_test_certs`` makes usable as a client cert).
    With ``--client-cert-auth`` and RBAC enabled, the gateway refuses client certs that carry a
    CommonName (see ``make_test_certs``).

    Files: ``base_dir`` (from ``tempfile.mkdtemp``) holds ``data/`` (etcd's ``--data-dir``),
    ``etcd.log`` (zap log, ``--log-level warn``) and ``etcd.stdout``.
    """

    def __init__(self, *, name: str = "etcd0", cert_file: str | None = None, key_file: str | None = None,
                 ca_file: str | None = None, client_cert_auth: bool | None = None,
                 client_cert_file: str | None = None, client_key_file: str | None = None,
                 heartbeat_interval_ms: int | None = None, election_timeout_ms: int | None = None,
                 log_level: str = "warn", extra_args: Sequence[str] = (), tmp_parent: str | None = None,
                 etcd_bin: str | None = None):
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        self.name = name
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.client_cert_auth = bool(ca_file) if client_cert_auth is None else client_cert_auth
        self.client_cert_file = client_cert_file or cert_file
        self.client_key_file = client_key_file or key_file
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.etcd_bin = etcd_bin or ETCD_BIN
        self.base_dir = tempfile.mkdtemp(prefix=f"etcd-{name}-", dir=tmp_parent)
        self.data_dir = os.path.join(self.base_dir, "data")
        self.log_path = os.path.join(self.base_dir, "etcd.log")  # beside data/: etcd warns about strangers in it
        self.out_path = os.path.join(self.base_dir, "etcd.stdout")  # early errors, panics
        self.client_port = free_port()
        self.peer_port = free_port()
        # cluster wiring (EtcdCluster overrides these before start)
        self.initial_cluster: str | None = None
        self.initial_cluster_token = f"cni-ipam-test-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._ssl_context: ssl.SSLContext | None = None
        self._out = None
        self._removed = False
        with _live_lock:  # from now on the atexit hook removes base_dir even if never started
            _live[id(self)] = self

    # -- addresses -------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.cert_file else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{HOST}:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client-side TLS context the helper uses (None for plain http)."""
        if not self.cert_file:
            return None
        if self._ssl_context is None:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.client_cert_file:
                ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
            self._ssl_context = ctx
        return self._ssl_context

    # -- process control -------------------------------------------------------
    def _args(self) -> list[str]:
        url = self.endpoint
        args = [self.etcd_bin, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
                "--initial-cluster-token", self.initial_cluster_token,
                "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", self.log_path, "--log-level", self.log_level]
        if self.heartbeat_interval_ms:
            args += ["--heartbeat-interval", str(self.heartbeat_interval_ms)]
        if self.election_timeout_ms:
            args += ["--election-timeout", str(self.election_timeout_ms)]
        if self.cert_file:
            args += ["--cert-file", self.cert_file, "--key-file", self.key_file]
        if self.ca_file:
            args += ["--trusted-ca-file", self.ca_file]
            if self.client_cert_auth:
                args += ["--client-cert-auth"]
        return args + self.extra_args

    def _spawn(self) -> None:
        if self._removed:
            raise EtcdError(f"{self.name}: already stopped (data dir removed)")
        if self.running:
            raise EtcdError(f"{self.name}: already running (pid {self.pid})")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        if self._out is None:
            self._out = open(self.out_path, "ab")
        # no preexec_fn (die_with_us says why): vfork + exec, no fork handlers run
        self.proc = subprocess.Popen(die_with_us(self._args()), stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, env=_child_env(), close_fds=True)
        self.paused = False

    def start(self, timeout: float = 20.0) -> "EtcdServer":
        """Start and wait until ``/health`` says true.  A port clash is retried with new ports."""
        for attempt in range(3):
            self._spawn()
            try:
                self.wait_healthy(timeout)
                return self
            except EtcdError:
                clash = "address already in use" in self.log_tail(200)
                self.kill()
                if not clash or self.initial_cluster or attempt == 2:
                    self.stop()
                    raise
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.client_port, self.peer_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """SIGKILL the process (data dir kept, so ``restart()`` brings the same member back)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        self.paused = False

    def restart(self, timeout: float = 20.0, *, wait: bool = True) -> None:
        """Kill (if running) and start again on the same ports and data dir."""
        self.kill()
        self._spawn()
        if wait:
            self.wait_healthy(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing."""
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Kill the process and remove its temp dir.  Safe to call more than once."""
        self.kill()
        if self._out is not None:
            self._out.close()
            self._out = None
        if not self._removed:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._removed = True
        with _live_lock:
            _live.pop(id(self), None)

    # -- probes ----------------------------------------------------------------
    def health(self, timeout: float = 1.0) -> bool:
        try:
            status, obj = _http(self.endpoint, "GET", "/health", timeout=timeout,
                                ssl_context=self.ssl_context())
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and obj.get("health") in ("true", True)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise EtcdError(f"{self.name}: etcd exited (rc={self.proc and self.proc.returncode});"
                                f" log tail:\n{self.log_tail()}")
            if self.health(timeout=min(1.0, max(0.1, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                raise EtcdError(f"{self.name}: not healthy after {timeout}s; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def api(self, path: str, body: dict | None = None, *, timeout: float = 5.0,
            token: str | None = None) -> dict:
        """POST ``body`` to this member's JSON gateway (e.g. ``/v3/auth/user/add``)."""
        return post_json(self.endpoint, path, body or {}, timeout=timeout,
                         ssl_context=self.ssl_context(), token=token)

    def status(self, timeout: float = 1.0) -> dict:
        """``/v3/maintenance/status`` of this member (``header.member_id``, ``leader``, ...)."""
        return self.api("/v3/maintenance/status", {}, timeout=timeout)

    def is_leader(self, timeout: float = 1.0) -> bool:
        try:
            st = self.status(timeout)
        except (OSError, http.client.HTTPException, EtcdError):
            return False
        leader = str(st.get("leader", "0"))
        return leader != "0" and leader == str(st.get("header", {}).get("member_id"))

    def log_tail(self, n: int = 30) -> str:
        lines: list[str] = []
        for path in (self.out_path, self.log_path):
            try:
                with open(path, "rb") as f:
                    lines += f.read().decode(errors="replace").splitlines()[-n:]
            except OSError:
                pass
        return "\n".join(lines[-n:])

    def __enter__(self) -> "EtcdServer":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "down")
        return f"<EtcdServer {self.name} {self.endpoint} {state}>"


class EtcdCluster:
    """``size`` members on loopback with a static ``--initial-cluster``.

    ``member_kwargs`` go to each ``EtcdServer`` (e.g. ``election_timeout_ms``, TLS files)."""

    def __init__(self, size: int = 3, **member_kwargs):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._member_kwargs = member_kwargs
        self.members: list[EtcdServer] = []
        self._new_members()

    def _new_members(self) -> None:
        self.members = [EtcdServer(name=f"m{i}", **self._member_kwargs) for i in range(self.size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"cni-ipam-test-{uuid.uuid4().hex[:12]}"
        for m in self.members:
            m.initial_cluster = initial
            m.initial_cluster_token = token

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 20.0) -> "EtcdCluster":
        for attempt in range(3):
            for m in self.members:
                m._spawn()
            try:
                self.wait_healthy(timeout)
                return self
            except EtcdError:
                clash = any("address already in use" in m.log_tail(200) for m in self.members)
                self.stop()
                if not clash or attempt == 2:
                    raise
                self._new_members()
        raise AssertionError("unreachable")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until every running, unpaused member reports healthy."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.running and not m.paused:
                m.wait_healthy(max(0.1, deadline - time.monotonic()))

    def leader(self, timeout: float = 10.0) -> EtcdServer:
        """The current leader, as reported by ``/v3/maintenance/status`` (polls during elections)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if m.running and not m.paused and m.is_leader(timeout=0.5):
                    return m
            if time.monotonic() >= deadline:
                raise EtcdError(f"no leader after {timeout}s: {self.members}")
            time.sleep(0.05)

    def followers(self, timeout: float = 10.0) -> list[EtcdServer]:
        lead = self.leader(timeout)
        return [m for m in self.members if m is not lead]

    def heal(self, timeout: float = 20.0) -> None:
        """Resume paused members, restart dead ones, wait for all to be healthy."""
        for m in self.members:
            if m.paused:
                m.resume()
            if not m.running:
                m.restart(wait=False)
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self) -> "EtcdCluster":
        if not any(m.proc for m in self.members):
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EtcdCluster {self.members}>"

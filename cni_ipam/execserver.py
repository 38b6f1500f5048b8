"""``cni-ipam exec-server``: the node's warm plugin (issue 17, docs/performance.md "The exec server").

A CNI exec of the Python bundle spends ~20 ms starting an interpreter and importing the plugin
before its first useful instruction; a burst of pod starts on one node pays that for every pod.
The exec server does that once: it imports everything a verb runs and waits on a unix socket.
The installed ``cni-ipam`` is a small launcher (packaging/launcher.c).  For a CNI exec it
connects to the socket and hands over its argv, environment, cwd, umask and its stdin, stdout and
stderr themselves (SCM_RIGHTS); the server forks, and the child -- the same code, already
imported -- runs the verb exactly as the exec would have (same ``cni_ipam.main.main``, same file
descriptors, same environment), then reports the exit code.  Nothing is shared between requests
but imported code: every request is its own process, as with an exec.

If anything is not right -- no server, another build, a server too busy to answer, not the same
user -- the launcher execs the bundle (``cni-ipam-python``) as before: the server is only ever
a shortcut, and a node without it works exactly as it always did.

Protocol (one SOCK_SEQPACKET connection per exec; the launcher's side is packaging/launcher.c):

1. launcher -> server: one message, with the exec's stdin (read whole by the launcher into a
   memory file, so that a refused exec can still give it to the bundle), stdout and stderr
   attached::

       b"cni-ipam-exec/1\\0" build-id \\0 umask(octal) \\0 cwd \\0 argc \\0 argv... envc \\0 env...

   (every field ends with a NUL; argc/envc are decimal).
2. server (the forked child) -> launcher: ``A`` (accepted) or ``R<reason>`` (refused: the
   launcher execs the bundle itself).  A refusal is sent for another build, another user
   (SO_PEERCRED), a message that does not parse, a network config naming paths the server cannot
   see (``unseen_paths``: a server in a container without that host dir) -- and by the parent
   itself, without a fork,
   when ``max_children`` children are running.
3. launcher -> child: ``G`` (go).  Only now does the child run the verb: a launcher that gave up
   waiting for ``A`` (and execs the bundle instead) closes the socket without ``G``, and the
   child exits without running anything -- a verb never runs twice.
4. child -> launcher: ``S`` + the exit code (4 bytes, little-endian).  The launcher exits with
   it.  EOF instead (the child was killed): the launcher answers with a CNI error (code 11).
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from .constants import EXEC_SERVER_MAX_CHILDREN, EXEC_SERVER_SOCKET

MAGIC = b"cni-ipam-exec/1"
DEFAULT_SOCKET = EXEC_SERVER_SOCKET
BUILD_ID_FILE = "cni-ipam-build-id"    # in the bundle's _internal/ (packaging/build.py writes it)
MAX_STDIN = 4 * 1024 * 1024 + 1        # what the plugin reads of stdin at most (cni.skel.MAX_STDIN + 1)
MAX_MESSAGE = 1 << 20                  # a launcher's argv + environment; larger: it execs the bundle
HANDSHAKE_TIMEOUT = 30.0               # a child waits this long for the launcher's "G"
#: children at once (most of a burst waits for the host lock, ~3 MB of its own each); one more
#: connection is refused at once and that exec starts the plugin itself
DEFAULT_MAX_CHILDREN = EXEC_SERVER_MAX_CHILDREN
#: on SIGTERM: stop accepting, then wait this long for the execs being served (the DaemonSet's
#: terminationGracePeriodSeconds is 10)
DRAIN_SECONDS = 8.0

#: what the verbs run: imported once by the server, before its first fork (the modules of
#: packaging/modblob.py's groups follow from these, and the Kubernetes client's with what it
#: imports when it is used; tests/test_execserver_unit.py checks that a served verb imports
#: nothing more)
PRELOAD = ("cni_ipam.main", "cni_ipam.cni.version", "cni_ipam.cni.skel", "cni_ipam.plugin",
           "cni_ipam.datastore.gateway", "cni_ipam.ipam.releases", "cni_ipam.ipam.snapshot",
           "cni_ipam.ipam.engine", "cni_ipam.ipam.reclaim", "cni_ipam.cni.result",
           "cni_ipam.k8s", "cni_ipam.ipam.annotations")


class ExecServerError(Exception):
    """The server cannot start (one line for the operator)."""


def bundle_build_id() -> str | None:
    """The build id of the running bundle (None: not a built bundle, e.g. run from source)."""
    base = getattr(sys, "_MEIPASS", None)
    if not base:
        return None
    try:
        with open(os.path.join(base, BUILD_ID_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def parse_request(data: bytes) -> dict:
    """The launcher's message (protocol step 1) -> {build, umask, cwd, argv, env}; ValueError
    if it does not parse."""
    if not data.endswith(b"\0"):
        raise ValueError("the message does not end with a NUL")
    fields = data[:-1].split(b"\0")
    if len(fields) < 6 or fields[0] != MAGIC:
        raise ValueError("not a cni-ipam-exec/1 message")
    build, umask, cwd = fields[1], int(fields[2], 8), fields[3]
    argc = int(fields[4])
    if argc < 0 or len(fields) < 6 + argc:
        raise ValueError("bad argc")
    argv = fields[5:5 + argc]
    envc = int(fields[5 + argc])
    env_fields = fields[6 + argc:]
    if envc != len(env_fields):
        raise ValueError("bad envc")
    env = {}
    for item in env_fields:
        name, eq, value = item.partition(b"=")
        if eq and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return {"build": build.decode("ascii", "replace"), "umask": umask, "cwd": cwd,
            "argv": [os.fsdecode(a) for a in argv], "env": env}


def encode_request(build: str, argv, env: dict, cwd: str = "/", umask: int = 0o022) -> bytes:
    """The message the launcher sends (for tests and tools; packaging/launcher.c builds it in C)."""
    parts = [MAGIC, build.encode(), b"%o" % umask, os.fsencode(cwd), b"%d" % len(argv)]
    parts += [os.fsencode(a) for a in argv]
    parts.append(b"%d" % len(env))
    parts += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    return b"\0".join(parts) + b"\0"


def unseen_paths(conf: bytes, cwd: str = "/") -> list[str]:
    """The paths of an exec's network config (stdin) that this server cannot see: the host lock's
    dir (the snapshot and handle files are next to it), the log's dir, the kubeconfig, the etcd
    TLS, password and node-name files.  A served exec opens them in the server's filesystem; in a
    container that mounts only some of the host's dirs a path can be missing there, and that exec
    is then left to start the plugin itself (which sees the host's).  A config that does not parse
    has nothing to check (the verb reports it).  A relative path is the exec's: under ``cwd``."""
    from . import _json as json
    from .config import DEFAULT_LOCK_FILE, DEFAULT_LOG_FILE
    try:
        ipam = json.loads(conf.decode("utf-8")).get("ipam")
    except (ValueError, AttributeError, RecursionError):
        return []
    if not isinstance(ipam, dict):
        return []
    out = []

    def text(key, default=None):
        v = ipam.get(key, default)
        return v if isinstance(v, str) and v.strip() else None
    def where(path):
        return os.path.normpath(os.path.join(cwd, path))
    for key, default in (("lock_file", DEFAULT_LOCK_FILE), ("log_file", DEFAULT_LOG_FILE)):
        path = text(key, default)
        if path and not os.path.isdir(os.path.dirname(where(path))):
            out.append(os.path.dirname(where(path)))
    files = [text(k) for k in ("etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file", "etcd_password_file",
                               "nodename_file")]
    kube = ipam.get("kubernetes")
    if isinstance(kube, dict) and isinstance(kube.get("kubeconfig"), str) and kube["kubeconfig"].strip():
        files.append(kube["kubeconfig"])
    out += [f for f in files if f and not os.path.exists(where(f))]
    return out


def preload() -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    try:
        import yaml  # noqa: F401  (cni_ipam.k8s reads a kubeconfig with it, imported on first use)
    except ImportError:
        pass


class Server:
    def __init__(self, path: str, build: str, log=None, max_children: int = DEFAULT_MAX_CHILDREN):
        self.path, self.build, self.max_children = path, build, max_children
        self.log = log or (lambda msg: print(f"cni-ipam exec-server: {msg}", file=sys.stderr, flush=True))
        self.sock: socket.socket | None = None
        self.ino: int | None = None
        self.served = self.busy = 0
        self.children: set[int] = set()

    # ---------------------------------------------------------------- the socket
    def bind(self) -> None:
        """Listen on ``path``: bound under a temporary name and renamed into place (a server
        started to replace a running one takes over atomically; the old one serves what it
        accepted and exits on SIGTERM).  A socket file nobody listens on is replaced."""
        d = os.path.dirname(self.path) or "."
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ExecServerError(f"cannot create {d}: {e.strerror}") from None
        tmp = f"{self.path}.{os.getpid()}.tmp"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                s.bind(tmp)
            finally:
                os.umask(old)
            os.chmod(tmp, 0o600)
            s.listen(1024)
            os.rename(tmp, self.path)
        except OSError as e:
            s.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ExecServerError(f"cannot listen on {self.path}: {e.strerror or e}") from None
        self.sock = s
        self.ino = os.stat(self.path).st_ino

    def close(self) -> None:
        """Stop listening; remove the socket file if it is still ours (not a successor's)."""
        if self.sock is None:
            return
        try:
            if os.stat(self.path).st_ino == self.ino:
                os.unlink(self.path)
        except OSError:
            pass
        self.sock.close()
        self.sock = None

    # ---------------------------------------------------------------- the loop
    def serve_forever(self) -> None:
        """Accept, fork, repeat.  The parent does nothing else (one accept and one fork per
        exec), so a burst of execs is forked as fast as they connect."""
        assert self.sock is not None
        import gc
        gc.collect()
        gc.freeze()     # the children never touch the imported objects' GC headers: fewer copied pages
        signal.signal(signal.SIGCHLD, lambda signum, frame: self._reap())
        while True:
            conn, _ = self.sock.accept()
            self._reap()
            if len(self.children) >= self.max_children:
                # refused by the parent itself: that exec starts the plugin on its own (and waits
                # for the host lock like the ones served)
                self.busy += 1
                try:
                    conn.send(b"Rbusy")
                except OSError:
                    pass
                conn.close()
                continue
            # SIGCHLD held until the pid is counted (a child that ends at once is reaped after)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:
                pid = os.fork()
            except OSError as e:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                self.log(f"fork failed ({e.strerror}); that exec runs the bundle itself")
                conn.close()
                continue
            if pid == 0:
                code = 1
                try:
                    self.sock.close()
                    code = self._child(conn)
                finally:
                    os._exit(code)
            self.children.add(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            conn.close()
            self.served += 1

    def drain(self, seconds: float) -> None:
        """After ``close``: wait up to ``seconds`` for the execs being served to end (the
        container's runtime kills whatever is left of a pod's processes when this one exits)."""
        import time
        deadline = time.monotonic() + seconds
        self._reap()
        if self.children:
            self.log(f"waiting for {len(self.children)} exec(s) being served")
        while self.children and time.monotonic() < deadline:
            time.sleep(0.02)
            self._reap()
        if self.children:
            self.log(f"{len(self.children)} exec(s) still running after {seconds:g} s")

    def _reap(self) -> None:
        """Collect the children that ended (SIGCHLD, and before each fork)."""
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)

    # ---------------------------------------------------------------- one exec
    def _child(self, conn: socket.socket) -> int:
        """In the forked child: take over the launcher's exec (protocol steps 1-4)."""
        if conn.fileno() <= 2:      # (never, with 0-2 open) it must outlive the dup2s onto 0-2
            conn = socket.socket(fileno=fcntl_dup_high(conn.fileno()))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        conn.settimeout(HANDSHAKE_TIMEOUT)
        fds: list[int] = []
        try:
            data, anc, flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(3 * 4))
            if not data and not anc:
                return 0             # connected and closed (a probe): nothing to say
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]))
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            reason = None
            if uid != os.geteuid():
                reason = f"uid {uid} is not the server's"
            elif flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 3:
                reason = "truncated message"
            else:
                try:
                    req = parse_request(data)
                except ValueError as e:
                    reason = str(e)
                else:
                    if req["build"] != self.build:
                        reason = f"build {req['build']} is not the server's ({self.build})"
                    else:
                        try:
                            conf = os.pread(fds[0], MAX_STDIN, 0)
                        except OSError as e:
                            reason = f"stdin is not a file the server can read from its start ({e.strerror})"
                        else:
                            unseen = unseen_paths(conf, os.fsdecode(req["cwd"]))
                            if unseen:
                                reason = "not visible to the exec server: " + ", ".join(unseen)
            if reason is not None:
                self.log(f"left an exec to start the plugin itself: {reason}")
                conn.sendall(b"R" + reason.encode()[:200])
                return 0
            conn.sendall(b"A")
            if conn.recv(1) != b"G":
                return 0             # the launcher gave up and runs the bundle itself
        except OSError:
            return 0
        conn.settimeout(None)
        # become the exec: its stdin/stdout/stderr, environment, cwd, umask, argv
        os.lseek(fds[0], 0, os.SEEK_SET)     # (the launcher's copy of stdin: read from its start)
        high = [fcntl_dup_high(fd) for fd in fds]      # none of them among 0-2 ...
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(high):     # ... while 0-2 are replaced
            os.dup2(fd, target)
            os.close(fd)
        os.umask(req["umask"])
        try:
            os.chdir(req["cwd"])
        except OSError:
            os.chdir("/")
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = req["argv"] or ["cni-ipam"]
        _std_streams()
        code = _run_verb()
        try:
            conn.sendall(b"S" + struct.pack("<i", code))
        except OSError:
            pass
        return code


def fcntl_dup_high(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def _std_streams() -> None:
    """sys.stdin/stdout/stderr over fds 0-2 (now the exec's): a server started with one of them
    closed has ``None`` there, which a verb cannot use."""
    import io
    for name, fd, mode, errors in (("stdin", 0, "rb", "surrogateescape"), ("stdout", 1, "wb", "surrogateescape"),
                                   ("stderr", 2, "wb", "backslashreplace")):
        if getattr(sys, name) is None:
            raw = io.open(fd, mode, closefd=False)
            setattr(sys, name, io.TextIOWrapper(raw, encoding="utf-8", errors=errors, line_buffering=fd == 2))


def _run_verb() -> int:
    """``cni_ipam.main.main()`` as packaging/entry.py runs it in a CNI exec: no cyclic GC, and
    ended by ``cni_exec.finish`` (threads, atexit, flushes; a failed flush is exit 120)."""
    import gc
    gc.disable()
    from cni_ipam.main import main
    try:
        rc = main()
        code = rc if isinstance(rc, int) else (0 if rc is None else 1)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:      # what an exec would print on the way out (a traceback on stderr)
        import traceback
        traceback.print_exc()
        code = 1
    # the end of packaging/entry.py's CNI exec, minus its os._exit (the server runs only from the
    # bundle, whose entry imported packaging/cni_exec.py)
    return sys.modules["cni_exec"].finish(code)


def run(path: str, build: str | None = None, max_children: int = DEFAULT_MAX_CHILDREN) -> int:
    """``cni-ipam exec-server``: preload, listen, serve until SIGTERM/SIGINT."""
    build = build or bundle_build_id()
    if build is None:
        raise ExecServerError("the exec server serves the launcher of its own bundle: run it from the built "
                              "binary (`dist/cni-ipam/cni-ipam exec-server`), not from the source tree")
    for fd in (0, 1, 2):       # started with one of them closed: a socket must not take its number
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
    preload()
    server = Server(path, build, max_children=max_children)

    def stop(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.bind()
    server.log(f"serving CNI execs of build {build} on {path} (pid {os.getpid()})")
    try:
        server.serve_forever()
    finally:
        server.close()
        server.drain(DRAIN_SECONDS)
        server.log(f"stopped after {server.served} execs"
                   + (f" ({server.busy} more refused: {max_children} running)" if server.busy else ""))
    return 0

"""The exec server (cni_ipam/execserver.py) and the binary's launcher (packaging/launcher.c),
end to end: ``cni-ipam exec-server`` from the built bundle on a socket under the test's temp dir,
CNI execs of the bundle's ``cni-ipam`` pointed at it with ``CNI_IPAM_EXEC_SOCKET``, a real etcd.

That an exec was really served (and not run by the launcher's fallback, the bundle itself) is
proved by the server's own count: ``stopped after N execs`` on its stderr after SIGTERM (the
connections it forked a child for; the fixture waits for the server's start-up line, never
connects) with no "left an exec to start the plugin itself" line (a child's refusal), and where
it matters by the pid in the plugin's log lines (a cold exec's is the launcher's own: it execs
the bundle; a served one's is a child of the server).
Fake servers (a thread of the test on a SOCK_SEQPACKET socket) check the launcher's side of the
protocol: what it sends, and that it obeys every answer."""
from __future__ import annotations

import array
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cni_ipam.execserver import encode_request, parse_request
from tests.e2e.helpers import ROOT
from tests.plugin_helpers import assert_error, exec_plugin, netconf, seed_store
from tests.support.exec_server import ExecServerProcess

BIN_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": None}
NO_SERVER = {**BIN_ENV, "CNI_IPAM_EXEC_SOCKET": ""}      # the cold path: never use a server
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

pytestmark = pytest.mark.time_limit(60)


# ----------------------------------------------------------------------------- helpers
def build_id(plugin_binary) -> str:
    return (Path(plugin_binary).parent / "_internal" / "cni-ipam-build-id").read_text().strip()


class RunningServer(ExecServerProcess):
    """One ``cni-ipam exec-server`` process (stderr to a file), with the tests' checks."""

    def __init__(self, binary: str, sock: Path, log: Path, *args: str, shell: str | None = None):
        super().__init__(binary, sock, log, *args, shell=shell, timeout=START_TIMEOUT)
        self.env = served_env(sock)
        self.rc: int | None = None
        assert sock.is_socket()

    def refusals(self) -> list[str]:
        """The execs its children refused (each logs why): those ran the bundle themselves."""
        return [line for line in self.stderr().splitlines() if "left an exec to start the plugin itself" in line]

    def shutdown(self) -> None:
        """SIGTERM (once), wait; it must exit 0."""
        if self.rc is None:
            self.rc, killed = self.end(STOP_TIMEOUT)
            if killed:
                pytest.fail(f"exec server did not stop on SIGTERM: {self.stderr()}")
        assert self.rc == 0, f"exec server exited {self.rc}: {self.stderr()}"

    def stop(self, refused: int = 0) -> int:
        """``shutdown``; the number of connections it forked a child for (its last line); its
        children must have refused ``refused`` execs (the others ran)."""
        self.shutdown()
        m = re.findall(r"stopped after (\d+) execs", self.stderr())
        assert len(m) == 1, self.stderr()
        assert "Traceback" not in self.stderr(), self.stderr()
        assert len(self.refusals()) == refused, self.stderr()
        return int(m[0])


def served_env(sock) -> dict:
    return {**BIN_ENV, "CNI_IPAM_EXEC_SOCKET": str(sock)}


@pytest.fixture
def start_server(plugin_binary, tmp_path):
    """``start(sock=None)`` -> a ``RunningServer`` (default socket: tmp_path/exec.sock); every
    server still running afterwards is stopped and must exit 0."""
    started: list[RunningServer] = []

    def start(sock: Path | None = None, *args: str, shell: str | None = None) -> RunningServer:
        sock = Path(sock or tmp_path / "exec.sock")
        s = RunningServer(plugin_binary, sock, tmp_path / f"exec-server-{len(started)}.log", *args, shell=shell)
        started.append(s)
        return s
    yield start
    for s in started:
        s.shutdown()


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path):
    with seed_store(etcd_server.endpoint, etcd_prefix):
        pass
    return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, version="1.1.0", ipv4_pools=["external-pool"])


class Engine:
    """The engine over the test's prefix (queries only)."""

    def __init__(self, endpoint, prefix):
        from cni_ipam.datastore import open_datastore
        from cni_ipam.ipam.engine import IPAM
        self.ds = open_datastore(endpoint)
        self.ipam = IPAM(self.ds, prefix)

    def close(self):
        self.ds.close()


@pytest.fixture
def engine(etcd_server, etcd_prefix):
    e = Engine(etcd_server.endpoint, etcd_prefix)
    yield e.ipam
    e.close()


def run_exec(argv, command, conf, *, env, cwd="/", container="c1", shell=None, timeout=60):
    """One CNI exec (Popen: its pid is known) -> (rc, stdout, stderr, pid)."""
    e = {k: v for k, v in env.items() if v is not None}
    e.update(CNI_COMMAND=command, CNI_IFNAME="eth0", CNI_NETNS="/var/run/netns/x", CNI_PATH="/opt/cni/bin")
    if container is not None:
        e["CNI_CONTAINERID"] = container
    if shell is not None:      # e.g. 'umask 277 && exec "$0"'
        argv = ["/bin/sh", "-c", shell, *argv]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=cwd)
    out, err = p.communicate(json.dumps(conf).encode(), timeout=timeout)
    return p.returncode, out.decode(), err.decode(), p.pid


def log_pids(path: Path, verb: str, container: str) -> set[int]:
    """The pids in the plugin's log lines of that exec (tagged "[pid] ADD <container>")."""
    return {int(m) for m in re.findall(rf"^\S+ \S+ \w+ \[(\d+)\] {verb} {re.escape(container)} ",
                                       path.read_text(), re.M)}


def no_status(**kw):
    return dict(container=None, ifname=None, netns=None, **kw)


# ----------------------------------------------------------------------------- a. served == cold
def test_served_verbs_answer_as_cold_ones(plugin_binary, server, conf, engine):
    argv = [plugin_binary]
    add = exec_plugin("ADD", conf, argv=argv, env=server.env)
    assert add.rc == 0, add.stdout + add.stderr
    ip = add.out["ips"][0]["address"]
    assert ip.startswith("172.16.0.") and ip.endswith("/29"), add.out
    assert add.stderr == ""
    # the same attachment again, cold: the existing allocation, the same answer byte for byte
    cold_add = exec_plugin("ADD", conf, argv=argv, env=NO_SERVER)
    assert (cold_add.rc, cold_add.stdout) == (0, add.stdout), cold_add.stdout + cold_add.stderr
    (h,) = engine.handles()
    assert (h.container_id, h.node, [str(a.interface) for a in h.addresses]) == ("c1", "node-a", [ip])

    checked = {**conf, "prevResult": add.out}
    for verb, doc, kw in (("CHECK", checked, {}), ("STATUS", conf, no_status()), ("VERSION", conf, {})):
        served = exec_plugin(verb, doc, argv=argv, env=server.env, **kw)
        cold = exec_plugin(verb, doc, argv=argv, env=NO_SERVER, **kw)
        assert served.rc == 0, (verb, served.stdout + served.stderr)
        assert (served.rc, served.stdout, served.stderr) == (cold.rc, cold.stdout, cold.stderr), verb
    assert json.loads(served.stdout)["supportedVersions"][-1] == "1.1.0"

    dele = exec_plugin("DEL", conf, argv=argv, env=server.env)
    assert (dele.rc, dele.stdout) == (0, ""), dele.stdout + dele.stderr
    assert engine.handles() == []
    # an error answer, served and cold: the same
    served = exec_plugin("CHECK", checked, argv=argv, env=server.env)
    cold = exec_plugin("CHECK", checked, argv=argv, env=NO_SERVER)
    assert_error(served, 3)
    assert (served.rc, served.stdout) == (cold.rc, cold.stdout)
    # served: ADD, CHECK, STATUS, VERSION, DEL, CHECK (the cold ones are not the server's)
    assert server.stop() == 6
    # the plugin's log: the served ADD ran in a child of the server, the cold one in the exec's
    # own process (the launcher execs the bundle: same pid)
    log = Path(conf["ipam"]["log_file"])
    rc, out, err, pid = run_exec(argv, "ADD", conf, env=NO_SERVER, container="cold-pid")
    assert rc == 0, out + err
    assert log_pids(log, "ADD", "cold-pid") == {pid}


def test_a_served_exec_runs_in_the_servers_child(plugin_binary, server, conf):
    log = Path(conf["ipam"]["log_file"])
    rc, out, err, pid = run_exec([plugin_binary], "ADD", conf, env=server.env)
    assert rc == 0, out + err
    (logged,) = log_pids(log, "ADD", "c1")
    assert logged != pid and logged != server.proc.pid
    assert server.stop() == 1


# ----------------------------------------------------------------------------- b. errors
def test_errors_through_the_server_are_the_specs(plugin_binary, server, conf, engine):
    bad = exec_plugin("ADD", conf, argv=[plugin_binary], env=server.env, raw_stdin=b'{"cniVersion": "1.0.0", nope')
    assert_error(bad, 6)
    cold_bad = exec_plugin("ADD", conf, argv=[plugin_binary], env=NO_SERVER, raw_stdin=b'{"cniVersion": "1.0.0", nope')
    assert (bad.rc, bad.stdout) == (cold_bad.rc, cold_bad.stdout)

    served = exec_plugin("ADD", conf, argv=[plugin_binary], env=server.env, container=None)
    cold = exec_plugin("ADD", conf, argv=[plugin_binary], env=NO_SERVER, container=None)
    assert_error(served, 4, names="CNI_CONTAINERID")     # the spec's "invalid environment variables"
    assert (served.rc, served.stdout) == (cold.rc, cold.stdout)
    assert engine.handles() == []
    assert server.stop() == 2


def test_an_oversized_config_is_refused_alike(plugin_binary, server, conf):
    """5 MB on stdin (the launcher keeps all of it; the plugin reads 4 MiB + 1): the same code 7."""
    big = dict(conf, padding="x" * 5_000_000)
    served = exec_plugin("ADD", big, argv=[plugin_binary], env=server.env)
    cold = exec_plugin("ADD", big, argv=[plugin_binary], env=NO_SERVER)
    assert_error(served, 7)
    assert (served.rc, served.stdout) == (cold.rc, cold.stdout)
    assert server.stop() == 1


# ----------------------------------------------------------------------------- c. the exec's own world
def test_the_execs_cwd_umask_and_environment_are_used(plugin_binary, server, conf, engine, tmp_path):
    """The served verb runs in the exec's cwd (a relative log_file lands there), with its umask
    (the mode of the log file it creates) and its environment (NODENAME, the conf naming no node).
    (The relative log dir, "tmp", exists in the server's cwd, "/", too: see the next test.)"""
    work = tmp_path / "w"
    (work / "tmp").mkdir(parents=True)
    c = json.loads(json.dumps(conf))
    c["ipam"]["log_file"] = "tmp/relative.log"
    del c["ipam"]["nodename"]
    env = dict(server.env, NODENAME="node-from-the-exec")
    rc, out, err, pid = run_exec([plugin_binary], "ADD", c, env=env, cwd=work, container="c-env",
                                 shell='umask 277 && exec "$0"')
    assert rc == 0, out + err
    ip = json.loads(out)["ips"][0]["address"]
    log = work / "tmp" / "relative.log"
    assert log.exists(), sorted(str(x) for x in tmp_path.rglob("*"))
    assert not Path("/tmp/relative.log").exists()
    assert (log.stat().st_mode & 0o777) == 0o400           # 0o600 & ~0o277 (the server's umask: 0o600)
    (logged,) = log_pids(log, "ADD", "c-env")
    assert logged != pid                                   # served, not the launcher's fallback
    (h,) = engine.handles()
    assert (h.container_id, h.node) == ("c-env", "node-from-the-exec")
    assert [str(a.interface) for a in h.addresses] == [ip]
    assert server.stop() == 1


def test_a_relative_log_dir_is_looked_for_in_the_execs_cwd(plugin_binary, server, conf, tmp_path):
    """The server's check of the paths it must see (execserver.unseen_paths) resolves a relative
    log_file against the EXEC's cwd, where the served verb opens it."""
    work = tmp_path / "w"
    (work / "logs-of-this-exec").mkdir(parents=True)
    assert not Path("/logs-of-this-exec").exists()
    c = json.loads(json.dumps(conf))
    c["ipam"]["log_file"] = "logs-of-this-exec/relative.log"
    rc, out, err, pid = run_exec([plugin_binary], "ADD", c, env=server.env, cwd=work)
    assert rc == 0, out + err
    log = work / "logs-of-this-exec" / "relative.log"
    assert log.exists()
    assert server.stop(refused=0) == 1, server.stderr()


# ----------------------------------------------------------------------------- d. fallback, fake servers
def test_no_server_listening_falls_back(plugin_binary, conf, engine, tmp_path):
    env = served_env(tmp_path / "nobody.sock")
    add = exec_plugin("ADD", conf, argv=[plugin_binary], env=env)
    assert add.rc == 0, add.stdout + add.stderr
    # a socket file nobody listens on any more (a server that was killed)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(stale))
    s.close()
    again = exec_plugin("ADD", conf, argv=[plugin_binary], env=served_env(stale))
    assert (again.rc, again.stdout) == (0, add.stdout), again.stdout + again.stderr
    assert [h.container_id for h in engine.handles()] == ["c1"]


class FakeServer(threading.Thread):
    """Accepts ONE connection on ``sock`` and plays ``script(conn, data, fds)``; records what
    the launcher sent."""

    def __init__(self, sock: Path, script):
        super().__init__(daemon=True)
        self.sock_path, self.script = sock, script
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(sock))
        self.listener.listen(4)
        self.listener.settimeout(30)
        self.data: bytes | None = None
        self.nfds = 0
        self.stdin: bytes | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self):
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(30)
                data, anc, flags, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
                fds = array.array("i")
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.data, self.nfds = data, len(fds)
                if fds:    # the exec's stdin: a copy the launcher made, readable from its start
                    self.stdin = os.pread(fds[0], 1 << 20, 0)
                try:
                    self.script(conn, data, list(fds))
                finally:
                    for fd in fds:
                        os.close(fd)
        except BaseException as e:   # reported by finish()
            self.error = e
        finally:
            self.listener.close()

    def finish(self):
        self.join(30)
        assert not self.is_alive(), "the fake server is still waiting"
        if self.error is not None:
            raise self.error
        assert self.data is not None, "the launcher never connected"
        return parse_request(self.data)


def refuse(conn, data, fds):
    conn.sendall(b"Rother build")


def close_at_once(conn, data, fds):
    pass


def obey_me(conn, data, fds):
    conn.sendall(b"A")
    assert conn.recv(16) == b"G"
    os.write(fds[1], b'{"x":1}\n')
    conn.sendall(b"S" + struct.pack("<i", 7))


def die_after_go(conn, data, fds):
    conn.sendall(b"A")
    assert conn.recv(16) == b"G"


@pytest.mark.parametrize("script", [refuse, close_at_once], ids=["refused", "closed"])
def test_a_launcher_not_accepted_runs_the_verb_itself(plugin_binary, conf, engine, tmp_path, script):
    fake = FakeServer(tmp_path / "fake.sock", script)
    add = exec_plugin("ADD", conf, argv=[plugin_binary], env=served_env(fake.sock_path), args="K8S_POD_NAME=p1")
    req = fake.finish()
    assert add.rc == 0, add.stdout + add.stderr
    assert add.out["ips"][0]["address"].startswith("172.16.0."), add.out
    assert [h.container_id for h in engine.handles()] == ["c1"]
    # what the launcher sent: its build, argv, environment, cwd, umask and fds 0, 1, 2
    assert req["build"] == build_id(plugin_binary)
    assert req["argv"] == [plugin_binary]
    env = req["env"]
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_CONTAINERID"] == "c1" and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_ARGS"] == "K8S_POD_NAME=p1" and env["CNI_IPAM_EXEC_SOCKET"] == str(fake.sock_path)
    assert "PYTHONPATH" not in env
    assert req["cwd"] == os.fsencode(os.getcwd())
    umask = os.umask(0o022)
    os.umask(umask)
    assert req["umask"] == umask
    assert fake.nfds == 3
    assert fake.stdin == json.dumps(conf).encode()


def test_the_launcher_obeys_the_server(plugin_binary, conf, engine, tmp_path):
    """Accepted: the server's child answers on the exec's own stdout and names the exit code;
    the launcher exits with it and runs nothing itself."""
    fake = FakeServer(tmp_path / "fake.sock", obey_me)
    r = exec_plugin("ADD", conf, argv=[plugin_binary], env=served_env(fake.sock_path))
    fake.finish()
    assert (r.rc, r.stdout, r.stderr) == (7, '{"x":1}\n', "")
    assert engine.handles() == []


def test_a_server_child_that_dies_after_go_is_a_try_again_error(plugin_binary, conf, engine, tmp_path):
    fake = FakeServer(tmp_path / "fake.sock", die_after_go)
    r = exec_plugin("ADD", conf, argv=[plugin_binary], env=served_env(fake.sock_path))
    fake.finish()
    assert r.rc == 1
    assert_error(r, 11)
    assert engine.handles() == []       # not run again cold: it may have run in the server


# ----------------------------------------------------------------------------- e. no "G", no verb
def _client_exec(sock: Path, message: bytes, stdin_data: bytes, *, go: bool, timeout=20.0):
    """Play the launcher: the message with (stdin file, stdout pipe, stderr pipe); 'G' if ``go``.
    Returns (first reply, final reply or None, stdout bytes, stderr bytes); stdout and stderr
    are read to EOF, i.e. until the server's child has exited."""
    with tempfile.TemporaryFile() as stdin:
        stdin.write(stdin_data)
        stdin.seek(0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.settimeout(timeout)
        try:
            c.connect(str(sock))
            c.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [stdin.fileno(), out_w, err_w]))])
            os.close(out_w)
            os.close(err_w)
            out_w = err_w = -1
            first = c.recv(256)
            final = None
            if go and first == b"A":
                c.sendall(b"G")
                final = c.recv(256)
        finally:
            c.close()
            for fd in (out_w, err_w):
                if fd >= 0:
                    os.close(fd)
        try:
            return (first, final) + _read_to_eof([out_r, err_r], timeout)
        finally:
            os.close(out_r)
            os.close(err_r)


def _read_to_eof(fds, timeout):
    bufs = {fd: b"" for fd in fds}
    open_fds = set(fds)
    deadline = time.monotonic() + timeout
    while open_fds:
        left = deadline - time.monotonic()
        assert left > 0, "the server's child still holds the exec's stdout/stderr"
        ready, _, _ = select.select(list(open_fds), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                bufs[fd] += chunk
            else:
                open_fds.discard(fd)
    return tuple(bufs[fd] for fd in fds)


def _add_env(container: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0",
            "CNI_NETNS": "/var/run/netns/x", "CNI_PATH": "/opt/cni/bin"}


def test_nothing_runs_without_go(plugin_binary, server, conf, engine, tmp_path):
    bid = build_id(plugin_binary)
    stdin = json.dumps(conf).encode()
    msg = encode_request(bid, [plugin_binary], _add_env("no-go"), str(tmp_path))
    first, final, out, err = _client_exec(server.sock, msg, stdin, go=False)
    assert (first, final, out, err) == (b"A", None, b"", b"")
    assert engine.find_attachment(conf["name"], "no-go", "eth0") is None
    assert engine.handles() == []

    msg = encode_request(bid, [plugin_binary], _add_env("go"), str(tmp_path))
    first, final, out, err = _client_exec(server.sock, msg, stdin, go=True)
    assert (first, final, err) == (b"A", b"S" + struct.pack("<i", 0), b""), out
    ip = json.loads(out)["ips"][0]["address"]
    h = engine.find_attachment(conf["name"], "go", "eth0")
    assert h is not None and [str(a.interface) for a in h.addresses] == [ip]
    assert [x.container_id for x in engine.handles()] == ["go"]
    assert server.stop() == 2


# ----------------------------------------------------------------------------- f. refusals
def test_another_build_is_refused(plugin_binary, server, conf, engine, tmp_path):
    """Refused (R<reason>, logged by the server), nothing run: the launcher would run the bundle."""
    msg = encode_request("other", [plugin_binary], _add_env("other-build"), str(tmp_path))
    first, final, out, err = _client_exec(server.sock, msg, json.dumps(conf).encode(), go=True)
    assert first.startswith(b"R") and b"other" in first, first
    assert (final, out, err) == (None, b"", b"")
    # a message that does not parse, and one without its 3 fds
    first, *_ = _client_exec(server.sock, b"hello\0", b"", go=True)
    assert first.startswith(b"R"), first
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.settimeout(20)
        c.connect(str(server.sock))
        c.sendall(encode_request(build_id(plugin_binary), [plugin_binary], _add_env("no-fds")))
        first = c.recv(256)
    assert first.startswith(b"R"), first
    assert engine.handles() == []
    assert server.stop(refused=3) == 3


CLIENT_AS_NOBODY = r"""
import array, socket, sys
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
c.settimeout(20)
c.connect(sys.argv[1])
c.sendmsg([bytes.fromhex(sys.argv[2])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
reply = c.recv(256)
if reply == b"A":
    c.sendall(b"G")
    reply += b" " + c.recv(256)
sys.stderr.write(repr(reply))
"""


def test_another_user_is_refused(plugin_binary, start_server, conf, engine):
    if os.geteuid() != 0:
        pytest.skip("needs root (a client of another uid)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    d = Path(tempfile.mkdtemp(prefix="cni-ipam-exec-"))   # (pytest's tmp_path is root's alone)
    try:
        d.chmod(0o755)
        server = start_server(d / "exec.sock")
        os.chmod(server.sock, 0o666)
        msg = encode_request(build_id(plugin_binary), [plugin_binary], _add_env("nobody"), "/")
        p = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                            sys.executable, "-c", CLIENT_AS_NOBODY, str(server.sock), msg.hex()],
                           input=json.dumps(conf).encode(), capture_output=True, timeout=30, cwd="/",
                           env={"PATH": "/usr/bin:/bin"})
        assert p.returncode == 0, p.stderr
        reply = eval(p.stderr.decode())   # noqa: S307 (our own repr)
        assert reply.startswith(b"R") and b"uid" in reply, reply
        assert p.stdout == b""
        assert engine.handles() == []
        assert server.stop(refused=1) == 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- busy, drain
def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(d))
    return out


def wait_for(what, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_full_server_refuses_and_the_exec_runs_itself(plugin_binary, start_server, conf, engine, tmp_path):
    """``--max-children 1``, its one child busy (accepted, waiting for "G"): the next exec is
    refused by the server itself ("Rbusy") and starts the plugin on its own."""
    server = start_server(None, "--max-children", "1")
    with tempfile.TemporaryFile() as stdin:
        stdin.write(json.dumps(conf).encode())
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        holder.settimeout(20)
        try:
            holder.connect(str(server.sock))
            msg = encode_request(build_id(plugin_binary), [plugin_binary], _add_env("held"), "/")
            holder.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [stdin.fileno(), 1, 2]))])
            assert holder.recv(16) == b"A"
            log = Path(conf["ipam"]["log_file"])
            rc, out, err, pid = run_exec([plugin_binary], "ADD", conf, env=server.env, container="busy")
            assert rc == 0, out + err
            assert log_pids(log, "ADD", "busy") == {pid}          # the launcher's own process: cold
        finally:
            holder.close()
    assert [h.container_id for h in engine.handles()] == ["busy"]      # "held" never ran
    assert server.stop() == 1
    assert "1 more refused" in server.stderr(), server.stderr()


def test_sigterm_lets_the_execs_being_served_finish(plugin_binary, server, conf, engine):
    """SIGTERM: the server stops listening (the socket file goes: new execs run the plugin
    themselves) and waits for the exec it is serving (here: waiting for the host lock)."""
    import fcntl
    lock = conf["ipam"]["lock_file"]
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        e = {k: v for k, v in server.env.items() if v is not None}
        e.update(CNI_COMMAND="ADD", CNI_CONTAINERID="drained", CNI_IFNAME="eth0", CNI_NETNS="/var/run/netns/x",
                 CNI_PATH="/opt/cni/bin")
        with tempfile.TemporaryFile() as stdin:
            stdin.write(json.dumps(conf).encode())
            stdin.seek(0)
            p = subprocess.Popen([plugin_binary], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=e, cwd="/")

        def child_waits_for_the_lock():
            for child in children_of(server.proc.pid):
                try:
                    if any(os.readlink(f"/proc/{child}/fd/{x}") == lock for x in os.listdir(f"/proc/{child}/fd")):
                        return child
                except OSError:
                    pass
            return None
        child = wait_for("the served ADD to wait for the host lock", child_waits_for_the_lock)
        server.terminate()
        wait_for("the socket file to go", lambda: not os.path.lexists(server.sock))
        assert server.proc.poll() is None                # still there: draining
        assert p.poll() is None
    finally:
        os.close(fd)                                     # the lock: the ADD goes on
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, out + err
    assert json.loads(out)["ips"][0]["address"].startswith("172.16.0.")
    assert log_pids(Path(conf["ipam"]["log_file"]), "ADD", "drained") == {child}
    assert server.stop() == 1
    assert "waiting for 1 exec(s) being served" in server.stderr()
    assert [h.container_id for h in engine.handles()] == ["drained"]


@pytest.mark.parametrize("closed", ["<&-", "<&- >&-"], ids=["stdin-closed", "stdin-and-stdout-closed"])
def test_a_server_started_with_closed_stdio_serves_like_the_others(plugin_binary, start_server, conf, tmp_path,
                                                                    closed):
    """A server started with its fd 0 (and 1) closed: the bundle's module blob, the listening
    socket... take those numbers, and a child's dup2 of the exec's stdin/stdout onto 0/1 must not
    clobber them (nor find ``sys.stdin`` / ``sys.stdout`` None).  A served exec answers as a
    cold one: VERSION, and an ADD whose kubeconfig does not do (its error path imports
    cni_ipam.k8s, which is not preloaded)."""
    server = start_server(None, shell=f'exec "$0" "$@" {closed}')
    (tmp_path / "kubeconfig").write_text("{}")
    c = json.loads(json.dumps(conf))
    c["ipam"]["kubernetes"] = {"kubeconfig": str(tmp_path / "kubeconfig")}
    for verb, doc in (("VERSION", conf), ("ADD", c)):
        served = exec_plugin(verb, doc, argv=[plugin_binary], env=server.env)
        cold = exec_plugin(verb, doc, argv=[plugin_binary], env=NO_SERVER)
        assert (served.rc, served.stdout) == (cold.rc, cold.stdout), (verb, served.stdout + served.stderr)
        assert "Traceback" not in served.stderr, served.stderr
    assert_error(cold, 7)
    assert server.stop() == 2


# ----------------------------------------------------------------------------- g. a burst
def test_a_burst_of_served_execs(plugin_binary, server, conf, engine):
    c = json.loads(json.dumps(conf))
    c["ipam"]["ipv4_pools"] = ["internal-pool"]      # (external-pool has 64 addresses)
    env = {k: v for k, v in server.env.items() if v is not None}
    n = 40

    def burst(command):
        procs = []
        for i in range(n):
            e = dict(env, CNI_COMMAND=command, CNI_CONTAINERID=f"burst-{i}", CNI_IFNAME="eth0",
                     CNI_NETNS="/var/run/netns/x", CNI_PATH="/opt/cni/bin")
            procs.append(subprocess.Popen([plugin_binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=e, cwd="/"))
        data = json.dumps(c).encode()
        out = []
        for p in procs:
            stdout, stderr = p.communicate(data, timeout=60)
            out.append((p.returncode, stdout, stderr))
        return out

    adds = burst("ADD")
    assert all(rc == 0 for rc, _, _ in adds), [x for x in adds if x[0] != 0][:3]
    ips = {json.loads(stdout)["ips"][0]["address"] for _, stdout, _ in adds}
    assert len(ips) == n and all(ip.startswith("192.168.") for ip in ips)
    assert len(engine.handles()) == n
    dels = burst("DEL")
    assert all((rc, stdout) == (0, b"") for rc, stdout, _ in dels), [x for x in dels if x[0] != 0][:3]
    assert engine.handles() == []
    assert server.stop() == 2 * n


# ----------------------------------------------------------------------------- h. takeover
def test_a_new_server_takes_over_the_socket(plugin_binary, start_server, conf, engine):
    first = start_server()
    version = exec_plugin("VERSION", conf, argv=[plugin_binary], env=first.env)
    assert version.rc == 0, version.stdout + version.stderr
    second = start_server(first.sock)
    assert second.sock == first.sock
    again = exec_plugin("VERSION", conf, argv=[plugin_binary], env=second.env)
    assert (again.rc, again.stdout) == (0, version.stdout)
    ino = first.sock.stat().st_ino
    assert first.stop() == 1            # it served the first exec only
    assert first.sock.is_socket() and first.sock.stat().st_ino == ino, "the successor's socket was removed"
    add = exec_plugin("ADD", conf, argv=[plugin_binary], env=second.env)
    assert add.rc == 0, add.stdout + add.stderr
    assert [h.container_id for h in engine.handles()] == ["c1"]
    assert second.stop() == 2
    assert not os.path.lexists(second.sock)
    assert [p for p in second.sock.parent.iterdir() if p.name.endswith(".tmp")] == []


# ----------------------------------------------------------------------------- i. from source
def test_exec_server_from_source_refuses(tmp_path):
    sock = tmp_path / "src.sock"
    p = subprocess.run([sys.executable, "-m", "cni_ipam", "exec-server", "--socket", str(sock)],
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.startswith("cni-ipam: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert p.stdout == ""
    assert not os.path.lexists(sock)

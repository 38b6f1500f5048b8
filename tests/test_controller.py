"""`cni-ipam controller` and `cni-ipam node remove` against the real etcd and the HTTPS
Kubernetes stand-in (list + watch).  The controller runs as a real process (subprocess)
except where a test needs to control the clock (grace periods: the Reconciler in-process)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cni_ipam.controller.kube import KubeCache, api_client
from cni_ipam.controller.reconcile import Reconciler
from cni_ipam.datastore import Compare, Put, open_datastore
from cni_ipam.ipam import gc
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import ROOT
from tests.support.k8s_standin import K8sStandin


@pytest.fixture
def api(tmp_path):
    with K8sStandin(tmp_path) as s:
        s.add_namespace("ns")
        yield s


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, transport="grpc")
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("p", "10.60.0.0/24", 29))
    yield ipam
    ds.close()


@pytest.fixture
def env(etcd_server, etcd_prefix):
    e = {k: v for k, v in os.environ.items() if k != "CNI_COMMAND"}
    e.update(ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix, PYTHONPATH=ROOT)
    return e


@pytest.fixture
def cli(env):
    def run(*args, stdin="", timeout=120):
        return subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, input=stdin,
                              capture_output=True, text=True, timeout=timeout)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Controller:
    """A `cni-ipam controller` process with its stderr log in a file."""

    def __init__(self, env, tmp_path, *args, name="c"):
        self.log = tmp_path / f"controller-{name}-{time.monotonic_ns()}.log"
        self.port = free_port()
        self.f = open(self.log, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "cni_ipam", "controller",
                                   "--metrics-address", f"127.0.0.1:{self.port}", *args],
                                  env=env, stdout=subprocess.DEVNULL, stderr=self.f)

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.text())) >= count:
                return time.monotonic()
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the controller log (exit {self.p.poll()}):\n{self.text()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            if sig == signal.SIGSTOP:
                return 0
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.f.close()
        return self.p.returncode


@pytest.fixture
def controllers(env, tmp_path):
    started = []

    def start(*args, name="c"):
        c = Controller(env, tmp_path, *args, name=name)
        started.append(c)
        return c
    yield start
    for c in started:
        if c.p.poll() is None:
            try:
                os.kill(c.p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            c.p.kill()
            c.p.wait()
        c.f.close()


def add(api, ipam, i, node="n1", *, uid=True, pod=True):
    """A pod in the API (unless pod=False) and its allocation in etcd; returns the handle id."""
    obj = api.add_pod("ns", f"p{i}", node=node) if pod else None
    hid = f"net.c{i}.eth0"
    ipam.assign(AssignRequest(handle_id=hid, node=node, network="net", container_id=f"c{i}", ifname="eth0",
                              namespace="ns" if pod is not None else "", pod=f"p{i}" if pod is not None else "",
                              pod_uid=obj["metadata"]["uid"] if (obj and uid) else ""))
    return hid


def handles(ipam) -> set[str]:
    return {h.id for h in ipam.handles()}


def once(cli, kc, *extra):
    return cli("controller", "--kubeconfig", kc, "--once", "--lease-ttl", "2", *extra)


# ----------------------------------------------------------------------------- leaks

def test_once_releases_leaks_by_name_and_by_recreated_uid(api, ipam, cli, tmp_path):
    api.add_node("n1")
    for i in range(5):
        add(api, ipam, i)
    ipam.assign(AssignRequest(handle_id="net.podman.eth0", node="n1", network="net"))   # no pod recorded
    api.delete_pod("ns", "p1")                    # gone
    api.delete_pod("ns", "p2")
    api.add_pod("ns", "p2", node="n1")            # recreated: same name, another uid
    api.delete_pod("ns", "p3")
    api.add_pod("ns", "p3", node="n1")            # recreated, but its handle recorded no uid: the same pod
    hid3 = "net.c3.eth0"
    h3 = ipam.get_handle(hid3)
    h3.pod_uid = ""
    ipam.ds.commit([], [Put(ipam.keys.handle(hid3), h3.to_json())])
    before = {h.id: [str(a.ip) for a in h.addresses] for h in ipam.handles()}
    kc = api.write_kubeconfig(tmp_path / "kc")
    p = once(cli, kc, "--leak-grace-period", "0")
    assert p.returncode == 0, p.stderr
    assert handles(ipam) == {"net.c0.eth0", "net.c3.eth0", "net.c4.eth0", "net.podman.eth0"}
    assert f"released {before['net.c1.eth0'][0]} (handle net.c1.eth0, node n1): pod ns/p1 is gone" in p.stderr
    assert "handle net.c2.eth0" in p.stderr and "pod ns/p2 was recreated" in p.stderr
    assert p.stdout == ""
    # the freed addresses are free in their blocks (a consistent store)
    assert cli("check").returncode == 0
    # the reads were a list of pods and nodes, plus one GET per release (the re-check) -- no list per candidate
    paths = api.paths()
    assert paths.count("/api/v1/pods") <= 2 and paths.count("/api/v1/nodes") <= 2   # a list (+ a watch)
    assert sorted(p for p in paths if p.startswith("/api/v1/namespaces/")) == \
        ["/api/v1/namespaces/ns/pods/p1", "/api/v1/namespaces/ns/pods/p2"]


def test_default_grace_period_releases_nothing_in_one_pass(api, ipam, cli, tmp_path):
    api.add_node("n1")
    add(api, ipam, 0)
    api.delete_pod("ns", "p0")
    p = once(cli, api.write_kubeconfig(tmp_path / "kc"))
    assert p.returncode == 0, p.stderr
    assert handles(ipam) == {"net.c0.eth0"}
    assert "1 candidate(s), released 0 handle(s)" in p.stderr


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def cache(api, tmp_path):
    c = KubeCache(api_client(api.write_kubeconfig(tmp_path / "kc")), timeout=5)
    c.start()
    assert c.wait_synced(20)
    yield c
    c.stop()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def leader_guard(ipam):
    """Take the leadership key the way the controller does (for in-process reconcilers)."""
    lid, _ = ipam.ds.lease_grant(60)
    key = gc.leader_key(ipam.keys)
    assert ipam.ds.commit([Compare(key, 0)], [Put(key, b"test", lease=lid)])
    g = Compare(key, ipam.ds.last_revision)
    return lambda: g


def test_grace_period_needs_time_and_two_observations(api, ipam, cache):
    api.add_node("n1")
    for i in range(3):
        add(api, ipam, i)
    clock = Clock()
    rec = Reconciler(ipam, cache, grace=900, guard=leader_guard(ipam), clock=clock)
    api.delete_pod("ns", "p0")
    api.delete_pod("ns", "p1")
    assert wait_for(lambda: ("ns", "p1") not in cache.pods and ("ns", "p0") not in cache.pods)
    r = rec.run()
    assert r.candidates == 2 and r.released == []
    clock.t += 899                                     # seen twice, but not long enough
    assert rec.run().released == []
    api.add_pod("ns", "p1", node="n1")                 # p1 comes back (same name; its handle's uid differs)
    h1 = ipam.get_handle("net.c1.eth0")
    h1.pod_uid = ""                                    # ... and its handle has no uid: it is the same pod
    ipam.ds.commit([], [Put(ipam.keys.handle(h1.id), h1.to_json())])
    assert wait_for(lambda: ("ns", "p1") in cache.pods)
    clock.t += 2
    r = rec.run()
    assert r.released == ["net.c0.eth0"]
    assert handles(ipam) == {"net.c1.eth0", "net.c2.eth0"}
    # a new candidate starts its own clock
    api.delete_pod("ns", "p2")
    assert wait_for(lambda: ("ns", "p2") not in cache.pods)
    assert rec.run().released == []
    clock.t += 1000
    assert rec.run().released == ["net.c2.eth0"]


def test_recheck_against_the_api_before_release(api, ipam, tmp_path):
    """A cache that says 'gone' is not enough: the pod is looked up in the API just before."""
    api.add_node("n1")
    add(api, ipam, 0)
    api.delete_pod("ns", "p0")
    c = KubeCache(api_client(api.write_kubeconfig(tmp_path / "kc")), timeout=5)
    c.list_once("pods")
    c.list_once("nodes")
    c._ok = {"pods": True, "nodes": True}              # synced, but no watch: the cache goes stale
    api.add_pod("ns", "p0", node="n1")                 # back in the API (its handle has a uid: recreated)
    h = ipam.get_handle("net.c0.eth0")
    h.pod_uid = ""
    ipam.ds.commit([], [Put(ipam.keys.handle(h.id), h.to_json())])
    rec = Reconciler(ipam, c, grace=0, guard=leader_guard(ipam))
    r = rec.run()
    assert r.released == [] and r.skipped == [("net.c0.eth0", "pod exists")]
    assert handles(ipam) == {"net.c0.eth0"}
    assert api.paths().count("/api/v1/namespaces/ns/pods/p0") == 1


def test_no_guard_no_write(api, ipam, cache):
    """A reconciler that is not the leader (guard None) judges but never writes."""
    api.add_node("n1")
    add(api, ipam, 0)
    api.delete_pod("ns", "p0")
    assert wait_for(lambda: ("ns", "p0") not in cache.pods)
    r = Reconciler(ipam, cache, grace=0, guard=lambda: None).run()
    assert r.candidates == 1 and r.released == [] and handles(ipam) == {"net.c0.eth0"}


def test_a_stale_guard_writes_nothing(api, ipam, cache):
    api.add_node("n1")
    add(api, ipam, 0)
    api.delete_pod("ns", "p0")
    assert wait_for(lambda: ("ns", "p0") not in cache.pods)
    key = gc.leader_key(ipam.keys)
    stale = Compare(key, 12345)                        # not the key's revision: someone else leads
    with pytest.raises(gc.GuardLost):
        Reconciler(ipam, cache, grace=0, guard=lambda: stale).run()
    assert handles(ipam) == {"net.c0.eth0"}


# ----------------------------------------------------------------------------- nodes

def test_deleted_node(api, ipam, cli, tmp_path):
    """n2 is deleted: its pods' allocations go at once (grace 900), its empty blocks and their
    affinities are deleted; a block of n2 holding an address borrowed by a live node's pod stays;
    a pod of n2 that still exists keeps its address; an affinity of n2 without a block goes."""
    for n in ("n1", "n2"):
        api.add_node(n)
    add(api, ipam, 0, node="n1")
    add(api, ipam, 1, node="n2")                       # will be gone with its node
    add(api, ipam, 2, node="n2")                       # will be gone too
    ipam.create_pool(make_pool("r", "10.70.0.0/28", 29))
    # a routed pool: n2 claims one block, n1 the other, fills it and borrows from n2's
    r_hids = []
    api.add_pod("ns", "r2", node="n2")
    ipam.assign(AssignRequest(handle_id="net.r2.eth0", node="n2", network="net", namespace="ns", pod="r2",
                              mode="routed", v4_pools=["r"]))
    for i in range(9):
        api.add_pod("ns", f"r1-{i}", node="n1")
        ipam.assign(AssignRequest(handle_id=f"net.r1-{i}.eth0", node="n1", network="net", namespace="ns",
                                  pod=f"r1-{i}", mode="routed", v4_pools=["r"]))
        r_hids.append(f"net.r1-{i}.eth0")
    borrowed = json.loads(cli("show", "--borrowed", "-o", "json").stdout)["borrowed"]
    assert [b["handle"] for b in borrowed] == ["net.r1-8.eth0"] and borrowed[0]["blockNode"] == "n2"
    # a stray affinity of n2 (its block never created)
    ipam.ds.commit([], [Put(ipam.keys.affinity_key("n2", make_pool("x", "10.60.0.248/29", 29).cidr), b"{}")])
    api.delete_pod("ns", "p1")
    api.delete_pod("ns", "p2")
    api.delete_pod("ns", "r2")
    api.delete_node("n2")
    p = once(cli, api.write_kubeconfig(tmp_path / "kc"))       # default grace 900
    assert p.returncode == 0, p.stderr
    assert "node n2 is gone" in p.stderr
    assert handles(ipam) == {"net.c0.eth0", *r_hids}
    show = json.loads(cli("show", "--blocks", "-o", "json").stdout)
    nodes = sorted((b["node"], b["pool"], b["inUse"]) for b in show["blocks"])
    assert nodes == [("n1", "p", 1), ("n1", "r", 8), ("n2", "r", 1)]   # n2's borrowed-from block stays
    aff = [kv.key for kv in ipam.ds.get_prefix(ipam.keys.affinity)]
    assert all("/n2/" not in k for k in aff if "0a3c" in k)          # n2's pool-p affinities are gone
    assert any("/n2/" in k for k in aff if "0a46" in k)              # the kept block keeps its affinity
    assert "kept block 10.70.0." in p.stderr
    # once the borrowed address is freed, the next pass deletes the block
    api.delete_pod("ns", "r1-8")
    p = once(cli, api.write_kubeconfig(tmp_path / "kc"), "--leak-grace-period", "0")
    assert p.returncode == 0, p.stderr
    show = json.loads(cli("show", "--blocks", "-o", "json").stdout)
    assert sorted(b["node"] for b in show["blocks"]) == ["n1", "n1"]
    assert not [kv.key for kv in ipam.ds.get_prefix(ipam.keys.node_affinity("n2"))]
    assert cli("check").returncode == 0


def test_pod_of_a_deleted_node_that_still_exists_keeps_its_address(api, ipam, cli, tmp_path):
    api.add_node("n1")
    add(api, ipam, 0, node="n2")                       # n2 is not in the API, its pod is
    p = once(cli, api.write_kubeconfig(tmp_path / "kc"), "--leak-grace-period", "0")
    assert p.returncode == 0, p.stderr
    assert handles(ipam) == {"net.c0.eth0"}
    assert "kept block" in p.stderr


def test_live_node_keeps_one_block_and_releases_long_empty_extra_ones(api, ipam, cache):
    api.add_node("n1")
    hids = [add(api, ipam, i) for i in range(12)]      # /29 bridge blocks: 5 addresses each -> 3 blocks
    blocks = {b.key for b in gc.scan(ipam).blocks}
    assert len(blocks) == 3
    clock = Clock()
    rec = Reconciler(ipam, cache, grace=600, guard=leader_guard(ipam), clock=clock)
    for hid in hids:                                   # every pod ends normally (CNI DEL)
        ipam.release(hid)
    clock.t = time.time()
    assert rec.run().blocks_deleted == []              # empty, but not for long
    clock.t += 601
    r = rec.run()
    assert len(r.blocks_deleted) == 2
    left = gc.scan(ipam)
    assert len(left.blocks) == 1 and len([a for a in left.affinities if a[1] == "n1"]) == 1


# ----------------------------------------------------------------------------- outages

def test_api_unreachable_releases_nothing(api, ipam, cli, tmp_path, controllers):
    api.add_node("n1")
    for i in range(3):
        add(api, ipam, i)
    kc = api.write_kubeconfig(tmp_path / "kc")
    c = controllers("--kubeconfig", kc, "--leak-grace-period", "0", "--interval", "0.5", "--lease-ttl", "2")
    c.wait_log("pass: ")
    assert c.get("/readyz")[0] == 200
    api.stop()                                         # the API goes away (its port closes)
    # pods created while the API is away: their handles are not in the (stale) cache
    for i in range(3, 6):
        ipam.assign(AssignRequest(handle_id=f"net.c{i}.eth0", node="n1", network="net", namespace="ns",
                                  pod=f"p{i}"))
    n = len(re.findall("pass: ", c.text()))
    c.wait_log("pass: ", count=n + 3, timeout=30)
    assert handles(ipam) == {f"net.c{i}.eth0" for i in range(6)}
    assert "released" not in c.text().replace("released 0 handle", "")
    assert c.get("/readyz")[0] == 503
    _, metrics = c.get("/metrics")
    assert re.search(r'cni_ipam_controller_errors_total\{source="kubernetes"\} [1-9]', metrics)
    # and --once fails (exit 1, one line) when the API does not answer
    p = once(cli, kc, "--leak-grace-period", "0", "--timeout", "2")
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("cni-ipam: error: --once:")
    assert handles(ipam) == {f"net.c{i}.eth0" for i in range(6)}
    assert c.stop() == 0


def test_etcd_down_then_back(api, ipam, env, tmp_path, controllers):
    """etcd unreachable (a closed port): the controller stays up, not ready; with etcd it passes."""
    api.add_node("n1")
    add(api, ipam, 0)
    bad = dict(env, ETCD_ENDPOINTS=f"http://127.0.0.1:{free_port()}")
    c = Controller(bad, tmp_path, "--kubeconfig", api.write_kubeconfig(tmp_path / "kc"), "--lease-ttl", "2",
                   "--timeout", "1", name="noetcd")
    try:
        c.wait_log("leader election: etcd unavailable", timeout=30)
        assert c.p.poll() is None
        assert c.get("/readyz")[0] == 503 and c.get("/healthz")[0] == 200
    finally:
        assert c.stop() == 0


# ----------------------------------------------------------------------------- the daemon

def test_watch_follows_changes_and_relists_after_410(api, ipam, tmp_path, controllers):
    api.add_node("n1")
    for i in range(3):
        add(api, ipam, i)
    c = controllers("--kubeconfig", api.write_kubeconfig(tmp_path / "kc"), "--leak-grace-period", "0",
                    "--interval", "0.5", "--lease-ttl", "2")
    c.wait_log("pass: ", count=2)
    api.delete_pod("ns", "p0")                         # seen through the watch
    assert wait_for(lambda: "net.c0.eth0" not in handles(ipam), 20)
    lists = api.paths().count("/api/v1/pods")
    assert lists == 2          # one list, one watch (same path): no list per pass
    api.compact()              # the watch's version is now too old ...
    api.add_pod("ns", "p9", node="n1")  # (a change after compaction)
    api.compact()
    api.delete_pod("ns", "p1")
    assert wait_for(lambda: "net.c1.eth0" not in handles(ipam), 20)
    c.wait_log("listing again|listed", count=3)
    assert handles(ipam) == {"net.c2.eth0"}
    assert c.stop() == 0


def test_metrics_endpoint(api, ipam, cli, tmp_path, controllers):
    api.add_node("n1")
    api.add_node("n2")
    for i in range(4):
        add(api, ipam, i, node="n1" if i < 3 else "n2")
    api.delete_pod("ns", "p0")
    c = controllers("--kubeconfig", api.write_kubeconfig(tmp_path / "kc"), "--leak-grace-period", "3600",
                    "--interval", "0.5", "--lease-ttl", "2")
    c.wait_log("pass: ", count=2)
    code, text = c.get("/metrics")
    assert code == 200
    assert 'ipam_allocations_in_use{ippool="p",node="n1"} 3.0' in text
    assert 'ipam_allocations_in_use{ippool="p",node="n2"} 1.0' in text
    assert 'ipam_blocks{ippool="p",node="n1"} 1.0' in text
    assert 'ipam_allocations_gc_candidates{ippool="p",node="n1"} 1.0' in text
    assert 'ipam_ippool_size{ippool="p"} 256.0' in text
    assert "cni_ipam_controller_leader 1.0" in text
    assert "# TYPE ipam_allocations_gc_reclamations_total counter" in text or \
        "# TYPE ipam_allocations_gc_reclamations counter" in text
    assert "cni_ipam_controller_reconcile_duration_seconds_count" in text
    total = sum(p["inUse"] for p in json.loads(cli("show", "-o", "json").stdout)["pools"])
    scraped = sum(float(v) for v in re.findall(r"^ipam_allocations_in_use\{.*\} (\S+)$", text, re.M))
    assert scraped == total == 4
    assert c.get("/healthz")[0] == 200 and c.get("/readyz")[0] == 200
    assert c.get("/nope")[0] == 404
    assert c.stop() == 0


def test_reclamation_counter(api, ipam, tmp_path, controllers):
    api.add_node("n1")
    for i in range(3):
        add(api, ipam, i)
    c = controllers("--kubeconfig", api.write_kubeconfig(tmp_path / "kc"), "--leak-grace-period", "0",
                    "--interval", "0.5", "--lease-ttl", "2")
    c.wait_log("pass: ")
    api.delete_pod("ns", "p0")
    api.delete_pod("ns", "p1")
    assert wait_for(lambda: handles(ipam) == {"net.c2.eth0"}, 20)
    c.wait_log("pass: ", count=len(re.findall("pass: ", c.text())) + 1)
    text = c.get("/metrics")[1]
    assert 'ipam_allocations_gc_reclamations_total{ippool="p",node="n1"} 2.0' in text
    assert c.stop() == 0


def test_without_kubernetes_metrics_only(ipam, env, tmp_path, controllers):
    ipam.assign(AssignRequest(handle_id="net.x.eth0", node="n1", network="net", namespace="ns", pod="gone"))
    c = controllers("--interval", "0.5", "--lease-ttl", "2")
    c.wait_log("pass: ", count=2)
    assert "serving metrics only" in c.text()
    assert 'ipam_allocations_in_use{ippool="p",node="n1"} 1.0' in c.get("/metrics")[1]
    assert handles(ipam) == {"net.x.eth0"}             # nothing judged without Kubernetes
    assert c.stop() == 0


def test_sigterm_resigns_and_follower_takes_over_at_once(api, ipam, tmp_path, controllers):
    api.add_node("n1")
    kc = api.write_kubeconfig(tmp_path / "kc")
    a = controllers("--kubeconfig", kc, "--interval", "0.5", "--lease-ttl", "10", name="a")
    a.wait_log("became the leader")
    b = controllers("--kubeconfig", kc, "--interval", "0.5", "--lease-ttl", "10", name="b")
    b.wait_log("listed .* nodes")
    time.sleep(0.5)
    assert "became the leader" not in b.text()
    assert "cni_ipam_controller_leader 0.0" in b.get("/metrics")[1]
    assert "ipam_allocations_in_use" not in b.get("/metrics")[1]     # followers export no ipam_* series
    t0 = time.monotonic()
    assert a.stop(signal.SIGTERM) == 0
    t1 = b.wait_log("became the leader", timeout=10)
    assert t1 - t0 < 5                                  # lease revoked: not the 10 s TTL
    assert b.stop() == 0


def test_sigkill_failover_within_the_lease_ttl(api, ipam, tmp_path, controllers):
    api.add_node("n1")
    kc = api.write_kubeconfig(tmp_path / "kc")
    ttl = 3
    a = controllers("--kubeconfig", kc, "--interval", "0.5", "--lease-ttl", str(ttl), name="a")
    a.wait_log("became the leader")
    b = controllers("--kubeconfig", kc, "--interval", "0.5", "--lease-ttl", str(ttl), name="b")
    b.wait_log("listed .* nodes")
    time.sleep(1.5)
    t0 = time.monotonic()
    a.p.kill()
    a.p.wait()
    t1 = b.wait_log("became the leader", timeout=3 * ttl)
    failover = t1 - t0
    print(f"failover after SIGKILL: {failover:.2f}s (lease TTL {ttl}s)")
    assert failover <= ttl + 1.0   # not a speed budget: a bound against a follower that never takes over (the etcd lease is TTL - 1)
    b.wait_log("pass: ")


def test_sigstopped_former_leader_never_writes(api, ipam, tmp_path, controllers):
    """The leader is paused (SIGSTOP) between its re-check and its release; a follower takes
    over (and keeps the address: the pod is back by then); when the former leader resumes,
    its release txn fails on the leadership compare -- nothing is written."""
    api.add_node("n1")
    add(api, ipam, 0, uid=False)                       # handle without uid: a pod of that name is the pod
    add(api, ipam, 1)
    kc = api.write_kubeconfig(tmp_path / "kc")
    ttl = 2
    a = controllers("--kubeconfig", kc, "--leak-grace-period", "0", "--interval", "0.3", "--lease-ttl", str(ttl),
                    name="a")
    a.wait_log("became the leader")
    a.wait_log("pass: ")
    b = controllers("--kubeconfig", kc, "--leak-grace-period", "0", "--interval", "0.3", "--lease-ttl", str(ttl),
                    name="b")
    b.wait_log("listed .* pods")
    b.wait_log("listed .* nodes")
    delay = 6.0
    path = "/api/v1/namespaces/ns/pods/p0"
    api.delay = delay                                  # every new request now answers after 6 s
    api.delete_pod("ns", "p0")                         # both caches see it through their watches
    assert wait_for(lambda: api.paths().count(path) >= 1, 20), "the leader never re-checked p0"
    t0 = time.monotonic()
    os.kill(a.p.pid, signal.SIGSTOP)                   # paused while waiting for its re-check answer
    b.wait_log("became the leader", timeout=4 * ttl)
    assert wait_for(lambda: api.paths().count(path) >= 2, 20), "the new leader never re-checked p0"
    tb = time.monotonic()
    # A's answer (404) was computed at t0 + delay; B's will be at tb + delay: bring p0 back in between
    time.sleep(max(0.0, t0 + delay + 0.5 - time.monotonic(), tb + 0.1 - time.monotonic()))
    api.add_pod("ns", "p0", node="n1")
    api.delay = 0
    b.wait_log("kept net.c0.eth0: pod ns/p0 exists", timeout=20)
    os.kill(a.p.pid, signal.SIGCONT)                   # A resumes with a 404 in hand and tries to release
    a.wait_log("no longer the leader", timeout=20)
    time.sleep(1.0)
    assert "net.c0.eth0" in handles(ipam)
    assert "released" not in a.text().replace("released 0 handle", "")
    assert b.p.poll() is None and "no longer the leader" not in b.text()


# ----------------------------------------------------------------------------- node remove

def test_node_remove(ipam, cli):
    for i in range(3):
        ipam.assign(AssignRequest(handle_id=f"net.c{i}.eth0", node="gone" if i else "n1", network="net"))
    p = cli("node", "remove", "gone", stdin="n\n")
    assert p.returncode == 0 and "nothing changed" in p.stderr
    assert "release 10.60.0." in p.stderr and len(handles(ipam)) == 3
    p = cli("node", "remove", "gone", "--yes", "-o", "json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert sorted(r["handle"] for r in d["released"]) == ["net.c1.eth0", "net.c2.eth0"]
    assert len(d["blocksDeleted"]) == 1 and d["blocksKept"] == []
    assert handles(ipam) == {"net.c0.eth0"}
    assert not ipam.ds.get_prefix(ipam.keys.node_affinity("gone"))
    assert cli("check").returncode == 0
    p = cli("node", "remove", "gone", "--yes")
    assert p.returncode == 1 and p.stderr.startswith("cni-ipam: error: node 'gone' has nothing")


def test_plugin_path_imports_nothing_heavy():
    """The controller's heavy modules are never imported by the admin CLI's parser or the plugin."""
    code = ("import sys, cni_ipam.cli.main as m; m.build_parser(); import cni_ipam.plugin; "
            "bad = [x for x in ('kubernetes', 'prometheus_client', 'grpc') if x in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_etcd_leader_loss_during_a_pass(api, etcd_cluster, tmp_path, controllers):
    """The etcd leader is killed while the controller is releasing: the controller stays up,
    finishes on the new etcd leader, frees every leak once and keeps every live allocation."""
    etcd_cluster.heal()
    prefix = f"/t/leaderloss-{os.getpid()}-{time.monotonic_ns()}"
    eps = ",".join(etcd_cluster.endpoints)
    ds = open_datastore(eps, transport="grpc", timeout=10)
    try:
        ip = IPAM(ds, prefix)
        ip.create_pool(make_pool("p", "10.80.0.0/20", 26))
        api.add_node("n1")
        live = set()
        for i in range(240):
            hid = add(api, ip, i)
            if i % 4:
                api.delete_pod("ns", f"p{i}")       # 180 leaks
            else:
                live.add(hid)
        env = {k: v for k, v in os.environ.items() if k != "CNI_COMMAND"}
        env.update(ETCD_ENDPOINTS=eps, CNI_IPAM_ETCD_PREFIX=prefix, PYTHONPATH=ROOT)
        c = Controller(env, tmp_path, "--kubeconfig", api.write_kubeconfig(tmp_path / "kc"), "--leak-grace-period",
                       "0", "--interval", "0.5", "--lease-ttl", "3", "--timeout", "3", name="cluster")
        try:
            c.wait_log("controller: released ", timeout=60)
            etcd_cluster.leader().kill()
            assert wait_for(lambda: handles(ip) == live, 90), (len(handles(ip)), c.text()[-3000:])
            assert c.p.poll() is None
            c.wait_log("pass: ", timeout=30)
            released = re.findall(r"released \S+ \(handle (net\.c\d+\.eth0)", c.text())
            # each leak released once (a commit whose answer was lost with the etcd leader is applied
            # but not logged as released by this controller: it finds the handle gone on its retry)
            assert len(released) == len(set(released)) and len(released) >= 170
            p = subprocess.run([sys.executable, "-m", "cni_ipam", "check"], env=env, capture_output=True,
                               text=True, timeout=120)
            assert p.returncode == 0, p.stdout + p.stderr
        finally:
            assert c.stop() == 0
    finally:
        ds.close()
        etcd_cluster.heal()


def test_a_corrupt_block_is_skipped_not_fatal(api, ipam, cache):
    """A leaked handle whose block is undecodable is reported and left alone; the others go."""
    api.add_node("n1")
    api.add_node("n2")
    add(api, ipam, 0, node="n1")
    add(api, ipam, 1, node="n2")
    api.delete_pod("ns", "p0")
    api.delete_pod("ns", "p1")
    assert wait_for(lambda: not cache.pods.get(("ns", "p0")) and not cache.pods.get(("ns", "p1")))
    b2 = next(b for b in gc.scan(ipam).blocks if b.node == "n2")
    ipam.ds.commit([], [Put(b2.key, b'{"cidr": "10.60.0.8/29", "allocations": {"3": "net.c1.eth0"}}')])
    r = Reconciler(ipam, cache, grace=0, guard=leader_guard(ipam)).run()
    assert r.released == ["net.c0.eth0"]
    assert r.skipped and r.skipped[0][0] == "net.c1.eth0" and "undecodable" in r.skipped[0][1]
    assert handles(ipam) == {"net.c1.eth0"}
    assert ipam.ds.get(b2.key).value.startswith(b'{"cidr": "10.60.0.8/29"')      # never overwritten

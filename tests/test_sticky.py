"""StatefulSet pods keep their address (IPAMConfig keepStatefulSetIPs; issue 16): the real plugin
exec'd against the real etcd and the HTTPS Kubernetes stand-in, the CLI as a process, the
controller's rules in-process (a clock to step over the grace period) and as `--once`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from cni_ipam.k8s import statefulset_slot
from tests.plugin_helpers import ROOT, assert_error, exec_plugin, netconf
from tests.support.k8s_standin import K8sStandin

ON = """apiVersion: projectcalico.org/v3
kind: IPAMConfig
metadata: {name: default}
spec:
  keepStatefulSetIPs: true
"""
OFF = ON.replace("true", "false")


@pytest.fixture
def api(tmp_path):
    with K8sStandin(tmp_path) as s:
        s.add_namespace("db")
        for n in ("node-a", "node-b"):
            s.add_node(n)
        yield s


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, transport="grpc")
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("p", "10.70.0.0/24", 29))
    yield ipam
    ds.close()


@pytest.fixture
def env(etcd_server, etcd_prefix):
    e = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    e.update(ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix, PYTHONPATH=ROOT)
    return e


@pytest.fixture
def cli(env):
    def run(*args, stdin="", check=True):
        p = subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, input=stdin,
                           capture_output=True, text=True, timeout=120)
        if check:
            assert p.returncode == 0, p.stderr
        return p
    return run


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path, api):
    kc = api.write_kubeconfig(tmp_path / "kubeconfig")

    def make(node="node-a", mode="bridge", **kw):
        extra = {"mode": mode} if mode != "bridge" else {}
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, node=node, name="net",
                       kubernetes={"kubeconfig": kc}, **extra, **kw)
    return make


class Pod:
    """A pod in the stand-in and its sandbox's CNI calls (a new container ID per incarnation)."""
    n = 0

    def __init__(self, api, name, node, sts=None, ns="db"):
        Pod.n += 1
        self.api, self.name, self.node, self.ns = api, name, node, ns
        self.obj = api.add_pod(ns, name, node=node, owner=sts)
        self.uid = self.obj["metadata"]["uid"]
        self.cid = f"sandbox{Pod.n:04d}"

    def args(self):
        return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.ns};K8S_POD_NAME={self.name};"
                f"K8S_POD_INFRA_CONTAINER_ID={self.cid};K8S_POD_UID={self.uid}")

    def add(self, conf):
        return exec_plugin("ADD", conf, container=self.cid, args=self.args())

    def ip(self, conf) -> str:
        r = self.add(conf)
        assert r.rc == 0, r.stdout + r.stderr
        return r.out["ips"][0]["address"].split("/")[0]

    def delete(self, conf, *, remove=True):
        r = exec_plugin("DEL", conf, container=self.cid, args=self.args())
        assert r.rc == 0, r.stdout + r.stderr
        if remove:
            self.api.delete_pod(self.ns, self.name)


def show_ip(cli, ip) -> dict:
    return json.loads(cli("show", "--ip", ip, "-o", "json").stdout)


# ----------------------------------------------------------------------------- pure parts

def test_statefulset_slot_reads_the_controller_owner_reference():
    def pod(name, refs):
        return {"metadata": {"name": name, "ownerReferences": refs}}
    ref = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u", "controller": True}
    assert statefulset_slot(pod("web-0", [ref])) == ("web", 0)
    assert statefulset_slot(pod("web-12", [ref])) == ("web", 12)
    assert statefulset_slot(pod("my-web-3", [{**ref, "name": "my-web"}])) == ("my-web", 3)
    assert statefulset_slot(pod("web-0", [{**ref, "controller": False}])) is None
    assert statefulset_slot(pod("web-0", [{**ref, "kind": "ReplicaSet"}])) is None
    assert statefulset_slot(pod("web-abc12", [ref])) is None
    assert statefulset_slot(pod("web-01", [ref])) is None
    assert statefulset_slot(pod("db-0", [ref])) is None
    assert statefulset_slot(pod("web-٣", [ref])) is None          # a non-ASCII digit
    assert statefulset_slot({"metadata": {"name": "web-0"}}) is None
    assert statefulset_slot(None) is None


def test_kept_ids():
    from cni_ipam.ipam import keys, sticky
    assert sticky.kept_id("db", "web", 2) == "sts/db/web/2"
    assert sticky.parse_kept_id("sts/db/web/2") == ("db", "web", 2)
    assert sticky.parse_kept_id("net/cid/eth0") is None and sticky.parse_kept_id("sts/db/web") is None
    k = keys.Keys("/x")
    # never the key of an attachment (3 parts) nor of a layout-1 id (no "/")
    assert k.handle("sts/db/web/2") == "/x/v1/handles/sts%2Fdb%2Fweb%2F2"
    assert k.handle_of_key(k.handle("sts/db/web/2")) == "sts/db/web/2"


# ----------------------------------------------------------------------------- the plugin

def keep_ips(cli, on=True):
    p = cli("apply", "-f", "-", stdin=ON if on else OFF)
    assert "IPAMConfig" in p.stdout, p.stdout


def test_pod_recreated_keeps_its_address_and_nobody_else_gets_it(api, ipam, cli, conf):
    keep_ips(cli)
    c = conf()
    web = api.add_statefulset("db", "web", replicas=2)
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(c)
    other = Pod(api, "client", "node-a")
    y = other.ip(c)
    w0.delete(c)
    info = show_ip(cli, x)
    assert info["allocated"] and info["handle"] == "sts/db/web/0"
    assert info["keptFor"]["namespace"] == "db" and info["keptFor"]["statefulSet"] == "web"
    assert info["keptFor"]["ordinal"] == 0 and info["keptFor"]["pod"] == "web-0"
    assert info["keptFor"]["podUID"] == w0.uid and info["pod"] is None
    text = cli("show", "--ip", x).stdout
    assert "kept for" in text and "db/web-0" in text, text
    # the block (/29, bridge: 5 addresses) fills up around it: 3 more, then a new block
    got = {Pod(api, f"filler-{i}", "node-a").ip(c) for i in range(4)}
    assert x not in got and y not in got and len(got) == 4
    # nor when asked for by name
    thief = Pod(api, "thief", "node-a")
    r = exec_plugin("ADD", c, container=thief.cid, args=thief.args() + f";IP={x}")
    assert_error(r, 111, names="sts/db/web/0")
    # the StatefulSet controller recreates web-0: a new UID, a new sandbox
    again = Pod(api, "web-0", "node-a", web)
    assert again.uid != w0.uid and again.cid != w0.cid
    assert again.ip(c) == x
    info = show_ip(cli, x)
    assert info["handle"] == f"net/{again.cid}/eth0" and info["pod"] == "web-0" and info["keptFor"] is None
    # a repeated ADD returns the same; the store stays consistent
    assert again.ip(c) == x
    assert cli("check", check=False).returncode == 0
    # a pod that is not a StatefulSet's is released on DEL as always
    other.delete(c)
    assert show_ip(cli, y)["reason"] == "free"


def test_routed_mode_recreated_on_another_node_borrows_it(api, ipam, cli, conf):
    keep_ips(cli)
    web = api.add_statefulset("db", "web", replicas=1)
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(conf("node-a", mode="routed"))
    w0.delete(conf("node-a", mode="routed"))
    assert show_ip(cli, x)["keptFor"]["ordinal"] == 0
    moved = Pod(api, "web-0", "node-b", web)
    r = moved.add(conf("node-b", mode="routed"))
    assert r.rc == 0, r.stdout
    assert r.out["ips"][0]["address"] == f"{x}/32"
    info = show_ip(cli, x)
    assert info["node"] == "node-b" and info["blockNode"] == "node-a" and info["pod"] == "web-0"
    # and back again
    moved.delete(conf("node-b", mode="routed"))
    back = Pod(api, "web-0", "node-a", web)
    assert back.ip(conf("node-a", mode="routed")) == x
    assert cli("check", check=False).returncode == 0


def test_bridge_mode_on_another_node_is_refused_clearly(api, ipam, cli, conf):
    keep_ips(cli)
    web = api.add_statefulset("db", "web", replicas=1)
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(conf("node-a"))
    w0.delete(conf("node-a"))
    elsewhere = Pod(api, "web-0", "node-b", web)
    err = assert_error(elsewhere.add(conf("node-b")), 111, names="node-a")
    assert x in err["msg"] and "bridge mode" in err["msg"] and "release --handle sts/db/web/0" in err["msg"]
    # nothing moved; DEL of the failed sandbox (the runtime sends it) is harmless
    exec_plugin("DEL", conf("node-b"), container=elsewhere.cid, args=elsewhere.args())
    assert show_ip(cli, x)["handle"] == "sts/db/web/0"
    api.delete_pod("db", "web-0")
    back = Pod(api, "web-0", "node-a", web)
    assert back.ip(conf("node-a")) == x
    # the operator frees a kept address by its handle, as the error says
    back.delete(conf("node-a"))
    p = cli("release", "--handle", "sts/db/web/0", "--yes")
    assert x in p.stdout + p.stderr
    assert show_ip(cli, x)["reason"] == "free" and ipam.handles() == []


def test_the_setting_is_applied_validated_and_shown(cli):
    assert "keepStatefulSetIPs  false" in cli("config", "show").stdout
    assert "keepStatefulSetIPs" not in cli("config", "show", "-o", "json").stdout   # absent when off, as before
    keep_ips(cli)
    assert cli("config", "show", "-o", "json").stdout and \
        json.loads(cli("config", "show", "-o", "json").stdout)["keepStatefulSetIPs"] is True
    assert "keepStatefulSetIPs  true" in cli("config", "show").stdout
    p = cli("apply", "-f", "-", stdin=ON.replace("true", '"yes"'), check=False)
    assert p.returncode == 1 and "spec.keepStatefulSetIPs" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = cli("apply", "-f", "-", stdin=ON.replace("keepStatefulSetIPs", "keepStatefulSetIps"), check=False)
    assert p.returncode == 1 and "did you mean" in p.stderr and "keepStatefulSetIPs" in p.stderr, p.stderr
    keep_ips(cli, on=False)
    assert "keepStatefulSetIPs  false" in cli("config", "show").stdout


def test_flag_off_is_the_old_behaviour(api, ipam, cli, conf):
    c = conf()
    web = api.add_statefulset("db", "web", replicas=1)
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(c)
    h = ipam.find_attachment("net", w0.cid, "eth0")
    assert h.keep_as == "" and b"keepAs" not in ipam.ds.get(ipam.keys.handle(h.id)).value
    w0.delete(c)
    assert show_ip(cli, x)["reason"] == "free" and ipam.handles() == []
    assert Pod(api, "web-0", "node-a", web).ip(c) != x      # FIFO: the freed one is handed out last
    # switched on, then off again: an attachment made while on is released while off
    keep_ips(cli)
    w1 = Pod(api, "web-1", "node-a", web)
    y = w1.ip(c)
    keep_ips(cli, on=False)
    w1.delete(c)
    assert show_ip(cli, y)["reason"] == "free"


# ----------------------------------------------------------------------------- the controller

class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


def wait_for(cond, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture
def cache(api, tmp_path):
    from cni_ipam.controller.kube import KubeCache, api_client
    c = KubeCache(api_client(api.write_kubeconfig(tmp_path / "kc-controller")), timeout=5)
    c.start()
    assert c.wait_synced(20) and c.statefulsets_synced
    yield c
    c.stop()


def leader_guard(ipam):
    from cni_ipam.datastore import Compare, Put
    from cni_ipam.ipam import gc
    lid, _ = ipam.ds.lease_grant(60)
    key = gc.leader_key(ipam.keys)
    assert ipam.ds.commit([Compare(key, 0)], [Put(key, b"test", lease=lid)])
    g = Compare(key, ipam.ds.last_revision)
    return lambda: g


def kept(ipam) -> set[str]:
    return {h.id for h in ipam.handles() if h.id.startswith("sts/")}


def test_scale_down_and_deletion_release_after_the_grace_period(api, ipam, cli, conf, cache):
    from cni_ipam.controller.reconcile import Reconciler
    keep_ips(cli)
    c = conf()
    web = api.add_statefulset("db", "web", replicas=3)
    pods = [Pod(api, f"web-{i}", "node-a", web) for i in range(3)]
    ips = [p.ip(c) for p in pods]
    clock = Clock()
    rec = Reconciler(ipam, cache, grace=900, guard=leader_guard(ipam), clock=clock)
    # web-2 restarts (kept, in range: never a candidate), then the StatefulSet scales to 2: web-2 goes
    pods[2].delete(c)
    assert kept(ipam) == {"sts/db/web/2"}
    r = rec.run()
    assert r.released == [] and r.candidates == 0
    api.scale_statefulset("db", "web", 2)
    assert wait_for(lambda: cache.statefulset_replicas()[("db", "web")] == 2)
    r = rec.run()
    assert r.released == [] and r.candidates == 1          # a candidate from now on
    clock.t += 899
    assert rec.run().released == []                        # seen twice, not long enough
    clock.t += 2
    r = rec.run()
    assert r.released == ["sts/db/web/2"] and r.addresses == 1
    assert show_ip(cli, ips[2])["reason"] == "free" and kept(ipam) == set()
    # scaled back up before the grace period is over: kept
    pods[1].delete(c)
    api.scale_statefulset("db", "web", 1)
    assert wait_for(lambda: cache.statefulset_replicas()[("db", "web")] == 1)
    assert rec.run().candidates == 1
    api.scale_statefulset("db", "web", 2)
    assert wait_for(lambda: cache.statefulset_replicas()[("db", "web")] == 2)
    clock.t += 1000
    assert rec.run().released == [] and kept(ipam) == {"sts/db/web/1"}
    # the StatefulSet is deleted (its pods go too): both kept addresses go after the grace period
    pods[0].delete(c)
    api.delete_statefulset("db", "web")
    assert wait_for(lambda: ("db", "web") not in cache.statefulset_replicas())
    assert rec.run().released == []
    clock.t += 901
    r = rec.run()
    assert sorted(r.released) == ["sts/db/web/0", "sts/db/web/1"]
    assert all(show_ip(cli, ip)["reason"] == "free" for ip in ips)
    assert cli("check", check=False).returncode == 0


def test_recheck_against_the_api_before_releasing_a_kept_address(api, ipam, cli, conf, cache):
    """The cache says 'scaled down'; the API says it is back: kept."""
    from cni_ipam.controller.reconcile import Reconciler
    keep_ips(cli)
    c = conf()
    web = api.add_statefulset("db", "web", replicas=1)
    w0 = Pod(api, "web-0", "node-a", web)
    w0.ip(c)
    w0.delete(c)
    api.delete_statefulset("db", "web")
    assert wait_for(lambda: ("db", "web") not in cache.statefulset_replicas())
    cache._stop.set()                                       # freeze the cache ("stale")
    for t in list(cache._watches.values()):
        t.close()
    api.add_statefulset("db", "web", replicas=1)
    rec = Reconciler(ipam, cache, grace=0, guard=leader_guard(ipam))
    r = rec.run()
    assert r.released == [] and ("sts/db/web/0", "StatefulSet keeps it") in r.skipped
    assert kept(ipam) == {"sts/db/web/0"}
    assert "/apis/apps/v1/namespaces/db/statefulsets/web" in api.paths()


def test_controller_once_releases_kept_addresses_of_a_deleted_statefulset(api, ipam, cli, conf, tmp_path):
    keep_ips(cli)
    c = conf()
    web = api.add_statefulset("db", "web", replicas=2)
    db = api.add_statefulset("db", "pg", replicas=1)
    w = [Pod(api, f"web-{i}", "node-a", web) for i in range(2)]
    pg = Pod(api, "pg-0", "node-a", db)
    ips = [p.ip(c) for p in w] + [pg.ip(c)]
    for p in w + [pg]:
        p.delete(c)
    api.delete_statefulset("db", "web")
    kc = api.write_kubeconfig(tmp_path / "kc-once")
    p = cli("controller", "--kubeconfig", kc, "--once", "--lease-ttl", "2", "--leak-grace-period", "0")
    assert f"released {ips[0]} (kept for sts/db/web/0, node node-a): StatefulSet db/web is gone" in p.stderr
    assert kept(ipam) == {"sts/db/pg/0"}
    assert show_ip(cli, ips[2])["keptFor"]["statefulSet"] == "pg"
    # the controller read StatefulSets with a list (+ watch), and GET one per release (the re-check)
    paths = api.paths()
    assert "/apis/apps/v1/statefulsets" in paths
    assert paths.count("/apis/apps/v1/namespaces/db/statefulsets/web") == 2
    # keepStatefulSetIPs off: what is still kept goes
    keep_ips(cli, on=False)
    p = cli("controller", "--kubeconfig", kc, "--once", "--lease-ttl", "2", "--leak-grace-period", "0")
    assert "(kept for sts/db/pg/0, node node-a): IPAMConfig keepStatefulSetIPs is off" in p.stderr
    assert kept(ipam) == set()


def test_flag_off_the_exec_path_imports_and_reads_nothing_new(api, ipam, cli, etcd_server, etcd_prefix, tmp_path):
    """keepStatefulSetIPs off: a StatefulSet pod's ADD and DEL never import ipam/sticky.py (nor
    anything heavy), and make the same etcd requests as any pod's; on: they do use it."""
    argv = [sys.executable, "-X", "importtime", "-m", "cni_ipam"]
    c = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, node="node-a", name="net",
                kubernetes={"kubeconfig": api.write_kubeconfig(tmp_path / "kc.json", fmt="json")})
    web = api.add_statefulset("db", "web", replicas=2)

    def mods(r):
        assert r.rc == 0, r.stdout + r.stderr
        return {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}

    def requests(cid):
        import re
        log = open(c["ipam"]["log_file"]).read()
        got = [int(n) for n in re.findall(rf"(?:ADD|DEL) {cid[:12]} etcd requests=(\d+)", log)]
        assert len(got) == 2, got      # ADD, DEL
        return got
    for i in range(2):                                  # the node's block and its snapshot exist
        Pod(api, f"warm-{i}", "node-a").ip(c)
    for on in (False, True):
        if on:
            keep_ips(cli)
        w = Pod(api, f"web-{int(on)}", "node-a", web)
        plain = Pod(api, f"plain-{int(on)}", "node-a")
        got = [mods(exec_plugin("ADD", c, container=p.cid, args=p.args(), argv=argv)) for p in (w, plain)]
        gone = [mods(exec_plugin("DEL", c, container=p.cid, args=p.args(), argv=argv)) for p in (w, plain)]
        heavy = {"kubernetes", "grpc", "etcd3", "yaml"} & set().union(*got, *gone)
        assert not heavy, heavy
        assert ("cni_ipam.ipam.sticky" in got[0] | gone[0]) is on
        assert "cni_ipam.ipam.sticky" not in got[1] | gone[1]
        if not on:   # the same requests for a StatefulSet pod as for any pod (ADD, DEL)
            assert requests(w.cid) == requests(plain.cid), (requests(w.cid), requests(plain.cid))


def test_cni_gc_of_a_statefulset_pod_keeps_its_address(api, ipam, cli, conf):
    """The runtime's GC (its DEL was lost): the same as a DEL, the address is kept."""
    keep_ips(cli)
    c = conf(version="1.1.0")
    web = api.add_statefulset("db", "web", replicas=1)
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(c)
    other = Pod(api, "client", "node-a")
    y = other.ip(c)
    api.delete_pod("db", "web-0")
    api.delete_pod("db", "client")
    r = exec_plugin("GC", dict(c, **{"cni.dev/valid-attachments": []}), container=None, ifname=None, netns=None)
    assert r.rc == 0, r.stdout + r.stderr
    assert show_ip(cli, x)["handle"] == "sts/db/web/0" and show_ip(cli, y)["reason"] == "free"
    assert Pod(api, "web-0", "node-a", web).ip(c) == x


def test_controller_without_the_statefulsets_rule_still_frees_leaks(api, ipam, cli, conf, tmp_path):
    """An older RBAC (no statefulsets rule): kept addresses stay, leaks are freed as before."""
    keep_ips(cli)
    c = conf()
    web = api.add_statefulset("db", "web", replicas=1)
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(c)
    w0.delete(c)
    api.delete_statefulset("db", "web")
    gone = Pod(api, "gone", "node-a")
    y = gone.ip(c)
    api.delete_pod("db", "gone")
    api.denied_resources = {"statefulsets"}
    p = cli("controller", "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kc-old")), "--once",
            "--lease-ttl", "2", "--leak-grace-period", "0")
    assert "statefulsets is forbidden" in p.stderr and 'in API group "apps"' in p.stderr
    assert f"released {y} (handle net/{gone.cid}/eth0, node node-a): pod db/gone is gone" in p.stderr
    assert show_ip(cli, y)["reason"] == "free" and show_ip(cli, x)["handle"] == "sts/db/web/0"


def test_a_second_network_of_the_pod_never_takes_the_first_ones_address(api, ipam, cli, conf):
    keep_ips(cli)
    web = api.add_statefulset("db", "web", replicas=1)
    net1 = conf()
    net2 = dict(conf(), name="net2")
    w0 = Pod(api, "web-0", "node-a", web)
    x = w0.ip(net1)
    r = exec_plugin("ADD", net2, container=w0.cid, ifname="net1", args=w0.args())
    assert r.rc == 0, r.stdout
    y = r.out["ips"][0]["address"].split("/")[0]
    w0.delete(net1, remove=False)
    assert exec_plugin("DEL", net2, container=w0.cid, ifname="net1", args=w0.args()).rc == 0
    api.delete_pod("db", "web-0")
    assert show_ip(cli, x)["handle"] == "sts/db/web/0" and show_ip(cli, y)["reason"] == "free"
    again = Pod(api, "web-0", "node-a", web)
    r = exec_plugin("ADD", net2, container=again.cid, ifname="net1", args=again.args())   # net2 first
    assert r.rc == 0 and r.out["ips"][0]["address"].split("/")[0] != x
    assert again.ip(net1) == x

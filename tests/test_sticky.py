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
    assert Pod(api, "web-0", "node-a", web).ip(conf("node-a")) == x


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

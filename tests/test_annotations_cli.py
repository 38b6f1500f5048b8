"""Without Kubernetes: namespace annotations and node labels stored in etcd with the CLI
(`cni-ipam namespace ...`, `cni-ipam node ...`, run as subprocesses), and the real plugin
choosing pools from them (real etcd, no mocks)."""
import ipaddress
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import ROOT, exec_plugin, netconf, seed_store

V4 = "cni.projectcalico.org/ipv4pools"
EXTERNAL, INTERNAL = ipaddress.ip_network("172.16.0.0/26"), ipaddress.ip_network("192.168.0.0/16")


@pytest.fixture
def cli(etcd_server, etcd_prefix):
    env = {k: v for k, v in os.environ.items() if k != "CNI_COMMAND"}
    env.update(ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix, PYTHONPATH=ROOT)

    def run(*args, ok=True):
        p = subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, capture_output=True, text=True,
                           timeout=60)
        if ok is True:
            assert p.returncode == 0, p.stderr
        elif ok is False:
            assert p.returncode != 0 and p.stderr.startswith("cni-ipam: error: ") and \
                p.stderr.count("\n") == 1, p.stderr
        return p
    return run


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    with seed_store(etcd_server.endpoint, etcd_prefix) as store:
        yield store


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path):
    def make(node="node-a", **kw):
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, node=node, **kw)
    return make


def add(conf, ns, pod):
    cid = f"{ns}-{pod}"
    return exec_plugin("ADD", conf, container=cid,
                       args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}")


def ip_of(r):
    assert r.rc == 0, r.stdout + r.stderr
    return ipaddress.ip_interface(r.out["ips"][0]["address"]).ip


def test_seed_scenario_with_annotations_in_etcd(cli, ipam, conf):
    cli("namespace", "annotate", "external-ns", f'{V4}=["external-pool"]')
    cli("namespace", "annotate", "internal-ns", f'{V4}=["internal-pool"]')
    pods = [(ns, f"web-{i}", "node-a" if i % 2 == 0 else "node-b")
            for ns in ("external-ns", "internal-ns") for i in range(3)]
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda p: (p, add(conf(node=p[2]), p[0], p[1])), pods))
    ips = set()
    for (ns, pod, node), r in results:
        ip = ip_of(r)
        assert ip in (EXTERNAL if ns == "external-ns" else INTERNAL), (ns, pod, ip)
        ips.add(ip)
    assert len(ips) == 6
    hs = {(h.namespace, h.pod): h for h in ipam.handles()}
    assert {(ns, pod): node for ns, pod, node in pods} == {k: h.node for k, h in hs.items()}
    # a namespace without a record: every enabled pool (by nodeSelector), config pools when set
    assert ip_of(add(conf(ipv4_pools=["internal-pool"]), "plain-ns", "x")) in INTERNAL
    # the namespace's annotation beats the config's pools
    assert ip_of(add(conf(ipv4_pools=["internal-pool"]), "external-ns", "y")) in EXTERNAL


def test_annotate_get_list_remove(cli, ipam, conf):
    p = cli("namespace", "annotate", "ns1", f'{V4}=["external-pool"]', "team=blue")
    assert p.stdout == "namespace/ns1 annotated\n" and p.stderr == ""
    got = json.loads(cli("namespace", "get", "ns1", "-o", "json").stdout)
    assert got == {"name": "ns1", "annotations": {V4: '["external-pool"]', "team": "blue"}}
    table = cli("namespace", "get", "ns1").stdout
    assert "ns1" in table and f'{V4}=["external-pool"]' in table
    # same value again: no-op; another value without --overwrite: refused; with it: replaced
    assert cli("namespace", "annotate", "ns1", "team=blue").stdout == "namespace/ns1 unchanged\n"
    p = cli("namespace", "annotate", "ns1", f'{V4}=["internal-pool"]', ok=False)
    assert "already has a value" in p.stderr and "--overwrite" in p.stderr
    cli("namespace", "annotate", "ns1", f'{V4}=["internal-pool"]', "--overwrite")
    assert ip_of(add(conf(), "ns1", "a")) in INTERNAL
    # remove: the plugin falls back to every pool by nodeSelector (both; a fresh node takes the
    # first by name -- node-a would first use the block it already has in internal-pool)
    cli("namespace", "annotate", "ns1", f"{V4}-")
    assert json.loads(cli("namespace", "get", "ns1", "-o", "json").stdout)["annotations"] == {"team": "blue"}
    assert ip_of(add(conf(node="node-z"), "ns1", "b")) in EXTERNAL
    cli("namespace", "annotate", "ns2", "x=1")
    rows = json.loads(cli("namespace", "list", "-o", "json").stdout)
    assert [r["name"] for r in rows] == ["ns1", "ns2"]
    cli("namespace", "annotate", "ns1", "team-")
    cli("namespace", "annotate", "ns2", "x-")
    assert json.loads(cli("namespace", "list", "-o", "json").stdout) == []
    assert ipam.ds.get_prefix(ipam.keys.namespaces) == []       # an emptied record is deleted


@pytest.mark.parametrize("args, msg", [
    (["ns", f"{V4}=external-pool"], f"invalid annotation '{V4}' on namespace ns: not JSON"),
    (["ns", f'{V4}=["10.0.0.0/99"]'], "is not a valid CIDR"),
    (["ns", 'cni.projectcalico.org/ipv6pools=["10.0.0.0/8"]'], "is not an IPv6 CIDR"),
    (["ns", "Bad_Prefix/x=1"], "invalid annotation key 'Bad_Prefix/x'"),
    (["ns", "novalue"], "expected KEY=VALUE to set or KEY- to remove"),
    (["ns", "a=1", "a-"], "is both set and removed"),
])
def test_annotate_rejects_bad_input_and_writes_nothing(cli, ipam, args, msg):
    p = cli("namespace", "annotate", *args, ok=False)
    assert msg in p.stderr
    assert ipam.ds.get_prefix(ipam.keys.namespaces) == []


def test_annotate_warns_about_unknown_pools(cli, ipam):
    p = cli("namespace", "annotate", "ns", f'{V4}=["later-pool", "external-pool"]')
    assert "warning: IPv4 pool 'later-pool' does not exist" in p.stderr and "external-pool" not in p.stderr


def test_named_pool_errors_through_the_plugin(cli, ipam, conf):
    ipam.create_pool(make_pool("off-pool", "10.9.0.0/24", 29, disabled=True))
    cli("namespace", "annotate", "ns-a", f'{V4}=["gone-pool"]')
    cli("namespace", "annotate", "ns-b", f'{V4}=["off-pool"]')
    r = add(conf(), "ns-a", "p")
    assert r.out["code"] == 7 and "'gone-pool' (from annotation" in r.out["msg"] and "does not exist" in r.out["msg"]
    r = add(conf(), "ns-b", "p")
    assert r.out["code"] == 7 and "'off-pool'" in r.out["msg"] and "is disabled" in r.out["msg"]
    assert ipam.handles() == []


def test_node_labels_and_node_selectors(cli, etcd_server, etcd_prefix, conf):
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("rack1-pool", "10.31.0.0/24", 29, node_selector="rack == 'r1'"))
    ipam.create_pool(make_pool("rack2-pool", "10.32.0.0/24", 29, node_selector="rack in {'r2'}"))
    assert cli("node", "label", "node-a", "rack=r1").stdout == "node/node-a labeled\n"
    cli("node", "label", "node-b", "rack=r2", "zone=z1")
    assert json.loads(cli("node", "get", "node-b", "-o", "json").stdout) == {
        "name": "node-b", "labels": {"rack": "r2", "zone": "z1"}}
    for node, net in (("node-a", "10.31.0.0/24"), ("node-b", "10.32.0.0/24")):
        r = exec_plugin("ADD", conf(node=node), container=f"c-{node}")
        assert ip_of(r) in ipaddress.ip_network(net)
    r = exec_plugin("ADD", conf(node="node-c"), container="c-node-c")
    assert r.out["code"] == 7 and "no enabled IPv4 pool matches this node" in r.out["msg"]
    # STATUS sees the same labels
    st = exec_plugin("STATUS", dict(conf(node="node-c"), cniVersion="1.1.0"), container=None, ifname=None,
                     netns=None)
    assert st.out["code"] == 50, st.stdout
    cli("node", "label", "node-c", "rack=r2")
    assert ip_of(exec_plugin("ADD", conf(node="node-c"), container="c-node-c")) in ipaddress.ip_network("10.32.0.0/24")
    st = exec_plugin("STATUS", dict(conf(node="node-c"), cniVersion="1.1.0"), container=None, ifname=None,
                     netns=None)
    assert st.rc == 0, st.stdout
    # relabel needs --overwrite; bad label values are refused
    assert "already has a value" in cli("node", "label", "node-c", "rack=r1", ok=False).stderr
    assert "invalid label value" in cli("node", "label", "node-c", "rack=r 1", ok=False).stderr
    cli("node", "label", "node-c", "rack=r1", "--overwrite")
    cli("node", "label", "node-a", "rack-")
    assert [r["name"] for r in json.loads(cli("node", "list", "-o", "json").stdout)] == ["node-b", "node-c"]
    ipam.ds.close()


def test_concurrent_annotates_never_lose_a_key(cli, ipam, etcd_server, etcd_prefix):
    """Eight processes each add their own key to one namespace at once (CAS + retry)."""
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: cli("namespace", "annotate", "shared", f"k{i}=v{i}"), range(8)))
    got = json.loads(cli("namespace", "get", "shared", "-o", "json").stdout)["annotations"]
    assert got == {f"k{i}": f"v{i}" for i in range(8)}


def test_corrupt_record_is_named_not_overwritten(cli, ipam):
    from cni_ipam.datastore import Put
    key = ipam.keys.namespace("ns")
    ipam.ds.commit([], [Put(key, b"{nope")])
    for args in (("namespace", "get", "ns"), ("namespace", "annotate", "ns", "a=b")):
        assert key in cli(*args, ok=False).stderr
    assert ipam.ds.get(key).value == b"{nope"

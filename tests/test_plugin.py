"""The plugin exec'd as a runtime does it (env + stdin, subprocess) against real etcd."""
import ipaddress
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import exec_plugin, netconf
from tests.support.etcd import free_port

ALL_VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.fixture
def store(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint)
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("pool-a", "10.200.0.0/24", 29))
    yield ipam
    ds.close()


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path):
    def make(**kw):
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, **kw)
    return make


def held(store):
    return {str(a.ip): h.id for h in store.handles() for a in h.addresses}


def test_version_does_not_need_etcd():
    r = exec_plugin("VERSION", None, raw_stdin=b'{"cniVersion":"1.1.0"}', container=None, ifname=None,
                    netns=None)
    assert r.rc == 0
    assert r.out == {"cniVersion": "1.1.0", "supportedVersions": ALL_VERSIONS}


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_result_format_for_every_version(store, conf, version):
    c = conf(version=version, routes=[{"dst": "0.0.0.0/0"}])
    r = exec_plugin("ADD", c, container=f"ctr-{version.replace('.', '')}")
    assert r.rc == 0, r.stdout + r.stderr
    out = r.out
    assert out["cniVersion"] == version
    assert "interfaces" not in out
    if version in ("0.1.0", "0.2.0"):
        ip4 = out["ip4"]
        addr = ipaddress.ip_interface(ip4["ip"])
        assert ip4["gateway"] == str(addr.network.network_address + 1)
        assert ip4["routes"] == [{"dst": "0.0.0.0/0"}]
        assert "ips" not in out
    else:
        (ip,) = out["ips"]
        addr = ipaddress.ip_interface(ip["address"])
        assert ("version" in ip) == version.startswith("0.")
        if "version" in ip:
            assert ip["version"] == "4"
        assert "interface" not in ip
        assert ip["gateway"] == str(addr.network.network_address + 1)
        assert out["routes"] == [{"dst": "0.0.0.0/0"}]
    assert addr.network.prefixlen == 29 and addr.ip in ipaddress.ip_network("10.200.0.0/24")
    assert held(store)[str(addr.ip)] == f"testnet/ctr-{version.replace('.', '')}/eth0"


def test_add_idempotent_del_idempotent(store, conf):
    c = conf()
    r1 = exec_plugin("ADD", c)
    r2 = exec_plugin("ADD", c)
    assert r1.rc == r2.rc == 0 and r1.out == r2.out
    assert len(held(store)) == 1
    for netns in ("/var/run/netns/x", "", None):   # containerd's second DEL has no netns
        r = exec_plugin("DEL", c, netns=netns)
        assert r.rc == 0 and r.stdout == "", r.stdout + r.stderr
    assert held(store) == {}
    assert exec_plugin("DEL", c, container="never-added").rc == 0


def test_check(store, conf):
    c = conf(version="1.0.0")
    add = exec_plugin("ADD", c)
    good = dict(c, prevResult=add.out)
    assert exec_plugin("CHECK", good).rc == 0
    bad = dict(c, prevResult={"cniVersion": "1.0.0", "ips": [{"address": "10.200.0.250/29"}]})
    r = exec_plugin("CHECK", bad)
    assert r.rc != 0 and r.out["code"] == 114 and "10.200.0.250" in r.out["details"]   # CHECK mismatch
    r = exec_plugin("CHECK", good, container="other")
    assert r.rc != 0 and r.out["code"] == 3
    old = dict(conf(version="0.3.1"), prevResult=add.out)
    r = exec_plugin("CHECK", old)
    assert r.rc != 0 and r.out["code"] == 1


def test_gc_releases_all_but_valid_attachments(store, conf):
    c = conf(version="1.1.0")
    for cid in ("keep1", "drop1", "drop2"):
        assert exec_plugin("ADD", c, container=cid).rc == 0
    other_node = conf(version="1.1.0", node="node-b")
    assert exec_plugin("ADD", other_node, container="elsewhere").rc == 0
    gc = dict(c, **{"cni.dev/valid-attachments": [{"containerID": "keep1", "ifname": "eth0"}]})
    r = exec_plugin("GC", gc, container=None, ifname=None, netns=None)
    assert r.rc == 0, r.stdout
    assert set(held(store).values()) == {"testnet/keep1/eth0", "testnet/elsewhere/eth0"}
    # the older key is accepted too
    gc = dict(c, **{"cni.dev/attachments": []})
    assert exec_plugin("GC", gc, container=None, ifname=None, netns=None).rc == 0
    assert set(held(store).values()) == {"testnet/elsewhere/eth0"}


def test_status(store, conf, etcd_prefix):
    assert exec_plugin("STATUS", conf(version="1.1.0"), container=None, ifname=None, netns=None).rc == 0
    r = exec_plugin("STATUS", conf(version="1.1.0", ipv4_pools=["nope"]), container=None, ifname=None, netns=None)
    assert r.rc != 0 and r.out["code"] == 50 and "nope" in r.out["msg"]
    # fill the pool: STATUS turns 50 with a message that says so
    store.create_pool(make_pool("tiny", "10.201.0.0/29", 29))
    c = conf(version="1.1.0", ipv4_pools=["tiny"])
    for i in range(5):
        assert exec_plugin("ADD", c, container=f"t{i}").rc == 0
    r = exec_plugin("STATUS", c, container=None, ifname=None, netns=None)
    assert r.rc != 0 and r.out["code"] == 50 and "full" in r.out["msg"]
    assert exec_plugin("STATUS", conf(version="1.0.0"), container=None, ifname=None, netns=None).out["code"] == 1


def test_etcd_down_is_code_11_and_status_50(conf, tmp_path):
    c = conf(version="1.1.0", etcd_endpoints=f"http://127.0.0.1:{free_port()}", timeout_seconds=1)
    r = exec_plugin("ADD", c)
    assert r.rc != 0 and r.out["code"] == 11 and "127.0.0.1" in r.out["msg"]
    r = exec_plugin("DEL", c)
    assert r.rc != 0 and r.out["code"] == 11
    r = exec_plugin("STATUS", c, container=None, ifname=None, netns=None)
    assert r.rc != 0 and r.out["code"] == 50


@pytest.mark.parametrize("case", ["bad-containerid", "long-ifname", "no-ifname", "no-command-value"])
def test_bad_env_is_code_4(store, conf, case):
    kw = {"bad-containerid": {"container": "../x"}, "long-ifname": {"ifname": "x" * 16},
          "no-ifname": {"ifname": None}, "no-command-value": {}}[case]
    cmd = "BOGUS" if case == "no-command-value" else "ADD"
    r = exec_plugin(cmd, conf(), **kw)
    assert r.rc != 0 and r.out["code"] == 4, r.stdout
    assert held(store) == {}


def test_bad_stdin_config_and_version(store, conf):
    r = exec_plugin("ADD", None, raw_stdin=b"{not json")
    assert r.rc != 0 and r.out["code"] == 6
    r = exec_plugin("ADD", conf(mode="sideways"))
    assert r.rc != 0 and r.out["code"] == 7 and "mode" in r.out["msg"]
    r = exec_plugin("ADD", conf(assign_ipv4="maybe"))
    assert r.rc != 0 and r.out["code"] == 7
    r = exec_plugin("ADD", conf(version="9.9.9"))
    assert r.rc != 0 and r.out["code"] == 1
    r = exec_plugin("ADD", conf(), args="FOO=bar")
    assert r.rc != 0 and r.out["code"] == 4 and "FOO" in r.out["msg"] + r.out["details"], r.stdout   # CNI_ARGS
    assert held(store) == {}
    r = exec_plugin("ADD", conf(), args="FOO=bar;IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1;K8S_POD_UID=u-1")
    assert r.rc == 0
    (h,) = store.handles()
    assert (h.namespace, h.pod, h.pod_uid, h.node) == ("ns1", "p1", "u-1", "node-a")


def test_requested_ips_precedence_and_failure(store, conf):
    c = conf(version="1.0.0")
    # args.cni.ips wins over CNI_ARGS IP=
    c2 = dict(c, args={"cni": {"ips": ["10.200.0.50"]}})
    r = exec_plugin("ADD", c2, args="IP=10.200.0.60")
    assert r.rc == 0 and r.out["ips"][0]["address"] == "10.200.0.50/29"
    r = exec_plugin("ADD", c, container="c2", args="IP=10.200.0.60")
    assert r.rc == 0 and r.out["ips"][0]["address"] == "10.200.0.60/29"
    c3 = dict(c, runtimeConfig={"ips": ["10.200.0.70/29"]})
    r = exec_plugin("ADD", c3, container="c3")
    assert r.rc == 0 and r.out["ips"][0]["address"] == "10.200.0.70/29"
    before = held(store)
    r = exec_plugin("ADD", dict(c, args={"cni": {"ips": ["10.200.0.50"]}}), container="c4")
    assert r.rc != 0 and "10.200.0.50" in r.out["msg"]
    r = exec_plugin("ADD", dict(c, args={"cni": {"ips": ["192.0.2.1"]}}), container="c5")
    assert r.rc != 0 and "not in any pool" in r.out["msg"]
    assert held(store) == before


def test_routed_mode_result(store, conf):
    c = conf(mode="routed", gateway="169.254.1.1")
    r = exec_plugin("ADD", c)
    assert r.rc == 0
    (ip,) = r.out["ips"]
    assert ip["address"].endswith("/32") and ip["gateway"] == "169.254.1.1"
    # routed_prefix "block": the block's prefix length (what Debian's ptp <= 1.1 needs)
    r = exec_plugin("ADD", conf(mode="routed", gateway="169.254.1.1", routed_prefix="block"), container="c2")
    assert r.rc == 0 and r.out["ips"][0]["address"].endswith("/29")
    assert r.out["ips"][0]["gateway"] == "169.254.1.1"


def test_bridge_mode_refuses_tiny_blocks(store, conf):
    store.create_pool(make_pool("slash31", "10.202.0.0/24", 31))
    r = exec_plugin("ADD", conf(ipv4_pools=["slash31"]))
    assert r.rc != 0 and r.out["code"] == 7 and "bridge mode" in r.out["msg"]


def test_stdout_is_protocol_only_and_log_file_is_private(store, conf, tmp_path):
    c = conf()
    r = exec_plugin("ADD", c)
    json.loads(r.stdout)  # exactly one JSON document
    log = tmp_path / "cni-ipam.log"
    assert log.exists() and (os.stat(log).st_mode & 0o777) == 0o600
    assert "ADD testnet/c1/eth0" in log.read_text()


def test_two_nodes_thirty_parallel_adds_each(store, conf, etcd_prefix):
    """Two nodes x 30 concurrent ADD execs against one small pool: no duplicates."""
    store.create_pool(make_pool("small", "10.210.0.0/25", 29))   # 16 blocks x 5 = 80 addresses
    jobs = [(node, i) for node in ("node-a", "node-b") for i in range(30)]

    def one(job):
        node, i = job
        return job, exec_plugin("ADD", conf(node=node, ipv4_pools=["small"]), container=f"{node}-{i}")

    with ThreadPoolExecutor(max_workers=60) as ex:
        results = list(ex.map(one, jobs))
    for (node, i), r in results:
        assert r.rc == 0, (node, i, r.stdout, r.stderr)
    ips = [r.out["ips"][0]["address"].split("/")[0] for _, r in results]
    assert len(set(ips)) == 60
    hs = {h.id: h for h in store.handles()}
    assert len(hs) == 60
    for (node, i), r in results:
        h = hs[f"testnet/{node}-{i}/eth0"]
        assert str(h.addresses[0].ip) == r.out["ips"][0]["address"].split("/")[0]
        assert store.verify_handle(h) == []
        blk = Block.from_json(store.ds.get(store.keys.block(h.addresses[0].block)).value)
        assert blk.node == node

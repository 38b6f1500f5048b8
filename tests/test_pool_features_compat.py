"""Data written with the pool features stays readable by the previous release (0.1, from git
history): an older node in a rolling upgrade reads blocks carrying release times, pools with
assignmentMode/namespaceSelector, the config with ipCooldownSeconds, and its `check` stays
clean; this version reads what the old one wrote back."""
import ipaddress
import json

from cni_ipam.ipam.model import IPAMConfig
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import ROOT, exec_plugin
from tests.test_correctness import cli, conf, holders, old_code, old_plugin, store  # noqa: F401 (fixtures)


def add_ip(r):
    assert r.rc == 0, r.stdout + r.stderr
    return r.out["ips"][0]["address"].split("/")[0]


def test_old_node_shares_a_store_with_pool_features(store, conf, old_code, etcd_server, etcd_prefix):
    store.create_pool(make_pool("manual", "10.211.0.0/24", 29, assignment_mode="Manual",
                                namespace_selector="team == 'x'"))
    store.set_config(IPAMConfig(ip_cooldown_seconds=600))
    ca, cb = conf(name="net", node="node-a"), conf(name="net", node="node-b")
    # the new node allocates and releases: its block carries release times
    new = [add_ip(exec_plugin("ADD", cb, container=f"b{i}")) for i in range(4)]
    assert exec_plugin("DEL", cb, container="b0").rc == 0
    blocks = [kv.value for kv in store.ds.get_prefix(store.keys.blocks)]
    assert any(b"releasedAt" in v for v in blocks)
    # the old node works on the same store; its check reads every record and is clean
    old = [add_ip(old_plugin(old_code, "ADD", ca, container=f"a{i}")) for i in range(3)]
    assert not set(old) & set(new)
    r = cli(old_code, etcd_server, etcd_prefix, "check", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout + r.stderr
    # b0's address is cooling: the new node does not hand it out again
    again = add_ip(exec_plugin("ADD", cb, container="b9"))
    assert again != new[0]
    assert old_plugin(old_code, "DEL", ca, container="a1").rc == 0
    r = cli(ROOT, etcd_server, etcd_prefix, "check", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout + r.stderr
    held = holders(store)
    assert len(held) == (4 - 1 + 1) + (3 - 1)
    # the new node never used the Manual pool; the old one does not know the field (README:
    # upgrade every node before relying on assignmentMode / namespaceSelector)
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.210.0.0/24")
               for ip, hid in held.items() if "/b" in hid)


def test_old_node_never_takes_an_address_kept_for_a_statefulset_pod(store, conf, old_code, etcd_server, etcd_prefix):
    """A kept handle (keepStatefulSetIPs, written by this version) in a rolling upgrade: the
    previous release on the same node fills the block around the kept address without taking
    it, its `check` reads the kept handle as a valid record, and this version gets it back."""
    from cni_ipam.ipam.engine import AssignRequest
    from cni_ipam.ipam.keys import handle_id
    store.set_config(IPAMConfig(keep_statefulset_ips=True))
    hid = handle_id("net", "sts0", "eth0")
    req = AssignRequest(handle_id=hid, node="node-a", network="net", container_id="sts0", ifname="eth0",
                        namespace="db", pod="web-0", keep_as="sts/db/web/0")
    kept_ip = str(store.assign(req).handle.addresses[0].ip)
    assert store.release(hid, keep=True) is not None
    assert holders(store)[kept_ip] == "sts/db/web/0"
    ca = conf(name="net", node="node-a")
    old = [add_ip(old_plugin(old_code, "ADD", ca, container=f"a{i}")) for i in range(8)]   # > one /29 block
    assert kept_ip not in old
    r = cli(old_code, etcd_server, etcd_prefix, "check", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout + r.stderr
    back = store.assign(req.replace(handle_id=handle_id("net", "sts1", "eth0"), container_id="sts1"))
    assert str(back.handle.addresses[0].ip) == kept_ip
    assert holders(store)[kept_ip] == handle_id("net", "sts1", "eth0")

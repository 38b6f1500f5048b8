"""`cni-ipam pool list|get|enable|disable|delete` against the real etcd (CLI as a subprocess;
allocations through the real plugin or the engine in-process)."""
from __future__ import annotations

import ipaddress

import pytest

from cni_ipam.datastore import Delete, Put
from cni_ipam.ipam.block import ROUTED, Block
from cni_ipam.ipam.engine import AssignRequest
from cni_ipam.ipam.errors import InvalidRequest
from cni_ipam.ipam.keys import block_from_id
from tests.plugin_helpers import exec_plugin, netconf
from tests.test_cli_common import SEED_POOLS, cli, dump, ipam  # noqa: F401 (fixtures)


def req(hid, node="node-a", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def keys_under(ipam, prefix):
    return [kv.key for kv in ipam.ds.get_prefix(prefix, keys_only=True)]


def test_list_and_get(cli):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    r = cli("pool", "list")
    assert r.rc == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "CIDR"]
    assert lines[1].startswith("external-pool") and "172.16.0.0/26" in lines[1] and "false" in lines[1]
    assert all(len(ln) <= 80 for ln in lines)
    wide = cli("pool", "list", "-o", "wide").stdout.splitlines()
    assert "IPIP" in wide[0] and "Always" in wide[1] and "NAT OUTGOING" in wide[0]
    # one spelling of booleans in a table: true/false (as in the manifests), never yes/no
    assert " yes " not in " ".join(wide) and " no " not in " ".join(wide)
    assert wide[1].split()[3] == "false" and "true" in wide[1].split()
    items = cli("pool", "ls", "-o", "json").json()["items"]
    assert [i["metadata"]["name"] for i in items] == ["external-pool", "internal-pool"]
    assert items[0]["spec"] == {"cidr": "172.16.0.0/26", "blockSize": 29, "disabled": False,
                                "nodeSelector": "all()", "allowedUses": ["Workload", "Tunnel"],
                                "ipipMode": "Always", "natOutgoing": True}
    g = cli("pool", "get", "internal-pool")
    assert g.rc == 0 and "192.168.0.0/16" in g.stdout and "no effect on allocation" in g.stdout
    r = cli("pool", "get", "nope")
    assert r.rc == 1 and 'pool "nope" does not exist' in r.error_line
    for verb in ("enable", "disable", "delete"):
        r = cli("pool", verb, "nope")
        assert r.rc == 1 and 'pool "nope" does not exist' in r.error_line


def test_disable_stops_new_allocations_through_the_plugin(cli, ipam, etcd_server, etcd_prefix, tmp_path):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS.split("---")[0]).rc == 0   # external-pool only
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    r1 = exec_plugin("ADD", conf, container="before")
    assert r1.rc == 0, r1.stdout + r1.stderr
    ip1 = r1.out["ips"][0]["address"].split("/")[0]
    assert ipaddress.ip_address(ip1) in ipaddress.ip_network("172.16.0.0/26")

    r = cli("pool", "disable", "external-pool")
    assert r.rc == 0 and r.stdout.strip() == 'pool "external-pool" disabled'
    assert cli("pool", "disable", "external-pool").stdout.strip() == 'pool "external-pool" was already disabled'
    r2 = exec_plugin("ADD", conf, container="after")
    assert r2.rc != 0 and r2.out["code"] == 7, r2.stdout
    assert "no enabled IPv4 pool" in r2.out["msg"]
    # existing addresses stay
    assert ipam.get_handle("testnet/before/eth0").addresses[0].ip == ipaddress.ip_address(ip1)
    assert cli("show", "--ip", ip1, "-o", "json").json()["allocated"] is True
    assert cli("pool", "get", "external-pool", "-o", "json").json()["spec"]["disabled"] is True
    # a requested address in the disabled pool is refused too
    r3 = exec_plugin("ADD", conf, container="asks", args="IP=172.16.0.20")
    assert r3.rc != 0 and "disabled" in r3.out["msg"]

    assert cli("pool", "enable", "external-pool").rc == 0
    r4 = exec_plugin("ADD", conf, container="after")
    assert r4.rc == 0, r4.stdout
    assert exec_plugin("DEL", conf, container="before").rc == 0
    assert exec_plugin("DEL", conf, container="after").rc == 0


def test_disable_moves_new_allocations_to_the_other_pool(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    assert ipam.assign(req("h1")).handle.addresses[0].pool == "external-pool"
    assert cli("pool", "disable", "external-pool").rc == 0
    assert ipam.assign(req("h2")).handle.addresses[0].pool == "internal-pool"
    assert cli("pool", "disable", "internal-pool").rc == 0
    with pytest.raises(InvalidRequest):
        ipam.assign(req("h3"))


def test_delete_refuses_while_allocated_then_deletes_cleanly(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    a = ipam.assign(req("h1")).handle.addresses[0]
    assert a.pool == "external-pool"
    before = dump(ipam)
    r = cli("pool", "delete", "external-pool")
    assert r.rc == 1
    assert 'pool "external-pool" has addresses allocated' in r.error_line and str(a.ip) in r.error_line
    assert "--force" in r.error_line
    assert dump(ipam) == before          # refused: not even disabled
    assert ipam.release("h1") is not None
    r = cli("pool", "delete", "external-pool")
    assert r.rc == 0, r.stderr
    assert 'pool "external-pool" deleted' in r.stdout and "1 block(s)" in r.stdout
    assert [p.name for p in ipam.pools()] == ["internal-pool"]
    assert keys_under(ipam, ipam.keys.blocks) == []
    assert keys_under(ipam, ipam.keys.affinity) == []
    assert cli("check").rc == 0


def test_delete_force_releases_and_leaves_no_orphans(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    assert cli("apply", "-f", "-", stdin="apiVersion: cni-ipam/v1\nkind: IPPool\nmetadata: {name: routed}\n"
                                        "spec: {cidr: 10.90.0.0/29, blockSize: 30}\n").rc == 0
    ext = []
    for node in ("node-a", "node-b", "node-c"):
        for i in range(3):
            ext.append(ipam.assign(req(f"{node}-{i}", node=node, v4_pools=["external-pool"])).handle)
    other = ipam.assign(req("keep", node="node-a", v4_pools=["internal-pool"])).handle
    # routed pool of two blocks, both claimed: node-b has to borrow
    ipam.assign(req("r-a", node="node-a", mode=ROUTED, v4_pools=["routed"]))
    ipam.assign(req("r-c", node="node-c", mode=ROUTED, v4_pools=["routed"]))
    borrowed = ipam.assign(req("r-b", node="node-b", mode=ROUTED, v4_pools=["routed"])).handle.addresses[0]
    assert ipam.get_handle("r-b").node == "node-b"
    assert cli("show", "--borrowed", "-o", "json").json()["borrowed"][0]["ip"] == str(borrowed.ip)
    # a stray affinity for a block of the pool that does not exist
    ipam.ds.commit([], [Put(ipam.keys.affinity_key("node-z", ipaddress.ip_network("172.16.0.56/29")),
                            b'{"pool":"external-pool","mode":"bridge"}')])
    r = cli("pool", "delete", "external-pool", "--force", "-o", "json", "--yes")
    assert r.rc == 0, r.stderr
    rep = r.json()
    assert sorted(rep["releasedHandles"]) == sorted(h.id for h in ext)
    assert rep["blocksDeleted"] == 3 and rep["affinitiesDeleted"] == 1
    assert [p.name for p in ipam.pools()] == ["internal-pool", "routed"]
    for h in ext:
        assert ipam.get_handle(h.id) is None
    net = ipaddress.ip_network("172.16.0.0/26")
    for key in keys_under(ipam, ipam.keys.blocks):
        assert not ipam.keys.block_of_key(key).subnet_of(net), key
    for key in keys_under(ipam, ipam.keys.affinity):
        bid = key[len(ipam.keys.affinity):].split("/", 1)[1]
        assert not block_from_id(bid).subnet_of(net), key
    # the other pools are untouched and the store is consistent
    assert ipam.get_handle("keep").addresses == other.addresses
    assert cli("check").rc == 0
    # a routed pool with a borrowed address deletes too
    r = cli("pool", "delete", "routed", "--force", "--yes")
    assert r.rc == 0, r.stderr
    assert cli("check").rc == 0


def test_delete_force_with_orphan_allocations(cli, ipam):
    """A block allocation whose handle record is gone (corruption) does not block --force."""
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    ipam.assign(req("h1"))
    ipam.assign(req("h2"))
    ipam.ds.commit([], [Delete(ipam.keys.handle("h1"))])
    r = cli("pool", "delete", "external-pool")
    assert r.rc == 1 and "--force" in r.error_line
    r = cli("pool", "delete", "external-pool", "--force", "--yes")
    assert r.rc == 0, r.stderr
    assert keys_under(ipam, ipam.keys.blocks) == [] and keys_under(ipam, ipam.keys.handles) == []
    assert cli("check").rc == 0


def test_deleted_pool_cannot_get_new_blocks_from_an_in_flight_add(cli, ipam):
    """An ADD that read the pool before it was disabled must not commit into it: ADDs compare
    the pool's revision, so the ADD re-plans and finds no enabled pool."""
    assert cli("apply", "-f", "-", stdin=SEED_POOLS.split("---")[0]).rc == 0
    ds = ipam.ds
    real_commit = ds.commit
    state = {"n": 0}

    def commit(compares, ops):
        if state["n"] == 0:      # the ADD's first commit: disable the pool right before it
            state["n"] += 1
            assert cli("pool", "disable", "external-pool").rc == 0
        return real_commit(compares, ops)
    ds.commit = commit
    try:
        with pytest.raises(InvalidRequest, match="no enabled IPv4 pool"):
            ipam.assign(req("late"))
    finally:
        ds.commit = real_commit
    assert keys_under(ipam, ipam.keys.blocks) == []


def test_undecodable_pool_record(cli, ipam):
    ipam.ds.commit([], [Put(ipam.keys.pool("broken"), b"{not json")])
    r = cli("pool", "list")
    assert r.rc == 0 and "undecodable" in r.stderr
    r = cli("pool", "delete", "broken")
    assert r.rc == 1 and "undecodable" in r.error_line and "--force" in r.error_line
    r = cli("apply", "-f", "-", stdin="apiVersion: cni-ipam/v1\nkind: IPPool\nmetadata: {name: broken}\n"
                                     "spec: {cidr: 10.1.0.0/24}\n")
    assert r.rc == 1 and "undecodable" in r.error_line and "not overwritten" in r.error_line
    assert cli("pool", "delete", "broken", "--force", "--yes").rc == 0
    assert keys_under(ipam, ipam.keys.pools) == []


def test_block_rows_keep_their_format(ipam, cli):
    """`pool delete` reads blocks written by the engine (guard against format drift)."""
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    h = ipam.assign(req("x")).handle
    kv = ipam.ds.get(ipam.keys.block(h.addresses[0].block))
    assert Block.from_json(kv.value).holder(h.addresses[0].ip) == "x"

"""`cni-ipam pool split NAME --into N` against the real etcd, with addresses allocated through
the real plugin: no address moves, every block belongs to the part containing it, the plugin
goes on allocating and releasing across the split."""
from __future__ import annotations

import ipaddress

import pytest

from cni_ipam.ipam.block import Block
from cni_ipam.ipam.errors import InvalidRequest
from cni_ipam.ipam.pool import make_pool
from cni_ipam.ipam.split import sub_pools
from tests.plugin_helpers import exec_plugin, netconf
from tests.test_cli_common import cli, ipam  # noqa: F401 (fixtures)

N = ipaddress.ip_network


def test_sub_pools_pure():
    p = make_pool("big", "10.0.0.0/16", 26, node_selector="zone == 'a'", assignment_mode="Manual")
    parts = sub_pools(p, 4)
    assert [(q.name, str(q.cidr)) for q in parts] == [("big-0", "10.0.0.0/18"), ("big-1", "10.0.64.0/18"),
                                                       ("big-2", "10.0.128.0/18"), ("big-3", "10.0.192.0/18")]
    assert all(q.block_size == 26 and q.node_selector == "zone == 'a'" and q.assignment_mode == "Manual"
               for q in parts)
    assert len(sub_pools(make_pool("x", "10.0.0.0/24", 26), 4)) == 4
    with pytest.raises(InvalidRequest, match="power of two"):
        sub_pools(p, 3)
    with pytest.raises(InvalidRequest, match="smaller than one block; at most 4"):
        sub_pools(make_pool("x", "10.0.0.0/24", 26), 8)


def blocks_by_pool(ipam):
    out = {}
    for kv in ipam.ds.get_prefix(ipam.keys.blocks):
        b = Block.from_json(kv.value)
        out.setdefault(b.pool, []).append(b)
    return out


@pytest.mark.parametrize("n_containers", [6, 70])   # 70 blocks do not fit one txn: the safe sequence
def test_split_moves_no_allocation(cli, ipam, etcd_server, etcd_prefix, tmp_path, n_containers):
    ipam.create_pool(make_pool("pool", "10.90.0.0/22", 30))       # 256 blocks of 2 bridge addresses
    confs = [netconf(etcd_server.endpoint, etcd_prefix, tmp_path, node=f"node-{i % 7}") for i in range(n_containers)]
    before = {}
    for i, conf in enumerate(confs):
        r = exec_plugin("ADD", conf, container=f"c{i}")
        assert r.rc == 0, r.stdout + r.stderr
        before[f"c{i}"] = r.out["ips"][0]["address"]
    # guard: the txn size decides the path
    n_blocks = sum(len(v) for v in blocks_by_pool(ipam).values())
    assert (n_blocks * 2 > 120) == (n_containers == 70)

    dry = cli("pool", "split", "pool", "--into", "4", "--dry-run", "-o", "json")
    assert dry.rc == 0, dry.stderr
    assert dry.json()["blocks"] == n_blocks and [p["cidr"] for p in dry.json()["into"]] == [
        "10.90.0.0/24", "10.90.1.0/24", "10.90.2.0/24", "10.90.3.0/24"]
    assert [p.name for p in ipam.pools()] == ["pool"]

    r = cli("pool", "split", "pool", "--into", "4")
    assert r.rc == 0, r.stderr
    assert 'pool "pool" (10.90.0.0/22) split into:' in r.stdout
    assert ("one transaction" in r.stdout) == (n_containers == 6)
    pools = {p.name: p for p in ipam.pools()}
    assert sorted(pools) == ["pool-0", "pool-1", "pool-2", "pool-3"]
    assert not any(p.disabled for p in pools.values())
    # every block belongs to the part that contains it; the affinities say the same
    by_pool = blocks_by_pool(ipam)
    assert sum(len(v) for v in by_pool.values()) == n_blocks and "pool" not in by_pool
    for name, blocks in by_pool.items():
        for b in blocks:
            assert b.cidr.subnet_of(pools[name].cidr)
            assert name.encode() in ipam.ds.get(ipam.keys.affinity_key(b.node, b.cidr)).value
    # no address moved: a repeated ADD returns the same address; CHECK-free view: the handles
    for i, conf in enumerate(confs[:10]):
        r = exec_plugin("ADD", conf, container=f"c{i}")
        assert r.rc == 0 and r.out["ips"][0]["address"] == before[f"c{i}"]
    # `check` finds nothing wrong
    chk = cli("check", "-o", "json")
    assert chk.rc == 0, chk.stdout + chk.stderr
    # the plugin goes on: release and allocate in the parts
    for i, conf in enumerate(confs[:3]):
        assert exec_plugin("DEL", conf, container=f"c{i}").rc == 0
    r = exec_plugin("ADD", confs[0], container="after")
    assert r.rc == 0 and ipaddress.ip_interface(r.out["ips"][0]["address"]).ip in N("10.90.0.0/22")


def test_split_refusals(cli, ipam):
    ipam.create_pool(make_pool("p", "10.91.0.0/24", 26))
    ipam.create_pool(make_pool("p-1", "10.92.0.0/24", 26))
    r = cli("pool", "split", "p", "--into", "3")
    assert r.rc != 0 and "power of two" in r.stderr and "Traceback" not in r.stderr
    r = cli("pool", "split", "p", "--into", "8")
    assert r.rc != 0 and "at most 4" in r.stderr
    r = cli("pool", "split", "p", "--into", "2")
    assert r.rc != 0 and "p-1 already exist" in r.stderr
    r = cli("pool", "split", "nope", "--into", "2")
    assert r.rc != 0 and 'pool "nope" does not exist' in r.stderr
    assert sorted(p.name for p in ipam.pools()) == ["p", "p-1"]


MIGRATION_NEW_POOL = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: new-pool
spec:
  cidr: 10.99.0.0/24
  blockSize: 29
"""


def test_migration_procedure_from_the_readme(cli, ipam, etcd_server, etcd_prefix, tmp_path):
    """README "Pool features" -> "Migrate to another pool", step by step."""
    ipam.create_pool(make_pool("old-pool", "10.98.0.0/24", 29))
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    for i in range(3):
        assert ip_in(exec_plugin("ADD", conf, container=f"pod{i}"), "10.98.0.0/24")
    # 1. add the new pool
    assert cli("apply", "-f", "-", stdin=MIGRATION_NEW_POOL).rc == 0
    # 2. disable the old pool: new pods get addresses from the new one only
    assert cli("pool", "disable", "old-pool").rc == 0
    assert ip_in(exec_plugin("ADD", conf, container="fresh"), "10.99.0.0/24")
    # running pods keep their addresses meanwhile (a repeated ADD returns the same)
    assert ip_in(exec_plugin("ADD", conf, container="pod0"), "10.98.0.0/24")
    # the old pool refuses to be deleted while addresses are in use
    r = cli("pool", "delete", "old-pool")
    assert r.rc != 0
    # 3. recreate the pods (DEL + ADD with a new container, as a rollout does)
    for i in range(3):
        assert exec_plugin("DEL", conf, container=f"pod{i}").rc == 0
        assert ip_in(exec_plugin("ADD", conf, container=f"pod{i}-new"), "10.99.0.0/24")
    # 4. the old pool is empty: show says so, delete it
    show = {p["name"]: p for p in cli("show", "-o", "json").json()["pools"]}
    assert show["old-pool"]["inUse"] == 0
    r = cli("pool", "delete", "old-pool")
    assert r.rc == 0, r.stderr
    assert [p.name for p in ipam.pools()] == ["new-pool"]
    assert cli("check").rc == 0


def ip_in(r, cidr):
    assert r.rc == 0, r.stdout + r.stderr
    return ipaddress.ip_interface(r.out["ips"][0]["address"]).ip in N(cidr)

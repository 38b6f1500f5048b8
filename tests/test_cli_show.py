"""`cni-ipam show` (pools, --blocks, --node, --ip, --borrowed) against the real etcd."""
from __future__ import annotations

import ipaddress

from cni_ipam.datastore import Put
from cni_ipam.datastore.base import MAX_TXN_OPS
from cni_ipam.ipam.block import ROUTED, Block
from cni_ipam.ipam.engine import AssignRequest
from tests.test_cli_common import SEED_POOLS, cli, ipam  # noqa: F401 (fixtures)


def req(hid, node="node-a", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def test_show_counts_blocks_and_nodes(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    # node-a: 5 addresses fill its first /29 (5 usable in bridge mode), 1 more claims a second block
    for i in range(6):
        ipam.assign(req(f"a{i}", v4_pools=["external-pool"]))
    for i in range(2):
        ipam.assign(req(f"b{i}", node="node-b", v4_pools=["external-pool"]))
    ipam.assign(req("c0", node="node-c", v4_pools=["internal-pool"]))
    d = cli("show", "--blocks", "-o", "json").json()
    ext = next(p for p in d["pools"] if p["name"] == "external-pool")
    assert ext["addresses"] == 64 and ext["inUse"] == 8 and ext["blocksClaimed"] == 3
    # capacity: 5 per bridge-mode /29, the 5 unclaimed blocks counted like the claimed ones (bridge)
    assert ext["capacity"] == 40 and ext["reserved"] == 24 and ext["free"] == 40 - 8
    assert ext["unclaimedBlocks"] == 5 and ext["unclaimedBlocksCountedAs"] == {"mode": "bridge",
                                                                               "capacityPerBlock": 5}
    assert ext["utilization"] == 20.0
    intp = next(p for p in d["pools"] if p["name"] == "internal-pool")
    assert intp["inUse"] == 1 and intp["blocksClaimed"] == 1 and intp["blocksTotal"] == 8192
    rows = {b["cidr"]: b for b in d["blocks"]}
    assert len(rows) == 4
    by_node = {}
    for b in d["blocks"]:
        by_node.setdefault(b["node"], []).append(b)
    assert sorted(b["inUse"] for b in by_node["node-a"]) == [1, 5]
    assert all(b["capacity"] == 5 and b["mode"] == "bridge" for b in d["blocks"])
    # --node: only that node's blocks, in the pool rows too
    n = cli("show", "--blocks", "--node", "node-b", "-o", "json").json()
    ext_b = next(p for p in n["pools"] if p["name"] == "external-pool")
    assert (ext_b["inUse"], ext_b["blocksClaimed"], ext_b["addresses"], ext_b["node"]) == (2, 1, 8, "node-b")
    assert [b["node"] for b in n["blocks"]] == ["node-b"]
    # the table: one row per pool with a bar, then one row per block
    t = cli("show", "--blocks").stdout
    print("\n$ cni-ipam show\n" + cli("show").stdout + "\n$ cni-ipam show --blocks\n" + t)   # seen with -s
    line = next(ln for ln in t.splitlines() if ln.startswith("external-pool"))
    assert "172.16.0.0/26" in line and " 40 " in line and " 8 " in line and "3/8" in line and "20.0%" in line
    assert "[#" in line
    assert "as a bridge-mode block: 5 of 8 addresses" in " ".join(t.split())
    assert sum(1 for ln in t.splitlines() if ln.startswith(("172.16.", "192.168."))) == 4
    assert any("node-a" in ln and "5/5" in ln for ln in t.splitlines())


def test_show_full_bridge_pool_reads_free_0_and_100_percent(cli, ipam):
    """A /26 of /29 blocks in bridge mode holds 40 pods: once the 41st ADD fails, FREE 0, 100 %."""
    from cni_ipam.ipam.errors import PoolExhausted
    import pytest
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    fresh = next(p for p in cli("show", "-o", "json").json()["pools"] if p["name"] == "external-pool")
    assert (fresh["capacity"], fresh["free"], fresh["inUse"], fresh["utilization"]) == (40, 40, 0, 0.0)
    internal = next(p for p in cli("show", "-o", "json").json()["pools"] if p["name"] == "internal-pool")
    assert internal["capacity"] == 8192 * 5
    for i in range(40):
        ipam.assign(req(f"p{i}", node=f"node-{i % 2}", v4_pools=["external-pool"]))
    with pytest.raises(PoolExhausted):
        ipam.assign(req("p40", node="node-0", v4_pools=["external-pool"]))
    d = next(p for p in cli("show", "-o", "json").json()["pools"] if p["name"] == "external-pool")
    assert (d["inUse"], d["free"], d["capacity"], d["utilization"]) == (40, 0, 40, 100.0)
    assert d["unclaimedBlocks"] == 0 and d["reserved"] == 24
    out = cli("show").stdout
    print("\n$ cni-ipam show   (external-pool full)\n" + out)
    line = next(ln for ln in out.splitlines() if ln.startswith("external-pool"))
    assert line.split()[2:6] == ["40", "40", "0", "8/8"] and "[#####] 100.0%" in line
    # the internal pool: one address of 40960 is <0.1%, and its bar shows nothing yet
    ipam.assign(req("x0", v4_pools=["internal-pool"]))
    line = next(ln for ln in cli("show").stdout.splitlines() if ln.startswith("internal-pool"))
    assert "[.....] <0.1%" in line
    assert all(len(ln) <= 80 for ln in cli("show").stdout.splitlines())
    wide = cli("show", "-o", "wide").stdout
    assert "RESERVED" in wide and "UNCLAIMED AS" in wide and "bridge (5/8)" in wide
    # pool get: blocks as size x count, how many are claimed
    assert "8 \u00d7 /29 (8 addresses each), 8 claimed" in cli("pool", "get", "external-pool").stdout


def test_show_node_without_blocks_names_the_nodes(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    ipam.assign(req("a0", node="node-a", v4_pools=["external-pool"]))
    ipam.assign(req("b0", node="node-b", v4_pools=["external-pool"]))
    r = cli("show", "--node", "node-x")
    assert r.rc == 0
    assert "node 'node-x' holds no blocks" in r.stdout and "node-a, node-b" in r.stdout
    r = cli("show", "--node", "node-aa")
    assert "did you mean 'node-a'?" in r.stdout
    j = cli("show", "--node", "node-x", "-o", "json").json()
    assert all(p["blocksClaimed"] == 0 and p["node"] == "node-x" for p in j["pools"])


def test_show_ip(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    h = ipam.assign(req("net.ctr1.eth0", pod="web-1", namespace="shop", v4_pools=["external-pool"])).handle
    ip = str(h.addresses[0].ip)
    d = cli("show", "--ip", ip, "-o", "json").json()
    assert d["allocated"] is True
    assert (d["handle"], d["pod"], d["namespace"], d["node"], d["pool"]) == \
        ("net.ctr1.eth0", "web-1", "shop", "node-a", "external-pool")
    assert d["created"] and d["block"] == str(h.addresses[0].block)
    t = cli("show", "--ip", ip).stdout
    assert t.startswith(f"{ip} is allocated") and "shop/web-1" in t and "node-a" in t
    gw = str(h.addresses[0].block.network_address + 1)
    d = cli("show", "--ip", gw, "-o", "json").json()
    assert d["allocated"] is False and d["reason"].startswith("reserved")
    free = str(h.addresses[0].ip + 1)
    assert cli("show", "--ip", free).stdout.strip().startswith(f"{free} is not allocated: free")
    assert "its block is not claimed" in cli("show", "--ip", "172.16.0.60").stdout
    assert "not in any pool" in cli("show", "--ip", "8.8.8.8").stdout
    assert "not an IP address" in cli("show", "--ip", "nope").error_line


def test_show_borrowed(cli, ipam):
    assert cli("apply", "-f", "-", stdin="apiVersion: cni-ipam/v1\nkind: IPPool\nmetadata: {name: tiny}\n"
                                        "spec: {cidr: 10.90.0.0/30, blockSize: 30}\n").rc == 0
    ipam.assign(req("own", node="node-a", mode=ROUTED))
    b = ipam.assign(req("guest", node="node-b", mode=ROUTED)).handle.addresses[0]
    d = cli("show", "--borrowed", "-o", "json").json()
    assert d == {"borrowed": [{"ip": str(b.ip), "block": "10.90.0.0/30", "pool": "tiny", "blockNode": "node-a",
                               "node": "node-b", "handle": "guest", "namespace": "", "pod": ""}]}
    assert cli("show", "--borrowed", "--node", "node-c", "-o", "json").json() == {"borrowed": []}
    t = cli("show", "--borrowed").stdout
    assert str(b.ip) in t and "node-a" in t and "node-b" in t
    assert cli("show", "--borrowed", "--ip", "10.90.0.1").rc == 1


def test_show_pages_through_many_blocks(cli, ipam):
    """1,300 blocks written straight into etcd: more than one page of every range read."""
    assert cli("apply", "-f", "-", stdin="apiVersion: cni-ipam/v1\nkind: IPPool\nmetadata: {name: big}\n"
                                        "spec: {cidr: 10.128.0.0/12, blockSize: 26}\n").rc == 0
    base = int(ipaddress.ip_address("10.128.0.0"))
    puts, in_use = [], 0
    for i in range(1300):
        b = Block.new(ipaddress.ip_network((base + 64 * i, 26)), "big", f"node-{i % 7}")
        for j in range(i % 4):
            b.allocate(f"h-{i}-{j}")
            in_use += 1
        puts.append(Put(ipam.keys.block(b.cidr), b.to_json()))
    for i in range(0, len(puts), MAX_TXN_OPS):
        assert ipam.ds.commit([], puts[i:i + MAX_TXN_OPS])
    d = cli("show", "--blocks", "-o", "json").json()
    (p,) = d["pools"]
    assert p["blocksClaimed"] == 1300 and p["inUse"] == in_use and p["addresses"] == 1 << 20
    assert len(d["blocks"]) == 1300
    assert [b["cidr"] for b in d["blocks"]] == sorted((b["cidr"] for b in d["blocks"]),
                                                      key=lambda c: ipaddress.ip_network(c))
    n = cli("show", "--node", "node-3", "-o", "json").json()["pools"][0]
    assert n["blocksClaimed"] == sum(1 for i in range(1300) if i % 7 == 3)

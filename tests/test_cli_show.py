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
    assert ext["reserved"] == 9 and ext["free"] == 64 - 8 - 9      # 3 per bridge-mode /29
    assert ext["utilization"] == 12.5
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
    assert "172.16.0.0/26" in line and " 64 " in line and " 8 " in line and "3/8" in line and "12.5%" in line
    assert "[#" in line
    assert sum(1 for ln in t.splitlines() if ln.startswith(("172.16.", "192.168."))) == 4
    assert any("node-a" in ln and "5/5" in ln for ln in t.splitlines())


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

"""`cni-ipam release` and `cni-ipam check` against the real etcd.  Corruption is written into
etcd directly; allocations go through the engine in-process (fast) and the CLI runs as a subprocess."""
from __future__ import annotations

import ipaddress
import json
import random
import threading
import time

import pytest

from cni_ipam.datastore import Delete, Put
from cni_ipam.ipam.block import ROUTED, Block
from cni_ipam.ipam.engine import AssignRequest
from cni_ipam.ipam.errors import PoolExhausted
from cni_ipam.ipam import check
from cni_ipam.ipam.model import Handle
from cni_ipam.ipam.pool import make_pool
from tests.test_cli_common import SEED_POOLS, cli, ipam  # noqa: F401 (fixtures)

N = ipaddress.ip_network
A = ipaddress.ip_address

DUAL = SEED_POOLS + """---
apiVersion: cni-ipam/v1
kind: IPPool
metadata: {name: v6-pool}
spec: {cidr: "fd00:10::/120", blockSize: 124}
---
apiVersion: cni-ipam/v1
kind: IPPool
metadata: {name: routed-pool}
spec: {cidr: 10.90.0.0/28, blockSize: 30}
"""


def req(hid, node="node-a", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


# ============================================================================ release

def test_release_by_ip(cli, ipam):
    assert cli("apply", "-f", "-", stdin=DUAL).rc == 0
    one = ipam.assign(req("one", v4_pools=["external-pool"])).handle
    dual = ipam.assign(req("dual", assign_v6=True, v4_pools=["external-pool"])).handle
    ip1 = str(one.addresses[0].ip)
    v4, v6 = (str(a.ip) for a in dual.addresses)
    r = cli("release", "--ip", ip1, "--ip", v4, "--yes")
    assert r.rc == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted([f"released {ip1} (handle one)", f"released {v4} (handle dual)"])
    assert ipam.get_handle("one") is None
    left = ipam.get_handle("dual")
    assert [str(a.ip) for a in left.addresses] == [v6]    # the handle keeps its other address
    blk = Block.from_json(ipam.ds.get(ipam.keys.block(one.addresses[0].block)).value)
    assert blk.holder(A(ip1)) is None and blk.holder(A(v4)) is None
    assert cli("check").rc == 0
    # not allocated: one error line, non-zero; what could be released still is
    r = cli("release", "--ip", v6, "--ip", ip1, "-o", "json", "--yes")
    assert r.rc == 1 and f"{ip1} is not allocated" in r.error_line
    assert json.loads(r.stdout)["released"] == [{"ip": v6, "handle": "dual"}]
    assert ipam.get_handle("dual") is None
    assert "not an IP address" in cli("release", "--ip", "10.1.2").error_line
    assert "give --ip ADDR and/or --handle ID" in cli("release").error_line


def test_release_by_handle(cli, ipam):
    assert cli("apply", "-f", "-", stdin=DUAL).rc == 0
    h = ipam.assign(req("net.abc.eth0", assign_v6=True, v4_pools=["internal-pool"])).handle
    r = cli("release", "--handle", "net.abc.eth0", "-o", "json", "-y")
    assert r.rc == 0, r.stderr
    assert sorted(x["ip"] for x in json.loads(r.stdout)["released"]) == sorted(str(a.ip) for a in h.addresses)
    assert ipam.get_handle("net.abc.eth0") is None
    r = cli("release", "--handle", "net.abc.eth0")
    assert r.rc == 1 and "does not exist" in r.error_line
    # a handle whose record was lost: its addresses are found in the blocks
    lost = ipam.assign(req("lost", v4_pools=["external-pool"])).handle
    ipam.ds.commit([], [Delete(ipam.keys.handle("lost"))])
    assert cli("check").rc == 1
    r = cli("release", "--handle", "lost", "--yes")
    assert r.rc == 0 and r.stdout.strip() == f"released {lost.addresses[0].ip} (handle lost)"
    assert cli("check").rc == 0


# ============================================================================ check

def test_check_is_clean_after_hundreds_of_adds_and_dels(cli, ipam):
    assert cli("apply", "-f", "-", stdin=DUAL).rc == 0
    rnd = random.Random(4)
    live: dict[str, AssignRequest] = {}
    nodes = ["node-a", "node-b", "node-c"]
    ops = 0
    for i in range(400):
        if live and (rnd.random() < 0.45 or len(live) > 40):
            hid = rnd.choice(sorted(live))
            assert ipam.release(hid) is not None
            del live[hid]
        else:
            kind = rnd.choice(["ext", "int", "dual", "routed"])
            node = rnd.choice(nodes)
            hid = f"h{i}"
            if kind == "routed":
                r = req(hid, node=node, mode=ROUTED, v4_pools=["routed-pool"])
            elif kind == "dual":
                r = req(hid, node=node, assign_v6=True, v4_pools=["internal-pool"])
            else:
                r = req(hid, node=node, v4_pools=["external-pool" if kind == "ext" else "internal-pool"])
            try:
                ipam.assign(r)
            except PoolExhausted:
                continue
            live[hid] = r
        ops += 1
    assert ops >= 300
    r = cli("check")
    assert r.rc == 0, r.stdout + r.stderr
    assert r.stdout.startswith("clean: 4 pool(s)")
    rep = cli("check", "-o", "json").json()
    assert rep["clean"] is True and rep["findings"] == [] and rep["summary"] == {}
    assert rep["scanned"]["handles"] == len(live)
    assert rep["scanned"]["allocations"] == sum(1 + (r.assign_v6 is True) for r in live.values())


def test_check_during_adds_and_dels_reports_nothing_false(cli, ipam, etcd_server, etcd_prefix):
    """Pages are read at different revisions while the store changes; suspects are re-read
    consistently, so a healthy store under load still checks clean."""
    from cni_ipam.datastore import open_datastore
    from cni_ipam.ipam.engine import IPAM
    assert cli("apply", "-f", "-", stdin=DUAL).rc == 0
    stop = threading.Event()
    errors = []

    def churn(node):
        ds = open_datastore(etcd_server.endpoint, timeout=10)
        eng = IPAM(ds, etcd_prefix)
        rnd = random.Random(node)
        mine = []
        try:
            i = 0
            while not stop.is_set():
                i += 1
                if mine and (rnd.random() < 0.5 or len(mine) > 20):
                    eng.release(mine.pop(rnd.randrange(len(mine))))
                else:
                    hid = f"{node}-{i}"
                    try:
                        eng.assign(req(hid, node=node, v4_pools=["internal-pool"]))
                        mine.append(hid)
                    except PoolExhausted:
                        pass
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            ds.close()
    threads = [threading.Thread(target=churn, args=(n,)) for n in ("node-a", "node-b")]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            r = cli("check", "-o", "json")
            assert r.rc == 0, r.stdout
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors


# --- corruption, one kind at a time --------------------------------------------------------

def _setup(ipam):
    """external-pool: node-a holds h1, h2, h3 in one block; node-b holds b0 in another."""
    hs = {h: ipam.assign(req(h, v4_pools=["external-pool"])).handle for h in ("h1", "h2", "h3")}
    hs["b0"] = ipam.assign(req("b0", node="node-b", v4_pools=["external-pool"])).handle
    return hs


def _block(ipam, h: Handle):
    kv = ipam.ds.get(ipam.keys.block(h.addresses[0].block))
    return kv.key, Block.from_json(kv.value)


def _unclaimed(ipam, hs):
    """A /29 of external-pool that no block uses."""
    used = {a.block for h in hs.values() for a in h.addresses}
    return next(n for n in N("172.16.0.0/26").subnets(new_prefix=29) if n not in used)


def _put(ipam, key, value: bytes):
    assert ipam.ds.commit([], [Put(key, value)])


def c_handle_missing(ipam, hs):
    ipam.ds.commit([], [Delete(ipam.keys.handle("h1"))])
    return str(hs["h1"].addresses[0].ip)


def c_handle_disagrees(ipam, hs):
    h = hs["h2"]
    other = ipam.get_handle("h2")
    other.addresses = []
    _put(ipam, ipam.keys.handle("h2"), other.to_json())
    return str(h.addresses[0].ip)


def c_handle_extra_address(ipam, hs):
    h = ipam.get_handle("h3")
    extra = type(h.addresses[0])(A("172.16.0.7") if h.addresses[0].ip != A("172.16.0.7") else A("172.16.0.6"),
                                 h.addresses[0].block, "external-pool", 29)
    h.addresses.append(extra)
    _put(ipam, ipam.keys.handle("h3"), h.to_json())
    return str(extra.ip)


def c_block_forgot(ipam, hs):
    key, b = _block(ipam, hs["h1"])
    b.release(hs["h1"].addresses[0].ip)
    _put(ipam, key, b.to_json())
    return str(hs["h1"].addresses[0].ip)


def c_block_outside(ipam, hs):
    b = Block.new(N("10.99.0.0/29"), "gone-pool", "node-a")
    assert ipam.ds.commit([], [Put(ipam.keys.block(b.cidr), b.to_json()),
                               Put(ipam.keys.affinity_key("node-a", b.cidr), b"{}")])
    return "10.99.0.0/29"


def c_wrong_size(ipam, hs):
    net = _unclaimed(ipam, hs).supernet(new_prefix=28)
    b = Block.new(net, "external-pool", "node-c")
    assert ipam.ds.commit([], [Put(ipam.keys.block(b.cidr), b.to_json()),
                               Put(ipam.keys.affinity_key("node-c", b.cidr), b"{}")])
    return str(net)


def c_pool_mismatch(ipam, hs):
    key, b = _block(ipam, hs["b0"])
    b.pool = "internal-pool"
    _put(ipam, key, b.to_json())
    return str(b.cidr)


def c_key_mismatch(ipam, hs):
    b = Block.new(N("10.0.0.0/29"), "external-pool", None)
    key = ipam.keys.block(_unclaimed(ipam, hs))
    _put(ipam, key, b.to_json())
    return key


def c_no_affinity(ipam, hs):
    net = hs["b0"].addresses[0].block
    ipam.ds.commit([], [Delete(ipam.keys.affinity_key("node-b", net))])
    return str(net)


def c_affinity_other_node(ipam, hs):
    net = hs["b0"].addresses[0].block
    assert ipam.ds.commit([], [Delete(ipam.keys.affinity_key("node-b", net)),
                               Put(ipam.keys.affinity_key("node-x", net), b'{"pool":"external-pool"}')])
    return "node-x"


def c_duplicate_affinity(ipam, hs):
    net = hs["b0"].addresses[0].block
    _put(ipam, ipam.keys.affinity_key("node-x", net), b'{"pool":"external-pool"}')
    return "node-x"


def c_affinity_without_block(ipam, hs):
    key = ipam.keys.affinity_key("node-y", _unclaimed(ipam, hs))
    _put(ipam, key, b'{"pool":"external-pool"}')
    return key


def c_garbage_block(ipam, hs):
    key, _ = _block(ipam, hs["b0"])
    _put(ipam, key, b'{"cidr": "172.16.0.8/29", "allocations": [}')
    return key


def c_garbage_handle(ipam, hs):
    _put(ipam, ipam.keys.handle("h1"), b"\xff\xfe not json")
    return ipam.keys.handle("h1")


def c_garbage_pool(ipam, hs):
    _put(ipam, ipam.keys.pool("broken"), b'{"name": "broken", "cidr": "nope"}')
    return ipam.keys.pool("broken")


def c_garbage_config(ipam, hs):
    _put(ipam, ipam.keys.config, b"[1, 2")
    return ipam.keys.config


def c_garbage_affinity(ipam, hs):
    net = hs["b0"].addresses[0].block
    _put(ipam, ipam.keys.affinity_key("node-b", net), b"<xml/>")
    return ipam.keys.affinity_key("node-b", net)


def c_bad_block_key(ipam, hs):
    _put(ipam, ipam.keys.blocks + "v4/zzzz-99", b"{}")
    return ipam.keys.blocks + "v4/zzzz-99"


def c_handle_key_mismatch(ipam, hs):
    h = Handle(id="someone-else", node="node-a")
    _put(ipam, ipam.keys.handle("orphan-record"), h.to_json())
    return "someone-else"


CORRUPTIONS = [
    # (function, expected finding kinds, one of them must name the returned needle)
    (c_handle_missing, {"allocation-without-handle"}),
    (c_handle_disagrees, {"allocation-handle-mismatch"}),
    (c_handle_extra_address, {"handle-not-held"}),
    (c_block_forgot, {"handle-not-held"}),
    (c_block_outside, {"block-outside-pools"}),
    (c_wrong_size, {"block-wrong-size"}),
    (c_pool_mismatch, {"block-pool-mismatch"}),
    (c_key_mismatch, {"block-key-mismatch"}),
    (c_no_affinity, {"block-without-affinity"}),
    (c_affinity_other_node, {"affinity-other-node"}),
    (c_duplicate_affinity, {"duplicate-affinity"}),
    (c_affinity_without_block, {"affinity-without-block"}),
    (c_garbage_block, {"undecodable"}),
    (c_garbage_handle, {"undecodable"}),
    (c_garbage_pool, {"undecodable"}),
    (c_garbage_config, {"undecodable"}),
    (c_garbage_affinity, {"undecodable"}),
    (c_bad_block_key, {"undecodable"}),
    (c_handle_key_mismatch, {"handle-key-mismatch"}),
]


@pytest.mark.parametrize("corrupt,kinds", CORRUPTIONS, ids=[c[0].__name__[2:] for c in CORRUPTIONS])
def test_check_finds_each_kind_of_corruption(cli, ipam, corrupt, kinds):
    ipam.create_pool(make_pool("external-pool", "172.16.0.0/26", 29))
    ipam.create_pool(make_pool("internal-pool", "192.168.0.0/16", 29))
    hs = _setup(ipam)
    assert check.check(ipam)["clean"]
    needle = corrupt(ipam, hs)
    r = cli("check")
    assert r.rc == 1, r.stdout
    lines = r.stdout.splitlines()
    assert {ln.split(":", 1)[0] for ln in lines if not ln.startswith("  fix: ")} == kinds, lines
    assert any(needle in ln for ln in lines), (needle, lines)
    assert "problem(s) found" in r.stderr and "Traceback" not in r.stderr
    rep = cli("check", "-o", "json").json()
    assert rep["clean"] is False
    assert {f["kind"] for f in rep["findings"]} == kinds
    assert all(f["key"].startswith(ipam.keys.root) and f["message"] for f in rep["findings"])
    assert sum(rep["summary"].values()) == len(rep["findings"]) == len([ln for ln in lines
                                                                        if not ln.startswith("  fix: ")])
    # every finding says how to fix it: `check --fix`, or the exact command
    assert all(f["fix"] for f in rep["findings"])
    assert sum(1 for ln in lines if ln.startswith("  fix: ")) == len(rep["findings"])
    if all(f["fixable"] for f in rep["findings"]):
        assert all("check --fix" in f["fix"] for f in rep["findings"])
        before = {kv.key: kv.value for kv in ipam.ds.get_prefix(ipam.keys.root)}
        r = cli("check", "--fix", "--dry-run")
        assert r.rc == 1 and "will be repaired" in r.stderr and "dry run: nothing changed" in r.stderr
        r = cli("check", "--fix")                      # no answer on stdin: refuses, names --yes
        assert r.rc == 3 and r.stderr.splitlines()[-1].startswith("cni-ipam: error: check --fix: no answer")
        assert "--yes" in r.stderr.splitlines()[-1]
        r = cli("check", "--fix", stdin="n\n")
        assert r.rc == 1 and "nothing repaired" in r.stderr
        assert {kv.key: kv.value for kv in ipam.ds.get_prefix(ipam.keys.root)} == before
        r = cli("check", "--fix", "--yes")
        assert r.rc == 0, r.stdout + r.stderr
        assert r.stdout.startswith("fixed: ")
        assert cli("check").rc == 0
        # what the pods hold is intact: every handle's addresses are still held by their blocks
        assert check.check(ipam)["clean"]
        assert {h.id for h in ipam.handles()} == set(hs)


def test_check_reports_several_problems_one_line_each(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    hs = _setup(ipam)
    c_handle_missing(ipam, hs)
    c_no_affinity(ipam, hs)
    c_affinity_without_block(ipam, hs)
    r = cli("check")
    assert r.rc == 1
    assert sorted(ln.split(":", 1)[0] for ln in r.stdout.splitlines() if not ln.startswith("  fix: ")) == \
        ["affinity-without-block", "allocation-without-handle", "block-without-affinity"]
    # --fix repairs the two it can; the third keeps its exact command; exit 1 while anything remains
    r = cli("check", "--fix", "--yes", "-o", "json")
    assert r.rc == 1
    d = r.json()
    assert sorted(x["kind"] for x in d["fixes"] if x["done"]) == ["affinity-without-block", "block-without-affinity"]
    assert [f["kind"] for f in d["remaining"]] == ["allocation-without-handle"]
    assert "`cni-ipam release --ip " in d["remaining"][0]["fix"]

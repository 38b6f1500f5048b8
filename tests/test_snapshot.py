"""The warm-snapshot fast path (ipam/snapshot.py, IPAM._assign_from_snapshot): one etcd
request per ADD while nothing it depends on changed, and a correct ADD (plus a fresh
snapshot) whenever something did.  Real etcd, no mocks."""
import json
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cni_ipam.datastore import Delete, Put, open_datastore
from cni_ipam.ipam import annotations as ann, pools
from cni_ipam.ipam import snapshot as snapshots
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import PoolExhausted
from cni_ipam.ipam.model import IPAMConfig
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import exec_plugin, netconf

V4 = "cni.projectcalico.org/ipv4pools"


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    yield IPAM(ds, etcd_prefix, use_snapshot=True)
    ds.close()


@pytest.fixture
def other(etcd_server, etcd_prefix):
    """Another client of the same store (no snapshot)."""
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    yield IPAM(ds, etcd_prefix)
    ds.close()


def req(hid, node="n1", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def counted(ipam, fn):
    n = ipam.ds.requests
    out = fn()
    return ipam.ds.requests - n, out


def warm(ipam, *reqs):
    """ADDs until the snapshot is warm; returns the handles."""
    out = [ipam.assign(r).handle for r in reqs]
    assert ipam.snapshot is not None
    return out


def consistent(store):
    """No address held twice; every handle agrees with its blocks and vice versa."""
    hs = store.handles()
    ips = [a.ip for h in hs for a in h.addresses]
    assert len(ips) == len(set(ips)), "duplicate address"
    for h in hs:
        assert store.verify_handle(h) == [], h.id
    held = {str(a.ip): h.id for h in hs for a in h.addresses}
    for kv in store.ds.get_prefix(store.keys.blocks):
        b = Block.from_json(kv.value)
        for o, hid in b.allocations.items():
            assert held.get(str(b.ip(o))) == hid, f"{b.ip(o)} in {b.cidr}: block says {hid}"


def test_warm_snapshot_is_one_request(ipam):
    ipam.create_pool(make_pool("p", "10.70.0.0/24", 26))
    ipam.assign(req("claim"))                    # claims a block: no snapshot (affinity written)
    assert ipam.snapshot is None
    n, _ = counted(ipam, lambda: ipam.assign(req("cold")))
    assert n == 3 and ipam.snapshot is not None
    n, r = counted(ipam, lambda: ipam.assign(req("warm")))
    assert n == 1 and ipam.snapshot_hits == 1 and not r.existing
    n, _ = counted(ipam, lambda: ipam.assign(req("warm2")))
    assert n == 1
    # DEL uses the snapshot's copy of the block (guarded by its content: 2 requests, not 3) and
    # keeps it current: the next ADD is still one request
    n, _ = counted(ipam, lambda: ipam.release("warm"))
    assert n == 2
    n, r = counted(ipam, lambda: ipam.assign(req("warm3")))
    assert n == 1 and ipam.snapshot_hits == 3 and ipam.snapshot_misses == 0
    ips = [ipam.get_handle(h).addresses[0].ip for h in ("claim", "cold", "warm2", "warm3")]
    assert len(set(ips)) == 4
    consistent(ipam)


def test_without_snapshot_is_three_requests(etcd_server, etcd_prefix):
    with open_datastore(etcd_server.endpoint, timeout=5) as ds:
        plain = IPAM(ds, etcd_prefix)
        plain.create_pool(make_pool("p", "10.70.0.0/24", 26))
        plain.assign(req("a"))
        plain.assign(req("b"))
        n, _ = counted(plain, lambda: plain.assign(req("c")))
        assert n == 3 and plain.snapshot is None


def _stale(ipam, hid, least=4, **kw):
    """An ADD after something changed: 1 refused snapshot txn + the usual 3 (or more)."""
    misses = ipam.snapshot_misses
    n, r = counted(ipam, lambda: ipam.assign(req(hid, **kw)))
    assert ipam.snapshot_misses == misses + 1 and n >= least
    return r


def test_other_client_allocates_from_the_same_block(ipam, other):
    ipam.create_pool(make_pool("p", "10.71.0.0/24", 26))
    warm(ipam, req("a"), req("b"))
    # another engine instance (same node name, no snapshot) takes the next free address
    x = other.assign(req("x")).handle.addresses[0].ip
    r = _stale(ipam, "c")
    assert r.handle.addresses[0].ip != x and ipam.snapshot is not None
    n, _ = counted(ipam, lambda: ipam.assign(req("d")))      # refreshed: one request again
    assert n == 1
    # a direct write of the block (an allocation the snapshot does not know)
    bkey = ipam.keys.block(r.handle.addresses[0].block)
    kv = other.ds.get(bkey)
    b = Block.from_json(kv.value)
    taken = b.allocate("intruder")
    assert other.ds.commit([], [Put(bkey, b.to_json())])
    r = _stale(ipam, "e")
    assert r.handle.addresses[0].ip != taken
    assert len({ipam.get_handle(h).addresses[0].ip for h in "abcde"} | {x, taken}) == 7


def test_borrow_by_another_node_invalidates(ipam, other):
    ipam.create_pool(make_pool("p", "10.72.0.0/29", 30))          # two /30 blocks, routed
    for hid in "abcde":                                           # 4 in the first block, e claims the 2nd
        ipam.assign(req(hid, mode="routed"))
    assert len(ipam.ds.get_prefix(ipam.keys.node_affinity("n1"))) == 2
    warm(ipam, req("w", mode="routed"))
    borrowed = other.assign(req("z", node="n2", mode="routed")).handle.addresses[0]
    assert other.ds.get(other.keys.affinity_key("n2", borrowed.block)) is None   # a borrow
    r = _stale(ipam, "f", mode="routed")
    assert r.handle.addresses[0].ip != borrowed.ip
    consistent(ipam)


def test_pool_disabled(ipam, other):
    ipam.create_pool(make_pool("a", "10.73.0.0/24", 26))
    ipam.create_pool(make_pool("b", "10.74.0.0/24", 26))
    assert warm(ipam, req("h1"), req("h2"))[-1].addresses[0].pool == "a"
    pools.set_pool_disabled(other, "a", True)
    assert _stale(ipam, "h3").handle.addresses[0].pool == "b"
    assert ipam.snapshot is None            # that ADD claimed a block in b
    assert ipam.assign(req("h4")).handle.addresses[0].pool == "b"
    n, r = counted(ipam, lambda: ipam.assign(req("h5")))
    assert n == 1 and r.handle.addresses[0].pool == "b"


def test_new_pool_that_should_now_be_chosen(ipam, other):
    ipam.create_pool(make_pool("a", "10.75.0.0/24", 26))
    ipam.create_pool(make_pool("m", "10.76.0.0/24", 26))
    ipam.assign(req("in-a", v4_pools=["a"]))         # the node has a block in a and one in m
    ipam.assign(req("in-m", v4_pools=["m"]))
    akv = other.ds.get(other.keys.pool("a"))
    assert other.ds.commit([], [Delete(akv.key)])     # pool a's record gone (block + affinity stay)
    assert warm(ipam, req("h1"), req("h2"))[-1].addresses[0].pool == "m"
    n, r = counted(ipam, lambda: ipam.assign(req("h3")))
    assert n == 1 and r.handle.addresses[0].pool == "m"
    # pool "a" (sorts first, matches this node) appears: the node's block in it comes first now
    assert other.ds.commit([], [Put(akv.key, akv.value)])
    assert _stale(ipam, "h4").handle.addresses[0].pool == "a"
    n, r = counted(ipam, lambda: ipam.assign(req("h5")))
    assert n == 1 and r.handle.addresses[0].pool == "a"


def test_pool_deleted_with_force(ipam, other):
    ipam.create_pool(make_pool("a", "10.77.0.0/24", 26))
    ipam.create_pool(make_pool("b", "10.78.0.0/24", 26))
    warm(ipam, req("h1"), req("h2"))
    pools.delete_pool(other, "a", force=True)
    r = _stale(ipam, "h3")
    assert r.handle.addresses[0].pool == "b"
    assert ipam.get_handle("h1") is None and ipam.verify_handle(r.handle) == []
    consistent(ipam)


def test_config_changed(ipam, other):
    ipam.create_pool(make_pool("p", "10.79.0.0/24", 26))
    warm(ipam, req("h1"), req("h2"))
    other.set_config(IPAMConfig(strict_affinity=True))
    r = _stale(ipam, "h3")
    assert ipam.verify_handle(r.handle) == []
    n, _ = counted(ipam, lambda: ipam.assign(req("h4")))
    assert n == 1
    other.set_config(IPAMConfig(strict_affinity=True, max_blocks_per_host=1))
    _stale(ipam, "h5")


def test_namespace_annotated_to_another_pool(ipam, other):
    ipam.create_pool(make_pool("a", "10.80.0.0/24", 26))
    ipam.create_pool(make_pool("b", "10.81.0.0/24", 26))
    r = dict(namespace="ns1", pod="web", labels_from_etcd=True)
    warm(ipam, req("h1", **r), req("h2", **r))
    n, res = counted(ipam, lambda: ipam.assign(req("h3", **r)))
    assert n == 1 and res.handle.addresses[0].pool == "a"
    nskey = other.keys.namespace("ns1")
    assert other.ds.commit([], [Put(nskey, ann.encode_record("ns1", "annotations", {V4: '["b"]'}))])
    assert _stale(ipam, "h4", **r).handle.addresses[0].pool == "b"
    ipam.assign(req("h5", **r))                       # (after the claim in b: no snapshot) -> warm
    n, res = counted(ipam, lambda: ipam.assign(req("h6", **r)))
    assert n == 1 and res.handle.addresses[0].pool == "b"
    # another namespace than the snapshot read: planned from fresh reads
    n, res = counted(ipam, lambda: ipam.assign(req("h7", namespace="ns2", pod="x", labels_from_etcd=True)))
    assert n == 3 and res.handle.addresses[0].pool == "a"


def test_node_labels_change(ipam, other):
    ipam.create_pool(make_pool("a", "10.82.0.0/24", 26, node_selector="zone == 'x'"))
    ipam.create_pool(make_pool("b", "10.83.0.0/24", 26))
    nkey = other.keys.node("n1")
    other.ds.commit([], [Put(nkey, ann.encode_record("n1", "labels", {"zone": "x"}))])
    r = dict(labels_from_etcd=True)
    warm(ipam, req("h1", **r), req("h2", **r))
    other.ds.commit([], [Put(nkey, ann.encode_record("n1", "labels", {"zone": "y"}))])
    assert _stale(ipam, "h3", **r).handle.addresses[0].pool == "b"


def test_existing_handle_is_returned(ipam, other):
    ipam.create_pool(make_pool("p", "10.84.0.0/24", 26))
    warm(ipam, req("h1"), req("h2"))
    first = other.assign(req("dup")).handle
    r = _stale(ipam, "dup", least=3)      # refused txn, handle read, its blocks (verify)
    assert r.existing and r.handle.addresses == first.addresses
    assert len([h for h in ipam.handles() if h.id == "dup"]) == 1
    # and the one made with the snapshot itself, repeated
    ipam.assign(req("h3"))
    n, r1 = counted(ipam, lambda: ipam.assign(req("h4")))
    assert n == 1
    r2 = ipam.assign(req("h4"))
    assert r2.existing and r2.handle.addresses == r1.handle.addresses
    consistent(ipam)


def test_node_affinity_removed(ipam, other):
    """An affinity deleted behind the snapshot's back (deletions are not seen by the range guard:
    each affinity key is compared too)."""
    ipam.create_pool(make_pool("p", "10.85.0.0/24", 26))
    warm(ipam, req("h1"), req("h2"))
    blk = ipam.get_handle("h1").addresses[0].block
    assert other.ds.commit([], [Delete(other.keys.affinity_key("n1", blk))])
    r = _stale(ipam, "h3")
    assert r.handle.addresses[0].block != blk       # the block is no longer the node's: claims another


def test_snapshot_for_another_node_or_requested_address_is_not_used(ipam):
    ipam.create_pool(make_pool("p", "10.86.0.0/24", 26))
    warm(ipam, req("h1"), req("h2"))
    n, _ = counted(ipam, lambda: ipam.assign(req("o1", node="n2")))
    assert n > 1 and ipam.snapshot is None          # n2 claimed
    warm(ipam, req("o2", node="n2"))
    assert ipam.snapshot.node == "n2"
    import ipaddress
    n, r = counted(ipam, lambda: ipam.assign(req("rq", node="n2", requested=[ipaddress.ip_address("10.86.0.200")])))
    assert n == 3 and str(r.handle.addresses[0].ip) == "10.86.0.200"


def test_snapshot_roundtrip_and_bad_files(tmp_path, ipam):
    ipam.create_pool(make_pool("p", "10.87.0.0/24", 26))
    warm(ipam, req("h1"), req("h2"))
    snap = ipam.snapshot
    path = str(tmp_path / "s.json")
    snapshots.save(path, snap, "id")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = snapshots.load(path, "id")
    assert back.to_dict("id") == snap.to_dict("id")
    assert snapshots.load(path, "other id") is None
    for bad in (b"", b"{", b"[]", b'{"format": 1, "ident": "id"}', json.dumps(
            {**snap.to_dict("id"), "revision": -1}).encode()):
        with open(path, "wb") as f:
            f.write(bad)
        assert snapshots.load(path, "id") is None
    os.chmod(path, 0o644)
    snapshots.save(path, snap, "id")     # replaced by a fresh 0600 file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and snapshots.load(path, "id") is not None
    os.chmod(path, 0o644)                # readable by others: not trusted
    assert snapshots.load(path, "id") is None
    snapshots.save(path, None, "id")
    assert not os.path.exists(path)
    # a loaded snapshot works like the in-memory one
    plain = IPAM(ipam.ds, ipam.keys.root[:-len("/v1/")], snapshot=back)
    n, _ = counted(plain, lambda: plain.assign(req("h3")))
    assert n == 1


# -------------------------------------------------------------------------- interleavings
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from("ABC"), st.sampled_from(["add", "add", "del", "poke"]),
                              st.integers(0, 11)), min_size=5, max_size=40))
def test_interleavings_never_duplicate(etcd_server, etcd_prefix, ops):
    """Two snapshot instances for the same node + a third writer (no snapshot; adds on the same
    node, releases, and pokes: pool re-written, config re-written, routed borrows by node n2),
    interleaved at random: never a duplicate, every handle consistent with its block."""
    import secrets
    prefix = f"{etcd_prefix}/{secrets.token_hex(3)}"
    dss = [open_datastore(etcd_server.endpoint, timeout=5) for _ in range(3)]
    try:
        a = IPAM(dss[0], prefix, use_snapshot=True)
        b = IPAM(dss[1], prefix, use_snapshot=True)
        c = IPAM(dss[2], prefix)
        c.create_pool(make_pool("p", "10.90.0.0/27", 29))     # 4 blocks, 8 routed addresses each
        actors = {"A": a, "B": b, "C": c}
        for who, op, i in ops:
            ip = actors[who]
            hid = f"h{i}"
            try:
                if op == "add":
                    ip.assign(req(hid, mode="routed"))
                elif op == "del":
                    ip.release(hid)
                elif who == "C":
                    kind = i % 3
                    if kind == 0:
                        kv = c.ds.get(c.keys.pool("p"))
                        c.ds.commit([], [Put(kv.key, kv.value)])
                    elif kind == 1:
                        c.set_config(IPAMConfig(max_blocks_per_host=0))
                    else:
                        c.assign(req(f"n2-{i}", node="n2", mode="routed"))
                else:
                    ip.assign(req(f"{who}-{i}", mode="routed"))
            except PoolExhausted:
                pass
        consistent(c)
    finally:
        for ds in dss:
            ds.close()


# -------------------------------------------------------------------------- the plugin
def test_plugin_second_add_is_one_request(etcd_server, etcd_prefix, tmp_path):
    with open_datastore(etcd_server.endpoint) as ds:
        IPAM(ds, etcd_prefix).create_pool(make_pool("pool-a", "10.200.0.0/24", 29))
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    log = tmp_path / "cni-ipam.log"

    def add(cid):
        before = log.read_text() if log.exists() else ""
        r = exec_plugin("ADD", conf, container=cid)
        assert r.rc == 0, r.stdout + r.stderr
        return r.out["ips"][0]["address"], log.read_text()[len(before):]

    ip1, _ = add("c1")          # claims the block
    ip2, _ = add("c2")          # cold: 3 requests, writes the snapshot
    files = [p for p in tmp_path.iterdir() if p.name.startswith("snapshot-")]
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    ip3, text = add("c3")
    assert "requests=1 " in text and "(snapshot: used)" in text, text
    r = exec_plugin("DEL", conf, container="c2")
    assert r.rc == 0, r.stderr
    ip4, text = add("c4")
    assert "requests=1 " in text, text
    assert len({ip1, ip2, ip3, ip4}) == 4
    # a garbage snapshot file is ignored (and replaced)
    files[0].write_bytes(b"not json")
    ip5, text = add("c5")
    assert "requests=3 " in text and ip5 not in {ip1, ip3, ip4}
    ip6, text = add("c6")
    assert "requests=1 " in text


def test_plugin_del_after_its_add_is_one_request(etcd_server, etcd_prefix, tmp_path):
    """An ADD keeps the handle record it wrote (``handle-<hash>.json`` next to the snapshot,
    0600); the DEL of the same attachment releases in ONE request from it and drops the file;
    GC drops the files of what it released; a bad file only costs the usual reads."""
    with open_datastore(etcd_server.endpoint) as ds:
        IPAM(ds, etcd_prefix).create_pool(make_pool("pool-a", "10.201.0.0/24", 29))
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    log = tmp_path / "cni-ipam.log"

    def run(verb, cid=None, **kw):
        before = log.read_text() if log.exists() else ""
        r = exec_plugin(verb, dict(conf, **kw), container=cid)
        assert r.rc == 0, r.stdout + r.stderr
        return log.read_text()[len(before):]

    def kept():
        return sorted(p for p in tmp_path.iterdir() if p.name.startswith("handle-"))

    for cid in ("c1", "c2", "c3"):
        run("ADD", cid)
    files = kept()
    assert len(files) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    text = run("DEL", "c3")
    assert "etcd requests=1 " in text, text
    assert len(kept()) == 2
    text = run("DEL", "c3")                     # nothing held any more: the usual read, no file
    assert "nothing held" in text and "etcd requests=1 " in text and len(kept()) == 2
    run("GC", cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})
    [left] = kept()
    left.write_bytes(b"not json")               # a bad file: ignored (the usual 2 requests), then dropped
    text = run("DEL", "c1")
    assert "etcd requests=2 " in text and kept() == []
    with open_datastore(etcd_server.endpoint) as ds:
        assert IPAM(ds, etcd_prefix).handles() == []

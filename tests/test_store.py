"""The store layer (ipam/store.py) on its own: keys and their inverses, the record codecs,
and transaction building (no etcd: a Txn is a value, ``ops()`` is pure)."""
import ipaddress
import json

import pytest

from cni_ipam.datastore import Compare, Delete, Put
from cni_ipam.ipam import store
from cni_ipam.ipam.block import BRIDGE, ROUTED, Block
from cni_ipam.ipam.errors import CorruptData
from cni_ipam.ipam.model import Handle, IPAMConfig
from cni_ipam.ipam.store import Affinity, Conflict, Keys, Txn


def test_keys_and_their_inverses():
    k = Keys("/pfx/")
    assert k.root == "/pfx/v1/" and k.poolset == "/pfx/v1/poolset" and k.leader() == "/pfx/v1/controller/leader"
    net = ipaddress.ip_network("10.1.2.64/26")
    bkey = k.block(net)
    assert bkey == "/pfx/v1/blocks/v4/0a010240-26" and k.block_of_key(bkey) == net
    akey = k.affinity_key("node/ä", net)
    assert akey == "/pfx/v1/affinity/node%2F%C3%A4/v4/0a010240-26"
    assert k.affinity_of_key(akey) == ("node/ä", "v4/0a010240-26")
    assert k.affinity_block(akey) == net and k.block_of_affinity(akey) == bkey
    with pytest.raises(CorruptData, match="not a block id"):
        k.affinity_block(k.node_affinity("n") + "v4/zz")
    assert k.pool_name_of_key(k.pool("a b")) == "a b"
    assert k.namespace_name_of_key(k.namespace("ns/1")) == "ns/1" and k.node_name_of_key(k.node("n%")) == "n%"
    for hid in ("net/c1/eth0", "net.c1.eth0", "odd/id"):
        assert k.handle_of_key(k.handle(hid)) == hid
    lo, hi = k.block_range(ipaddress.ip_network("10.1.0.0/16"))
    assert lo < bkey < hi and not (lo < k.block(ipaddress.ip_network("10.2.0.0/26")) < hi)


def test_keys_module_is_the_store():
    from cni_ipam.ipam import keys
    assert keys.Keys is Keys and keys.block_id is store.block_id and keys.LAYOUT == store.LAYOUT


def test_affinity_record_is_the_bytes_older_versions_wrote():
    b = Block.new(ipaddress.ip_network("10.0.0.0/26"), "default-pool", "n1", ROUTED)
    old = b'{"pool":"%s","mode":"%s"}' % (b.pool.encode(), b.mode.encode())   # what 0.1/0.2 wrote by hand
    assert Affinity.of(b).to_json() == old
    assert Affinity.from_json(old) == Affinity("default-pool", ROUTED)
    assert Affinity.from_json(b"{}") == Affinity("", "")   # nothing needs more than the key
    with pytest.raises(ValueError):
        Affinity.from_json(b"[")


def test_strict_and_tolerant_decode():
    k = Keys()
    b = Block.new(ipaddress.ip_network("10.0.0.0/26"), "p", "n1", BRIDGE)
    assert store.decode_block(k.block(b.cidr), b.to_json()).cidr == b.cidr
    other = k.block(ipaddress.ip_network("10.0.0.64/26"))
    with pytest.raises(CorruptData, match="it describes block 10.0.0.0/26"):
        store.decode_block(other, b.to_json())
    with pytest.raises(CorruptData, match=f"corrupt value at etcd key {other}"):
        store.decode_block(other, b"{")
    # a pool's and a block's own decode errors are CorruptData naming the key too
    with pytest.raises(CorruptData, match=f"corrupt value at etcd key {k.pool('p')}: undecodable pool"):
        store.decode_pool(k.pool("p"), b"[1]")
    with pytest.raises(CorruptData, match=f"corrupt value at etcd key {k.block(b.cidr)}: unknown mode"):
        store.decode_block(k.block(b.cidr), b.to_json().replace(b'"bridge"', b'"sideways"'))
    errors = []
    assert store.decode_or_none(other, b"[1]", Block.from_json, errors) is None
    assert errors and errors[0][0] == other
    assert store.decode_config(None) == IPAMConfig()
    # the scan summaries read what Block/Handle write
    d = json.loads(b.to_json())
    info = store.BlockInfo.from_dict(k.block(b.cidr), 7, d)
    assert (info.cidr, info.node, info.allocations, info.rev) == ("10.0.0.0/26", "n1", {}, 7)
    h = Handle(id="net/c/eth0", node="n1", pod="p", namespace="ns")
    cache = {}
    hi = store.HandleInfo.from_dict(k, k.handle(h.id), 3, json.loads(h.to_json()), cache)
    assert (hi.id, hi.node, hi.pod, hi.namespace, hi.blocks) == (h.id, "n1", "p", "ns", [])
    got = list(store.decoded_dicts([type("KV", (), {"value": v})() for v in (b"{}", b"[", b"1")]))
    assert [d for _, d in got] == [{}, None, None]


def test_txn_ops_is_pure_and_encodes_records_at_ops_time():
    k = Keys()
    b = Block.new(ipaddress.ip_network("10.0.0.0/26"), "p", "n1", BRIDGE)
    bkey = k.block(b.cidr)
    t = Txn()
    t.update(bkey, 5, b"old", b)
    t.absent(k.handle("n/c/e"))
    t.put(k.handle("n/c/e"), b"h")
    t.delete(k.affinity_key("n2", b.cidr))
    t.read(bkey, 99)   # the first record of a key wins
    first = t.ops()
    assert t.ops() == first   # no side effects
    compares, ops, puts = first
    assert compares == [Compare(bkey, 5), Compare(k.handle("n/c/e"), 0)]
    assert ops == [Put(bkey, b.to_json()), Put(k.handle("n/c/e"), b"h"), Delete(k.affinity_key("n2", b.cidr))]
    assert puts == {bkey: b.to_json(), k.handle("n/c/e"): b"h"}
    b.allocate("x")   # the plan goes on: the block is encoded as it is when ops() is called
    assert t.ops()[2][bkey] == b.to_json() != first[2][bkey]


def test_txn_by_value_guards_content_and_ranges():
    k = Keys()
    t = Txn(by_value=True)
    t.read("/a", 4, b"A")        # content
    t.read("/b", 0, None)        # still absent
    t.read("/c", 9)              # no value recorded: by revision
    t.no_newer(k.pools, 41)
    t.canary = k.pools
    t.guard(store.revision_guard("/leader", 3))
    compares, _, _ = t.ops()
    assert compares == [Compare("/a", value=b"A"), Compare("/b", 0), Compare("/c", 9),
                        Compare(k.pools, 42, range_end=k.root + "pools0", result="LESS"),
                        Compare(k.pools, 0, range_end=k.root + "pools0", result="GREATER"),
                        Compare("/leader", 3)]
    assert t.n_compares() == len(compares)
    # the same reads planned for a fresh attempt: revisions
    t2 = Txn()
    t2.read("/a", 4, b"A")
    assert t2.ops()[0] == [Compare("/a", 4)]


class _FakeDS:
    """Records commits; answers them with ``ok``."""
    def __init__(self, ok):
        self.ok, self.commits = ok, []

    def commit(self, compares, ops):
        self.commits.append((compares, ops))
        return self.ok


def test_commit_raises_conflict_and_returns_what_it_wrote():
    t = Txn()
    t.absent("/k")
    t.put("/k", b"v", lease=7)
    assert store.commit(_FakeDS(True), t) == {"/k": b"v"}
    ds = _FakeDS(False)
    with pytest.raises(Conflict):
        store.commit(ds, t)
    assert ds.commits == [([Compare("/k", 0)], [Put("/k", b"v", lease=7)])]


def test_only_the_store_layer_builds_transactions():
    """Nothing outside ipam/store.py and datastore/ builds a Compare, Put or Delete, or commits."""
    import ast
    import pathlib
    root = pathlib.Path(store.__file__).resolve().parents[1]
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("datastore/") or rel == "ipam/store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in ("Compare", "Put", "Delete") or (name == "commit" and isinstance(f, ast.Attribute)):
                    offenders.append(f"{rel}:{node.lineno} {name}")
    assert offenders == []

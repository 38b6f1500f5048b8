"""Tests that guard the guards (issue 11, section 6).

Each test here exercises a safety branch that nothing else reached: if the guard were
removed, the test fails (each was checked by breaking the guard locally).  Real etcd
everywhere; where a conflict or a refusal must happen at an exact moment, a thin
``Interposed`` wrapper around a REAL etcd client lets a concurrent writer act (or etcd's
refusal be reproduced) right before a chosen commit -- the data always lives in etcd.
"""
from __future__ import annotations

import fcntl
import io
import ipaddress
import json
import os

import pytest

from cni_ipam import plugin as plugin_mod
from cni_ipam.datastore import Datastore, DatastoreError, Put, open_datastore
from cni_ipam.datastore.base import MAX_TXN_OPS
from cni_ipam.ipam import apply, manifest
from cni_ipam.ipam.block import Block, BlockError
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import PoolExhausted, TryAgain
from cni_ipam.ipam.model import Handle
from cni_ipam.ipam.pool import Pool, make_pool
from cni_ipam.plugin import run_plugin
from tests.plugin_helpers import ROOT, exec_plugin, netconf

A = ipaddress.ip_address
N = ipaddress.ip_network


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def store(etcd_server, etcd_prefix):
    """An engine over the test's prefix with one pool (blockSize 28: 13 addresses per block in bridge mode)."""
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("pool-a", "10.210.0.0/24", 28))
    yield ipam
    ds.close()


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path):
    def make(**kw):
        kw.setdefault("version", "1.1.0")
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, **kw)
    return make


def dump(ds, prefix: str) -> dict:
    """Every key under the test's prefix with its value AND mod revision: equal dumps mean
    nothing at all was written in between."""
    return {kv.key: (kv.value, kv.mod_revision) for kv in ds.get_prefix(prefix + "/")}


def held(ipam) -> dict:
    """address -> (network, container, ifname) of every decodable handle record."""
    return {str(a.ip): (h.network, h.container_id, h.ifname)
            for h in ipam.handles(errors=[]) for a in h.addresses}


def block_holders(ipam) -> dict:
    """address -> holder recorded by the blocks (the other half of every allocation)."""
    out = {}
    for kv in ipam.ds.get_prefix(ipam.keys.blocks):
        b = Block.from_json(kv.value)
        for o, hid in b.allocations.items():
            out[str(b.ip(o))] = hid
    return out


def assert_cni_error(rc: int, out: str, code: int, stderr: str = "") -> dict:
    assert rc != 0, out
    assert out.count("\n") == 1, out
    doc = json.loads(out)
    assert doc["code"] == code, out
    assert "Traceback" not in stderr, stderr
    return doc


def gc_run(c: dict, **attachments):
    """GC as a runtime sends it (no container/ifname/netns)."""
    return exec_plugin("GC", dict(c, **attachments), container=None, ifname=None, netns=None)


def run_inprocess(command: str, c: dict, *, container="c1", ifname="eth0") -> tuple[int, str]:
    """The exec path (skel -> Plugin) in this process, so that a test can interpose on the
    plugin's datastore.  Same env handling as tests.plugin_helpers.exec_plugin."""
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin", "PATH": os.environ.get("PATH", "")}
    if container is not None:
        env.update(CNI_CONTAINERID=container, CNI_IFNAME=ifname, CNI_NETNS="/var/run/netns/x")
    out = io.StringIO()
    rc = run_plugin(env, json.dumps(c).encode(), stdout=out)
    return rc, out.getvalue()


class Interposed(Datastore):
    """A REAL etcd client (``inner``) with a hook that runs right before each commit:
    ``before_commit(compares, ops)`` may let a concurrent writer change etcd first, or raise
    what etcd would answer.  Reads and commits themselves go to etcd unchanged."""

    def __init__(self, inner: Datastore, before_commit=None):
        self.inner = inner
        self.before_commit = before_commit
        self.commits: list[tuple[list, list]] = []   # every commit attempted (compares, ops)

    requests = property(lambda self: self.inner.requests)
    last_revision = property(lambda self: self.inner.last_revision)

    def read(self, reads):
        return self.inner.read(reads)

    def commit(self, compares, ops):
        self.commits.append((list(compares), list(ops)))
        if self.before_commit is not None:
            self.before_commit(list(compares), list(ops))
        return self.inner.commit(compares, ops)

    def close(self):
        self.inner.close()


def interpose_plugin(monkeypatch, wrap):
    """Make the plugin's engine use ``wrap(ipam)`` (which may replace ``ipam.ds``)."""
    orig = plugin_mod.Plugin._ipam

    def patched(self, ic):
        ipam = orig(self, ic)
        wrap(ipam)
        return ipam
    monkeypatch.setattr(plugin_mod.Plugin, "_ipam", patched)


def req(cid, node="n1", network="net", **kw):
    return AssignRequest(handle_id=plugin_mod.handle_id(network, cid, "eth0"), node=node, network=network,
                         container_id=cid, ifname="eth0", **kw)


# =========================================================================== GC without the list
def test_gc_without_valid_attachments_is_refused_and_frees_nothing(store, conf, etcd_prefix):
    """The only thing between a malformed GC and freeing a whole network: with LIVE handles
    of the same network on the same node, a GC that carries no attachment list is code 7
    and etcd is left exactly as it was (every handle, every block, every revision)."""
    c = conf()
    for cid in ("live1", "live2", "live3"):
        assert exec_plugin("ADD", c, container=cid).rc == 0
    assert exec_plugin("ADD", conf(name="othernet"), container="live4").rc == 0
    before = dump(store.ds, etcd_prefix)
    addresses = held(store)
    assert len(addresses) == 4 and {v[1] for v in addresses.values()} == {"live1", "live2", "live3", "live4"}
    for extra in ({}, {"cni.dev/unrelated": []}):
        r = gc_run(c, **extra)
        doc = assert_cni_error(r.rc, r.stdout, 7, r.stderr)
        assert "valid-attachments" in doc["msg"], doc
    assert dump(store.ds, etcd_prefix) == before
    assert held(store) == addresses and block_holders(store).keys() == addresses.keys()
    # the same GC with the list (even an empty one) is what frees: the guard is the only difference
    r = gc_run(c, **{"cni.dev/valid-attachments": [{"containerID": "live2", "ifname": "eth0"}]})
    assert r.rc == 0, r.stdout + r.stderr
    assert sorted(v[1] for v in held(store).values()) == ["live2", "live4"]


# =========================================================================== host lock
def test_host_lock_timeout_is_code_11_and_writes_nothing(store, conf, etcd_prefix, tmp_path):
    c = conf(lock_timeout_seconds=0.3)
    assert exec_plugin("ADD", c, container="held").rc == 0
    before = dump(store.ds, etcd_prefix)
    lock_path = c["ipam"]["lock_file"]
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # another exec on this node holds the lock
        for verb, kw in (("ADD", {"container": "new"}), ("DEL", {"container": "held"})):
            r = exec_plugin(verb, c, **kw)
            doc = assert_cni_error(r.rc, r.stdout, 11, r.stderr)
            assert "lock" in doc["msg"], doc
        r = gc_run(c, **{"cni.dev/valid-attachments": []})
        doc = assert_cni_error(r.rc, r.stdout, 11, r.stderr)
        assert "lock" in doc["msg"], doc
        assert dump(store.ds, etcd_prefix) == before
    finally:
        os.close(fd)
    # the lock free again: the same requests go through
    assert exec_plugin("ADD", c, container="new").rc == 0
    assert exec_plugin("DEL", c, container="held").rc == 0
    assert [v[1] for v in held(store).values()] == ["new"]


# =========================================================================== nodename_file
@pytest.mark.parametrize("what", ["missing", "directory"])
def test_unreadable_nodename_file_is_code_7(store, conf, etcd_prefix, tmp_path, what):
    path = tmp_path / "nodename"
    if what == "directory":
        path.mkdir()
    c = conf(node="", nodename_file=str(path))
    before = dump(store.ds, etcd_prefix)
    for verb in ("ADD", "DEL"):
        r = exec_plugin(verb, c)
        doc = assert_cni_error(r.rc, r.stdout, 7, r.stderr)
        assert "nodename_file" in doc["msg"] and str(path) in doc["msg"], doc
    assert dump(store.ds, etcd_prefix) == before
    # readable: that name is used
    if what == "missing":
        path.write_text("node-from-file\n")
        assert exec_plugin("ADD", c).rc == 0
        (h,) = store.handles()
        assert h.node == "node-from-file"


def test_nodename_file_that_is_not_utf8_is_code_7(store, conf, etcd_prefix, tmp_path):
    path = tmp_path / "nodename"
    path.write_bytes(b"\xff\xfenode-a\n")
    c = conf(node="", nodename_file=str(path))
    before = dump(store.ds, etcd_prefix)
    r = exec_plugin("ADD", c)
    assert dump(store.ds, etcd_prefix) == before
    doc = assert_cni_error(r.rc, r.stdout, 7, r.stderr)
    assert "nodename_file" in doc["msg"], doc


# =========================================================================== max_retries
def _competitor(etcd_server, prefix, node="n1"):
    """Another client of the same store that allocates on ``node`` (same pool, same block):
    a genuine concurrent ADD, as a second process on the node would do without the host lock."""
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    return IPAM(ds, prefix)


def test_engine_gives_up_after_max_retries_conflicts(store, etcd_server, etcd_prefix):
    other = _competitor(etcd_server, etcd_prefix)
    n = [0]

    def concurrent_add(compares, ops):
        n[0] += 1
        other.assign(req(f"rival{n[0]}"))   # changes the block (or claims it) our txn compares

    ipam = IPAM(Interposed(store.ds, concurrent_add), etcd_prefix, max_retries=3)
    try:
        with pytest.raises(TryAgain, match="gave up after 3 conflicting attempts") as ei:
            ipam.assign(req("mine"))
        assert ei.value.code == 11
        assert ipam.conflicts == 3 and len(ipam.ds.commits) == 3 and n[0] == 3
        # nothing of ours was written; the rivals got distinct addresses
        assert sorted(v[1] for v in held(store).values()) == ["rival1", "rival2", "rival3"]
        assert len(block_holders(store)) == 3
        # the same engine without the rival: the next attempt succeeds
        ipam.ds.before_commit = None
        assert ipam.assign(req("mine")).attempts == 1
    finally:
        other.ds.close()


def test_plugin_gives_up_after_max_retries_with_code_11(store, conf, etcd_server, etcd_prefix, monkeypatch):
    other = _competitor(etcd_server, etcd_prefix, node="node-a")
    n = [0]

    def concurrent_add(compares, ops):
        n[0] += 1
        other.assign(req(f"rival{n[0]}", node="node-a"))

    def wrap(ipam):
        ipam.max_retries = 4
        ipam.ds = Interposed(ipam.ds, concurrent_add)
    interpose_plugin(monkeypatch, wrap)
    try:
        rc, out = run_inprocess("ADD", conf(), container="mine")
        doc = assert_cni_error(rc, out, 11)
        assert "4 conflicting attempts" in doc["msg"], doc
        assert n[0] == 4
        assert sorted(v[1] for v in held(store).values()) == [f"rival{i}" for i in range(1, 5)]
    finally:
        other.ds.close()


# =========================================================================== GC failure codes
def _gc_with(store, conf, monkeypatch, etcd_server, etcd_prefix, *, corrupt: bool, transient: bool):
    """GC of network testnet on node-a with handles ok1/ok2 (to be freed), ``keep``, and
    optionally one corrupt handle record and one whose release conflicts every time."""
    c = conf()
    cids = ["ok1", "ok2", "keep"] + (["bad"] if corrupt else []) + (["busy"] if transient else [])
    for cid in cids:
        assert exec_plugin("ADD", c, container=cid).rc == 0
    by_cid = {h.container_id: h for h in store.handles()}
    bad_key = None
    if corrupt:
        bad_key = store.keys.handle(by_cid["bad"].id)
        assert store.ds.commit([], [Put(bad_key, b'{"id": "testnet.bad.eth0", "addresses": [}')])
    busy_key = store.keys.handle(by_cid["busy"].id) if transient else None
    other = _competitor(etcd_server, etcd_prefix, node="node-a")
    n = [0]

    def rival_on_busy(compares, ops):
        # a concurrent ADD (another network, same node and block) lands before each release of "busy"
        if busy_key is not None and any(getattr(op, "key", None) == busy_key for op in ops):
            n[0] += 1
            other.assign(req(f"rival{n[0]}", node="node-a", network="othernet"))

    def wrap(ipam):
        ipam.max_retries = 3
        ipam.ds = Interposed(ipam.ds, rival_on_busy)
    interpose_plugin(monkeypatch, wrap)
    try:
        rc, out = run_inprocess("GC", dict(c, **{"cni.dev/valid-attachments": [
            {"containerID": "keep", "ifname": "eth0"}]}), container=None)
    finally:
        other.ds.close()
    left = {v[1] for v in held(store).values() if v[0] == "testnet"}
    assert "ok1" not in left and "ok2" not in left, "GC gave up on the good handles"
    assert "keep" in left
    if corrupt:
        assert store.ds.get(bad_key).value.startswith(b'{"id": "testnet.bad.eth0"'), "corrupt record touched"
    if transient:
        assert n[0] == 3 and "busy" in left
        busy = store.get_handle(by_cid["busy"].id)
        assert all(block_holders(store)[str(a.ip)] == busy.id for a in busy.addresses)
    return rc, out, bad_key


def test_gc_mixed_corrupt_and_transient_failures_is_code_11(store, conf, monkeypatch, etcd_server, etcd_prefix):
    rc, out, bad_key = _gc_with(store, conf, monkeypatch, etcd_server, etcd_prefix, corrupt=True, transient=True)
    doc = assert_cni_error(rc, out, 11)     # retrying may help (the transient one): 11, not 113
    assert "2 handle(s)" in doc["msg"] and bad_key in doc["details"], doc


def test_gc_only_corrupt_failures_is_code_113(store, conf, monkeypatch, etcd_server, etcd_prefix):
    rc, out, bad_key = _gc_with(store, conf, monkeypatch, etcd_server, etcd_prefix, corrupt=True, transient=False)
    doc = assert_cni_error(rc, out, 113)    # retrying will not help: say so
    assert "1 handle(s)" in doc["msg"] and bad_key in doc["details"], doc


def test_gc_only_transient_failures_is_code_11(store, conf, monkeypatch, etcd_server, etcd_prefix):
    rc, out, _ = _gc_with(store, conf, monkeypatch, etcd_server, etcd_prefix, corrupt=False, transient=True)
    doc = assert_cni_error(rc, out, 11)
    assert "1 handle(s)" in doc["msg"] and "conflicting" in doc["details"], doc


# =========================================================================== snapshot txn refused
def _consistent(ipam):
    """No address held twice; handle records and blocks agree both ways."""
    hs = ipam.handles()
    ips = [str(a.ip) for h in hs for a in h.addresses]
    assert len(ips) == len(set(ips)), "duplicate address"
    assert block_holders(ipam) == {str(a.ip): h.id for h in hs for a in h.addresses}


def _warm(ipam, *cids, node="n1"):
    for cid in cids:
        ipam.assign(req(cid, node=node))
    assert ipam.snapshot is not None, "the snapshot did not warm up"


def test_snapshot_txn_refused_by_etcd_falls_back_to_the_usual_way(store, etcd_prefix):
    """etcd answering the ONE-request snapshot txn with an error (an etcd that refuses its
    compares, e.g. one without range compares): the ADD still succeeds by reading as usual,
    and this engine stops using snapshots."""
    refused = []

    def refuse_first(compares, ops):
        if not refused:
            refused.append(ipam.ds.requests - n0)   # requests sent by this ADD before this commit
            raise DatastoreError("etcdserver: unexpected compare (refused by this etcd)")

    ipam = IPAM(store.ds, etcd_prefix, use_snapshot=True)
    _warm(ipam, "a", "b")
    ipam.ds = Interposed(store.ds, refuse_first)
    n0 = store.ds.requests
    r = ipam.assign(req("c"))
    assert refused == [0], "the refused commit was not the snapshot's one-request txn"
    assert not r.existing and len(r.handle.addresses) == 1
    assert ipam.snapshot is None and not ipam.use_snapshot
    assert len(ipam.ds.commits) == 2                 # the refused one, then the usual one
    assert store.get_handle(r.handle.id).addresses == r.handle.addresses
    _consistent(store)
    # and on: the usual three requests, no snapshot
    n1 = store.ds.requests
    ipam.assign(req("d"))
    assert store.ds.requests - n1 == 3 and ipam.snapshot is None
    _consistent(store)


# =========================================================================== guards > MAX_TXN_OPS
def _apply_pools(ipam, pools: list[dict]):
    """Pools through the production validator and ``apply`` (one txn)."""
    docs = [manifest.Doc(f"test document {i + 1}", {"apiVersion": manifest.OUR_API_VERSION, "kind": manifest.POOL_KIND,
                                                 "metadata": {"name": p["name"]},
                                                 "spec": {k: v for k, v in p.items() if k != "name"}})
            for i, p in enumerate(pools)]
    return apply.apply(ipam, manifest.parse_resources(docs))


def _many_pools(n, start=0):
    # /28 pools of blockSize 28 in 10.212.0.0/16, named so that they sort after "aaa"
    return [{"name": f"p{i:03d}", "cidr": f"10.212.{i // 16}.{(i % 16) * 16}/28", "blockSize": 28}
            for i in range(start, start + n)]


def _no_txn_too_large(commits):
    for compares, ops in commits:
        assert len(compares) <= MAX_TXN_OPS and len(ops) <= MAX_TXN_OPS, \
            f"a txn etcd refuses was sent ({len(compares)} compares, {len(ops)} ops)"


def test_snapshot_is_not_kept_when_its_guards_would_not_fit_one_txn(store, etcd_prefix):
    _apply_pools(store, _many_pools(124))       # + pool-a: 125 pools, each guarded by the snapshot txn
    ipam = IPAM(Interposed(store.ds), etcd_prefix, use_snapshot=True)
    ipam.assign(req("claim", v4_pools=["pool-a"]))      # claims a block: no snapshot yet
    ipam.assign(req("cold", v4_pools=["pool-a"]))       # the usual way; its reads are NOT kept
    assert ipam.snapshot is None
    r = ipam.assign(req("next", v4_pools=["pool-a"]))
    assert ipam.use_snapshot and ipam.snapshot is None and ipam.snapshot_hits == 0
    assert r.handle.addresses[0].ip in N("10.210.0.0/24")
    _no_txn_too_large(ipam.ds.commits)
    _consistent(store)


def test_snapshot_too_large_to_guard_is_not_used(store, etcd_server, etcd_prefix):
    """A warm snapshot whose guard grew past one txn (here: a consistent view of a store that
    gained 124 pools, as a snapshot file written by a build with another size limit would be):
    the ADD goes the usual way -- no txn etcd would refuse is ever sent."""
    ipam = IPAM(Interposed(store.ds), etcd_prefix, use_snapshot=True)
    _warm(ipam, "a", "b")
    _apply_pools(store, _many_pools(124))
    snap = ipam.snapshot
    for kv in store.ds.get_prefix(store.keys.pools):
        snap.pools[kv.key] = (kv.mod_revision, kv.value)
    snap.revision = store.ds.last_revision             # everything in it is current: only its size is wrong
    assert len(snap.pools) == 125
    before = len(ipam.ds.commits)
    r = ipam.assign(req("c"))
    assert not r.existing and ipam.snapshot_hits == 0
    assert ipam.use_snapshot, "the snapshot txn was sent and refused instead of not being used"
    assert ipam.snapshot is None                       # and not kept: still too many guards
    assert len(ipam.ds.commits) == before + 1
    _no_txn_too_large(ipam.ds.commits)
    _consistent(store)


# =========================================================================== boundaries
def test_host_sized_pools_v4_32_and_v6_128_through_the_validator(store):
    """A /32 and a /128 pool (blockSize = the pool's prefix) pass the production validator
    (``manifest.parse_resources`` + ``apply``) and hand out their one address, once."""
    _apply_pools(store, [{"name": "host4", "cidr": "10.213.0.7/32", "blockSize": 32},
                         {"name": "host6", "cidr": "fd00:213::7/128", "blockSize": 128}])
    pools = {p.name: p for p in store.pools()}
    assert (pools["host4"].cidr, pools["host4"].block_size, pools["host4"].n_blocks) == (N("10.213.0.7/32"), 32, 1)
    assert (pools["host6"].cidr, pools["host6"].block_size, pools["host6"].n_blocks) == (N("fd00:213::7/128"), 128, 1)
    # the pure validator takes them too
    assert make_pool("h4", "10.213.0.8/32", 32).n_blocks == 1 and make_pool("h6", "fd00:213::8/128", 128).n_blocks == 1

    def add(cid):
        return store.assign(req(cid, mode="routed", assign_v6=True, v4_pools=["host4"], v6_pools=["host6"]))
    h = add("one").handle
    assert sorted(str(a.interface) for a in h.addresses) == ["10.213.0.7/32", "fd00:213::7/128"]
    before = dump(store.ds, store.keys.root.rstrip("/"))
    with pytest.raises(PoolExhausted) as ei:
        add("two")
    assert ei.value.code == 110
    assert dump(store.ds, store.keys.root.rstrip("/")) == before
    # bridge mode cannot use a one-address block (no room for a gateway): a clear config error
    from cni_ipam.ipam.errors import InvalidRequest
    with pytest.raises(InvalidRequest, match="too small") as ei:
        store.assign(req("br", v4_pools=["host4"]))
    assert ei.value.code == 7
    store.release(h.id)
    assert sorted(str(a.ip) for a in add("three").handle.addresses) == ["10.213.0.7", "fd00:213::7"]
    _consistent(store)


def _block(cidr, mode, allocations, free):
    return json.dumps({"cidr": cidr, "pool": "p", "node": "n", "mode": mode, "allocations": allocations,
                       "free": free, "seq": 1}).encode()


@pytest.mark.parametrize("cidr,n", [("10.0.0.0/29", 8), ("fd00::/126", 4), ("10.0.0.7/32", 1)])
def test_stored_ordinal_equal_to_the_block_size_is_corrupt(cidr, n):
    # the last ordinal is fine ...
    assert Block.from_json(_block(cidr, "routed", {str(n - 1): "h"}, [])).allocations == {n - 1: "h"}
    assert Block.from_json(_block(cidr, "routed", {}, [n - 1])).free == [n - 1]
    # ... one past it (== size) is not: it would be an address outside the block
    for allocations, free in (({str(n): "h"}, []), ({}, [n]), ({"-1": "h"}, []), ({}, [-1])):
        with pytest.raises(BlockError, match="out of range"):
            Block.from_json(_block(cidr, "routed", allocations, free))


@pytest.mark.parametrize("cidr,reserved", [("10.0.0.0/29", [0, 1, 7]), ("fd00::/125", [0, 1])])
def test_stored_bridge_block_listing_a_reserved_address_is_corrupt(cidr, reserved):
    """In bridge mode the network, gateway (and IPv4 broadcast) addresses are never handed
    out: a stored block whose free list (or allocations) holds one would hand out the node's
    gateway -- a duplicate -- so it is refused as corrupt (the engine reports 113)."""
    n = N(cidr).num_addresses
    ok = [o for o in range(n) if o not in reserved]
    assert Block.from_json(_block(cidr, "bridge", {}, ok)).free == ok
    for o in reserved:
        with pytest.raises(BlockError, match="reserved"):
            Block.from_json(_block(cidr, "bridge", {}, ok + [o]))
        with pytest.raises(BlockError, match="reserved"):
            Block.from_json(_block(cidr, "bridge", {str(o): "h"}, ok))
    # routed mode reserves nothing
    assert Block.from_json(_block(cidr, "routed", {}, list(range(n)))).free == list(range(n))


@pytest.mark.parametrize("value", [
    {"blockSize": 8},              # larger than the pool: used to crash the plugin (999)
    {"blockSize": 40},             # out of range for IPv4
    {"blockSize": True},
    {"blockSize": 23},             # a /23 block in a /24 pool
    {"blockSize": "28"},
    {"disabled": "no"},            # not a boolean (bool("no") would read it as disabled)
    {"cidr": "10.214.0.0"},        # no prefix: a /32 pool by accident? refused
    {"name": 7},
])
def test_stored_pool_that_breaks_the_pool_rules_is_corrupt(value, store, conf, etcd_prefix):
    raw = {"name": "bad", "cidr": "10.214.0.0/24", "blockSize": 28, **value}
    data = json.dumps(raw).encode()
    with pytest.raises(ValueError):
        Pool.from_json(data)
    key = store.keys.pool("bad")
    assert store.ds.commit([], [Put(key, data)])
    before = dump(store.ds, etcd_prefix)
    r = exec_plugin("ADD", conf())
    doc = assert_cni_error(r.rc, r.stdout, 113, r.stderr)
    assert key in doc["msg"], doc
    assert dump(store.ds, etcd_prefix) == before


# =========================================================================== fixed stored formats
# Bytes exactly as this code base writes them today (Pool/Block/Handle.to_json, the affinity
# value of IPAM._claim).  They must be read the same way by every later version: never edit
# them to follow a format change -- add a new fixture next to them instead.
POOL_V4 = (b'{"name":"edge","cidr":"10.90.0.0/24","blockSize":28,"disabled":false,'
           b'"nodeSelector":"rack == \'r1\'","allowedUses":["Workload"],"ipipMode":"CrossSubnet",'
           b'"natOutgoing":true,"disableBGPExport":false}')
POOL_V6 = (b'{"name":"v6","cidr":"fd00:90::/120","blockSize":124,"disabled":true,"nodeSelector":"all()",'
           b'"allowedUses":["Workload","Tunnel"]}')
BLOCK_BRIDGE = (b'{"cidr":"10.90.0.16/28","pool":"edge","node":"node-a","mode":"bridge",'
                b'"allocations":{"2":"net.c1.eth0","4":"net.c3.eth0"},"free":[5,6,7,8,9,10,11,12,13,14,3],"seq":4}')
BLOCK_ROUTED_EMPTY = (b'{"cidr":"10.90.0.32/28","pool":"edge","node":"node-b","mode":"routed","allocations":{},'
                      b'"free":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,0],"seq":2,"emptySince":1764500001.25}')
HANDLE = (b'{"id":"net.c1.eth0","node":"node-a","network":"net","containerID":"c1","ifname":"eth0",'
          b'"pod":"web-0","namespace":"shop","podUID":"0f4c","mode":"bridge","created":"2026-11-30T16:00:00Z",'
          b'"addresses":[{"ip":"10.90.0.18","block":"10.90.0.16/28","pool":"edge","prefixlen":28,'
          b'"gateway":"10.90.0.17"}]}')
AFFINITY = b'{"pool":"edge","mode":"bridge"}'
# layout 2 (handles keyed <net>/<cid>/<ifname>), as written by an ADD of today's plugin
BLOCK_L2 = (b'{"cidr":"10.90.0.80/28","pool":"edge","node":"node-a","mode":"bridge","allocations":{"2":"net/c2/eth0"},'
            b'"free":[3,4,5,6,7,8,9,10,11,12,13,14],"seq":1}')
HANDLE_L2 = (b'{"id":"net/c2/eth0","node":"node-a","network":"net","containerID":"c2","ifname":"eth0","pod":"web-1",'
             b'"namespace":"shop","podUID":"1a2b","mode":"bridge","created":"2026-11-30T16:31:55Z","addresses":'
             b'[{"ip":"10.90.0.82","block":"10.90.0.80/28","pool":"edge","prefixlen":28,"gateway":"10.90.0.81"}]}')


def test_fixed_pool_format_decodes_field_by_field():
    p = Pool.from_json(POOL_V4)
    assert p.name == "edge" and p.cidr == N("10.90.0.0/24") and p.block_size == 28 and p.disabled is False
    assert p.node_selector == "rack == 'r1'" and p.allowed_uses == ["Workload"]
    assert (p.ipip_mode, p.vxlan_mode, p.nat_outgoing, p.disable_bgp_export) == ("CrossSubnet", None, True, False)
    assert (p.n_blocks, p.block_addresses, p.block_at(1)) == (16, 16, N("10.90.0.16/28"))
    q = Pool.from_json(POOL_V6)
    assert q.name == "v6" and q.cidr == N("fd00:90::/120") and q.block_size == 124 and q.disabled is True
    assert q.node_selector == "all()" and q.allowed_uses == ["Workload", "Tunnel"]
    assert (q.ipip_mode, q.vxlan_mode, q.nat_outgoing, q.disable_bgp_export) == (None, None, None, None)
    # written back unchanged (a rewrite by a newer binary must not lose or rename a field)
    assert p.to_json() == POOL_V4 and q.to_json() == POOL_V6


def test_fixed_block_format_decodes_field_by_field():
    b = Block.from_json(BLOCK_BRIDGE)
    assert b.cidr == N("10.90.0.16/28") and b.pool == "edge" and b.node == "node-a" and b.mode == "bridge"
    assert b.allocations == {2: "net.c1.eth0", 4: "net.c3.eth0"}
    assert b.free == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3] and b.seq == 4 and b.empty_since == 0.0
    assert b.holder(A("10.90.0.18")) == "net.c1.eth0" and b.gateway == A("10.90.0.17")
    assert b.allocate("x") == A("10.90.0.21")          # the FIFO head: longest free first
    e = Block.from_json(BLOCK_ROUTED_EMPTY)
    assert e.cidr == N("10.90.0.32/28") and e.node == "node-b" and e.mode == "routed"
    assert e.allocations == {} and e.free == list(range(1, 16)) + [0] and e.seq == 2
    assert e.empty_since == 1764500001.25 and e.gateway is None
    assert Block.from_json(BLOCK_BRIDGE).to_json() == BLOCK_BRIDGE and e.to_json() == BLOCK_ROUTED_EMPTY


def test_fixed_handle_format_decodes_field_by_field():
    h = Handle.from_json(HANDLE)
    assert (h.id, h.node, h.network, h.container_id, h.ifname) == ("net.c1.eth0", "node-a", "net", "c1", "eth0")
    assert (h.pod, h.namespace, h.pod_uid, h.mode, h.created) == ("web-0", "shop", "0f4c", "bridge",
                                                                 "2026-11-30T16:00:00Z")
    (a,) = h.addresses
    assert (a.ip, a.block, a.pool, a.prefixlen, a.gateway) == (A("10.90.0.18"), N("10.90.0.16/28"), "edge", 28,
                                                               A("10.90.0.17"))
    assert str(a.interface) == "10.90.0.18/28"
    h2 = Handle.from_json(HANDLE_L2)
    assert (h2.id, h2.node, h2.network, h2.container_id, h2.ifname) == ("net/c2/eth0", "node-a", "net", "c2", "eth0")
    assert (h2.pod, h2.namespace, h2.pod_uid, h2.mode, h2.created) == ("web-1", "shop", "1a2b", "bridge",
                                                                      "2026-11-30T16:31:55Z")
    (a,) = h2.addresses
    assert (a.ip, a.block, a.pool, a.prefixlen, a.gateway) == (A("10.90.0.82"), N("10.90.0.80/28"), "edge", 28,
                                                               A("10.90.0.81"))
    b = Block.from_json(BLOCK_L2)
    assert b.allocations == {2: "net/c2/eth0"} and b.free == list(range(3, 15)) and b.seq == 1


def test_fixed_formats_in_etcd_are_used_by_today_engine(etcd_server, etcd_prefix, tmp_path):
    """The fixtures stored where their writers stored them (a store that went through the
    layout-1 -> layout-2 upgrade holds both): an ADD on node-a allocates the lowest block's
    FIFO head, CHECK and DEL find the handles of both layouts."""
    from cni_ipam.ipam.keys import Keys
    k = Keys(etcd_prefix)
    with open_datastore(etcd_server.endpoint, timeout=5) as ds:
        assert ds.commit([], [Put(k.pool("edge"), POOL_V4), Put(k.block(N("10.90.0.16/28")), BLOCK_BRIDGE),
                              Put(k.affinity_key("node-a", N("10.90.0.16/28")), AFFINITY),
                              Put(k.handles + "net.c1.eth0", HANDLE),
                              Put(k.block(N("10.90.0.80/28")), BLOCK_L2),
                              Put(k.affinity_key("node-a", N("10.90.0.80/28")), AFFINITY),
                              Put(k.handles + "net/c2/eth0", HANDLE_L2)])
        # (the fixture pool's nodeSelector matches no label of node-a: named in the config, it is used)
        c = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, version="1.1.0", name="net", ipv4_pools=["edge"])
        r = exec_plugin("ADD", c, container="new")
        assert r.rc == 0, r.stdout + r.stderr
        assert [ip["address"] for ip in r.out["ips"]] == ["10.90.0.21/28"]
        assert r.out["ips"][0]["gateway"] == "10.90.0.17"
        prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.90.0.18/28", "gateway": "10.90.0.17"}]}
        r = exec_plugin("CHECK", dict(c, prevResult=prev), container="c1")
        assert r.rc == 0, r.stdout + r.stderr
        r = exec_plugin("DEL", c, container="c1")
        assert r.rc == 0, r.stdout + r.stderr
        b = Block.from_json(ds.get(k.block(N("10.90.0.16/28"))).value)
        assert 2 not in b.allocations and b.free[-1] == 2 and b.allocations[4] == "net.c3.eth0"
        assert ds.get(k.handles + "net.c1.eth0") is None
        prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.90.0.82/28", "gateway": "10.90.0.81"}]}
        r = exec_plugin("CHECK", dict(c, prevResult=prev), container="c2")
        assert r.rc == 0, r.stdout + r.stderr
        r = exec_plugin("DEL", c, container="c2")
        assert r.rc == 0, r.stdout + r.stderr
        b = Block.from_json(ds.get(k.block(N("10.90.0.80/28"))).value)
        assert b.allocations == {} and b.free[-1] == 2
        assert ds.get(k.handles + "net/c2/eth0") is None

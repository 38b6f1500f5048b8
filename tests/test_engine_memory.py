"""The engine over the in-memory datastore (datastore/memory.py): no etcd, milliseconds a test.

Every retry path is driven by a REAL concurrent change made just before the engine's commit
(``MemoryStore.before_commit``: another client of the same store allocates, claims or reclaims
first), so the commit fails for the reason it would in production and the retry must re-read
and re-plan.  Each test asserts the outcome: addresses distinct, every handle agreeing with
its blocks and every block allocation with a handle, affinities matching block owners, and
nothing half-written after a failure (``consistent``).  The same datastore contract runs on
this datastore and on etcd (tests/test_datastore_contract.py).
"""
from __future__ import annotations

import ipaddress
import threading

import pytest

from cni_ipam.datastore import Put
from cni_ipam.datastore.memory import MemoryDatastore, MemoryStore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import InvalidRequest, PoolExhausted, TryAgain
from cni_ipam.ipam.keys import Keys, handle_id
from cni_ipam.ipam.model import Handle
from cni_ipam.ipam.pool import make_pool
from cni_ipam.ipam.reclaim import RECLAIM_EMPTY_AFTER, EmptyBlockWatch

A = ipaddress.ip_address
PREFIX = "/cni-ipam"


@pytest.fixture
def store():
    return MemoryStore()


def client(store, **kw) -> IPAM:
    """Another process of the same cluster: its own client of the shared store."""
    return IPAM(MemoryDatastore(store), PREFIX, **kw)


@pytest.fixture
def ipam(store):
    return client(store, max_retries=10)


def req(hid, node="n1", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def interfere(store, action, times=1, when=None):
    """Before each of the next ``times`` commits (those ``when(compares, ops)`` accepts), run
    ``action(i, ops)`` -- a concurrent writer that gets in first (``ops``: what the commit writes).  Returns the list of i's run."""
    ran: list[int] = []

    def hook(ds, compares, ops):
        if len(ran) < times and (when is None or when(compares, ops)):
            ran.append(len(ran))
            action(len(ran) - 1, ops)
    store.before_commit = hook
    return ran


def consistent(store) -> list:
    """The store's invariants; returns every allocated address."""
    k = Keys(PREFIX)
    data = store.dump(k.root)
    blocks = {key: Block.from_json(v) for key, v in data.items() if key.startswith(k.blocks)}
    handles = {k.handle_of_key(key): Handle.from_json(v) for key, v in data.items() if key.startswith(k.handles)}
    ips = []
    for hid, h in handles.items():
        assert h.id == hid
        for a in h.addresses:
            b = blocks.get(k.block(a.block))
            assert b is not None, f"{hid}: {a.ip} in a block that does not exist"
            assert b.holder(a.ip) == hid, f"{a.ip}: block says {b.holder(a.ip)!r}, handle says {hid!r}"
            ips.append(a.ip)
    assert len(ips) == len(set(ips)), f"an address held twice: {sorted(ips)}"
    held = set(ips)
    for key, b in blocks.items():
        for o, hid in b.allocations.items():
            assert b.ip(o) in held, f"{b.ip(o)} allocated to {hid!r} in {key}, no handle lists it"
    affinities = {key for key in data if key.startswith(k.affinity)}
    assert affinities == {k.affinity_key(b.node, b.cidr) for b in blocks.values() if b.node}
    return ips


def block_put(compares, ops) -> bool:
    """A commit that writes a block (an allocation, not a pool/config write)."""
    return any(isinstance(op, Put) and op.key.startswith(PREFIX + "/v1/blocks/") for op in ops)


# --------------------------------------------------------------------------- assign
def test_fast_path_conflict_rereads_and_takes_the_next_address(store, ipam):
    ipam.create_pool(make_pool("p", "10.1.0.0/24", 29))
    first = ipam.assign(req("h1")).handle.addresses[0]
    rival = client(store)
    got = []
    interfere(store, lambda i, ops: got.append(rival.assign(req("rival")).handle.addresses[0]))
    res = ipam.assign(req("h2"))
    a = res.handle.addresses[0]
    assert res.attempts == 2 and ipam.conflicts == 1
    # the rival took the address h2 had planned; h2 got the next one in the same block
    assert got[0].ip == first.ip + 1 and a.ip == first.ip + 2 and a.block == first.block
    assert sorted(consistent(store)) == [first.ip, first.ip + 1, first.ip + 2]


def test_claim_conflict_same_node_then_uses_the_claimed_block(store, ipam):
    ipam.create_pool(make_pool("p", "10.2.0.0/24", 29))
    rival = client(store)
    got = []
    interfere(store, lambda i, ops: got.append(rival.assign(req("rival")).handle.addresses[0]))
    res = ipam.assign(req("h1"))
    a = res.handle.addresses[0]
    assert res.attempts == 2
    # both claimed the same block for n1: the rival won, h1's retry allocates in its block
    assert a.block == got[0].block and a.ip != got[0].ip
    assert len(store.dump(Keys(PREFIX).node_affinity("n1"))) == 1
    assert len(consistent(store)) == 2


def test_claim_conflict_other_node_takes_the_block_then_claims_another(store, ipam):
    ipam.create_pool(make_pool("p", "10.3.0.0/28", 29))      # two /29 blocks
    rival = client(store)
    wanted = []

    def n2_claims_the_same_block(i, ops):
        blocks = [op.key for op in ops if op.key.startswith(PREFIX + "/v1/blocks/")]
        wanted.append(Keys(PREFIX).block_of_key(blocks[0]))
        rival.assign(req("rival", node="n2", requested=[wanted[0].network_address + 3]))
    interfere(store, n2_claims_the_same_block)
    res = ipam.assign(req("h1"))
    a = res.handle.addresses[0]
    assert res.attempts == 2
    assert a.block != wanted[0]             # n2 owns the block h1 first planned; h1 took the other one
    k = Keys(PREFIX)
    assert Block.from_json(store.dump()[k.block(wanted[0])]).node == "n2"
    assert Block.from_json(store.dump()[k.block(a.block)]).node == "n1"
    assert len(consistent(store)) == 2


def test_borrow_conflict_borrows_the_next_free_address(store, ipam):
    ipam.create_pool(make_pool("p", "10.4.0.0/30", 30))      # one routed /30: four addresses
    owner = client(store)
    for i in range(2):
        owner.assign(req(f"own{i}", mode="routed"))
    interfere(store, lambda i, ops: owner.assign(req("own-late", mode="routed")))
    res = ipam.assign(req("b1", node="n2", mode="routed"))
    a = res.handle.addresses[0]
    assert res.attempts == 2
    assert Block.from_json(store.dump()[Keys(PREFIX).block(a.block)]).node == "n1"   # borrowed
    assert len(consistent(store)) == 4
    store.before_commit = None
    with pytest.raises(PoolExhausted):
        ipam.assign(req("b2", node="n2", mode="routed"))
    assert len(consistent(store)) == 4


def test_reclaim_conflict_other_node_reclaims_first(store, ipam):
    ipam.create_pool(make_pool("p", "10.5.0.0/29", 29))      # one block
    gone = client(store)
    gone.assign(req("old", node="gone"))
    gone.release("old")
    clock = [1000.0]
    ipam.empty_watch = EmptyBlockWatch(clock=lambda: clock[0])
    rival = client(store)
    rival.empty_watch = EmptyBlockWatch(clock=lambda: clock[0])
    for who, node in ((ipam, "n3"), (rival, "n4")):     # both see the block empty, at one revision
        with pytest.raises(PoolExhausted):
            who.assign(req(f"first-{node}", node=node))
    clock[0] += RECLAIM_EMPTY_AFTER
    before = store.dump()
    got = []
    interfere(store, lambda i, ops: got.append(rival.assign(req("r", node="n4")).handle.addresses[0]),
              when=block_put)
    with pytest.raises(PoolExhausted):       # n4 reclaimed it first; bridge mode does not borrow
        ipam.assign(req("new", node="n3"))
    assert ipam.conflicts == 1
    k = Keys(PREFIX)
    after = store.dump()
    b = Block.from_json(after[k.block(got[0].block)])
    assert b.node == "n4" and b.holder(got[0].ip) == "r"
    assert k.handle("new") not in after and not store.dump(k.node_affinity("n3"))
    assert k.affinity_key("gone", b.cidr) in before and k.affinity_key("gone", b.cidr) not in after
    assert consistent(store) == [got[0].ip]


def test_dual_stack_conflict_on_one_family_writes_neither_until_the_retry(store, ipam):
    ipam.create_pool(make_pool("p4", "10.6.0.0/24", 29))
    ipam.create_pool(make_pool("p6", "fd00:6::/64", 125))
    ipam.assign(req("h1", assign_v6=True))
    rival = client(store)
    snapshots = []

    def v6_only(i, ops):
        snapshots.append(store.dump())
        rival.assign(req("rival6", assign_v4=False, assign_v6=True))
    interfere(store, v6_only)
    res = ipam.assign(req("h2", assign_v6=True))
    assert res.attempts == 2 and [a.ip.version for a in res.handle.addresses] == [4, 6]
    ips = consistent(store)
    assert len(ips) == 5
    # the refused attempt wrote nothing: between it and the retry only the rival's writes happened
    k = Keys(PREFIX)
    assert k.handle("h2") not in snapshots[0]


# --------------------------------------------------------------------------- release
def test_release_conflict_retries_and_keeps_the_others(store, ipam):
    ipam.create_pool(make_pool("p", "10.7.0.0/24", 29))
    h1 = ipam.assign(req("h1")).handle
    ipam.assign(req("h2"))
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(req("h3")))
    out = ipam.release("h1")
    assert out.addresses == h1.addresses and ipam.conflicts == 1
    assert ipam.get_handle("h1") is None
    assert {h.id for h in ipam.handles()} == {"h2", "h3"}
    assert h1.addresses[0].ip not in consistent(store)


def test_release_with_a_warm_snapshot_is_two_requests_and_keeps_it_current(store):
    """DEL on a node with a warm snapshot: its block is not read again (2 requests, not 3); the
    snapshot holds the block as written, so the next ADD is still one request."""
    ipam = client(store, use_snapshot=True)
    ipam.create_pool(make_pool("p", "10.12.0.0/24", 28))
    ipam.assign(req("h1"))
    ipam.assign(req("h2"))
    assert ipam.snapshot is not None
    n = ipam.ds.requests
    out = ipam.release("h1")
    assert ipam.ds.requests - n == 2 and out is not None and ipam.conflicts == 0
    n = ipam.ds.requests
    ipam.assign(req("h3"))
    assert ipam.ds.requests - n == 1 and ipam.snapshot_hits >= 1
    assert {h.id for h in ipam.handles()} == {"h2", "h3"}
    consistent(store)


def test_release_from_a_stale_snapshot_block_retries_with_a_fresh_read(store):
    """The snapshot's copy of the block is out of date (another client allocated from it after):
    the content compare refuses the txn, nothing is lost, the retry reads the block and frees
    exactly this handle's address."""
    ipam = client(store, use_snapshot=True, max_retries=5)
    ipam.create_pool(make_pool("p", "10.13.0.0/24", 28))
    ipam.assign(req("h1"))
    h2 = ipam.assign(req("h2")).handle
    rival = client(store)
    rival.assign(req("r1"))            # same node's block, written by another process: snapshot stale
    out = ipam.release("h2")
    assert out is not None and out.addresses == h2.addresses and ipam.conflicts == 1
    assert {h.id for h in ipam.handles()} == {"h1", "r1"}
    held = consistent(store)
    assert h2.addresses[0].ip not in held and len(held) == 2


def test_release_with_the_handle_record_the_add_wrote_is_one_request(store):
    """DEL with the handle record as this node's ADD wrote it (the plugin keeps it in a file) and a
    warm snapshot: ONE txn, guarded by the content of the handle, the config, the schema record
    and the block; the snapshot stays current (the next ADD is one request too)."""
    ipam = client(store, use_snapshot=True)
    ipam.create_pool(make_pool("p", "10.15.0.0/24", 28))
    ipam.assign(req("h1"))
    h2 = ipam.assign(req("h2")).handle
    key, rev, value = ipam.written_handle
    assert key == ipam.keys.handle("h2") and rev > 0 and value == ipam.ds.get(key).value
    n = ipam.ds.requests
    out = ipam.release("h2", cached=(rev, value))
    assert ipam.ds.requests - n == 1 and out.addresses == h2.addresses and ipam.conflicts == 0
    assert {h.id for h in ipam.handles()} == {"h1"} and h2.addresses[0].ip not in consistent(store)
    n = ipam.ds.requests
    ipam.assign(req("h3"))
    assert ipam.ds.requests - n == 1


@pytest.mark.parametrize("change", ["handle rewritten", "legacy record", "config changed", "handle gone"])
def test_release_with_a_stale_handle_record_goes_the_usual_way(store, change):
    """What the one-txn release was planned from changed after the ADD: the txn is refused
    (nothing written) and the release is done the usual way, exactly."""
    ipam = client(store, use_snapshot=True, max_retries=5)
    ipam.create_pool(make_pool("p", "10.16.0.0/24", 28))
    ipam.assign(req("h1"))
    h2 = ipam.assign(req("h2")).handle
    key, rev, value = ipam.written_handle
    other = client(store)
    if change == "handle rewritten":    # the same record, other bytes: a content compare sees it
        other.ds.commit([], [Put(key, value + b" ")])
    elif change == "legacy record":     # a record under the attachment's layout-1 id
        other.ds.commit([], [Put(ipam.keys.handle("h2-legacy"), value)])
    elif change == "config changed":
        from cni_ipam.ipam.model import IPAMConfig
        other.set_config(IPAMConfig(ip_cooldown_seconds=0, strict_affinity=True))
    else:
        other.release("h2")
    out = ipam.release("h2", legacy_id="h2-legacy", cached=(rev, value))
    assert ipam.conflicts == 1
    assert (out is None) == (change == "handle gone")
    if out is not None:
        assert out.addresses[0] == h2.addresses[0]
    assert {h.id for h in ipam.handles()} == {"h1"}
    held = consistent(store)
    assert h2.addresses[0].ip not in held and len(held) == 1


def test_release_snapshot_race_during_the_commit(store):
    """Another client writes the block between the plan and the commit: refused, re-read,
    released; the other client's allocation survives."""
    ipam = client(store, use_snapshot=True, max_retries=5)
    ipam.create_pool(make_pool("p", "10.14.0.0/24", 28))
    ipam.assign(req("h1"))
    ipam.assign(req("h2"))
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(req("r1")), when=block_put)
    ipam.release("h1")
    assert ipam.conflicts == 1
    assert {h.id for h in ipam.handles()} == {"h2", "r1"}
    assert len(consistent(store)) == 2


def test_release_ips_conflict_on_a_dual_stack_handle(store, ipam):
    ipam.create_pool(make_pool("p4", "10.8.0.0/24", 29))
    ipam.create_pool(make_pool("p6", "fd00:8::/64", 125))
    h = ipam.assign(req("h1", assign_v6=True)).handle
    v4, v6 = h.addresses
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(req("rival")))
    assert ipam.release_ips([v4.ip]) == [(str(v4.ip), "h1")]
    assert ipam.conflicts == 1
    left = ipam.get_handle("h1")
    assert [a.ip for a in left.addresses] == [v6.ip]
    ips = consistent(store)
    assert v4.ip not in ips and v6.ip in ips and len(ips) == 2


def test_release_ips_of_a_single_address_handle_conflict(store, ipam):
    ipam.create_pool(make_pool("p", "10.9.0.0/24", 29))
    a = ipam.assign(req("h1")).handle.addresses[0]
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(req("rival")))
    assert ipam.release_ips([a.ip]) == [(str(a.ip), "h1")]
    assert ipam.conflicts == 1 and ipam.get_handle("h1") is None
    assert a.ip not in consistent(store)


def test_gc_conflict_releases_all_it_should(store, ipam):
    ipam.create_pool(make_pool("p", "10.10.0.0/24", 28))
    hid = {cid: handle_id("net", cid, "eth0") for cid in ("c1", "c2", "c3", "r0", "r1")}
    for cid in ("c1", "c2", "c3"):
        ipam.assign(AssignRequest(handle_id=hid[cid], node="n1", network="net", container_id=cid,
                                  ifname="eth0"))
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(AssignRequest(
        handle_id=hid[f"r{i}"], node="n1", network="net", container_id=f"r{i}", ifname="eth0")), times=2)
    released, failed = ipam.gc("net", "n1", keep={("c1", "eth0"), ("r0", "eth0"), ("r1", "eth0")})
    assert sorted(released) == [hid["c2"], hid["c3"]] and failed == []
    assert ipam.conflicts == 2
    assert {h.id for h in ipam.handles()} == {hid["c1"], hid["r0"], hid["r1"]}
    assert len(consistent(store)) == 3


# --------------------------------------------------------------------------- snapshot
def test_snapshot_miss_rereads_then_hits_again(store):
    ipam = client(store, use_snapshot=True)
    ipam.create_pool(make_pool("p", "10.11.0.0/24", 28))
    ipam.assign(req("h1"))                       # claims: no snapshot kept
    ipam.assign(req("h2"))                       # fast path, fresh reads: snapshot kept
    assert ipam.snapshot is not None
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(req("rival")))
    res = ipam.assign(req("h3"))
    assert ipam.snapshot_misses == 1 and ipam.snapshot_hits == 0
    assert res.handle.addresses[0].ip not in {h.addresses[0].ip for h in rival.handles() if h.id != "h3"}
    store.before_commit = None
    n = ipam.ds.requests
    ipam.assign(req("h4"))
    assert ipam.ds.requests - n == 1 and ipam.snapshot_hits == 1
    assert len(consistent(store)) == 5


def test_snapshot_miss_on_a_changed_pool_replans(store):
    """A pool disabled behind the snapshot's back: the one-txn ADD is refused (content compare)
    and the re-read sees the pool disabled -- nothing is allocated from it."""
    from cni_ipam.ipam.pool import Pool
    ipam = client(store, use_snapshot=True)
    ipam.create_pool(make_pool("p", "10.12.0.0/24", 28))
    ipam.assign(req("h1"))
    ipam.assign(req("h2"))
    assert ipam.snapshot is not None
    k = Keys(PREFIX)
    admin_ds = MemoryDatastore(store)

    def disable(i, ops):
        kv = admin_ds.get(k.pool("p"))
        p = Pool.from_json(kv.value)
        p.disabled = True
        assert admin_ds.commit([], [Put(k.pool("p"), p.to_json())])
    interfere(store, disable)
    before = store.dump()
    with pytest.raises(InvalidRequest, match="no enabled IPv4 pool"):
        ipam.assign(req("h3"))
    assert ipam.snapshot_misses == 1
    after = store.dump()
    assert set(after) == set(before) and Pool.from_json(after[k.pool("p")]).disabled
    assert {key: v for key, v in after.items() if key != k.pool("p")} == \
        {key: v for key, v in before.items() if key != k.pool("p")}
    assert len(consistent(store)) == 2


# --------------------------------------------------------------------------- giving up
def test_gives_up_after_max_retries_and_writes_nothing(store):
    ipam = client(store, max_retries=4)
    ipam.create_pool(make_pool("p", "10.13.0.0/24", 29))
    ipam.assign(req("h1"))
    before = store.dump()
    store.fail_next_commits(1000)
    with pytest.raises(TryAgain, match="gave up after 4 conflicting attempts"):
        ipam.assign(req("h2"))
    assert store.dump() == before and store.refused == 4
    with pytest.raises(TryAgain, match="gave up after 4"):
        ipam.release("h1")
    assert store.dump() == before


def test_gives_up_under_a_real_writer_that_always_wins(store):
    ipam = client(store, max_retries=3)
    ipam.create_pool(make_pool("p", "10.14.0.0/24", 27))
    ipam.assign(req("h0"))
    rival = client(store)
    interfere(store, lambda i, ops: rival.assign(req(f"rival{i}")), times=100)
    with pytest.raises(TryAgain):
        ipam.assign(req("h1"))
    assert ipam.get_handle("h1") is None
    assert {h.id for h in rival.handles()} == {"h0", "rival0", "rival1", "rival2"}
    assert len(consistent(store)) == 4


# --------------------------------------------------------------------------- threads
def test_threads_racing_never_duplicate(store):
    setup = client(store)
    setup.create_pool(make_pool("p", "10.15.0.0/24", 29))   # 32 blocks x 5 = 160 addresses
    results, errors = [], []

    def worker(node, t):
        ipam = client(store)
        for i in range(9):
            try:
                results.append(ipam.assign(req(f"{node}-{t}-{i}", node=node)).handle)
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"n{n}", t)) for n in range(4) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(results) == 72 and len(consistent(store)) == 72

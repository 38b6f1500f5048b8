"""The engine against the real etcd started by the test session (no mocks)."""
import ipaddress
import threading

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import (AddressUnavailable, CorruptData, InvalidRequest, PoolExhausted,
                                  TryAgain)
from cni_ipam.ipam.model import IPAMConfig
from cni_ipam.ipam.pool import make_pool

A = ipaddress.ip_address


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    yield IPAM(ds, etcd_prefix)
    ds.close()


def req(hid, node="n1", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def dump(ipam):
    """Every key/value under the prefix (to assert nothing changed)."""
    return {kv.key: kv.value for kv in ipam.ds.get_prefix(ipam.keys.root)}


def test_bridge_mode_claims_block_and_hands_out_hosts(ipam):
    ipam.create_pool(make_pool("p", "10.10.0.0/24", 29))
    r1 = ipam.assign(req("h1"))
    a = r1.handle.addresses[0]
    blk = a.block
    assert blk.prefixlen == 29 and blk.subnet_of(ipaddress.ip_network("10.10.0.0/24"))
    assert a.ip == blk.network_address + 2 and a.gateway == blk.network_address + 1
    assert a.prefixlen == 29 and not r1.existing
    # the second ADD on the node uses the same block
    a2 = ipam.assign(req("h2")).handle.addresses[0]
    assert a2.block == blk and a2.ip == blk.network_address + 3
    # the affinity record exists and the handle index is written
    assert ipam.ds.get(ipam.keys.affinity_key("n1", blk)) is not None
    assert ipam.get_handle("h1").addresses[0].ip == a.ip
    assert ipam.verify_handle(ipam.get_handle("h2")) == []


def test_add_is_idempotent_and_release_twice_is_fine(ipam):
    ipam.create_pool(make_pool("p", "10.10.0.0/24", 29))
    first = ipam.assign(req("h1")).handle
    again = ipam.assign(req("h1"))
    assert again.existing and again.handle.addresses == first.addresses
    assert len(ipam.handles()) == 1
    released = ipam.release("h1")
    assert released.addresses == first.addresses
    assert ipam.get_handle("h1") is None
    assert ipam.release("h1") is None
    b = Block.from_json(ipam.ds.get(ipam.keys.block(first.addresses[0].block)).value)
    assert b.in_use == 0


def test_fifo_reuse_through_etcd(ipam):
    ipam.create_pool(make_pool("p", "10.10.0.0/24", 28))
    ips = [ipam.assign(req(f"h{i}")).handle.addresses[0].ip for i in range(3)]
    ipam.release("h0")
    nxt = ipam.assign(req("h3")).handle.addresses[0].ip
    assert nxt not in ips  # the just-released h0 address waits behind older free ones


def test_full_block_claims_next_and_bridge_never_borrows(ipam):
    ipam.create_pool(make_pool("p", "10.10.0.0/28", 29))   # two /29 blocks, 5 hosts each
    got = [ipam.assign(req(f"h{i}")).handle.addresses[0] for i in range(5)]
    assert len({a.block for a in got}) == 1
    n2 = ipam.assign(req("x", node="n2")).handle.addresses[0]
    assert n2.block != got[0].block
    with pytest.raises(PoolExhausted, match="bridge mode never borrows"):
        ipam.assign(req("h5"))
    assert ipam.get_handle("h5") is None


def test_routed_mode_borrows_unless_strict(ipam):
    ipam.create_pool(make_pool("p", "10.20.0.0/29", 30))   # two /30 blocks, 4 addresses each
    for i in range(6):
        ipam.assign(req(f"a{i}", mode="routed"))
    assert len(ipam.ds.get_prefix(ipam.keys.node_affinity("n1"))) == 2
    # n2 cannot claim a block (none left) but borrows n1's last free addresses
    b = ipam.assign(req("b0", node="n2", mode="routed", gateways={4: A("169.254.1.1")})).handle.addresses[0]
    assert b.prefixlen == 32 and b.gateway == A("169.254.1.1")
    assert Block.from_json(ipam.ds.get(ipam.keys.block(b.block)).value).node == "n1"
    ipam.set_config(IPAMConfig(strict_affinity=True))
    with pytest.raises(PoolExhausted, match="strict affinity"):
        ipam.assign(req("b1", node="n2", mode="routed"))


def test_max_blocks_per_host_and_no_auto_allocation(ipam):
    ipam.create_pool(make_pool("p", "10.30.0.0/24", 29))
    ipam.set_config(IPAMConfig(max_blocks_per_host=1))
    for i in range(5):
        ipam.assign(req(f"h{i}"))
    with pytest.raises(PoolExhausted, match="maxBlocksPerHost"):
        ipam.assign(req("h5"))
    ipam.set_config(IPAMConfig(auto_allocate_blocks=False, strict_affinity=True))
    with pytest.raises(PoolExhausted, match="automatic block allocation is off"):
        ipam.assign(req("other", node="n2"))


def test_requested_address_rules_leave_nothing_behind(ipam):
    ipam.create_pool(make_pool("p", "10.40.0.0/24", 29))
    ipam.create_pool(make_pool("off", "10.41.0.0/24", 29, disabled=True))
    got = ipam.assign(req("h1", requested=[A("10.40.0.42")])).handle.addresses[0]
    assert got.ip == A("10.40.0.42") and got.block == ipaddress.ip_network("10.40.0.40/29")
    before = dump(ipam)
    for ip, exc, msg in [("10.40.0.42", AddressUnavailable, "already allocated"),
                         ("10.40.0.41", AddressUnavailable, "reserved"),
                         ("10.99.0.1", InvalidRequest, "not in any pool"),
                         ("10.41.0.5", InvalidRequest, "disabled")]:
        with pytest.raises(exc, match=msg):
            ipam.assign(req("h2", requested=[A(ip)]))
    assert dump(ipam) == before


def test_dual_stack_failure_rolls_back_both(ipam):
    ipam.create_pool(make_pool("p4", "10.50.0.0/24", 29))
    before = dump(ipam)
    with pytest.raises(InvalidRequest, match="IPv6"):
        ipam.assign(req("h1", assign_v6=True))
    assert dump(ipam) == before
    ipam.create_pool(make_pool("p6", "fd00:50::/64", 125))
    h = ipam.assign(req("h1", assign_v6=True)).handle
    assert [a.ip.version for a in h.addresses] == [4, 6]
    assert h.addresses[1].gateway == h.addresses[1].block.network_address + 1


def test_pool_choice_by_name_and_cidr(ipam):
    ipam.create_pool(make_pool("a", "10.60.0.0/24", 29))
    ipam.create_pool(make_pool("b", "10.61.0.0/24", 29))
    assert ipam.assign(req("h1", v4_pools=["b"])).handle.addresses[0].pool == "b"
    assert ipam.assign(req("h2", v4_pools=["10.60.0.0/24"])).handle.addresses[0].pool == "a"
    with pytest.raises(InvalidRequest, match="'zzz'.*does not exist"):
        ipam.assign(req("h3", v4_pools=["zzz"]))


def test_fast_path_is_three_requests(ipam):
    """Without a snapshot (the default; with one it is 1 request: tests/test_snapshot.py)."""
    ipam.create_pool(make_pool("p", "10.70.0.0/24", 26))
    ipam.assign(req("warm"))
    n = ipam.ds.requests
    ipam.assign(req("fast"))
    assert ipam.ds.requests - n == 3
    n = ipam.ds.requests
    ipam.release("fast")
    assert ipam.ds.requests - n == 3


def test_gc_releases_only_this_network_and_node(ipam):
    ipam.create_pool(make_pool("p", "10.80.0.0/24", 28))
    for hid, node, net in [("net.c1.eth0", "n1", "net"), ("net.c2.eth0", "n1", "net"),
                           ("net.c3.eth0", "n2", "net"), ("other.c4.eth0", "n1", "other")]:
        ipam.assign(AssignRequest(handle_id=hid, node=node, network=net, container_id=hid.split(".")[1],
                                  ifname="eth0"))
    released, failed = ipam.gc("net", "n1", keep={("c1", "eth0")})
    assert released == ["net.c2.eth0"] and failed == []
    assert {h.id for h in ipam.handles()} == {"net.c1.eth0", "net.c3.eth0", "other.c4.eth0"}


def test_corrupt_block_is_reported_and_not_overwritten(ipam):
    ipam.create_pool(make_pool("p", "10.90.0.0/24", 29))
    blk = ipam.assign(req("h1")).handle.addresses[0].block
    key = ipam.keys.block(blk)
    ipam.ds.commit([], [__import__("cni_ipam.datastore", fromlist=["Put"]).Put(key, b"{garbage")])
    with pytest.raises(CorruptData, match=key):
        ipam.assign(req("h2"))
    with pytest.raises(CorruptData, match=key):
        ipam.release("h1")
    assert ipam.ds.get(key).value == b"{garbage"


def test_unreachable_etcd_is_try_again(etcd_prefix):
    from tests.support.etcd import free_port
    ds = open_datastore(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    with pytest.raises(TryAgain, match="etcd unavailable"):
        IPAM(ds, etcd_prefix).assign(req("h"))


def test_concurrent_nodes_never_duplicate(etcd_server, etcd_prefix):
    """Four nodes, two threads each, all racing over one small pool (CAS conflicts)."""
    setup = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    setup.create_pool(make_pool("p", "10.100.0.0/24", 29))   # 32 blocks x 5 = 160 addresses
    results, errors = [], []

    def worker(node, t):
        ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
        for i in range(9):
            try:
                results.append(ipam.assign(req(f"{node}-{t}-{i}", node=node)).handle)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"n{n}", t)) for n in range(4) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    ips = [h.addresses[0].ip for h in results]
    assert len(ips) == 72 and len(set(ips)) == 72
    for h in results:
        assert setup.verify_handle(h) == []
        blk = Block.from_json(setup.ds.get(setup.keys.block(h.addresses[0].block)).value)
        assert blk.node == h.node  # bridge mode: every address is in its own node's block


def test_claim_after_a_dense_run_is_found_in_few_requests(ipam):
    """Other nodes hold a dense run of blocks right where this node starts looking:
    the claim still finds a free block, in a handful of requests."""
    from cni_ipam.datastore import Put
    from cni_ipam.ipam.pool import start_index
    pool = make_pool("p", "10.110.0.0/16", 28)            # 4096 blocks
    ipam.create_pool(pool)
    start = start_index("n1", pool.n_blocks)
    taken = [(start + i) % pool.n_blocks for i in range(1500)]
    for chunk in range(0, len(taken), 100):
        ipam.ds.commit([], [Put(ipam.keys.block(pool.block_at(i)),
                                Block.new(pool.block_at(i), "p", "other", "bridge").to_json())
                            for i in taken[chunk:chunk + 100]])
    n = ipam.ds.requests
    a = ipam.assign(req("h1")).handle.addresses[0]
    assert pool.block_index(a.block) not in set(taken) and a.block.subnet_of(pool.cidr)
    assert Block.from_json(ipam.ds.get(ipam.keys.block(a.block)).value).node == "n1"
    # batched read + own window + probe windows (the first lies inside the run) + commit
    assert ipam.ds.requests - n <= 6


def test_empty_blocks_of_gone_nodes_are_reclaimed_when_the_pool_is_out_of_blocks(ipam):
    """Node churn must not exhaust a small pool: a block that another node emptied more
    than RECLAIM_EMPTY_AFTER ago is taken over (one txn); a recently emptied one is not."""
    from cni_ipam.datastore import Put
    from cni_ipam.ipam import engine as eng
    ipam.create_pool(make_pool("p", "10.120.0.0/28", 29))     # two /29 blocks
    a = ipam.assign(req("old-a", node="gone-1")).handle.addresses[0]
    b = ipam.assign(req("old-b", node="gone-2")).handle.addresses[0]
    ipam.release("old-a")
    ipam.release("old-b")
    # n3 first sees both blocks empty (by its own clock): nothing is taken yet
    clock = [1000.0]
    ipam.empty_watch = eng.EmptyBlockWatch(clock=lambda: clock[0])
    key_a = ipam.keys.block(a.block)
    with pytest.raises(PoolExhausted):
        ipam.assign(req("new", node="n3"))
    # gone-2's block changes meanwhile (written again: a new revision); gone-1's stays as it was
    key_b = ipam.keys.block(b.block)
    ipam.ds.commit([], [Put(key_b, ipam.ds.get(key_b).value)])
    clock[0] += eng.RECLAIM_EMPTY_AFTER
    got = ipam.assign(req("new", node="n3")).handle.addresses[0]
    assert got.block == a.block
    taken = Block.from_json(ipam.ds.get(key_a).value)
    assert taken.node == "n3" and taken.holder(got.ip) == "new"
    assert ipam.ds.get(ipam.keys.affinity_key("gone-1", a.block)) is None
    assert ipam.ds.get(ipam.keys.affinity_key("n3", a.block)) is not None
    # gone-2's block was seen empty at its new revision only just now: not taken
    with pytest.raises(PoolExhausted):
        ipam.assign(req("other", node="n4"))
    clock[0] += eng.RECLAIM_EMPTY_AFTER - 1
    with pytest.raises(PoolExhausted):
        ipam.assign(req("other", node="n4"))
    clock[0] += 1
    assert ipam.assign(req("other", node="n4")).handle.addresses[0].block == b.block
    assert Block.from_json(ipam.ds.get(ipam.keys.block(b.block)).value).node == "n4"


def test_create_pool_is_apply_with_its_validator_and_poolset_guard(ipam):
    """``IPAM.create_pool`` (how tests set up pools) runs the manifest validator and the
    pool-set-guarded transaction of ``cni-ipam apply``: one rule set, and overlapping creates
    cannot both commit."""
    from cni_ipam.ipam import apply, manifest
    from cni_ipam.ipam.errors import AdminError, Conflict
    from cni_ipam.ipam.pool import Pool
    ipam.create_pool(make_pool("a", "10.130.0.0/24", 29))
    assert ipam.ds.get(apply.poolset_key(ipam.keys)) is not None     # the marker apply bumps
    with pytest.raises(AdminError, match='IPPool "a" already exists'):
        ipam.create_pool(make_pool("a", "10.131.0.0/24", 29))
    with pytest.raises(manifest.ManifestError, match='overlaps pool "a"'):
        ipam.create_pool(make_pool("b", "10.130.0.128/25", 29))
    # a Pool built by hand (bypassing make_pool) still meets the manifest rules
    with pytest.raises(manifest.ManifestError, match="loopback"):
        ipam.create_pool(Pool(name="lo", cidr=ipaddress.ip_network("127.0.0.0/24"), block_size=29))
    # an apply and a create racing to add overlapping pools: the one committing second loses
    doc = manifest.Doc("race", {"apiVersion": manifest.OUR_API_VERSION, "kind": manifest.POOL_KIND,
                                "metadata": {"name": "c"}, "spec": {"cidr": "10.132.0.0/24", "blockSize": 29}})
    with pytest.raises(Conflict):
        apply.apply(ipam, manifest.parse_resources([doc]),
                    before_commit=lambda: ipam.create_pool(make_pool("d", "10.132.0.0/25", 29)))
    assert sorted(p.name for p in ipam.pools()) == ["a", "d"]

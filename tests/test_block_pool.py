"""Pure block and pool logic: no etcd."""
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from cni_ipam.ipam.block import BRIDGE, ROUTED, Block, BlockError, usable_in_mode
from cni_ipam.ipam.errors import InvalidRequest
from cni_ipam.ipam.keys import Keys, block_from_id, block_id, escape, unescape
from cni_ipam.ipam.pool import (PoolError, find_free_block, make_pool, pool_of_ip, select_pools,
                                start_index)

N4 = ipaddress.IPv4Network
A = ipaddress.ip_address


# -- blocks -----------------------------------------------------------------------

def test_bridge_block_reserves_network_gateway_broadcast():
    b = Block.new(N4("10.0.0.0/29"), "p", "n1", BRIDGE)
    assert b.capacity == 5
    assert b.gateway == A("10.0.0.1")
    got = [b.allocate(f"h{i}") for i in range(5)]
    assert got == [A(f"10.0.0.{i}") for i in (2, 3, 4, 5, 6)]
    with pytest.raises(BlockError, match="full"):
        b.allocate("x")
    for ip in ("10.0.0.0", "10.0.0.1", "10.0.0.7"):
        assert b.holder(A(ip)) is None


def test_routed_block_uses_every_address():
    b = Block.new(N4("10.0.0.0/30"), "p", "n1", ROUTED)
    assert [b.allocate("h") for _ in range(4)] == [A(f"10.0.0.{i}") for i in range(4)]
    assert b.gateway is None


def test_v6_bridge_reserves_subnet_anycast_and_gateway():
    b = Block.new(ipaddress.IPv6Network("fd00::/126"), "p", "n", BRIDGE)
    assert b.capacity == 2
    assert b.allocate("h") == A("fd00::2")


def test_too_small_for_bridge():
    assert not usable_in_mode(31, 4, BRIDGE) and not usable_in_mode(32, 4, BRIDGE)
    assert usable_in_mode(30, 4, BRIDGE) and usable_in_mode(32, 4, ROUTED)
    assert not usable_in_mode(127, 6, BRIDGE) and usable_in_mode(126, 6, BRIDGE)
    with pytest.raises(BlockError, match="too small"):
        Block.new(N4("10.0.0.0/31"), "p", "n", BRIDGE)


def test_specific_address_and_reserved():
    b = Block.new(N4("10.0.0.0/29"), "p", "n", BRIDGE)
    assert b.allocate("h1", A("10.0.0.5")) == A("10.0.0.5")
    with pytest.raises(BlockError, match="already allocated"):
        b.allocate("h2", A("10.0.0.5"))
    with pytest.raises(BlockError, match="reserved"):
        b.allocate("h2", A("10.0.0.1"))
    with pytest.raises(BlockError, match="not in block"):
        b.allocate("h2", A("10.0.1.5"))


def test_release_checks_holder_and_json_roundtrip():
    b = Block.new(N4("10.0.0.0/28"), "p", "n", BRIDGE)
    ip = b.allocate("h1")
    assert not b.release(ip, "other")
    assert b.holder(ip) == "h1"
    b2 = Block.from_json(b.to_json())
    assert b2 == b
    assert b2.release(ip, "h1") and not b2.release(ip, "h1")


@pytest.mark.parametrize("raw", [b"{", b"[]", b'{"cidr":"10.0.0.0/29"}',
                                 b'{"cidr":"10.0.0.0/29","pool":"p","allocations":{"9":"h"},"free":[]}',
                                 b'{"cidr":"10.0.0.0/29","pool":"p","allocations":{"2":"h"},"free":[2]}',
                                 b'{"cidr":"10.0.0.0/29","pool":"p","allocations":{},"free":[1,1]}'])
def test_corrupt_block_is_rejected(raw):
    with pytest.raises(BlockError):
        Block.from_json(raw)


ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(0, 10**6)),
                         st.tuples(st.just("release"), st.integers(0, 63))), max_size=300)


@settings(max_examples=200, deadline=None)
@given(ops=ops, mode=st.sampled_from([BRIDGE, ROUTED]), plen=st.integers(26, 30))
def test_property_no_double_allocation_and_fifo_reuse(ops, mode, plen):
    """No address is ever held twice; an allocation never returns a just-released
    address while an address free for longer exists (FIFO reuse)."""
    b = Block.new(N4(f"10.1.0.0/{plen}"), "p", "n", mode)
    held: dict = {}
    free_since: dict = {b.ip(o): -1 for o in b.free}   # when each free address became free
    clock = 0
    for op, arg in ops:
        clock += 1
        if op == "alloc":
            if not b.free:
                with pytest.raises(BlockError):
                    b.allocate("h")
                continue
            ip = b.allocate(f"h{arg}")
            assert ip not in held
            # the chosen address has been free at least as long as every other
            assert free_since[ip] == min(free_since.values())
            del free_since[ip]
            held[ip] = f"h{arg}"
        else:
            if not held:
                continue
            ip = sorted(held)[arg % len(held)]
            assert b.release(ip, held.pop(ip))
            free_since[ip] = clock
        assert len(b.allocations) == len(held)
        assert set(b.allocations) .isdisjoint(b.free)
    assert Block.from_json(b.to_json()) == b


# -- keys ----------------------------------------------------------------------

@given(st.text(max_size=40))
def test_escape_roundtrip_and_no_slash(name):
    e = escape(name)
    assert "/" not in e and e.isascii()
    assert unescape(e) == name


def test_block_ids_sort_numerically():
    nets = [N4("10.0.0.0/26"), N4("10.0.0.64/26"), N4("10.0.1.0/26"), N4("9.255.255.192/26")]
    assert sorted(nets, key=block_id) == sorted(nets)
    for n in nets + [ipaddress.IPv6Network("fd00::40/122")]:
        assert block_from_id(block_id(n)) == n
    k = Keys("/x/")
    assert k.block(nets[0]) == "/x/v1/blocks/v4/0a000000-26"
    assert k.handle("net.a/b.eth0") == "/x/v1/handles/net.a%2Fb.eth0"


# -- pools ---------------------------------------------------------------------

def test_pool_validation():
    p = make_pool("ext", "172.16.0.0/26", 29)
    assert p.n_blocks == 8 and p.block_at(7) == N4("172.16.0.56/29")
    assert make_pool("d", "10.0.0.0/16").block_size == 26
    assert make_pool("d6", "fd00::/48").block_size == 122
    for args, msg in [(("x", "10.0.0.1/24", 26), "has host bits set"), (("x", "10.0.0.0/33", 26), "not a valid CIDR"),
                      (("x", "127.0.0.0/24", 26), "loopback"), (("x", "::ffff:0:0/120", 122), "IPv4-mapped"),
                      (("X_bad", "10.0.0.0/24", 26), "not a valid name"), (("x", "10.0.0.0/24", 19), "out of range"),
                      (("x", "10.0.0.0/24", 33), "out of range"), (("x", "fd00::/64", 115), "out of range"),
                      (("x", "10.0.0.0/28", 26), "larger than the pool"),
                      (("x", "169.254.0.0/24", 26), "link-local"), (("x", "fe80::/64", 122), "link-local")]:
        with pytest.raises(PoolError, match=msg):
            make_pool(*args)


def test_select_pools_by_name_cidr_and_default():
    a = make_pool("a", "10.0.0.0/24", 29)
    b = make_pool("b", "10.1.0.0/24", 29, disabled=True)
    c = make_pool("c", "10.2.0.0/24", 31)
    six = make_pool("six", "fd00::/64", 122)
    pools = [c, b, a, six]
    assert select_pools(4, ["10.0.0.0/24"], pools, BRIDGE) == [a]
    assert select_pools(4, None, pools, ROUTED) == [a, c]
    assert select_pools(4, None, pools, BRIDGE) == [a]        # c's /31 blocks unusable in bridge
    assert select_pools(6, None, pools, BRIDGE) == [six]
    with pytest.raises(InvalidRequest, match="does not exist"):
        select_pools(4, ["nope"], pools, BRIDGE)
    with pytest.raises(InvalidRequest, match="disabled"):
        select_pools(4, ["b"], pools, BRIDGE)
    with pytest.raises(InvalidRequest, match="too small"):
        select_pools(4, ["c"], pools, BRIDGE)
    with pytest.raises(InvalidRequest, match="matches this node"):
        select_pools(4, None, pools, BRIDGE, node_matches=lambda p: False)
    assert pool_of_ip(A("10.2.0.9"), pools) is c and pool_of_ip(A("11.0.0.1"), pools) is None


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 3000), data=st.data())
def test_property_find_free_block(n, data):
    claimed = data.draw(st.sets(st.integers(0, n - 1), max_size=n))
    if data.draw(st.booleans()):  # dense runs are the hard case
        lo = data.draw(st.integers(0, n - 1))
        claimed |= set(range(lo, min(n, lo + data.draw(st.integers(0, 2000)))))
    start = data.draw(st.integers(0, n - 1))
    calls = {"list": 0, "count": 0}

    def list_from(lo, hi, limit):
        calls["list"] += 1
        return sorted(i for i in claimed if lo <= i < hi)[:limit]

    def counts_in(ranges):
        calls["count"] += 1
        return [sum(1 for i in claimed if lo <= i < hi) for lo, hi in ranges]

    got = find_free_block(n, start, list_from, counts_in, scan=16, fanout=8, probes=4)
    free = set(range(n)) - claimed
    if not free:
        assert got is None
    else:
        assert got in free
        # a gap that the first listing of the node's own window (64 indexes, at most 16
        # keys returned) reaches is taken first, lowest first
        window = [i for i in range(start, min(n, start + 64)) if i in free]
        if window and sum(1 for i in claimed if start <= i < window[0]) < 16:
            assert got == window[0]
    # one listing for the own window, at most 4 probes, then per side one request per level
    levels = 1
    while 8 ** levels < n:
        levels += 1
    assert calls["list"] <= 5 and calls["count"] <= 2 * levels


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2000, 100000), data=st.data())
def test_property_dense_run_costs_few_requests(n, data):
    """A dense run of other nodes' blocks at the start point (the worst case for a
    first-gap rule) costs a few listings, not a search, while the pool is not nearly full."""
    start = data.draw(st.integers(0, n - 1))
    run = data.draw(st.integers(64, n // 2))
    claimed = {(start + i) % n for i in range(run)}
    calls = {"list": 0, "count": 0}

    def list_from(lo, hi, limit):
        calls["list"] += 1
        return [i for i in range(lo, hi) if i in claimed][:limit]

    def counts_in(ranges):
        calls["count"] += 1
        return [sum(1 for i in range(lo, hi) if i in claimed) for lo, hi in ranges]

    got = find_free_block(n, start, list_from, counts_in, scan=16, probes=4)
    assert got is not None and got not in claimed
    assert calls["count"] == 0 and calls["list"] <= 4


def test_start_index_spreads_nodes():
    starts = {start_index(f"node-{i}", 1 << 16) for i in range(200)}
    assert len(starts) > 190

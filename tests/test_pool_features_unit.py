"""Pool features (issue #16), the pure parts: reservations as intervals, the block's pick with
reservations and cooldown, Manual pools and namespaceSelector in the pool choice.  No etcd."""
import ipaddress

import pytest

from cni_ipam.ipam.annotations import namespace_matcher
from cni_ipam.ipam.block import BRIDGE, ROUTED, Block
from cni_ipam.ipam.errors import InvalidRequest
from cni_ipam.ipam.model import IPAMConfig
from cni_ipam.ipam.pool import Pool, PoolError, find_free_block, make_pool, select_pools
from cni_ipam.ipam.reservation import (Reservation, Reserved, ReservationError, count_in, decode, encode,
                                       parse_cidrs, with_taken)

N = ipaddress.ip_network
A = ipaddress.ip_address


def reserved(**named):
    return Reserved([Reservation(n, parse_cidrs(n, cidrs)) for n, cidrs in named.items()])


# -- reservations ---------------------------------------------------------------------

def test_intervals_per_block_merge_and_clip():
    r = reserved(a=["10.0.0.10/31", "10.0.0.12/30"], b=["10.0.0.60", "10.0.1.0/24"], c=["fd00::/127"])
    # a's two CIDRs touch: one interval; b's /32 alone; the /24 is outside the block
    assert r.intervals(N("10.0.0.0/26")) == [(10, 16), (60, 61)]
    assert r.intervals(N("10.0.0.64/26")) == []
    assert r.intervals(N("10.0.1.64/26")) == [(0, 64)]
    assert r.count(N("10.0.0.0/26")) == 7 and r.covers(N("10.0.1.0/26"))
    assert r.intervals(N("fd00::/122")) == [(0, 2)]
    assert r.which(A("10.0.0.13")).name == "a" and r.which(A("10.0.0.16")) is None
    assert r.which(A("fd00::1")).name == "c"


def test_big_pool_small_reservation_is_not_expanded():
    # a /8 pool with a /12 and a single address reserved: counting is interval arithmetic
    r = reserved(big=["10.16.0.0/12"], one=["10.200.0.5"])
    pool = make_pool("p", "10.0.0.0/8", 26)
    assert r.count(N("10.0.0.0/8")) == (1 << 20) + 1
    full = r.full_block_ranges(pool)
    assert full == [((1 << 20) // 64 * 1, (1 << 20) // 64 * 2)]   # the /12's 16384 blocks, nothing for the /32
    assert r.count(N("10.200.0.0/26")) == 1 and not r.covers(N("10.200.0.0/26"))


def test_full_block_ranges_partial_edges():
    pool = make_pool("p", "10.0.0.0/24", 26)
    r = reserved(x=["10.0.0.32/27", "10.0.0.64/26", "10.0.0.128/27"])   # merged: .32 - .159
    assert r.full_block_ranges(pool) == [(1, 2)]


def test_record_round_trip_and_errors():
    rs = [Reservation("b", parse_cidrs("b", ["10.0.0.1"])), Reservation("a", parse_cidrs("a", ["fd00::/64"]))]
    back = decode(encode(rs))
    assert [(r.name, [str(c) for c in r.cidrs]) for r in back] == [("a", ["fd00::/64"]), ("b", ["10.0.0.1/32"])]
    assert decode(None) == []
    with pytest.raises(ValueError, match="undecodable reservations"):
        decode(b'{"reservations": {"x": {"reservedCIDRs": ["nope"]}}}')
    with pytest.raises(ReservationError, match="non-empty list"):
        parse_cidrs("x", [])
    with pytest.raises(ReservationError, match="not a CIDR"):
        parse_cidrs("x", ["10.0.0.0/33"])
    assert not Reserved() and Reserved.EMPTY.intervals(N("10.0.0.0/26")) == []


def test_with_taken_makes_reserved_blocks_look_claimed():
    claimed = {3, 4}
    taken = [(0, 3), (10, 20)]

    def list_from(lo, hi, limit):
        return sorted(i for i in claimed if lo <= i < hi)[:limit]

    def count(ranges):
        return [sum(1 for i in claimed if lo <= i < hi) for lo, hi in ranges]

    lf, ci = with_taken(taken, list_from, count, count)
    assert lf(0, 8, 4) == [0, 1, 2, 3]
    assert ci([(0, 8), (8, 32)]) == [5, 10]
    # the search never answers a reserved block (0-2, 10-19) nor a claimed one (3, 4)
    for start in range(32):
        got = find_free_block(32, start, lf, ci, scan=4)
        assert got is not None and got not in claimed and count_in(taken, got, got + 1) == 0, start
    # a reserved block that is also claimed is counted once
    claimed.add(12)
    assert ci([(8, 32)]) == [10]
    assert count_in(taken, 2, 12) == 3


def test_search_finds_the_only_unreserved_block_in_a_full_pool():
    n = 4096
    taken = [(0, 1000), (1001, n)]
    lf, ci = with_taken(taken, lambda lo, hi, limit: [], lambda r: [0] * len(r), lambda r: [0] * len(r))
    assert find_free_block(n, 2000, lf, ci) == 1000
    lf, ci = with_taken([(0, n)], lambda lo, hi, limit: [], lambda r: [0] * len(r), lambda r: [0] * len(r))
    assert find_free_block(n, 7, lf, ci) is None


# -- the block: pick with reservations and cooldown ------------------------------------

def test_pick_skips_reserved_ordinals_fifo_kept():
    b = Block.new(N("10.0.0.0/29"), "p", "n", BRIDGE)    # free 2..6
    assert b.pick([(2, 4)]) == (4, 0.0)
    o, _ = b.pick([(2, 4)])
    assert b.allocate("h", ordinal=o) == A("10.0.0.4")
    assert b.pick([(2, 7)]) == (None, 0.0)
    assert b.pick() == (2, 0.0)


def test_cooldown_records_release_time_and_skips_until_it_passes():
    b = Block.new(N("10.0.0.0/30"), "p", "n", ROUTED)    # free 0..3
    for i in range(4):
        b.allocate(f"h{i}")
    b.release(A("10.0.0.1"), now=1000.0, cooldown=30)
    b.release(A("10.0.0.3"), now=1010.0, cooldown=30)
    assert b.released_at == {1: 1000.0, 3: 1010.0}
    assert b.pick((), 30, 1020.0) == (None, 1030.0)        # both cooling; the first frees at 1030
    assert b.pick((), 30, 1030.0) == (1, 0.0)              # FIFO: the one released first
    assert b.pick((), 0, 1000.0) == (1, 0.0)               # cooldown off: as before
    b.allocate("x", ordinal=1)
    assert b.released_at == {3: 1010.0}
    # the stored form carries it; an older binary ignores the field, this one reads it back
    d = b.to_dict()
    assert d["releasedAt"] == {"3": 1010.0}
    assert Block.from_json(b.to_json()).released_at == {3: 1010.0}
    # old entries go with the next release; without a cooldown none is recorded
    b.release(A("10.0.0.0"), now=2000.0, cooldown=0)
    assert b.released_at == {} and "releasedAt" not in b.to_dict()


def test_block_without_release_times_is_unchanged_and_stale_times_are_dropped():
    b = Block.new(N("10.0.0.0/30"), "p", "n", ROUTED)
    assert "releasedAt" not in b.to_dict()
    raw = b'{"cidr":"10.0.0.0/30","pool":"p","node":"n","mode":"routed","allocations":{"1":"h"},' \
          b'"free":[0,2,3],"seq":3,"releasedAt":{"1":5.0,"2":6.0}}'
    assert Block.from_json(raw).released_at == {2: 6.0}   # ordinal 1 is allocated: its time is stale


def test_config_cooldown_field():
    assert "ipCooldownSeconds" not in IPAMConfig().to_dict()
    c = IPAMConfig.from_json(IPAMConfig(ip_cooldown_seconds=60).to_json())
    assert c.ip_cooldown_seconds == 60 and c.to_dict()["ipCooldownSeconds"] == 60
    assert IPAMConfig.from_json(b'{"ipCooldownSeconds": 99999}').ip_cooldown_seconds == 1200


# -- pools: assignmentMode and namespaceSelector ---------------------------------------

def test_pool_fields_round_trip_and_default_record_unchanged():
    p = make_pool("p", "10.0.0.0/24", 26)
    assert "assignmentMode" not in p.to_dict() and "namespaceSelector" not in p.to_dict()
    q = make_pool("q", "10.0.1.0/24", 26, assignment_mode="Manual", namespace_selector="team == 'a'")
    back = Pool.from_json(q.to_json())
    assert back.assignment_mode == "Manual" and back.namespace_selector == "team == 'a'"
    with pytest.raises(PoolError, match="assignmentMode"):
        Pool.from_dict({**q.to_dict(), "assignmentMode": "Sometimes"})


def test_manual_pool_only_when_named():
    auto = make_pool("auto", "10.0.0.0/24", 26)
    man = make_pool("man", "10.0.1.0/24", 26, assignment_mode="Manual")
    assert select_pools(4, None, [auto, man], BRIDGE) == [auto]
    assert select_pools(4, ["man"], [auto, man], BRIDGE) == [man]
    assert select_pools(4, ["10.0.1.0/24"], [auto, man], BRIDGE) == [man]
    with pytest.raises(InvalidRequest, match="Manual pools are used only when named"):
        select_pools(4, None, [man], BRIDGE)


def test_namespace_selector_with_node_selector():
    a = make_pool("a", "10.0.0.0/24", 26, namespace_selector="team == 'blue'")
    b = make_pool("b", "10.0.1.0/24", 26, node_selector="zone == 'x'")
    c = make_pool("c", "10.0.2.0/24", 26)
    node = {"zone": "y"}
    from cni_ipam.ipam.annotations import node_matcher
    nm = node_matcher("n", lambda: node)
    calls = []

    def labels():
        calls.append(1)
        return {"team": "blue"}
    ns = namespace_matcher("ns1", labels)
    assert select_pools(4, None, [a, b, c], BRIDGE, nm, ns_matches=ns) == [a, c]
    assert len(calls) == 1
    red = namespace_matcher("ns2", lambda: {"team": "red"})
    assert select_pools(4, None, [a, b, c], BRIDGE, nm, ns_matches=red) == [c]
    with pytest.raises(InvalidRequest, match="namespaceSelector of a"):
        select_pools(4, None, [a], BRIDGE, nm, ns_matches=red)
    # a pool named explicitly is used whatever its selectors say
    assert select_pools(4, ["a"], [a, c], BRIDGE, nm, ns_matches=red) == [a]
    # no namespace (not a pod): only all() matches; all() never asks for labels
    none = namespace_matcher("", lambda: pytest.fail("labels read"))
    assert select_pools(4, None, [a, c], BRIDGE, ns_matches=none) == [c]

"""Pool features (issue #16) through the engine against the real etcd: reservations, Manual
pools, namespaceSelector (etcd records), release cooldown."""
import ipaddress

import pytest

from cni_ipam.datastore import Put, open_datastore
from cni_ipam.ipam import annotations as ann
from cni_ipam.ipam.block import ROUTED
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import AddressUnavailable, InvalidRequest, PoolExhausted
from cni_ipam.ipam.model import IPAMConfig
from cni_ipam.ipam.pool import make_pool
from cni_ipam.ipam.reservation import Reservation, encode, parse_cidrs

A = ipaddress.ip_address
N = ipaddress.ip_network


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    yield IPAM(ds, etcd_prefix)
    ds.close()


def req(hid, node="n1", **kw):
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def reserve(ipam, **named):
    rs = [Reservation(n, parse_cidrs(n, c)) for n, c in named.items()]
    ipam.ds.commit([], [Put(ipam.keys.reservations, encode(rs))])


def ip_of(ipam, r):
    return ipam.assign(r).handle.addresses[0].ip


def test_reserved_addresses_are_never_handed_out(ipam):
    ipam.create_pool(make_pool("p", "10.80.0.0/27", 29))      # 4 blocks of 5 bridge addresses
    # a whole block (.8/29), part of one (.2-.3 of .0/29) and one address (.20)
    reserve(ipam, infra=["10.80.0.8/29", "10.80.0.2/31"], vip=["10.80.0.20"])
    got = []
    with pytest.raises(PoolExhausted):
        for i in range(30):
            got.append(ip_of(ipam, req(f"h{i}")))
    reserved = [N("10.80.0.8/29"), N("10.80.0.2/31"), N("10.80.0.20/32")]
    assert got and not [ip for ip in got if any(ip in r for r in reserved)]
    # everything else was handed out: 3 claimable blocks (.8/29 never claimed) of 5 bridge addresses,
    # less .2, .3 and .20
    assert len(got) == 15 - 3 and len(set(got)) == len(got)
    assert ipam.ds.get(ipam.keys.block(N("10.80.0.8/29"))) is None


def test_requested_address_in_a_reservation_is_refused_naming_it(ipam):
    ipam.create_pool(make_pool("p", "10.81.0.0/24", 29))
    reserve(ipam, gateways=["10.81.0.16/28"])
    with pytest.raises(AddressUnavailable, match=r"10.81.0.18 is reserved by IPReservation 'gateways' \(10.81.0.16/28\)"):
        ipam.assign(req("h1", requested=[A("10.81.0.18")]))
    assert ip_of(ipam, req("h2", requested=[A("10.81.0.34")])) == A("10.81.0.34")
    assert ipam.handles() and len(ipam.handles()) == 1


def test_reservation_added_after_snapshot_is_honoured(ipam):
    ipam.create_pool(make_pool("p", "10.82.0.0/24", 26))
    ipam.use_snapshot = True
    a = ipam.assign(req("a")).handle.addresses[0]
    assert a.ip == a.block.network_address + 2
    ip_of(ipam, req("warm"))                  # (a claim drops the snapshot; this one keeps it)
    assert ipam.snapshot is not None
    nxt = a.ip + 2
    reserve(ipam, r=[f"{nxt}/32", f"{nxt + 1}/32"])
    misses = ipam.snapshot_misses
    assert ip_of(ipam, req("b")) == nxt + 2   # the snapshot's compare saw the new reservation
    assert ipam.snapshot_misses == misses + 1


def test_manual_pool_is_used_only_when_named(ipam):
    ipam.create_pool(make_pool("auto", "10.83.0.0/24", 29))
    ipam.create_pool(make_pool("manual", "10.84.0.0/24", 29, assignment_mode="Manual"))
    for i in range(4):
        assert ip_of(ipam, req(f"a{i}")) in N("10.83.0.0/24")
    assert ip_of(ipam, req("m", v4_pools=["manual"])) in N("10.84.0.0/24")
    ipam.ds.commit([], [Put(ipam.keys.namespace("ns"), ann.encode_record("ns", "annotations", {
        "cni.projectcalico.org/ipv4pools": '["manual"]'}))])
    assert ip_of(ipam, req("n", namespace="ns", pod="x", labels_from_etcd=True)) in N("10.84.0.0/24")


def test_namespace_selector_from_etcd_labels(ipam):
    ipam.create_pool(make_pool("blue", "10.85.0.0/24", 29, namespace_selector="team == 'blue'"))
    ipam.create_pool(make_pool("zz-rest", "10.86.0.0/24", 29, namespace_selector="!has(team)"))
    # labels and annotations share the record: setting one keeps the other
    key = ipam.keys.namespace("web")
    ipam.ds.commit([], [Put(key, ann.encode_record("web", "annotations", {"a": "b"}))])
    ipam.ds.commit([], [Put(key, ann.encode_record("web", "labels", {"team": "blue"}, ipam.ds.get(key).value))])
    assert ann.decode_record(key, ipam.ds.get(key).value, "annotations") == {"a": "b"}

    def r(hid, ns):
        return req(hid, namespace=ns, pod=hid, labels_from_etcd=True)
    assert ip_of(ipam, r("w", "web")) in N("10.85.0.0/24")
    assert ip_of(ipam, r("o", "other")) in N("10.86.0.0/24")
    ipam.ds.commit([], [Put(ipam.keys.namespace("red"), ann.encode_record("red", "labels", {"team": "red"}))])
    with pytest.raises(InvalidRequest, match="matches this node and the pod's namespace"):
        ipam.assign(r("x", "red"))


def test_cooldown_keeps_released_addresses_then_fifo(ipam):
    ipam.create_pool(make_pool("p", "10.87.0.0/30", 30))    # one routed block of 4 addresses
    ipam.set_config(IPAMConfig(ip_cooldown_seconds=1200, strict_affinity=True))
    ips = [ip_of(ipam, req(f"h{i}", mode=ROUTED)) for i in range(4)]
    ipam.release("h1")
    ipam.release("h3")
    b = ipam.ds.get(ipam.keys.block(N("10.87.0.0/30")))
    assert b"releasedAt" in b.value
    with pytest.raises(PoolExhausted, match=r"cooling down \(IPAMConfig ipCooldownSeconds 1200\): the next one "
                                            r"frees up at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in 1[12]\d\ds\)"):
        ipam.assign(req("x", mode=ROUTED))
    # cooldown off: the address released first comes back first (FIFO)
    ipam.set_config(IPAMConfig(strict_affinity=True))
    assert ip_of(ipam, req("y", mode=ROUTED)) == ips[1]
    assert ip_of(ipam, req("z", mode=ROUTED)) == ips[3]


def test_cooldown_skips_cooling_and_takes_the_next_free(ipam):
    ipam.create_pool(make_pool("p", "10.88.0.0/29", 29))
    ipam.set_config(IPAMConfig(ip_cooldown_seconds=600))
    a = ip_of(ipam, req("a", mode=ROUTED))
    ipam.release("a")
    b = ip_of(ipam, req("b", mode=ROUTED))
    assert b != a
    # without a cooldown, release writes no release times
    ipam.set_config(IPAMConfig())
    ipam.release("b")
    blk = ipam.ds.get(ipam.keys.block(N("10.88.0.0/29"))).value
    assert b"releasedAt" not in blk

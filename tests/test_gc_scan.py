"""ipam/gc.py's store scan: split-point ranges stay exact while keys come and go between
passes, one bad record never hides the others, and the guarded release/delete txns."""
from __future__ import annotations

import pytest

from cni_ipam.datastore import Compare, Put, open_datastore
from cni_ipam.ipam import gc
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.pool import make_pool


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, transport="grpc")
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("p", "10.90.0.0/20", 26))
    yield ipam
    ds.close()


def assign(ipam, name, node="n1"):
    ipam.assign(AssignRequest(handle_id=f"net.{name}.eth0", node=node, network="net", namespace="ns", pod=name))


def test_splits_follow_keys_added_and_deleted_between_passes(ipam):
    for i in range(10, 60):
        assign(ipam, f"c{i}")
    sp = gc.Splits(page=7, first_page=9, per_request=3)
    v = gc.scan(ipam, splits=sp)
    assert {h.id for h in v.handles} == {f"net.c{i}.eth0" for i in range(10, 60)}
    assert len(sp.points[ipam.keys.handles]) == 8          # every 7th key of 50
    first_requests = v.requests
    # keys before the first split point, between points, after the last; deletions; a range that grows a lot
    for name in ("a0", "c25x", "c33y", "z9") + tuple(f"c40-{j:02d}" for j in range(40)):
        assign(ipam, name)
    for i in (10, 11, 30, 59):
        ipam.release(f"net.c{i}.eth0")
    v = gc.scan(ipam, splits=sp)
    want = {h.id for h in ipam.handles()}
    got = [h.id for h in v.handles]
    assert len(got) == len(set(got)) and set(got) == want
    assert v.requests < first_requests + 8                  # ranges between the points, several per request
    # the points were learned again: a third pass is exact too
    assert {h.id for h in gc.scan(ipam, splits=sp).handles} == want


def test_an_undecodable_record_is_listed_not_fatal(ipam):
    for i in range(5):
        assign(ipam, f"c{i}")
    bad = ipam.keys.handle("net.bad.eth0")
    ipam.ds.commit([], [Put(bad, b"{not json")])
    v = gc.scan(ipam)
    assert v.undecodable == [bad]
    assert len(v.handles) == 5 and sum(len(b.allocations) for b in v.blocks) == 5


def test_guarded_release_and_block_delete(ipam):
    assign(ipam, "c0")
    assign(ipam, "c1", node="n2")
    ds, k = ipam.ds, ipam.keys
    key = gc.leader_key(k)
    assert ds.commit([Compare(key, 0)], [Put(key, b"me")])
    guard = Compare(key, ds.last_revision)
    stale = Compare(key, guard.mod_revision + 1000)
    h = ipam.get_handle("net.c0.eth0")
    rev = ds.get(k.handle(h.id)).mod_revision
    with pytest.raises(gc.GuardLost):
        gc.release_handle(ds, k, h.id, expect_revision=rev, guards=[stale])
    assert ipam.get_handle(h.id) is not None
    assert gc.release_handle(ds, k, h.id, expect_revision=rev - 1, guards=[guard]) is None   # changed since
    assert gc.release_handle(ds, k, h.id, expect_revision=rev, guards=[guard]) == [str(h.addresses[0].ip)]
    assert ipam.get_handle(h.id) is None
    # the now empty block of n1 goes with its affinity; n2's block (in use) is refused
    blocks = {b.node: b for b in gc.scan(ipam).blocks}
    assert not gc.delete_empty_block(ds, k, blocks["n2"].key, expect_revision=blocks["n2"].rev, guards=[guard])
    with pytest.raises(gc.GuardLost):
        gc.delete_empty_block(ds, k, blocks["n1"].key, expect_revision=blocks["n1"].rev, guards=[stale])
    assert gc.delete_empty_block(ds, k, blocks["n1"].key, expect_revision=blocks["n1"].rev, guards=[guard])
    assert ds.get(blocks["n1"].key) is None and not ds.get_prefix(k.node_affinity("n1"))


def test_layout2_and_layout1_handles_are_released_by_their_keys(ipam):
    """Handles of both key layouts (net/cid/ifname and the older net.cid.ifname) are found by
    the scan and released under the key they were read from."""
    ipam.assign(AssignRequest(handle_id="net/c-new/eth0", node="n1", network="net", container_id="c-new",
                              ifname="eth0", namespace="ns", pod="a"))
    ipam.assign(AssignRequest(handle_id="net.c-old.eth0", node="n1", network="net", container_id="c-old",
                              ifname="eth0", namespace="ns", pod="b"))
    v = gc.scan(ipam)
    assert {h.id for h in v.handles} == {"net/c-new/eth0", "net.c-old.eth0"}
    for h in v.handles:
        assert gc.release_handle(ipam.ds, ipam.keys, h.id, expect_revision=h.rev, key=h.key, block_keys=h.blocks)
    assert gc.scan(ipam).handles == [] and sum(len(b.allocations) for b in gc.scan(ipam).blocks) == 0

"""Hostile data already in etcd, and etcd down, slow or without quorum.

Corrupt values (a block, a handle, a pool, the config, an affinity key that is not a block id,
a block whose value is for another CIDR) and records that disagree (a handle pointing nowhere, a
handle whose block names another holder): the plugin fails the request with a clear error
naming the key (code 113, or CHECK's 114), does not crash (no traceback), and never overwrites
the corrupt key; ``cni-ipam check`` reports each one.

etcd unreachable (refused, black hole, no quorum): ADD fails within ``timeout_seconds`` with code
11 and a message naming the endpoints; STATUS says 50; DEL of a container whose state cannot be
read fails with 11 (it never pretends success while addresses remain allocated) and succeeds
once etcd is back.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cni_ipam.datastore import Put, open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import ROOT, assert_error, exec_plugin, netconf
from tests.support.etcd import free_port


@pytest.fixture
def store(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint)
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("pool-h", "10.250.0.0/24", 29))
    yield ipam
    ds.close()


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path):
    def make(**kw):
        kw.setdefault("version", "1.1.0")
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, **kw)
    return make


def snapshot(store) -> dict:
    return {kv.key: (kv.value, kv.mod_revision) for kv in store.ds.get_prefix(store.keys.root)}


def corrupt(store, key: str, value: bytes) -> None:
    assert store.ds.commit([], [Put(key, value)])


def cni_ipam_check(etcd_server, etcd_prefix) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
    env.update(PYTHONPATH=ROOT, ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix)
    return subprocess.run([sys.executable, "-m", "cni_ipam", "check"], env=env, capture_output=True, text=True,
                          timeout=60)


def assert_check_reports(etcd_server, etcd_prefix, key: str):
    p = cni_ipam_check(etcd_server, etcd_prefix)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert key in p.stdout, p.stdout


GARBAGE = [b"", b"not json", b"{", b"[]", b"null", b'{"cidr": 5}', b"\xff\xfe\x00", b'{"x":' * 10000,
           b'{"cidr":"10.250.0.0/29","pool":"pool-h","node":"node-a","mode":"bridge",'
           b'"allocations":{"99":"h"},"free":[]}']


# --------------------------------------------------------------------------- corrupt blocks
@pytest.mark.parametrize("garbage", GARBAGE, ids=[f"g{i}" for i in range(len(GARBAGE))])
def test_corrupt_block_fails_add_and_del_naming_the_key(store, conf, garbage, etcd_server, etcd_prefix):
    c = conf()
    r = exec_plugin("ADD", c, container="c1")
    assert r.rc == 0, r.stdout
    (h,) = store.handles()
    bkey = store.keys.block(h.addresses[0].block)
    corrupt(store, bkey, garbage)
    before = snapshot(store)
    assert_error(exec_plugin("ADD", c, container="c2"), 113, names=bkey)
    assert_error(exec_plugin("DEL", c, container="c1"), 113, names=bkey)
    r = exec_plugin("GC", dict(c, **{"cni.dev/valid-attachments": []}), container=None, ifname=None, netns=None)
    assert r.rc != 0 and "Traceback" not in r.stderr and bkey in r.stdout, r.stdout
    assert json.loads(r.stdout)["code"] == 113   # corrupt data: retrying would not help
    assert snapshot(store) == before          # nothing written, the corrupt key least of all
    if garbage in (b"", b"not json", b"{"):
        assert_check_reports(etcd_server, etcd_prefix, bkey)


def test_block_value_for_another_cidr_is_refused(store, conf):
    """A block whose value describes another CIDR than its key must not hand out addresses."""
    c = conf()
    assert exec_plugin("ADD", c, container="c1").rc == 0
    (h,) = store.handles()
    bkey = store.keys.block(h.addresses[0].block)
    value = json.loads(store.ds.get(bkey).value)
    value["cidr"] = "10.250.0.128/29"          # another block's addresses
    value["allocations"] = {}
    value["free"] = [2, 3, 4, 5, 6]
    corrupt(store, bkey, json.dumps(value).encode())
    before = snapshot(store)
    r = exec_plugin("ADD", c, container="c2")
    assert_error(r, 113, names=bkey)
    assert snapshot(store) == before


# --------------------------------------------------------------------------- corrupt handles
def test_corrupt_handle_fails_add_check_del_and_gc_goes_on(store, conf, etcd_server, etcd_prefix):
    c = conf()
    for cid in ("bad", "other"):
        assert exec_plugin("ADD", c, container=cid).rc == 0
    hkey = store.keys.handle("testnet/bad/eth0")
    corrupt(store, hkey, b"{garbage")
    before = snapshot(store)
    assert_error(exec_plugin("ADD", c, container="bad"), 113, names=hkey)
    assert_error(exec_plugin("DEL", c, container="bad"), 113, names=hkey)
    assert_error(exec_plugin("CHECK", dict(c, prevResult={"cniVersion": "1.1.0", "ips": []}), container="bad"),
                 113, names=hkey)
    assert snapshot(store) == before
    assert_check_reports(etcd_server, etcd_prefix, hkey)
    # GC must not be blocked by one corrupt record: it releases what it can and reports the rest
    r = exec_plugin("GC", dict(c, **{"cni.dev/valid-attachments": []}), container=None, ifname=None, netns=None)
    assert "Traceback" not in r.stderr
    assert store.ds.get(hkey).value == b"{garbage"
    assert store.get_handle("testnet/other/eth0") is None, "GC gave up on the good handle"
    assert r.rc != 0 and hkey in r.stdout, r.stdout
    assert json.loads(r.stdout)["code"] == 113


def test_handle_pointing_nowhere(store, conf, etcd_server, etcd_prefix):
    """A handle whose block does not exist: CHECK and a repeated ADD refuse it (the address is not
    allocated anywhere -- handing it out would be a duplicate waiting to happen); DEL clears it."""
    c = conf()
    add = exec_plugin("ADD", c, container="c1")
    assert add.rc == 0
    (h,) = store.handles()
    hkey = store.keys.handle(h.id)
    value = json.loads(store.ds.get(hkey).value)
    value["addresses"][0].update(ip="10.250.0.250", block="10.250.0.248/29")
    corrupt(store, hkey, json.dumps(value).encode())
    before = snapshot(store)
    r = exec_plugin("CHECK", dict(c, prevResult={"cniVersion": "1.1.0", "ips": [{"address": "10.250.0.250/29"}]}),
                    container="c1")
    assert_error(r, 114, names="10.250.0.248/29")
    r = exec_plugin("ADD", c, container="c1")
    assert_error(r, 113, names=hkey)
    assert snapshot(store) == before
    assert_check_reports(etcd_server, etcd_prefix, "10.250.0.250")
    assert exec_plugin("DEL", c, container="c1").rc == 0
    assert store.ds.get(hkey) is None


def test_handle_and_block_disagree(store, conf):
    """Handle A lists an address its block records for handle B: ADD (repeated) refuses it, DEL
    of A does not free B's address."""
    c = conf()
    assert exec_plugin("ADD", c, container="a").rc == 0
    assert exec_plugin("ADD", c, container="b").rc == 0
    ha, hb = store.get_handle("testnet/a/eth0"), store.get_handle("testnet/b/eth0")
    akey = store.keys.handle(ha.id)
    value = json.loads(store.ds.get(akey).value)
    value["addresses"][0]["ip"] = str(hb.addresses[0].ip)
    corrupt(store, akey, json.dumps(value).encode())
    before = snapshot(store)
    assert_error(exec_plugin("ADD", c, container="a"), 113, names=akey)
    assert snapshot(store) == before
    assert exec_plugin("DEL", c, container="a").rc == 0
    assert store.get_handle("testnet/b/eth0") is not None
    assert store.verify_handle(store.get_handle("testnet/b/eth0")) == []


# --------------------------------------------------------------------------- corrupt pools, config, affinity keys
@pytest.mark.parametrize("what", ["pool", "config", "affinity key", "affinity key of another family"])
def test_other_corrupt_records(store, conf, etcd_server, etcd_prefix, what):
    c = conf()
    assert exec_plugin("ADD", c, container="c1").rc == 0
    if what == "pool":
        key = store.keys.pool("pool-h")
        corrupt(store, key, b'{"name": "pool-h", "cidr": "not a cidr"}')
    elif what == "config":
        key = store.keys.config
        corrupt(store, key, b"[1, 2")
    elif what == "affinity key":
        key = store.keys.node_affinity("node-a") + "v4/zzzz-99"
        corrupt(store, key, b'{"pool":"pool-h","mode":"bridge"}')
    else:
        key = store.keys.node_affinity("node-a") + "v9/00-1"
        corrupt(store, key, b"{}")
    before = snapshot(store)
    out = assert_error(exec_plugin("ADD", c, container="c2"), 113, names=key)
    assert out["msg"]
    if what in ("pool", "config"):
        r = exec_plugin("STATUS", c, container=None, ifname=None, netns=None)
        assert_error(r, 50, names=key)
    assert snapshot(store) == before
    # DEL needs neither pools nor affinities: it still works
    assert exec_plugin("DEL", c, container="c1").rc == 0
    assert_check_reports(etcd_server, etcd_prefix, key)


# --------------------------------------------------------------------------- etcd unreachable
class BlackHole:
    """A TCP listener that accepts connections and never answers (a hung or partitioned member)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.stopped = False
        self.t = threading.Thread(target=self._accept, daemon=True)
        self.t.start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.stopped = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def blackhole():
    b = BlackHole()
    yield b
    b.close()


@pytest.mark.parametrize("kind", ["refused", "black hole", "refused + black hole"])
def test_etcd_unreachable(conf, kind, blackhole):
    refused = f"http://127.0.0.1:{free_port()}"
    hole = f"http://127.0.0.1:{blackhole.port}"
    eps = {"refused": [refused], "black hole": [hole], "refused + black hole": [refused, hole]}[kind]
    timeout = 2.0
    c = conf(etcd_endpoints=",".join(eps), timeout_seconds=timeout)
    for verb in ("ADD", "DEL"):
        t0 = time.monotonic()
        r = exec_plugin(verb, c)
        took = time.monotonic() - t0
        out = assert_error(r, 11)
        # the outcome shows the configured deadline was applied to every endpoint (a black hole
        # never answers: without a deadline the exec would hang until exec_plugin's timeout)
        if kind == "refused":   # refused everywhere: fails at once, saying so (no deadline to wait for)
            assert "connection refused" in out["msg"], out
        else:
            assert "no answer within 2s" in out["msg"], out
        for ep in eps:
            assert ep in out["msg"], out
        # the deadline is per etcd call and an unavailable etcd ends the verb (no CAS retry loop:
        # 100 attempts would take minutes).  Not a speed assertion (that is `make bench`): a bound
        # far above one deadline plus start-up on a loaded machine, far below a retry loop.
        assert took < 10 * timeout + 20, f"{verb} took {took:.1f}s"
    t0 = time.monotonic()
    r = exec_plugin("STATUS", c, container=None, ifname=None, netns=None)
    assert_error(r, 50)
    assert time.monotonic() - t0 < 10 * timeout + 20


def test_no_quorum_add_and_del_fail_with_11_then_recover(etcd_cluster, tmp_path):
    """Two of three members SIGSTOPped: ADD fails with 11 within the timeout, DEL of a live
    container fails with 11 (its state cannot be read) and the address stays allocated; after
    the members resume, DEL succeeds."""
    etcd_cluster.heal()
    prefix = f"/quorum-{os.getpid()}-{time.monotonic_ns()}"
    ds = open_datastore(etcd_cluster.endpoints, timeout=10)
    ipam = IPAM(ds, prefix)
    ipam.create_pool(make_pool("q", "10.251.0.0/24", 29))
    c = netconf(",".join(etcd_cluster.endpoints), prefix, tmp_path, version="1.1.0", timeout_seconds=2)
    assert exec_plugin("ADD", c, container="live").rc == 0
    stopped = etcd_cluster.members[:2]
    try:
        for m in stopped:
            m.pause()
        for verb, cid in (("ADD", "new"), ("DEL", "live")):
            r = exec_plugin(verb, c, container=cid)
            out = assert_error(r, 11)
            assert any(ep in out["msg"] for ep in etcd_cluster.endpoints), out
        r = exec_plugin("STATUS", c, container=None, ifname=None, netns=None)
        assert_error(r, 50)
    finally:
        for m in stopped:
            m.resume()
    etcd_cluster.wait_healthy()
    deadline = time.monotonic() + 20
    while True:   # a new election may take a moment
        h = ipam.get_handle("testnet/live/eth0")
        if h is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert h is not None and ipam.verify_handle(h) == [], "the failed DEL released the address"
    r = exec_plugin("DEL", c, container="live")
    assert r.rc == 0, r.stdout
    assert ipam.get_handle("testnet/live/eth0") is None
    exec_plugin("DEL", c, container="new")
    ds.close()

"""One contract for every datastore, against a real etcd (no mocks) -- and the in-memory one.

Each test runs once per datastore (``gateway``: JSON gateway over http.client;
``grpc``: python3-etcd3; ``memory``: ``datastore.memory.MemoryDatastore``, which must keep the
same contract: the engine's fast tests run on it).  Tests about endpoints, TLS, auth and
failover run on the etcd transports only (``etcd_only``).  Keys live under the per-test
``etcd_prefix``.
"""
from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import re

import pytest

from cni_ipam.datastore import (Compare, DatastoreError, DatastoreUnavailable, Delete, Put, Read,
                                open_datastore, prefix_end, read_key, read_prefix)
from cni_ipam.datastore.base import MAX_TXN_OPS
from cni_ipam.datastore.memory import MemoryDatastore, MemoryStore
from tests.support.etcd import EtcdServer, delete_prefix, free_port, make_test_certs

#: a hang (an etcd member restart, a gRPC channel) fails the test with every thread's stack instead
#: of running into CI's job limit; generous: these tests take seconds (tests/conftest.py: time_limit)
pytestmark = pytest.mark.time_limit(120)

TRANSPORTS = ["gateway", "grpc", "memory"]
ETCD_TRANSPORTS = ["gateway", "grpc"]
#: a test about the network side of a transport (endpoints, TLS, auth, failover): etcd only
etcd_only = pytest.mark.parametrize("transport", ETCD_TRANSPORTS, indirect=True)


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


def _param_transport(request) -> str | None:
    callspec = getattr(request.node, "callspec", None)
    return callspec.params.get("transport") if callspec is not None else None


@pytest.fixture
def etcd_prefix(request):
    """conftest's ``etcd_prefix``, without starting etcd for the memory datastore."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:80] or "test"
    prefix = f"/t/{name}-{secrets.token_hex(4)}"
    if _param_transport(request) == "memory":
        yield prefix
        return
    server = request.getfixturevalue("etcd_server")
    yield prefix
    delete_prefix(server.endpoint, prefix)


@pytest.fixture
def open_ds(request, transport):
    """Factory: ``open_ds(endpoints=None, transport=<param>, timeout=5, **kw)``; all closed after.
    For ``memory`` every client of one test shares one ``MemoryStore`` (one etcd)."""
    opened = []
    store = MemoryStore()
    server = None if transport == "memory" else request.getfixturevalue("etcd_server")

    def _open(endpoints=None, *, transport=transport, timeout=5.0, **kw):
        if transport == "memory":
            assert endpoints is None and not kw, "the memory datastore has no endpoints, TLS or auth"
            ds = MemoryDatastore(store)
        else:
            ds = open_datastore(endpoints or server.endpoint, transport=transport, timeout=timeout, **kw)
        opened.append(ds)
        return ds

    yield _open
    for ds in opened:
        ds.close()


@pytest.fixture
def ds(open_ds):
    return open_ds()


def put_many(ds, items: dict[str, bytes]) -> None:
    """Write ``items`` in transactions of at most MAX_TXN_OPS puts."""
    keys = list(items)
    for i in range(0, len(keys), MAX_TXN_OPS):
        assert ds.commit([], [Put(k, items[k]) for k in keys[i:i + MAX_TXN_OPS]])


# --------------------------------------------------------------------------- single keys
def test_get_missing_key(ds, etcd_prefix):
    assert ds.get(f"{etcd_prefix}/missing") is None
    [res] = ds.read([read_prefix(f"{etcd_prefix}/")])
    assert res.kvs == [] and res.count == 0 and res.more is False
    assert ds.get_many([f"{etcd_prefix}/a", f"{etcd_prefix}/b"]) == [None, None]


def test_put_if_absent_succeeds_once(ds, etcd_prefix):
    key = f"{etcd_prefix}/lease"
    assert ds.commit([Compare(key, 0)], [Put(key, b"first")]) is True
    assert ds.commit([Compare(key, 0)], [Put(key, b"second")]) is False
    kv = ds.get(key)
    assert kv.key == key and kv.value == b"first" and kv.version == 1 and kv.mod_revision > 0


def test_cas_on_mod_revision(ds, etcd_prefix):
    key = f"{etcd_prefix}/k"
    assert ds.commit([Compare(key, 0)], [Put(key, b"v1")])
    old = ds.get(key)
    assert ds.commit([Compare(key, old.mod_revision)], [Put(key, b"v2")]) is True
    new = ds.get(key)
    assert new.value == b"v2" and new.version == 2 and new.mod_revision > old.mod_revision
    # stale revision: refused, nothing changes
    assert ds.commit([Compare(key, old.mod_revision)], [Put(key, b"v3")]) is False
    assert ds.get(key) == new
    # a revision compare on a missing key fails too
    other = f"{etcd_prefix}/missing"
    assert ds.commit([Compare(other, new.mod_revision)], [Put(other, b"x")]) is False
    assert ds.get(other) is None


def test_multi_key_txn_is_atomic(ds, etcd_prefix):
    a, b, c = (f"{etcd_prefix}/{n}" for n in "abc")
    assert ds.commit([Compare(a, 0), Compare(b, 0)], [Put(a, b"a1"), Put(b, b"b1")])
    ka, kb = ds.get_many([a, b])
    assert ka.mod_revision == kb.mod_revision  # one txn, one revision
    # b is stale -> nothing at all is written
    assert ds.commit([Compare(a, ka.mod_revision), Compare(b, kb.mod_revision - 1), Compare(c, 0)],
                     [Put(a, b"a2"), Put(b, b"b2"), Put(c, b"c2")]) is False
    assert ds.get_many([a, b, c]) == [ka, kb, None]
    # all current -> everything is written
    assert ds.commit([Compare(a, ka.mod_revision), Compare(b, kb.mod_revision), Compare(c, 0)],
                     [Put(a, b"a2"), Delete(b), Put(c, b"c2")]) is True
    na, nb, nc = ds.get_many([a, b, c])
    assert (na.value, nb, nc.value) == (b"a2", None, b"c2")
    assert na.mod_revision == nc.mod_revision


def test_delete_with_cas(ds, etcd_prefix):
    key = f"{etcd_prefix}/k"
    assert ds.commit([], [Put(key, b"v")])
    kv = ds.get(key)
    assert ds.commit([Compare(key, kv.mod_revision - 1)], [Delete(key)]) is False
    assert ds.get(key) == kv
    assert ds.commit([Compare(key, kv.mod_revision)], [Delete(key)]) is True
    assert ds.get(key) is None
    # "delete if absent" is a successful no-op; empty compares and ops are allowed
    assert ds.commit([Compare(key, 0)], [Delete(key)]) is True
    assert ds.commit([], []) is True


def test_range_compare_nothing_newer(ds, etcd_prefix):
    """``Compare(start, rev + 1, range_end=..., result="LESS")``: no key in the range was created
    or modified after ``rev`` (what the engine's snapshot fast path relies on)."""
    p = f"{etcd_prefix}/r/"
    other = f"{etcd_prefix}/other"
    assert ds.commit([], [Put(p + "a", b"1"), Put(p + "b", b"2")])
    rev = ds.last_revision
    assert rev > 0 and ds.get(p + "a").mod_revision == rev
    ds.read([read_prefix(p), read_key(other)])
    assert ds.last_revision == rev       # a read reports the revision it read at
    guard = Compare(p, rev + 1, range_end=prefix_end(p), result="LESS")
    # nothing changed in the range: holds (also after writes elsewhere)
    assert ds.commit([], [Put(other, b"x")])
    assert ds.commit([guard], [Put(other, b"y")]) is True
    assert ds.last_revision > rev
    # an empty range holds too
    empty = f"{etcd_prefix}/empty/"
    assert ds.commit([Compare(empty, rev + 1, range_end=prefix_end(empty), result="LESS")], []) is True
    # a put in the range (a new key, or a modified one): refused, nothing written
    assert ds.commit([], [Put(p + "c", b"3")])
    assert ds.commit([guard], [Put(other, b"z")]) is False
    assert ds.get(other).value == b"y"
    rev2 = ds.last_revision
    assert ds.commit([Compare(p, rev2 + 1, range_end=prefix_end(p), result="LESS")], []) is True
    assert ds.commit([], [Put(p + "a", b"1b")])
    assert ds.commit([Compare(p, rev2 + 1, range_end=prefix_end(p), result="LESS")], []) is False
    # the single-key forms are unchanged: EQUAL on a revision, 0 = absent
    kv = ds.get(p + "a")
    assert ds.commit([Compare(p + "a", kv.mod_revision), Compare(p + "zz", 0)], []) is True
    with pytest.raises(ValueError):
        ds.commit([Compare(p + "a", 1, result="ALMOST")], [])


# --------------------------------------------------------------------------- reads
def test_batch_read_is_one_request(ds, etcd_prefix):
    p = etcd_prefix
    put_many(ds, {**{f"{p}/a/{i}": f"a{i}".encode() for i in range(5)},
                  **{f"{p}/b/{i}": f"b{i}".encode() for i in range(3)},
                  f"{p}/single": b"s"})
    before = ds.requests
    res = ds.read([
        read_key(f"{p}/single"),
        read_key(f"{p}/nope"),
        read_prefix(f"{p}/a/"),
        Read(f"{p}/a/", prefix_end(f"{p}/a/"), count_only=True),
        read_prefix(f"{p}/b/", keys_only=True),
        read_prefix(f"{p}/a/", limit=2),
        Read(f"{p}/a/1", f"{p}/a/3"),  # explicit [start, end)
        read_prefix(f"{p}/b/", limit=3),
    ])
    assert ds.requests - before == 1
    single, nope, a_all, a_count, b_keys, a_two, a_mid, b_three = res
    assert [kv.value for kv in single.kvs] == [b"s"] and single.count == 1
    assert nope.kvs == [] and nope.count == 0
    assert [kv.key for kv in a_all.kvs] == [f"{p}/a/{i}" for i in range(5)]
    assert [kv.value for kv in a_all.kvs] == [f"a{i}".encode() for i in range(5)]
    assert a_all.count == 5 and a_all.more is False
    assert a_count.kvs == [] and a_count.count == 5
    assert [kv.key for kv in b_keys.kvs] == [f"{p}/b/{i}" for i in range(3)]
    assert all(kv.value == b"" and kv.mod_revision > 0 for kv in b_keys.kvs)
    assert [kv.key for kv in a_two.kvs] == [f"{p}/a/0", f"{p}/a/1"]
    assert a_two.count == 5 and a_two.more is True
    assert [kv.key for kv in a_mid.kvs] == [f"{p}/a/1", f"{p}/a/2"]
    assert b_three.more is False and len(b_three.kvs) == 3
    # single reads take the plain range path and agree with the batch
    assert ds.read([read_prefix(f"{p}/a/", limit=2)]) == [a_two]
    assert ds.count(f"{p}/a/", prefix_end(f"{p}/a/")) == 5
    assert ds.read([]) == []


def test_more_than_max_txn_ops_reads(ds, etcd_prefix):
    n = 2 * MAX_TXN_OPS + 44  # 300: three chunks
    items = {f"{etcd_prefix}/k{i:04d}": str(i).encode() for i in range(0, n, 2)}  # every other exists
    put_many(ds, items)
    keys = [f"{etcd_prefix}/k{i:04d}" for i in range(n)]
    before = ds.requests
    got = ds.get_many(keys)
    assert ds.requests - before == 3
    assert len(got) == n
    for i, kv in enumerate(got):
        if i % 2:
            assert kv is None
        else:
            assert kv.key == keys[i] and kv.value == str(i).encode()


def test_range_pages_over_large_prefix(ds, etcd_prefix):
    n = 2500
    put_many(ds, {f"{etcd_prefix}/ip/{i:05d}": b"x" for i in range(n)})
    start, end = f"{etcd_prefix}/ip/", prefix_end(f"{etcd_prefix}/ip/")
    before = ds.requests
    kvs = ds.range(start, end)
    assert ds.requests - before == 3  # pages of 1000
    assert [kv.key for kv in kvs] == [f"{etcd_prefix}/ip/{i:05d}" for i in range(n)]
    assert ds.count(start, end) == n
    keys_only = ds.get_prefix(f"{etcd_prefix}/ip/", keys_only=True)
    assert len(keys_only) == n and all(kv.value == b"" for kv in keys_only)
    limited = ds.range(start, end, limit=1500)
    assert [kv.key for kv in limited] == [f"{etcd_prefix}/ip/{i:05d}" for i in range(1500)]


# --------------------------------------------------------------------------- concurrency
def test_concurrent_cas_counter(open_ds, etcd_prefix):
    key = f"{etcd_prefix}/counter"
    threads_n, per_thread = 4, 15
    clients = [open_ds() for _ in range(threads_n)]
    errors: list[BaseException] = []
    conflicts = [0] * threads_n

    def worker(i: int) -> None:
        ds = clients[i]
        try:
            for _ in range(per_thread):
                while True:
                    kv = ds.get(key)
                    cur = int(kv.value) if kv else 0
                    if ds.commit([Compare(key, kv.mod_revision if kv else 0)],
                                 [Put(key, str(cur + 1).encode())]):
                        break
                    conflicts[i] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    kv = clients[0].get(key)
    assert int(kv.value) == threads_n * per_thread
    assert kv.version == threads_n * per_thread


# --------------------------------------------------------------------------- bookkeeping & errors
def test_requests_counter(ds, etcd_prefix):
    assert ds.requests == 0
    ds.get(f"{etcd_prefix}/a")
    assert ds.requests == 1
    ds.commit([Compare(f"{etcd_prefix}/a", 0)], [Put(f"{etcd_prefix}/a", b"1")])
    assert ds.requests == 2
    ds.read([read_key(f"{etcd_prefix}/a"), read_key(f"{etcd_prefix}/b")])
    assert ds.requests == 3
    ds.read([])
    assert ds.requests == 3


def test_refusal_is_error_not_unavailability(ds, etcd_prefix):
    too_many = [Put(f"{etcd_prefix}/{i}", b"") for i in range(MAX_TXN_OPS + 1)]
    with pytest.raises(DatastoreError, match="too many operations") as ei:
        ds.commit([], too_many)
    assert not isinstance(ei.value, DatastoreUnavailable)
    with pytest.raises(DatastoreError, match="duplicate key") as ei:
        ds.commit([], [Put(f"{etcd_prefix}/d", b"1"), Put(f"{etcd_prefix}/d", b"2")])
    assert not isinstance(ei.value, DatastoreUnavailable)
    assert ds.get(f"{etcd_prefix}/d") is None and ds.get(f"{etcd_prefix}/0") is None


def _silent_listener():
    """A loopback socket that listens but never answers: connections are accepted by the kernel,
    requests are never read -- an etcd that hangs."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


@etcd_only
def test_unavailable_endpoint_times_out(open_ds):
    silent = [_silent_listener(), _silent_listener()]
    try:
        dead = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in silent]
        ds = open_ds(dead, timeout=1.0)
        # outcomes, not a wall-clock window (speed is measured in bench/): the client gives up
        # (raises), naming the deadline it was given and every endpoint, after trying each of them
        with pytest.raises(DatastoreUnavailable) as ei:
            ds.get("/anything")
        msg = str(ei.value)
        assert dead[0] in msg and dead[1] in msg and "no answer within 1s" in msg
        assert not ei.value.unreachable      # they accept connections: waiting might have helped
        assert ds.requests >= 2
        with pytest.raises(DatastoreUnavailable) as ei:
            ds.commit([], [Put("/anything", b"")])
        assert "no answer within 1s" in str(ei.value) and dead[0] in str(ei.value), ei.value
        ds.close()
    finally:
        for s in silent:
            s.close()


@etcd_only
def test_refused_endpoints_fail_after_one_round(open_ds):
    """Connection refused everywhere: no waiting for the deadline -- one attempt per endpoint,
    then an error naming each endpoint and why (a huge timeout shows nothing waits for it)."""
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    ds = open_ds(dead, timeout=3600)
    with pytest.raises(DatastoreUnavailable) as ei:
        ds.get("/anything")
    assert ei.value.unreachable
    msg = str(ei.value)
    assert msg.startswith("etcd unavailable: cannot reach")
    assert f"{dead[0]} (connection refused)" in msg and f"{dead[1]} (connection refused)" in msg
    assert ds.requests == 2


@etcd_only
def test_https_against_plain_http_says_so(open_ds, etcd_server):
    if not etcd_server.endpoint.startswith("http://"):
        pytest.skip("needs a plain-http etcd")
    ds = open_ds([etcd_server.endpoint.replace("http://", "https://")], timeout=3600)
    with pytest.raises(DatastoreUnavailable) as ei:
        ds.get("/anything")
    assert ei.value.unreachable and "plain HTTP there? then use an http:// URL" in str(ei.value)


def test_peer_port_is_named(etcd_server):
    """The gateway transport (the plugin's) against etcd's peer port: a 404, said to be the peer port."""
    from cni_ipam.datastore import open_datastore
    peer = getattr(etcd_server, "peer_url", None)
    if not peer:
        pytest.skip("an external etcd: its peer URL is unknown")
    with open_datastore([peer], transport="gateway", timeout=3600) as ds:
        with pytest.raises(DatastoreUnavailable) as ei:
            ds.get("/anything")
    assert ei.value.unreachable and "HTTP 404" in str(ei.value) and "peer port" in str(ei.value)


def test_unresolvable_and_unroutable_count_as_unreachable():
    """The classifier behind the fast failure (no name lookup here: it would leave loopback)."""
    import socket
    from cni_ipam.datastore import gateway
    from cni_ipam.datastore.base import Unreachable
    assert gateway._unreachable(socket.gaierror(-2, "Name or service not known"), False) == \
        "host name does not resolve"
    assert isinstance(gateway._unreachable(ConnectionRefusedError(111, "refused"), False), Unreachable)
    assert gateway._unreachable(OSError(113, "No route to host"), False) == "no route to host"
    assert gateway._unreachable(TimeoutError("timed out"), False) is None
    from cni_ipam.datastore import grpc as g
    assert g._unreachable("DNS resolution failed for x:2379", False) == "host name does not resolve"
    assert g._unreachable("Deadline Exceeded", False) is None


@etcd_only
def test_dead_endpoint_is_skipped(open_ds, etcd_server, etcd_prefix):
    dead = f"http://127.0.0.1:{free_port()}"
    ds = open_ds([dead, etcd_server.endpoint], timeout=5.0)
    key = f"{etcd_prefix}/k"
    assert ds.commit([Compare(key, 0)], [Put(key, b"v")])
    # the working endpoint is remembered: one request per call from now on
    before = ds.requests
    assert ds.get(key).value == b"v"
    assert ds.requests - before == 1


# --------------------------------------------------------------------------- cross transport
def test_cross_transport_roundtrip(etcd_server, etcd_prefix):
    gw = open_datastore(etcd_server.endpoint, transport="gateway", timeout=5)
    gr = open_datastore(etcd_server.endpoint, transport="grpc", timeout=5)
    try:
        values = {f"{etcd_prefix}/bin": bytes(range(256)),
                  f"{etcd_prefix}/empty": b"",
                  f"{etcd_prefix}/json": b'{"ip": "10.0.0.1", "id": "c0ffee"}',
                  f"{etcd_prefix}/utf8-\u00e9\u4e2d": "h\u00e9llo".encode()}
        keys = list(values)
        assert gw.commit([Compare(k, 0) for k in keys[:2]], [Put(k, values[k]) for k in keys[:2]])
        assert gr.commit([Compare(k, 0) for k in keys[2:]], [Put(k, values[k]) for k in keys[2:]])
        reads = [read_prefix(f"{etcd_prefix}/"), *(read_key(k) for k in keys),
                 Read(f"{etcd_prefix}/", prefix_end(f"{etcd_prefix}/"), keys_only=True, limit=2)]
        assert gw.read(reads) == gr.read(reads)
        by_gw, by_gr = gw.get_many(keys), gr.get_many(keys)
        assert by_gw == by_gr
        assert {kv.key: kv.value for kv in by_gw} == values
        # a revision read by one transport is a valid CAS token for the other
        kv = gr.get(keys[0])
        assert gw.commit([Compare(keys[0], kv.mod_revision)], [Put(keys[0], b"changed")])
        assert gr.get(keys[0]).value == b"changed"
    finally:
        gw.close()
        gr.close()


# --------------------------------------------------------------------------- TLS + auth
ROOT_PASSWORD = "s3cret-" + secrets.token_hex(6)


@pytest.fixture(scope="module")
def tls_auth_etcd(tmp_path_factory):
    """A TLS etcd (client-cert auth) with authentication enabled: root + a read-only user."""
    certs = make_test_certs(str(tmp_path_factory.mktemp("certs")))
    server = EtcdServer(name="tls", cert_file=certs.server_cert, key_file=certs.server_key,
                        ca_file=certs.ca, client_cert_file=certs.client_cert,
                        client_key_file=certs.client_key)
    try:
        server.start()
        server.api("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
        server.api("/v3/auth/user/grant", {"user": "root", "role": "root"})
        server.api("/v3/auth/role/add", {"name": "ro"})
        server.api("/v3/auth/user/add", {"name": "reader", "password": "reader-pw"})
        server.api("/v3/auth/user/grant", {"user": "reader", "role": "ro"})
        server.api("/v3/auth/enable", {})
        token = server.api("/v3/auth/authenticate", {"name": "root", "password": ROOT_PASSWORD})["token"]
        b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        server.api("/v3/auth/role/grant", {"name": "ro", "perm": {"permType": "READ", "key": b64("/"),
                                                                  "range_end": b64("0")}}, token=token)
        yield server, certs
    finally:
        server.stop()


@etcd_only
def test_tls_and_auth(tls_auth_etcd, transport):
    server, certs = tls_auth_etcd
    tls = dict(ca_cert=certs.ca, cert=certs.client_cert, key=certs.client_key)
    key = f"/tls/{transport}-{secrets.token_hex(4)}"
    with open_datastore(server.endpoint, transport=transport, timeout=5, username="root",
                        password=ROOT_PASSWORD, **tls) as ds:
        assert ds.commit([Compare(key, 0)], [Put(key, b"secure")])
        assert ds.get(key).value == b"secure"
        # an invalid token (expired, member restarted...) is replaced once, transparently
        ds._token = "bogus.1"
        before = ds.requests
        assert ds.get(key).value == b"secure"
        assert ds.requests - before == 3  # refused, authenticate, retried
    with open_datastore(server.endpoint, transport=transport, timeout=5, username="reader",
                        password="reader-pw", **tls) as reader:
        assert reader.get(key).value == b"secure"
        with pytest.raises(DatastoreError, match="permission denied") as ei:
            reader.commit([], [Put(key, b"nope")])
        assert not isinstance(ei.value, DatastoreUnavailable)
    with open_datastore(server.endpoint, transport=transport, timeout=5, username="root",
                        password="wrong-password", **tls) as bad:
        with pytest.raises(DatastoreError) as ei:
            bad.get(key)
        assert not isinstance(ei.value, DatastoreUnavailable)
        assert "wrong-password" not in str(ei.value) and ROOT_PASSWORD not in str(ei.value)
    # no CA: the server's certificate cannot be verified -> a configuration error, quickly
    with open_datastore(server.endpoint, transport=transport, timeout=3, cert=certs.client_cert,
                        key=certs.client_key, username="root", password=ROOT_PASSWORD) as unverified:
        with pytest.raises(DatastoreError) as ei:
            unverified.get(key)
        assert not isinstance(ei.value, DatastoreUnavailable), ei.value
        assert ROOT_PASSWORD not in str(ei.value)


# --------------------------------------------------------------------------- failover
FAILOVER_TIMEOUT = 6.0


def _client_pinned_to(cluster, member, transport, timeout=FAILOVER_TIMEOUT):
    """A client whose endpoint list starts at ``member`` and that has talked to it."""
    eps = [member.endpoint] + [m.endpoint for m in cluster.members if m is not member]
    ds = open_datastore(eps, transport=transport, timeout=timeout)
    ds.get("/warmup")  # connection to ``member`` established and remembered
    return ds


def _use_after_failure(ds, key: str) -> None:
    # A write that met the broken member may have been applied while its answer was lost;
    # the retry on another member then finds the key existing (False).  That is the
    # contract (the engine re-reads and recognises its own write): either way, our value.
    # (The same holds for the second write: on a loaded machine the new leader can be slower than
    # one attempt's timeout, so the txn it applied is retried elsewhere and answered False.)
    ok = ds.commit([Compare(key, 0)], [Put(key, b"1")])
    kv = ds.get(key)
    assert kv.value == b"1", (ok, kv)
    ok = ds.commit([Compare(key, kv.mod_revision)], [Put(key, b"2")])
    kv2 = ds.read([read_key(key), read_key(key + "/none")])[0].kvs[0]
    assert kv2.value == b"2" and kv2.mod_revision > kv.mod_revision, (ok, kv, kv2)
    before = ds.requests  # the endpoint that worked is remembered
    ds.get(key)
    assert ds.requests - before == 1


@etcd_only
@pytest.mark.parametrize("how", ["kill", "pause"])
def test_cluster_failover(etcd_cluster, transport, how):
    leader = etcd_cluster.leader()
    ds = _client_pinned_to(etcd_cluster, leader, transport)
    try:
        if how == "kill":
            leader.kill()
        else:
            leader.pause()
        # the call that meets the broken member may wait out one attempt timeout (while the
        # followers elect a new leader, a write sent to one of them hangs); what is asserted is
        # the outcome -- every call answers, from another member -- not how long it took
        _use_after_failure(ds, f"/failover/{transport}-{how}-{secrets.token_hex(4)}")
        # a fresh client that starts at the broken member works too
        eps = [leader.endpoint] + [m.endpoint for m in etcd_cluster.members if m is not leader]
        with open_datastore(eps, transport=transport, timeout=FAILOVER_TIMEOUT) as ds2:
            assert ds2.get("/failover/none") is None
    finally:
        ds.close()
        etcd_cluster.heal()


@etcd_only
def test_member_restart_is_transparent(etcd_cluster, transport):
    """A client whose member is restarted (its keep-alive connection / channel is dead) just goes on."""
    etcd_cluster.heal()
    member = etcd_cluster.members[-1]
    ds = _client_pinned_to(etcd_cluster, member, transport)
    try:
        member.restart()
        key = f"/restart/{transport}-{secrets.token_hex(4)}"
        assert ds.commit([Compare(key, 0)], [Put(key, b"v")])
        assert ds.get(key).value == b"v"
    finally:
        ds.close()
        etcd_cluster.heal()


# --------------------------------------------------------------------------- gateway specifics
def test_gateway_keeps_one_connection_per_endpoint(etcd_server, etcd_prefix):
    with open_datastore(etcd_server.endpoint, transport="gateway", timeout=5) as ds:
        ds.get(f"{etcd_prefix}/a")
        sock = ds._eps[0].conn.sock
        local = sock.getsockname()
        for i in range(5):
            ds.commit([], [Put(f"{etcd_prefix}/a", str(i).encode())])
            ds.read([read_key(f"{etcd_prefix}/a"), read_prefix(f"{etcd_prefix}/")])
        assert ds._eps[0].conn.sock is sock and sock.getsockname() == local
        assert ds.requests == 11


def test_gateway_imports_no_grpc():
    """The plugin's exec path must not pay for grpc/protobuf imports."""
    code = ("import sys, cni_ipam.datastore as d; d.open_datastore('http://127.0.0.1:1', transport='gateway');"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'etcd3', 'google')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------------- leases (grpc: long-running code)
@pytest.mark.parametrize("transport", ["grpc", "memory"], indirect=True)
def test_lease_grant_keepalive_revoke(open_ds, etcd_prefix):
    """A key put with a lease lives while the lease is renewed, goes when it is revoked, and a
    compare on its mod revision fails once it is gone (the controller's leadership guard)."""
    ds = open_ds()
    try:
        lid, ttl = ds.lease_grant(5)
        assert lid > 0 and 0 < ttl <= 5
        key = f"{etcd_prefix}/leader"
        assert ds.commit([Compare(key, 0)], [Put(key, b"me", lease=lid)])
        rev = ds.last_revision
        assert ds.get(key).mod_revision == rev
        assert 0 < ds.lease_keepalive(lid) <= 5
        # a guarded write holds while the key is ours
        assert ds.commit([Compare(key, rev)], [Put(f"{etcd_prefix}/x", b"1")])
        assert ds.lease_revoke(lid)
        assert ds.get(key) is None                              # deleted with its lease
        assert ds.lease_keepalive(lid) == 0                     # expired / unknown: TTL 0
        assert not ds.lease_revoke(lid)
        assert not ds.commit([Compare(key, rev)], [Put(f"{etcd_prefix}/x", b"2")])
        assert ds.get(f"{etcd_prefix}/x").value == b"1"
        # a short lease that is not renewed expires by itself
        lid2, _ = ds.lease_grant(2)
        assert ds.commit([], [Put(f"{etcd_prefix}/short", b"v", lease=lid2)])
        deadline = time.monotonic() + 10
        while ds.get(f"{etcd_prefix}/short") is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ds.get(f"{etcd_prefix}/short") is None
    finally:
        ds.close()


def test_gateway_put_with_lease(etcd_server, etcd_prefix):
    """A Put's lease reaches etcd through the JSON gateway too (the key goes with the lease)."""
    g = open_datastore(etcd_server.endpoint, transport="gateway", timeout=5)
    r = open_datastore(etcd_server.endpoint, transport="grpc", timeout=5)
    try:
        lid, _ = r.lease_grant(30)
        assert g.commit([], [Put(f"{etcd_prefix}/k", b"v", lease=lid)])
        assert r.lease_revoke(lid)
        assert g.get(f"{etcd_prefix}/k") is None
    finally:
        g.close()
        r.close()

"""1. Engine vs the physical limit.

In-process ``IPAM.assign()`` on the fast path (the node already has a block
with a free address) against ONE bare etcd compare-and-swap transaction on the
same etcd, through the same transport (the JSON gateway, one keep-alive HTTP
connection), interleaved in the same loop.  A single range read is timed in
the same loop too, to explain the difference (fast path = 2 reads + 1 commit).
The fast path is timed twice: cold (no snapshot: 3 requests) and with a warm
snapshot (``IPAM(use_snapshot=True)``, what the plugin keeps per node: 1 request).

Also counts etcd requests (``Datastore.requests``) per ADD and DEL: fast
path, idempotent repeat, block claim, borrowing.
"""
from __future__ import annotations

import time

from bench.common import cdf_plot, ratio, stats_ms, table
from cni_ipam.datastore import Read, open_datastore
from cni_ipam.datastore.base import Compare, Put
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.pool import make_pool

NAME = "engine"
TITLE = "1. Engine fast path vs one bare etcd CAS txn"


def _req(hid: str, node: str, **kw) -> AssignRequest:
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def _counted(ds, fn):
    before = ds.requests
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, ds.requests - before, out


def request_counts(endpoint: str, prefix: str) -> list[dict]:
    """etcd requests per operation (deterministic: no other writer)."""
    rows = []
    with open_datastore(endpoint, timeout=10) as ds:
        ipam = IPAM(ds, prefix + "/counts")
        ipam.create_pool(make_pool("p", "10.1.0.0/16", 26))
        _, n, _ = _counted(ds, lambda: ipam.assign(_req("claim", "n-claim")))
        rows.append({"operation": "ADD, claims a new block (0 other blocks)", "requests": n})
        _, n, _ = _counted(ds, lambda: ipam.assign(_req("fast", "n-claim")))
        rows.append({"operation": "ADD, fast path (own block has room)", "requests": n})
        _, n, _ = _counted(ds, lambda: ipam.assign(_req("fast", "n-claim")))
        rows.append({"operation": "ADD repeated (handle exists: idempotent)", "requests": n})
        _, n, _ = _counted(ds, lambda: ipam.release("fast"))
        rows.append({"operation": "DEL, fast path", "requests": n})
        _, n, _ = _counted(ds, lambda: ipam.release("fast"))
        rows.append({"operation": "DEL repeated (nothing held)", "requests": n})
        warm = IPAM(ds, prefix + "/counts", use_snapshot=True)
        warm.assign(_req("s0", "n-claim"))
        _, n, _ = _counted(ds, lambda: warm.assign(_req("s1", "n-claim")))
        rows.append({"operation": "ADD, fast path, warm snapshot", "requests": n})
        ds.commit([], [Put(warm.keys.config, b'{"strictAffinity":false}')])   # any guarded change
        _, n, _ = _counted(ds, lambda: warm.assign(_req("s2", "n-claim")))
        rows.append({"operation": "ADD, fast path, stale snapshot (refused txn + re-read)", "requests": n})
        _, n, _ = _counted(ds, lambda: warm.release("s2"))
        rows.append({"operation": "DEL with a snapshot (keeps it current)", "requests": n})
        # a node whose own block is full claims a second one
        ipam2 = IPAM(ds, prefix + "/counts-full")
        ipam2.create_pool(make_pool("p", "10.2.0.0/16", 29))   # 5 usable addresses per block (bridge)
        for i in range(5):
            ipam2.assign(_req(f"f{i}", "n-full"))
        _, n, _ = _counted(ds, lambda: ipam2.assign(_req("f5", "n-full")))
        rows.append({"operation": "ADD, own block full -> claims another", "requests": n})
        # borrowing: routed mode, every block of the pool claimed by other nodes
        ipam3 = IPAM(ds, prefix + "/counts-borrow")
        ipam3.create_pool(make_pool("p", "10.3.0.0/29", 30))   # 2 blocks of 4 addresses
        ipam3.assign(_req("a", "n-a", mode="routed"))
        ipam3.assign(_req("b", "n-b", mode="routed"))
        _, n, _ = _counted(ds, lambda: ipam3.assign(_req("c", "n-c", mode="routed")))
        rows.append({"operation": "ADD, borrows from another node's block (routed)", "requests": n})
        _, n, _ = _counted(ds, lambda: ipam3.release("c"))
        rows.append({"operation": "DEL of a borrowed address", "requests": n})
    return rows


def run(ctx) -> dict:
    endpoint = ctx.etcd.endpoint
    prefix = "/bench/engine"
    reps = 150 if ctx.quick else 600
    node = "bench-node"
    node_s = "bench-node-snapshot"
    with open_datastore(endpoint, timeout=10) as ds:
        ipam = IPAM(ds, prefix)
        snap = IPAM(ds, prefix, use_snapshot=True)   # same store, same node, same connection
        ipam.create_pool(make_pool("p", "10.0.0.0/16", 26))
        ipam.assign(_req("warm", node))          # claims the node's block: later ADDs take the fast path
        ipam.release("warm")
        block_key = ds.get_prefix(ipam.keys.blocks)[0]
        # the bare CAS rewrites a key holding a block-sized value, guarded by its mod revision
        cas_key, cas_val = prefix + "/bare-cas", block_key.value
        # (the transport's own txn call: one POST /v3/kv/txn, no planning, no record codecs)
        _, rev = ds._call("txn", ds._txn, [], [Put(cas_key, cas_val)])

        def bare_cas():
            nonlocal rev
            ok, rev = ds._call("txn", ds._txn, [Compare(cas_key, rev)], [Put(cas_key, cas_val)])
            if not ok:
                raise RuntimeError("bare CAS lost (no other writer exists)")

        def one_read():
            ds.read([Read(block_key.key)])

        for i in range(20):  # warm up connection, etcd and caches
            bare_cas()
            one_read()
            ipam.assign(_req(f"w{i}", node))
            ipam.release(f"w{i}")
            snap.assign(_req(f"ws{i}", node_s))
            snap.release(f"ws{i}")

        cas, read, add, dele, add_s = [], [], [], [], []
        add_req, del_req, snap_req = set(), set(), set()
        conflicts0 = ipam.conflicts
        misses0, hits0 = snap.snapshot_misses, snap.snapshot_hits
        for i in range(reps):
            t, _, _ = _counted(ds, bare_cas)
            cas.append(t)
            t, _, _ = _counted(ds, one_read)
            read.append(t)
            t, n, res = _counted(ds, lambda: ipam.assign(_req(f"h{i}", node)))
            assert not res.existing and res.handle.addresses
            add.append(t)
            add_req.add(n)
            t, n, h = _counted(ds, lambda: ipam.release(f"h{i}"))
            assert h is not None
            dele.append(t)
            del_req.add(n)
            # the warm-snapshot instance (its own node and block, so the cold ADDs above do not
            # stale its snapshot; its DEL keeps the snapshot's copy of the block current)
            t, n, res = _counted(ds, lambda: snap.assign(_req(f"t{i}", node_s)))
            assert not res.existing and res.handle.addresses
            add_s.append(t)
            snap_req.add(n)
            snap.release(f"t{i}")
        conflicts = ipam.conflicts - conflicts0
        misses, hits = snap.snapshot_misses - misses0, snap.snapshot_hits - hits0

    counts = request_counts(endpoint, prefix)
    s = {"bare_cas": stats_ms(cas), "read": stats_ms(read), "allocate": stats_ms(add), "release": stats_ms(dele),
         "allocate_snapshot": stats_ms(add_s)}
    r_add = ratio(s["allocate"]["p50"], s["bare_cas"]["p50"])
    r_snap = ratio(s["allocate_snapshot"]["p50"], s["bare_cas"]["p50"])
    r_del = ratio(s["release"]["p50"], s["bare_cas"]["p50"])
    fast_add = max(add_req)
    snap_add = max(snap_req)
    rows = [
        ["one bare CAS txn (1 compare + 1 put)", s["bare_cas"]["p50"], s["bare_cas"]["p99"], 1, 1.0],
        ["one range read", s["read"]["p50"], s["read"]["p99"], 1, ratio(s["read"]["p50"], s["bare_cas"]["p50"])],
        ["allocate() fast path, cold (no snapshot)", s["allocate"]["p50"], s["allocate"]["p99"], fast_add, r_add],
        ["allocate() fast path, warm snapshot", s["allocate_snapshot"]["p50"], s["allocate_snapshot"]["p99"],
         snap_add, r_snap],
        ["release()", s["release"]["p50"], s["release"]["p99"], max(del_req), r_del],
    ]
    text = table(["in-process, same etcd, interleaved", "p50 ms", "p99 ms", "etcd requests", "p50 / CAS"], rows)
    text += "\n\n" + table(["operation", "etcd requests"], [[c["operation"], c["requests"]] for c in counts])
    text += (f"\n\n{reps} interleaved repetitions; CAS conflicts: {conflicts}; snapshot txns used: {hits}, "
             f"refused (stale): {misses}")
    plot = cdf_plot("engine", "Engine fast path vs one bare etcd CAS (same etcd, same run)",
                    {"bare CAS txn": cas, "1 range read": read, "allocate() fast path (cold)": add,
                     "allocate() fast path (warm snapshot)": add_s, "release()": dele},
                    log_x=True)
    data = {"reps": reps, "stats_ms": s, "ratio_allocate_p50_to_cas_p50": r_add,
            "ratio_allocate_snapshot_p50_to_cas_p50": r_snap, "requests_fast_path_add_snapshot": sorted(snap_req),
            "snapshot_hits": hits, "snapshot_misses": misses,
            "ratio_release_p50_to_cas_p50": r_del, "requests_fast_path_add": sorted(add_req),
            "requests_fast_path_del": sorted(del_req), "request_counts": counts, "conflicts": conflicts,
            "plot": plot}
    summary = [
        ("allocate() fast path p50 / bare CAS p50, warm snapshot", r_snap, "≤ 2.0", r_snap <= 2.0),
        ("allocate() fast path p50 / bare CAS p50, cold (no snapshot)", r_add, "", None),
        ("etcd requests per ADD, fast path: warm snapshot / cold", f"{snap_add} / {fast_add}", "≤ 3",
         max(snap_add, fast_add) <= 3),
        ("etcd requests per DEL, fast path", max(del_req), "", None),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": data, "summary": summary}

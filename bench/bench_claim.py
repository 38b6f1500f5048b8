"""4. Cluster size does not slow a claim.

A node with no block claims one (in-process ``IPAM.assign()``, gateway
transport) while the pool (10.0.0.0/12 in /26 blocks: 16,384 blocks) already
holds 0, 1,000 or 10,000 blocks claimed by other nodes.  Two layouts of those
blocks, written straight into etcd in big transactions:

* ``hashed`` -- what other nodes claiming with the engine's own rule leave
  behind: each node (4 blocks each) takes the first free block at or after the
  index hashed from its name;
* ``packed`` -- the worst case for the search: one dense run of N blocks that
  starts exactly at the claiming node's own start index.

After each claim the new block, its affinity and the handle are deleted
again, so every repetition claims against the same N.  Configurations are
interleaved in one loop (same etcd, same run).
"""
from __future__ import annotations

import time

from bench.common import bulk_put, log, pyplot, ratio, save_plot, stats_ms, table
from cni_ipam.datastore import Delete, open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.keys import Keys
from cni_ipam.ipam.pool import make_pool, start_index

NAME = "claim"
TITLE = "4. Claim latency vs blocks already claimed in the pool"
POOL_CIDR, BLOCK = "10.0.0.0/12", 26
CLAIMER = "claimer-node"
SIZES = (0, 1000, 10000)


def layout_hashed(n_blocks: int, n: int, per_node: int = 4) -> dict[int, str]:
    taken: dict[int, str] = {}
    node = 0
    while len(taken) < n:
        name = f"other-{node:05d}"
        i = start_index(name, n_blocks)
        for _ in range(min(per_node, n - len(taken))):
            while i in taken:
                i = (i + 1) % n_blocks
            taken[i] = name
        node += 1
    return taken


def layout_packed(n_blocks: int, n: int) -> dict[int, str]:
    s = start_index(CLAIMER, n_blocks)
    return {(s + k) % n_blocks: f"other-{k // 4:05d}" for k in range(n)}


def populate(ds, prefix: str, taken: dict[int, str]) -> None:
    keys = Keys(prefix)
    pool = make_pool("big", POOL_CIDR, BLOCK)
    ipam = IPAM(ds, prefix)
    ipam.create_pool(pool)
    items = []
    for idx, node in taken.items():
        net = pool.block_at(idx)
        items.append((keys.block(net), Block.new(net, pool.name, node).to_json()))
        items.append((keys.affinity_key(node, net), b'{"pool":"big","mode":"bridge"}'))
    bulk_put(ds, items)


def run(ctx) -> dict:
    reps = 15 if ctx.quick else 60
    endpoint = ctx.etcd.endpoint
    n_blocks = make_pool("x", POOL_CIDR, BLOCK).n_blocks
    configs = [("hashed", 0)] + [(lay, n) for n in SIZES[1:] for lay in ("hashed", "packed")]
    with open_datastore(endpoint, timeout=30) as ds:
        t0 = time.monotonic()
        for lay, n in configs:
            taken = layout_hashed(n_blocks, n) if lay == "hashed" else layout_packed(n_blocks, n)
            populate(ds, f"/bench/claim/{lay}-{n}", taken)
        log(f"claim: wrote {sum(n for _, n in configs):,} blocks in {time.monotonic() - t0:.1f} s")
        ipams = {c: IPAM(ds, f"/bench/claim/{c[0]}-{c[1]}") for c in configs}
        lat: dict[tuple, list[float]] = {c: [] for c in configs}
        reqs: dict[tuple, set[int]] = {c: set() for c in configs}
        where: dict[tuple, str] = {}
        for r in range(reps + 2):
            for c in configs:
                ipam = ipams[c]
                hid = f"claim-{r}"
                before = ds.requests
                t = time.perf_counter()
                res = ipam.assign(AssignRequest(handle_id=hid, node=CLAIMER, network="net", container_id=hid,
                                                ifname="eth0"))
                t = time.perf_counter() - t
                n_req = ds.requests - before
                blk = res.handle.addresses[0].block
                where[c] = str(blk)
                # undo: the pool goes back to exactly N claimed blocks
                ds.commit([], [Delete(ipam.keys.block(blk)), Delete(ipam.keys.affinity_key(CLAIMER, blk)),
                               Delete(ipam.keys.handle(hid))])
                if r >= 2:   # the first two rounds warm up
                    lat[c].append(t)
                    reqs[c].add(n_req)
    st = {f"{c[0]}-{c[1]}": stats_ms(v) for c, v in lat.items()}
    base = st["hashed-0"]["p50"]
    rows = []
    for c in configs:
        s = st[f"{c[0]}-{c[1]}"]
        rows.append([c[0] if c[1] else "(empty pool)", f"{c[1]:,}", s["p50"], s["p99"], ratio(s["p50"], base),
                     "/".join(str(x) for x in sorted(reqs[c])), where[c]])
    text = table(["layout", "blocks claimed", "claim p50 ms", "p99 ms", "p50 / empty", "etcd requests",
                  "block claimed"], rows)
    text += (f"\n\npool {POOL_CIDR} in /{BLOCK} blocks ({n_blocks:,}); {reps} interleaved repetitions each; "
             f"the claiming node's start index: {start_index(CLAIMER, n_blocks)}")
    plot = None
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for lay, mark in (("hashed", "o-"), ("packed", "s--")):
            xs = [n for n in SIZES if (lay, n) in lat or n == 0]
            keys_ = [f"{lay}-{n}" if n else "hashed-0" for n in xs]
            ax.errorbar(xs, [st[k]["p50"] for k in keys_],
                        yerr=[[0] * len(xs), [st[k]["p99"] - st[k]["p50"] for k in keys_]],
                        fmt=mark, capsize=4, label=f"{lay} layout (p50, bar to p99)")
        ax.set_xscale("symlog", linthresh=1000)
        ax.set_xlabel("blocks already claimed by other nodes")
        ax.set_ylabel("claim latency (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title("Claiming a block: latency vs pool occupancy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        plot = save_plot(fig, "claim")
    r_h = ratio(st["hashed-10000"]["p50"], base)
    r_p = ratio(st["packed-10000"]["p50"], base)
    data = {"reps": reps, "pool": POOL_CIDR, "block_size": BLOCK, "n_blocks": n_blocks, "stats_ms": st,
            "requests": {f"{c[0]}-{c[1]}": sorted(v) for c, v in reqs.items()},
            "ratio_hashed_10000": r_h, "ratio_packed_10000": r_p, "plot": plot}
    summary = [
        ("claim p50 at 10,000 blocks / at 0 (hashed layout)", r_h, "≤ 1.5", r_h <= 1.5),
        ("claim p50 at 10,000 blocks / at 0 (packed worst case)", r_p, "≤ 1.5", r_p <= 1.5),
        ("etcd requests per claim at 0 / 10,000 hashed / 10,000 packed",
         f"{max(reqs[('hashed', 0)])} / {max(reqs[('hashed', 10000)])} / {max(reqs[('packed', 10000)])}", "", None),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": data, "summary": summary}

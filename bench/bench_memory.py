"""6. Memory: peak RSS of one plugin exec, and of ``cni-ipam show`` over 10,000 blocks.

Peak RSS is the child's ``ru_maxrss`` as reported by GNU time (``/usr/bin/time
-f %M``): a process spawned straight from this (large) Python process would
report the spawner's pages too (Linux carries the high-water mark across
fork/vfork + exec).  Without GNU time the numbers are upper bounds.
"""
from __future__ import annotations

import os
import random
import time

from bench.common import (ExecEnv, binary_note, bulk_put, cni_env, cni_ipam_conf, exec_once, host_local_conf,
                          log, pyplot, save_plot, table)
from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.keys import Keys
from cni_ipam.ipam.pool import make_pool

NAME = "memory"
TITLE = "6. Peak RSS: one plugin exec; cni-ipam show over 10,000 blocks"
GNU_TIME = os.path.exists("/usr/bin/time")
N_BLOCKS = 10000


def peak(argv, env, stdin: bytes, reps: int = 5):
    """(max peak RSS in KB over reps, last ExecResult, wall seconds list)."""
    best, last, walls = 0, None, []
    for _ in range(reps):
        if GNU_TIME:
            r = exec_once(["/usr/bin/time", "-f", "@@maxrss %M", *argv], env, stdin)
            line = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.startswith("@@maxrss ")]
            kb = int(line[-1].split()[1]) if line else 0
        else:
            r = exec_once(argv, env, stdin)
            kb = r.maxrss_kb
        best = max(best, kb)
        last = r
        walls.append(r.seconds)
    return best, last, walls


def populate_show_store(ds, prefix: str, n: int) -> None:
    """``n`` claimed /26 blocks over 200 nodes, each block with a few allocations (+ their handles)."""
    keys = Keys(prefix)
    ipam = IPAM(ds, prefix)
    pool = make_pool("big", "10.0.0.0/12", 26)
    ipam.create_pool(pool)
    rng = random.Random(7)
    items = []
    for idx in range(n):
        node = f"node-{idx % 200:03d}"
        net = pool.block_at(idx)
        b = Block.new(net, pool.name, node)
        for k in range(rng.randint(0, 8)):
            hid = f"net.{node}-{idx}-{k}.eth0"
            ip = b.allocate(hid)
            items.append((keys.handle(hid), b'{"id":"%s","node":"%s","network":"net","addresses":'
                                            b'[{"ip":"%s","block":"%s","pool":"big","prefixlen":26}]}'
                          % (hid.encode(), node.encode(), str(ip).encode(), str(net).encode())))
        items.append((keys.block(net), b.to_json()))
        items.append((keys.affinity_key(node, net), b'{"pool":"big","mode":"bridge"}'))
    bulk_put(ds, items)


def run(ctx) -> dict:
    endpoint = ctx.etcd.endpoint
    reps = 3 if ctx.quick else 7
    rows, data = [], {"gnu_time": bool(GNU_TIME), "exec_kb": {}, "show": {}}
    with ExecEnv("memory") as xe:
        prefix = "/bench/memory"
        with open_datastore(endpoint, timeout=30) as ds:
            IPAM(ds, prefix).create_pool(make_pool("p", "10.220.0.0/16", 26))
        impls = xe.impls(python_s=False)
        for i in impls:
            conf = (host_local_conf(xe.tmp) if i.kind == "host-local"
                    else cni_ipam_conf(endpoint, prefix, xe.tmp, node="mem-node"))
            exec_once(i.argv, dict(i.env, **cni_env("ADD", "warm")), conf)   # warm caches
            exec_once(i.argv, dict(i.env, **cni_env("DEL", "warm")), conf)
            for verb in ("ADD", "DEL", "VERSION"):
                kbs = []
                for k in range(reps):
                    cid = f"mem{k}"
                    kb, r, _ = peak(i.argv, dict(i.env, **cni_env(verb, cid)), conf, reps=1)
                    if r.rc != 0:
                        raise RuntimeError(f"{i.name} {verb} failed: {r.stdout[:300]!r} {r.stderr[-300:]!r}")
                    kbs.append(kb)
                data["exec_kb"][f"{i.name} {verb}"] = max(kbs)
                rows.append([i.name, verb, round(max(kbs) / 1024, 1)])

        # cni-ipam show over a store with 10,000 blocks
        sprefix = "/bench/memory-show"
        t0 = time.monotonic()
        with open_datastore(endpoint, timeout=60) as ds:
            populate_show_store(ds, sprefix, N_BLOCKS)
        log(f"memory: wrote {N_BLOCKS:,} blocks for show in {time.monotonic() - t0:.1f} s")
        show_rows = []
        cli_impls = [i for i in impls if i.kind == "cni-ipam"]
        for i in cli_impls:
            for args in (["show"], ["show", "--blocks"], ["show", "-o", "json"]):
                argv = i.argv + args + ["--etcd-endpoints", endpoint, "--etcd-prefix", sprefix]
                env = dict(i.env)
                kb, r, walls = peak(argv, env, b"", reps=3 if ctx.quick else 5)
                label = f"{i.name} {' '.join(args)}"
                if r.rc != 0:
                    show_rows.append([label, None, None, f"FAILED rc={r.rc}: "
                                      + r.stderr.decode(errors='replace').strip().splitlines()[-1][:120]])
                    data["show"][label] = {"rc": r.rc, "stderr": r.stderr.decode(errors="replace")[-500:]}
                    continue
                walls.sort()
                show_rows.append([label, round(kb / 1024, 1), round(walls[len(walls) // 2], 2),
                                  f"{len(r.stdout):,} bytes of output"])
                data["show"][label] = {"peak_kb": kb, "wall_s_median": walls[len(walls) // 2],
                                       "stdout_bytes": len(r.stdout)}
    text = table(["implementation", "verb", "peak RSS MB"], rows)
    text += "\n\n" + table([f"cni-ipam CLI over {N_BLOCKS:,} blocks", "peak RSS MB", "wall s (median)", "note"],
                           show_rows)
    text += (f"\n\npeak RSS by {'GNU time (child only)' if GNU_TIME else 'wait4 (UPPER BOUND: includes the spawner)'}"
             f"; max over {reps} execs; {binary_note()}")
    main = "binary" if any(i.name == "binary" for i in impls) else "python -m"
    add_mb = data["exec_kb"][f"{main} ADD"] / 1024
    plugin_mb = max(v for k, v in data["exec_kb"].items() if k.startswith(main)) / 1024
    show_key = f"{main} show"
    show_mb = data["show"].get(show_key, {}).get("peak_kb")
    plot = None
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r[0]}\n{r[1]}" for r in rows] + [r[0].replace(" show", "\nshow") for r in show_rows if r[1]]
        vals = [r[2] for r in rows] + [r[1] for r in show_rows if r[1]]
        ax.bar(range(len(vals)), vals, color=["tab:blue"] * len(rows) + ["tab:orange"] * (len(vals) - len(rows)))
        ax.axhline(60, color="red", ls="--", lw=1, label="plugin target 60 MB")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
        ax.set_ylabel("peak RSS (MB)")
        ax.set_title("Peak RSS per process")
        ax.legend(fontsize=8)
        plot = save_plot(fig, "memory")
    data["plot"] = plot
    summary = [
        (f"peak RSS of one plugin exec, MB ({main}, worst verb)", round(plugin_mb, 1), "≤ 60", plugin_mb <= 60),
        (f"peak RSS of ADD, MB ({main})", round(add_mb, 1), "", None),
        (f"peak RSS of `cni-ipam show` over {N_BLOCKS:,} blocks, MB ({main})",
         round(show_mb / 1024, 1) if show_mb else "show failed", "", None if show_mb else False),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": data, "summary": summary}

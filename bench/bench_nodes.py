"""5. Many nodes, one etcd cluster: 20 simulated nodes x 50 ADDs, 3 etcd members on loopback.

Each node is a separate process with its own ``nodename`` (bench/node_worker.py);
all start on one signal.  Two runs on the same cluster:

* ``engine`` -- each node process calls ``IPAM.assign()`` 50 times (the
  datastore/CAS contention, without exec cost);
* ``exec`` -- each node process execs the plugin 50 times in a row (as a
  node's runtime would; the binary if built), so 20 execs run at any moment
  on this 2-core machine;
* ``served`` -- the same execs through an exec server (``cni-ipam exec-server``; one for
  the machine, as each node runs its own), as deploy/daemonset.yaml runs the plugin.

Pool 10.64.0.0/16 in /28 blocks (13 usable addresses in bridge mode), so every
node claims about 4 blocks while the others claim theirs.  Each node lists the
3 endpoints starting at a different member.  Afterwards every handle and every
block is read back: no address may be held twice, and every block allocation
must match its handle.
"""
from __future__ import annotations

import json
import subprocess
import time

from bench.common import (PYTHON, ROOT, SERVED_LABEL, ExecEnv, ExecServer, binary_note, log, pyplot, save_plot,
                          stats_ms, table)
from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool

NAME = "nodes"
TITLE = "5. 20 nodes x 50 ADDs against a 3-member etcd cluster"
NODES, ADDS = 20, 50


def verify(endpoints, prefix: str) -> dict:
    with open_datastore(endpoints, timeout=30) as ds:
        ipam = IPAM(ds, prefix)
        handles = ipam.handles()
        held: dict[str, str] = {}
        dup = []
        for h in handles:
            for a in h.addresses:
                if str(a.ip) in held:
                    dup.append(str(a.ip))
                held[str(a.ip)] = h.id
        in_blocks: dict[str, str] = {}
        for kv in ds.get_prefix(ipam.keys.blocks):
            b = Block.from_json(kv.value)
            for o, hid in b.allocations.items():
                ip = str(b.ip(o))
                if ip in in_blocks:
                    dup.append(ip)
                in_blocks[ip] = hid
        mismatch = sorted(ip for ip in set(held) | set(in_blocks) if held.get(ip) != in_blocks.get(ip))
        n_blocks = len(ds.get_prefix(ipam.keys.blocks, keys_only=True))
    return {"handles": len(handles), "addresses": len(held), "duplicates": sorted(set(dup)),
            "block_handle_mismatches": mismatch[:20], "n_mismatches": len(mismatch), "blocks": n_blocks}


def run_mode(cluster, mode: str, xe: ExecEnv, impl) -> dict:
    prefix = f"/bench/nodes-{mode}"
    eps = cluster.endpoints
    with open_datastore(eps, timeout=30) as ds:
        IPAM(ds, prefix).create_pool(make_pool("p", "10.64.0.0/16", 28))
    procs = []
    for i in range(NODES):
        rot = eps[i % len(eps):] + eps[:i % len(eps)]
        argv = [PYTHON, "-m", "bench.node_worker", "--endpoints", ",".join(rot), "--prefix", prefix,
                "--node", f"node-{i:02d}", "--n", str(ADDS), "--mode", "engine" if mode == "engine" else "exec",
                "--tmp", str(xe.tmp)]
        if mode != "engine":
            argv += ["--plugin", json.dumps(impl.argv), "--plugin-env", json.dumps(impl.env)]
        procs.append(subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=xe.base_env()))
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"node worker did not start: {line!r} {p.stderr.read()[-2000:]!r}")
        t_go = time.time()
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"node worker failed (rc {p.returncode}): {err[-2000:]!r}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    t_end = max(o["t_end"] for o in outs)
    wall = t_end - t_go
    ok = sum(ADDS - len(o["failures"]) for o in outs)
    lat = [x for o in outs for x in o["lat"]]
    attempts = [x for o in outs for x in o["attempts"]]
    res = {"mode": mode, "wall_s": round(wall, 2), "allocations": ok, "per_s": round(ok / wall, 1),
           "lat_ms": stats_ms(lat), "conflicts": sum(o["conflicts"] for o in outs),
           "retries": sum(attempts) - len(attempts), "max_attempts": max(attempts or [0]),
           "failures": [f for o in outs for f in o["failures"]][:20],
           "requests": sum(o["requests"] or 0 for o in outs) if mode == "engine" else None,
           "finish_times": sorted(o["t_end"] - t_go for o in outs)}
    res["verify"] = verify(eps, prefix)
    return res


def run(ctx) -> dict:
    from tests.support.etcd import EtcdCluster
    modes = ["engine", "exec"]
    results = {}
    names = {"engine": "engine"}
    cluster = EtcdCluster(3)
    try:
        cluster.start()
        log(f"nodes: 3-member cluster up: {', '.join(cluster.endpoints)}")
        with ExecEnv("nodes") as xe, ExecServer(xe.tmp) as server:
            impls = {i.name: i for i in xe.impls(python_s=False, host_local=False, server=server if server.ok else None)}
            impl = xe.plugin_impl()
            names["exec"] = f"exec ({impl.name})"
            if SERVED_LABEL in impls:   # one exec server for the 20 "nodes" of this machine
                modes.append("served")
                names["served"] = f"exec ({SERVED_LABEL})"
            for mode in modes:
                log(f"nodes: {NODES} nodes x {ADDS} ADDs ({names[mode]})")
                results[mode] = run_mode(cluster, mode, xe, impls[SERVED_LABEL] if mode == "served" else impl)
    finally:
        cluster.stop()
    rows = []
    for mode in modes:
        r = results[mode]
        v = r["verify"]
        rows.append([names[mode], r["allocations"], r["wall_s"], r["per_s"],
                     r["lat_ms"]["p50"], r["lat_ms"]["p99"], r["conflicts"], r["retries"], r["max_attempts"],
                     len(v["duplicates"]), v["n_mismatches"], v["blocks"]])
    text = table(["ADDs by", "allocations", "wall s", "allocations/s", "per-ADD p50 ms", "p99 ms",
                  "CAS conflicts", "retries", "max attempts", "duplicate IPs", "block/handle mismatches",
                  "blocks claimed"], rows)
    text += f"\n\n{NODES} node processes x {ADDS} ADDs each, 3 etcd members on loopback; {binary_note()}"
    for mode in modes:
        if results[mode]["failures"]:
            text += f"\n\n{mode} FAILURES:\n" + "\n".join(results[mode]["failures"][:10])
    plot = None
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in modes:
            ft = results[mode]["finish_times"]
            ax.step([0] + ft, [0] + [(k + 1) * ADDS for k in range(len(ft))], where="post",
                    label=f"{names[mode]}: {results[mode]['per_s']:.0f} allocations/s")
        ax.set_xlabel("seconds since the start signal")
        ax.set_ylabel("allocations done (by finished nodes)")
        ax.set_title(f"{NODES} nodes x {ADDS} ADDs, 3-member etcd")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        plot = save_plot(fig, "nodes")
    e, x = results["engine"], results["exec"]
    sv = results.get("served")
    clean = all(not r["verify"]["duplicates"] and not r["verify"]["n_mismatches"]
                and r["verify"]["handles"] == NODES * ADDS and not r["failures"] for r in results.values())
    summary = [("aggregate allocations/s, in-process engine per node", e["per_s"], "≥ 50", e["per_s"] >= 50)]
    # the target is read on the nodes as deployed (each runs its exec server, deploy/daemonset.yaml);
    # the binary alone is the fallback's figure
    if sv is not None:
        summary += [(f"aggregate allocations/s, plugin exec per ADD ({SERVED_LABEL})", sv["per_s"], "≥ 50",
                     sv["per_s"] >= 50),
                    (f"aggregate allocations/s, plugin exec per ADD ({impl.name}, no exec server)", x["per_s"], "",
                     None)]
    else:
        summary.append((f"aggregate allocations/s, plugin exec per ADD ({impl.name})", x["per_s"], "≥ 50",
                        x["per_s"] >= 50))
    summary += [
        ("CAS conflicts / retries (engine; exec" + ("; served)" if sv else ")"),
         f"{e['conflicts']} / {e['retries']}; {x['conflicts']} / {x['retries']}"
         + (f"; {sv['conflicts']} / {sv['retries']}" if sv else ""), "", None),
        (f"{NODES * ADDS:,} ADDs each, no duplicate address, blocks agree with handles", clean, "yes", clean),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": results, "summary": summary}

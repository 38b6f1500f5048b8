"""3. Burst on one node: 100 ADDs started at once (kubelet after a node reboot), then 100 DELs.

Every exec is a separate plugin process (the binary if built), all sharing the
node's host lock file, as on a real node.  Twice: with the node's exec server (as
deploy/daemonset.yaml runs it: the binary's launcher hands each exec to a fork of the warm
plugin; the issue's target is read here) and the binary alone (the fallback: every exec starts
the interpreter and imports the plugin).  Reported: wall time from the first
spawn to the last exit, per-exec latency p50/p99, CAS conflicts and attempts
(the plugin logs ``CAS conflict`` at debug level and ``(attempts N)`` per ADD),
and that every ADD got a distinct address and every DEL released it.

Two baselines through the same harness, side by side in the same run (what the machine and the
harness give, so the absolute target can be read against them): Debian's Go host-local, 100
ADDs at once (its own file lock and data dir), and the hello-world bundle (bench exec's floor of
the packaging: the same bootloader and options, none of cni_ipam), 100 execs at once.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import tempfile
import time

from bench.common import (HOST_LOCAL, SERVED_LABEL, ExecEnv, ExecServer, Impl, binary_note, cni_env, cni_ipam_conf, host_local_conf, log,
                          pyplot, save_plot, stats_ms, table)
from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool

NAME = "burst"
TITLE = "3. Burst: 100 ADDs at once on one node, then 100 DELs"


def burst(impl, conf: bytes, verb: str, ids: list[str], timeout: float = 120.0):
    """Start one process per id at once; reap them as they exit.  Returns per-exec
    (start, end, rc, stdout, stderr) and the wall time."""
    procs, files, ends, rcs = {}, {}, {}, {}
    pending: set[int] = set()

    def reap():  # only our own pids: never reap someone else's child (etcd)
        for pid in list(pending):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                cid, p, _ = procs[pid]
                ends[cid] = time.perf_counter()
                p.returncode = rcs[cid] = os.waitstatus_to_exitcode(status)
                pending.discard(pid)

    t_first = time.perf_counter()
    for cid in ids:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        t0 = time.perf_counter()
        p = subprocess.Popen(impl.argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                             env=dict(impl.env, **cni_env(verb, cid)), close_fds=True)
        p.stdin.write(conf)   # < pipe buffer: never blocks
        p.stdin.close()
        procs[p.pid] = (cid, p, t0)
        pending.add(p.pid)
        files[cid] = (out, err)
        reap()   # early finishers get their real end time
    deadline = time.monotonic() + timeout
    while pending:
        reap()
        if pending:
            if time.monotonic() > deadline:
                for pid in pending:
                    procs[pid][1].kill()
                deadline = float("inf")
            time.sleep(0.001)
    wall = max(ends.values()) - t_first
    results = []
    for cid, p, t0 in procs.values():
        out, err = files[cid]
        out.seek(0)
        err.seek(0)
        results.append({"id": cid, "start": t0 - t_first, "end": ends[cid] - t_first,
                        "seconds": ends[cid] - t0, "rc": rcs[cid], "stdout": out.read(), "stderr": err.read()})
        out.close()
        err.close()
    return wall, results


def _one(impl, conf: bytes, logfile, ids: list[str], endpoint: str, prefix: str) -> dict:
    """100 ADDs at once, then 100 DELs at once, through ``impl``; what they gave."""
    from bench.common import exec_once
    # warm-up exec (page cache for the binary; the exec server's first fork), then an empty log
    for verb in ("ADD", "DEL"):
        exec_once(impl.argv, dict(impl.env, **cni_env(verb, "warmup")), conf)
    logfile.unlink(missing_ok=True)
    n = len(ids)
    log(f"burst: {n} x ADD at once ({impl.name})")
    add_wall, adds = burst(impl, conf, "ADD", ids)
    add_log = logfile.read_text() if logfile.exists() else ""
    logfile.unlink(missing_ok=True)
    log(f"burst: {n} x DEL at once ({impl.name})")
    del_wall, dels = burst(impl, conf, "DEL", ids)
    del_log = logfile.read_text() if logfile.exists() else ""
    logfile.unlink(missing_ok=True)
    ips, add_fail, del_fail = [], [], []
    for r in adds:
        try:
            doc = json.loads(r["stdout"])
            ips.append(ipaddress.ip_interface(doc["ips"][0]["address"]).ip)
        except (ValueError, KeyError, IndexError, TypeError):
            doc = None
        if r["rc"] != 0 or doc is None:
            add_fail.append(f"{impl.name} {r['id']}: rc={r['rc']} {r['stdout'][:200]!r} {r['stderr'][-200:]!r}")
    for r in dels:
        if r["rc"] != 0:
            del_fail.append(f"{impl.name} {r['id']}: rc={r['rc']} {r['stdout'][:200]!r} {r['stderr'][-200:]!r}")
    with open_datastore(endpoint, timeout=10) as ds:
        left = IPAM(ds, prefix).handles()
    import re
    add_attempts = [int(m) for m in re.findall(r"\(attempts (\d+)\)", add_log)]
    return {"impl": impl.name, "add_wall": add_wall, "del_wall": del_wall, "adds": adds, "dels": dels,
            "ips": ips, "add_fail": add_fail, "del_fail": del_fail, "left": left,
            "distinct": len(set(ips)) == len(ips) == n, "add_attempts": add_attempts,
            "conflicts": add_log.count("CAS conflict") + del_log.count("CAS conflict"),
            "lock_waits": add_log.count("host lock"),
            "s_add": stats_ms([r["seconds"] for r in adds]), "s_del": stats_ms([r["seconds"] for r in dels])}


def run(ctx) -> dict:
    n = 100
    endpoint = ctx.etcd.endpoint
    prefix = "/bench/burst"
    with open_datastore(endpoint, timeout=10) as ds:
        IPAM(ds, prefix).create_pool(make_pool("p", "10.210.0.0/16", 26))
    runs = []
    with ExecEnv("burst") as xe, ExecServer(xe.tmp) as server:
        impls = xe.impls(python_s=False, host_local=False, server=server if server.ok else None)
        impls = [i for i in impls if i.name in ("binary", SERVED_LABEL)] or impls[:1]
        conf = cni_ipam_conf(endpoint, prefix, xe.tmp, node="burst-node", log_level="debug")
        logfile = xe.tmp / "cni-ipam-burst-node.log"
        for k, impl in enumerate(impls):
            runs.append(_one(impl, conf, logfile, [f"burst{k}x{i:04d}" for i in range(n)], endpoint, prefix))
        baselines = _baselines(xe, [f"burst{i:04d}" for i in range(n)])

    # the target is read on the node as deployed (deploy/daemonset.yaml runs the exec server);
    # the binary alone is the fallback's figure
    main = next((r for r in runs if r["impl"] == SERVED_LABEL), runs[0])
    rows = []
    for r in runs:
        rows += [[r["impl"], "ADD x100", round(r["add_wall"], 2), r["s_add"]["p50"], r["s_add"]["p99"],
                  r["s_add"]["max"], n - len(r["add_fail"])],
                 [r["impl"], "DEL x100", round(r["del_wall"], 2), r["s_del"]["p50"], r["s_del"]["p99"],
                  r["s_del"]["max"], n - len(r["del_fail"])]]
    text = table(["how", "burst", "wall s", "per-exec p50 ms", "p99 ms", "max ms", "succeeded"], rows)
    for r in runs:
        a = r["add_attempts"]
        text += (f"\n\n{r['impl']}: CAS conflicts (debug log): {r['conflicts']}; ADD attempts: "
                 f"{sum(a)} for {len(a)} ADDs (retries: {sum(a) - len(a)}); "
                 f"distinct addresses: {len(set(r['ips']))}/{n}; handles left after the DELs: {len(r['left'])}")
    text += f"\n\n{binary_note()}"
    if baselines:
        text += "\n\nBaselines, the same harness in the same run (100 execs at once): " + "; ".join(
            f"{name}: wall {wall:.2f} s ({ok_n}/{n} succeeded)" for name, (wall, ok_n) in baselines.items())
    failures = [f for r in runs for f in r["add_fail"] + r["del_fail"]]
    if failures:
        text += "\n\nFAILED:\n" + "\n".join(failures[:10])

    plot = None
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(runs), figsize=(8 * len(runs), 4.5), squeeze=False)
        for ax, r in zip(axes[0], runs):
            for k, (label, res) in enumerate((("ADD", r["adds"]), ("DEL", r["dels"]))):
                order = sorted(res, key=lambda x: x["start"])
                for j, x in enumerate(order):
                    ax.plot([x["start"] * 1000, x["end"] * 1000], [j + k * (n + 10)] * 2,
                            color="tab:blue" if label == "ADD" else "tab:orange", lw=1)
            ax.set_xlabel("ms since the first spawn")
            ax.set_ylabel("exec (ADDs below, DELs above)")
            ax.set_title(f"{r['impl']}: 100 ADDs {r['add_wall']:.2f} s; 100 DELs {r['del_wall']:.2f} s")
            ax.grid(True, alpha=0.3)
        plot = save_plot(fig, "burst")
    oks = {r["impl"]: not r["add_fail"] and not r["del_fail"] and r["distinct"] and not r["left"] for r in runs}
    ok = all(oks.values())
    data = {"n": n, "impl": main["impl"], "add_wall_s": main["add_wall"], "del_wall_s": main["del_wall"],
            "add_ms": main["s_add"], "del_ms": main["s_del"], "cas_conflicts": main["conflicts"],
            "add_attempts_total": sum(main["add_attempts"]), "adds_logged": len(main["add_attempts"]),
            "distinct_addresses": len(set(main["ips"])), "handles_left": len(main["left"]),
            "failures": failures, "lock_timeouts_logged": main["lock_waits"], "plot": plot,
            "baselines_wall_s": {name: wall for name, (wall, _) in baselines.items()},
            "runs": {r["impl"]: {"add_wall_s": r["add_wall"], "del_wall_s": r["del_wall"], "add_ms": r["s_add"],
                                 "del_ms": r["s_del"], "cas_conflicts": r["conflicts"],
                                 "distinct_addresses": len(set(r["ips"])), "handles_left": len(r["left"]),
                                 "ok": oks[r["impl"]]} for r in runs}}
    m = main
    summary = [
        (f"100 ADDs at once: wall s ({m['impl']})", round(m["add_wall"], 2), "≤ 1.5 (issue 17)", m["add_wall"] <= 1.5),
        (f"100 DELs at once: wall s ({m['impl']})", round(m["del_wall"], 2), "", None),
        (f"burst ADD per-exec p50 / p99 ms ({m['impl']})", f"{m['s_add']['p50']:.0f} / {m['s_add']['p99']:.0f}", "", None),
        *((f"100 ADDs / 100 DELs at once: wall s ({r['impl']}, no exec server)",
           f"{r['add_wall']:.2f} / {r['del_wall']:.2f}", "", None) for r in runs if r is not m),
        *((f"100 execs at once: wall s, {name} (baseline)", round(wall, 2), "", None)
          for name, (wall, _) in baselines.items()),
        ("burst: all succeeded, distinct addresses, nothing left", ok, "yes", ok),
        ("burst: CAS conflicts / retries", f"{m['conflicts']} / {sum(m['add_attempts']) - len(m['add_attempts'])}",
         "", None),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": data, "summary": summary}


def _baselines(xe: ExecEnv, ids: list[str]) -> dict:
    """{name: (wall s, succeeded)} of 100 host-local ADDs and 100 hello-world bundle execs at once."""
    from bench.bench_exec import HELLO_LABEL, hello_bundle
    out = {}
    runs = []
    if os.path.exists(HOST_LOCAL):
        runs.append((Impl("host-local (Go) ADD", [HOST_LOCAL], {"PATH": "/usr/bin:/bin", "CNI_PATH": "/usr/lib/cni"},
                          "host-local"), host_local_conf(xe.tmp), "ADD"))
    hello = hello_bundle()
    if hello is not None:
        runs.append((Impl(HELLO_LABEL, [str(hello)], {"PATH": "/usr/bin:/bin", "CNI_IPAM_EXEC_SOCKET": ""}, "hello"),
                     b"{}", "VERSION"))
    for impl, conf, verb in runs:
        log(f"burst: {len(ids)} x {impl.name} at once (baseline)")
        wall, res = burst(impl, conf, verb, ids)
        out[impl.name] = (wall, sum(1 for r in res if r["rc"] == 0))
    return out

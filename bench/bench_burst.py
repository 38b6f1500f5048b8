"""3. Burst on one node: 100 ADDs started at once (kubelet after a node reboot), then 100 DELs.

Every exec is a separate plugin process (the binary if built), all sharing the
node's host lock file, as on a real node.  Reported: wall time from the first
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

from bench.common import (HOST_LOCAL, ExecEnv, Impl, binary_note, cni_env, cni_ipam_conf, host_local_conf, log,
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


def run(ctx) -> dict:
    n = 100
    endpoint = ctx.etcd.endpoint
    prefix = "/bench/burst"
    with open_datastore(endpoint, timeout=10) as ds:
        IPAM(ds, prefix).create_pool(make_pool("p", "10.210.0.0/16", 26))
    with ExecEnv("burst") as xe:
        impl = xe.plugin_impl()
        conf = cni_ipam_conf(endpoint, prefix, xe.tmp, node="burst-node", log_level="debug")
        logfile = xe.tmp / "cni-ipam-burst-node.log"
        # warm-up exec (bytecode cache for python -m; page cache for the binary), then an empty log
        from bench.common import exec_once
        for verb in ("ADD", "DEL"):
            exec_once(impl.argv, dict(impl.env, **cni_env(verb, "warmup")), conf)
        logfile.unlink(missing_ok=True)
        ids = [f"burst{i:04d}" for i in range(n)]
        log(f"burst: {n} x ADD at once ({impl.name})")
        add_wall, adds = burst(impl, conf, "ADD", ids)
        add_log = logfile.read_text() if logfile.exists() else ""
        logfile.unlink(missing_ok=True)
        log(f"burst: {n} x DEL at once")
        del_wall, dels = burst(impl, conf, "DEL", ids)
        del_log = logfile.read_text() if logfile.exists() else ""
        baselines = _baselines(xe, ids)

    ips, add_fail, del_fail = [], [], []
    for r in adds:
        try:
            doc = json.loads(r["stdout"])
            ips.append(ipaddress.ip_interface(doc["ips"][0]["address"]).ip)
        except (ValueError, KeyError, IndexError, TypeError):
            doc = None
        if r["rc"] != 0 or doc is None:
            add_fail.append(f"{r['id']}: rc={r['rc']} {r['stdout'][:200]!r} {r['stderr'][-200:]!r}")
    for r in dels:
        if r["rc"] != 0:
            del_fail.append(f"{r['id']}: rc={r['rc']} {r['stdout'][:200]!r} {r['stderr'][-200:]!r}")
    with open_datastore(endpoint, timeout=10) as ds:
        left = IPAM(ds, prefix).handles()
    distinct = len(set(ips)) == len(ips) == n

    def attempts(text):
        import re
        a = [int(m) for m in re.findall(r"\(attempts (\d+)\)", text)]
        return a
    add_attempts = attempts(add_log)
    conflicts = add_log.count("CAS conflict") + del_log.count("CAS conflict")
    lock_waits = add_log.count("host lock")
    s_add = stats_ms([r["seconds"] for r in adds])
    s_del = stats_ms([r["seconds"] for r in dels])
    rows = [["ADD x100", round(add_wall, 2), s_add["p50"], s_add["p99"], s_add["max"], n - len(add_fail)],
            ["DEL x100", round(del_wall, 2), s_del["p50"], s_del["p99"], s_del["max"], n - len(del_fail)]]
    text = table(["burst", "wall s", "per-exec p50 ms", "p99 ms", "max ms", "succeeded"], rows)
    text += (f"\n\nCAS conflicts (debug log): {conflicts}; ADD attempts: "
             f"{sum(add_attempts)} for {len(add_attempts)} ADDs (retries: {sum(add_attempts) - len(add_attempts)}); "
             f"distinct addresses: {len(set(ips))}/{n}; handles left after the DELs: {len(left)}; "
             f"{binary_note()} ({impl.name} used)")
    if baselines:
        text += "\n\nBaselines, the same harness in the same run (100 execs at once): " + "; ".join(
            f"{name}: wall {wall:.2f} s ({ok_n}/{n} succeeded)" for name, (wall, ok_n) in baselines.items())
    if add_fail or del_fail:
        text += "\n\nFAILED:\n" + "\n".join((add_fail + del_fail)[:10])

    plot = None
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for k, (label, res) in enumerate((("ADD", adds), ("DEL", dels))):
            order = sorted(res, key=lambda r: r["start"])
            for j, r in enumerate(order):
                ax.plot([r["start"] * 1000, r["end"] * 1000], [j + k * (n + 10)] * 2,
                        color="tab:blue" if label == "ADD" else "tab:orange", lw=1)
        ax.set_xlabel("ms since the first spawn")
        ax.set_ylabel("exec (ADDs below, DELs above)")
        ax.set_title(f"100 ADDs at once: wall {add_wall:.2f} s; 100 DELs at once: wall {del_wall:.2f} s")
        ax.grid(True, alpha=0.3)
        plot = save_plot(fig, "burst")
    ok = not add_fail and not del_fail and distinct and not left
    data = {"n": n, "impl": impl.name, "add_wall_s": add_wall, "del_wall_s": del_wall, "add_ms": s_add,
            "del_ms": s_del, "cas_conflicts": conflicts, "add_attempts_total": sum(add_attempts),
            "adds_logged": len(add_attempts), "distinct_addresses": len(set(ips)), "handles_left": len(left),
            "failures": add_fail + del_fail, "lock_timeouts_logged": lock_waits, "plot": plot,
            "baselines_wall_s": {name: wall for name, (wall, _) in baselines.items()}}
    summary = [
        (f"100 ADDs at once: wall s ({impl.name})", round(add_wall, 2), "≤ 1.5 (issue 17)", add_wall <= 1.5),
        ("100 DELs at once: wall s", round(del_wall, 2), "", None),
        ("burst ADD per-exec p50 / p99 ms", f"{s_add['p50']:.0f} / {s_add['p99']:.0f}", "", None),
        *((f"100 execs at once: wall s, {name} (baseline)", round(wall, 2), "", None)
          for name, (wall, _) in baselines.items()),
        ("burst: all succeeded, distinct addresses, nothing left", ok, "yes", ok),
        ("burst: CAS conflicts / retries", f"{conflicts} / {sum(add_attempts) - len(add_attempts)}", "", None),
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
        runs.append((Impl(HELLO_LABEL, [str(hello)], {"PATH": "/usr/bin:/bin"}, "hello"), b"{}", "VERSION"))
    for impl, conf, verb in runs:
        log(f"burst: {len(ids)} x {impl.name} at once (baseline)")
        wall, res = burst(impl, conf, verb, ids)
        out[impl.name] = (wall, sum(1 for r in res if r["rc"] == 0))
    return out

"""7. `cni-ipam controller` at Kubernetes' documented limits: 5,000 nodes, 150,000 pods.

The store is written directly (batched txns of 120 puts: blocks, affinities, handles
as the plugin writes them), the pods and nodes go into the HTTPS API stand-in
(tests/support/k8s_standin.py) in this process.  Then:

* ``controller --once --leak-grace-period 0`` with 100 leaked pods and 5 deleted
  nodes (150 more pods): its cache sync (list of 150,000 pods + 5,000 nodes), the
  reconcile pass (log line: seconds, etcd requests), peak RSS of the process;
* the same again on the cleaned store (the steady-state pass: nothing to free);
* ``cni-ipam show`` and ``cni-ipam check`` on that store (wall, peak RSS).

Targets (issue 13): one full pass <= 30 s and <= 500 MB RSS on this 2-core machine.
Peak RSS via GNU time (``/usr/bin/time -f %M``), as benchmark 6 does.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import ROOT, bulk_put, log, table
from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.keys import Keys
from cni_ipam.ipam.pool import make_pool

NAME = "controller"
TITLE = "7. Controller at 5,000 nodes / 150,000 pods: one reconcile pass, show, check"
GNU_TIME = os.path.exists("/usr/bin/time")
PASS_TARGET_S = 30.0
RSS_TARGET_MB = 500.0


def populate(ds, api, prefix: str, n_nodes: int, pods_per_node: int) -> dict:
    """Pool 10.0.0.0/12 in /26 blocks; one block per node holding its pods' addresses."""
    keys = Keys(prefix)
    pool = make_pool("big", "10.0.0.0/12", 26)
    IPAM(ds, prefix).create_pool(pool)
    items, pods = [], []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for n in range(n_nodes):
        node = f"node-{n:05d}"
        net = pool.block_at(n)
        b = Block.new(net, pool.name, node)
        for k in range(pods_per_node):
            name, cid, uid = f"pod-{n:05d}-{k:02d}", uuid.uuid4().hex, str(uuid.uuid4())
            hid = f"k8s-pod-network.{cid}.eth0"
            ip = b.allocate(hid)
            items.append((keys.handle(hid), json.dumps({
                "id": hid, "node": node, "network": "k8s-pod-network", "containerID": cid, "ifname": "eth0",
                "pod": name, "namespace": f"ns-{k % 50:02d}", "podUID": uid, "mode": "bridge", "created": now,
                "addresses": [{"ip": str(ip), "block": str(net), "pool": pool.name, "prefixlen": 26,
                               "gateway": str(b.gateway)}]}, separators=(",", ":")).encode()))
            pods.append((f"ns-{k % 50:02d}", name, node, uid))
        items.append((keys.block(net), b.to_json()))
        items.append((keys.affinity_key(node, net), b'{"pool":"big","mode":"bridge","state":"confirmed"}'))
    bulk_put(ds, items)
    for n in range(n_nodes):
        api.nodes[f"node-{n:05d}"] = {"kind": "Node", "apiVersion": "v1", "metadata": {
            "name": f"node-{n:05d}", "uid": str(uuid.uuid4()), "resourceVersion": "1"}, "spec": {}, "status": {}}
    api._order["nodes"] = None
    api.add_pods_bulk(pods)
    return {"records": len(items), "pods": pods}


def proc_cpu(pid) -> float:
    """CPU seconds (user + system) a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            p = f.read().rsplit(")", 1)[1].split()
        return (int(p[11]) + int(p[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed(argv, env, timeout=900):
    """(rc, wall s, peak RSS MB, stdout, stderr) of one process."""
    if GNU_TIME:
        argv = ["/usr/bin/time", "-f", "@@maxrss %M", *argv]
    t0 = time.monotonic()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    kb = 0
    for ln in p.stderr.splitlines():
        if ln.startswith("@@maxrss "):
            kb = int(ln.split()[1])
    return p.returncode, wall, kb / 1024, p.stdout, p.stderr


def parse_pass(stderr: str) -> dict:
    m = re.search(r"pass: ([\d.]+)s \(cpu ([\d.]+)s\), (\d+) etcd request\(s\), (\d+) API request\(s\), (\d+) candidate\(s\), "
                  r"released (\d+) handle\(s\) / (\d+) address\(es\), deleted (\d+) block", stderr)
    if not m:
        raise RuntimeError(f"no pass line in the controller's log: {stderr[-1500:]}")
    keys = ("seconds", "cpu_seconds", "etcd_requests", "api_requests", "candidates", "released", "addresses", "blocks_deleted")
    d = dict(zip(keys, (float(m.group(1)), float(m.group(2)), *map(int, m.groups()[2:]))))
    stamps = re.findall(r"^(\d\d\d\d-\d\d-\d\d \d\d:\d\d:\d\d,\d\d\d) .*(became the leader|listed \d+ pods|pass: )",
                        stderr, re.M)

    def t(s):
        return time.mktime(time.strptime(s[:19], "%Y-%m-%d %H:%M:%S")) + int(s[20:]) / 1000
    start = next((t(s) for s, w in stamps if w == "became the leader"), None)
    listed = next((t(s) for s, w in stamps if w.startswith("listed")), None)
    if start and listed:
        d["cache_sync_s"] = round(listed - start, 2)
    return d


def run(ctx) -> dict:
    from tests.support.k8s_standin import K8sStandin
    quick = ctx.quick or os.environ.get("BENCH_CONTROLLER_QUICK") == "1"
    n_nodes, per_node = (500, 30) if quick else (5000, 30)
    endpoint = ctx.etcd.endpoint
    prefix = "/bench/controller"
    tmp = Path(tempfile.mkdtemp(prefix="cni-ipam-bench-controller-"))
    env = {k: v for k, v in os.environ.items() if k != "CNI_COMMAND"}
    env.update(ETCD_ENDPOINTS=endpoint, CNI_IPAM_ETCD_PREFIX=prefix, PYTHONPATH=str(ROOT))
    py = [sys.executable, "-m", "cni_ipam"]
    data: dict = {"nodes": n_nodes, "pods": n_nodes * per_node, "quick": quick}
    with K8sStandin(tmp) as api:
        t0 = time.monotonic()
        with open_datastore(endpoint, transport="grpc", timeout=60) as ds:
            pop = populate(ds, api, prefix, n_nodes, per_node)
        data["setup_s"] = round(time.monotonic() - t0, 1)
        log(f"controller: wrote {pop['records']:,} records and {n_nodes * per_node:,} pods in {data['setup_s']} s")
        # leaks: 100 pods gone; 5 nodes gone with their pods
        pods = pop["pods"]
        for ns, name, _, _ in pods[7::len(pods) // 100][:100]:
            api.pods.pop((ns, name), None)
        gone_nodes = [f"node-{n:05d}" for n in range(3, n_nodes, n_nodes // 5)][:5]
        for node in gone_nodes:
            api.nodes.pop(node, None)
        for ns, name, node, _ in pods:
            if node in gone_nodes:
                api.pods.pop((ns, name), None)
        api._order = {"pods": None, "nodes": None}
        kc = api.write_kubeconfig(tmp / "kc")
        argv = py + ["controller", "--kubeconfig", kc, "--once", "--leak-grace-period", "0", "--lease-ttl", "5",
                     "--timeout", "60"]
        rows = []
        for label in ("pass with 250 leaks + 5 deleted nodes", "steady pass (nothing to free)"):
            e0 = proc_cpu(ctx.etcd.pid)
            rc, wall, mb, _, err = timed(argv, env)
            etcd_cpu = round(proc_cpu(ctx.etcd.pid) - e0, 2)
            if rc != 0:
                raise RuntimeError(f"controller --once failed (rc {rc}): {err[-1500:]}")
            d = parse_pass(err)
            d.update(wall_s=round(wall, 2), peak_rss_mb=round(mb, 1), etcd_cpu_s_whole_run=etcd_cpu,
                     load_avg=round(os.getloadavg()[0], 1))
            data[label] = d
            rows.append([label, d["seconds"], d["cpu_seconds"], etcd_cpu, d.get("cache_sync_s"), round(wall, 1),
                         round(mb, 1),
                         d["etcd_requests"], d["api_requests"], d["released"], d["blocks_deleted"]])
            log(f"controller: {label}: {d}")
        cli_rows = []
        for args in (["show"], ["show", "-o", "json"], ["check"]):
            rc, wall, mb, out, err = timed(py + args, env)
            cli_rows.append([" ".join(args), rc, round(wall, 2), round(mb, 1)])
            data[" ".join(args)] = {"rc": rc, "wall_s": round(wall, 2), "peak_rss_mb": round(mb, 1)}
            if rc not in (0, 1):
                raise RuntimeError(f"cni-ipam {' '.join(args)} failed: {err[-800:]}")
    with open_datastore(endpoint, timeout=60) as ds:   # leave the shared etcd small for the next benchmark
        from bench.common import bulk_delete_prefix
        bulk_delete_prefix(endpoint, prefix)
    text = table(["controller --once", "pass s", "pass CPU s", "etcd CPU s (whole run)", "cache sync s", "process wall s", "peak RSS MB", "etcd requests",
                  "API requests", "handles released", "blocks deleted"], rows)
    text += "\n\n" + table([f"CLI at {n_nodes * per_node:,} handles", "rc", "wall s", "peak RSS MB"], cli_rows)
    text += (f"\n\n{n_nodes:,} nodes, {n_nodes * per_node:,} pods ({'QUICK size' if quick else 'full size'}); "
             f"setup {data['setup_s']} s; API stand-in in the benchmark process (HTTPS, pages of 500); "
             f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work inflates "
             f"wall times; CPU s is the controller's own)")
    first = data["pass with 250 leaks + 5 deleted nodes"]
    steady = data["steady pass (nothing to free)"]
    worst_mb = max(first["peak_rss_mb"], steady["peak_rss_mb"])
    summary = [
        ("reconcile pass at scale (s)", first["seconds"], f"<= {PASS_TARGET_S:g}", first["seconds"] <= PASS_TARGET_S),
        ("steady pass (s)", steady["seconds"], f"<= {PASS_TARGET_S:g}", steady["seconds"] <= PASS_TARGET_S),
        ("controller peak RSS (MB)", worst_mb, f"<= {RSS_TARGET_MB:g}",
         worst_mb <= RSS_TARGET_MB if GNU_TIME and worst_mb else None),
        ("reconcile pass CPU time (s)", first["cpu_seconds"], None, None),
        ("etcd requests per pass", steady["etcd_requests"], None, None),
        ("check wall (s)", data["check"]["wall_s"], None, None),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": data, "summary": summary}

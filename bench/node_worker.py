"""One simulated node for benchmark 5 (a separate process, its own ``nodename``).

Prints ``ready`` once set up, waits for a line on stdin (the common start
signal), runs N ADDs, prints one JSON line with what happened, and exits.

``--mode engine``: N in-process ``IPAM.assign()`` calls (gateway transport, all
endpoints of the cluster, this node's own rotation of them).
``--mode exec``: N sequential execs of the plugin (``--plugin`` argv, JSON
list), each with this node's lock file and debug log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--mode", choices=("engine", "exec"), default="engine")
    ap.add_argument("--plugin", default="[]")
    ap.add_argument("--plugin-env", default="{}")
    ap.add_argument("--tmp", default="/tmp")
    a = ap.parse_args()
    lat, failures, attempts = [], [], []
    conflicts = 0
    if a.mode == "engine":
        from cni_ipam.datastore import open_datastore
        from cni_ipam.ipam.engine import IPAM, AssignRequest
        from cni_ipam.ipam.errors import IPAMError
        ds = open_datastore(a.endpoints, timeout=30)
        ipam = IPAM(ds, a.prefix)
        ipam.pools()   # connect before the start signal
        print("ready", flush=True)
        sys.stdin.readline()
        t_start = time.time()
        for i in range(a.n):
            hid = f"net.{a.node}-c{i}.eth0"
            t0 = time.perf_counter()
            try:
                res = ipam.assign(AssignRequest(handle_id=hid, node=a.node, network="net",
                                                container_id=f"{a.node}-c{i}", ifname="eth0"))
                attempts.append(res.attempts)
            except IPAMError as e:
                failures.append(f"{hid}: {e.msg}")
            lat.append(time.perf_counter() - t0)
        t_end = time.time()
        conflicts = ipam.conflicts
        requests = ds.requests
        ds.close()
    else:
        argv = json.loads(a.plugin)
        env = json.loads(a.plugin_env)
        tmp = Path(a.tmp)
        logfile = tmp / f"cni-ipam-{a.node}.log"
        conf = json.dumps({"cniVersion": "1.0.0", "name": "net", "type": "bridge",
                           "ipam": {"type": "cni-ipam", "etcd_endpoints": a.endpoints, "etcd_prefix": a.prefix,
                                    "nodename": a.node, "lock_file": str(tmp / f"lock-{a.node}"),
                                    "log_file": str(logfile), "log_level": "debug",
                                    "timeout_seconds": 30}}).encode()
        print("ready", flush=True)
        sys.stdin.readline()
        t_start = time.time()
        for i in range(a.n):
            cid = f"{a.node}-c{i}"
            e = dict(env, CNI_COMMAND="ADD", CNI_CONTAINERID=cid, CNI_IFNAME="eth0",
                     CNI_NETNS="/var/run/netns/bench")
            t0 = time.perf_counter()
            p = subprocess.run(argv, input=conf, env=e, capture_output=True, timeout=120)
            lat.append(time.perf_counter() - t0)
            if p.returncode != 0 or b'"ips"' not in p.stdout:
                failures.append(f"{cid}: rc={p.returncode} {p.stdout[:200]!r} {p.stderr[-200:]!r}")
        t_end = time.time()
        text = logfile.read_text() if logfile.exists() else ""
        conflicts = text.count("CAS conflict")
        attempts = [int(x) for x in re.findall(r"\(attempts (\d+)\)", text)]
        requests = None
    print(json.dumps({"node": a.node, "pid": os.getpid(), "t_start": t_start, "t_end": t_end, "lat": lat,
                      "failures": failures, "conflicts": conflicts, "attempts": attempts,
                      "requests": requests}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measure PyInstaller layouts side by side: exec time of CNI VERSION and of a real ADD, size on disk.

    python packaging/measure.py [--runs 20] [BINARY ...]

Without arguments it measures dist/cni-ipam/cni-ipam (onedir) and dist/cni-ipam-onefile
(build them first: `make binary binary-onefile`), plus ``python3 -m cni_ipam`` for reference,
and any build under build/measure/ (see the README: the --no-grpc variants).  A throw-away etcd
is started on loopback (tests/support/etcd.py); each binary gets its own key prefix and a pool
10.244.0.0/24 (blockSize 28).  Runs are interleaved (binary A, B, C, A, B, C, ...) so that
noise from other work on the machine hits every candidate alike.  Each ADD uses a new container
id and is followed by an (untimed) DEL.  Prints a table; ``--json FILE`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.etcd import EtcdServer, delete_prefix  # noqa: E402


def size_on_disk(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(b, n)) for b, _, ns in os.walk(path) for n in ns
               if not os.path.islink(os.path.join(b, n)))


def bundle_of(exe: str) -> str:
    """What counts for an executable's size: its onedir bundle (dir with _internal/), else itself."""
    d = os.path.dirname(os.path.abspath(exe))
    return d if os.path.isdir(os.path.join(d, "_internal")) else os.path.abspath(exe)


def candidates() -> list[tuple[str, list[str], str | None]]:
    """(label, argv, path whose size counts)."""
    out = []
    for label, exe, sized in (("onedir", "dist/cni-ipam/cni-ipam", "dist/cni-ipam"),
                              ("onefile", "dist/cni-ipam-onefile", "dist/cni-ipam-onefile"),
                              ("onedir --no-grpc", "build/measure/nogrpc/cni-ipam/cni-ipam",
                               "build/measure/nogrpc/cni-ipam"),
                              ("onefile --no-grpc", "build/measure/nogrpc/cni-ipam-onefile",
                               "build/measure/nogrpc/cni-ipam-onefile")):
        if os.access(os.path.join(ROOT, exe), os.X_OK):
            out.append((label, [os.path.join(ROOT, exe)], os.path.join(ROOT, sized)))
    out.append(("python3 -m cni_ipam", [sys.executable, "-m", "cni_ipam"], None))
    return out


def run(argv, env, stdin: bytes) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, input=stdin, capture_output=True, timeout=60)
    return time.perf_counter() - t0, p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binaries", nargs="*", help="executables to measure (default: see above)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    cands = ([(os.path.relpath(os.path.abspath(b), ROOT), [os.path.abspath(b)], bundle_of(b))
              for b in args.binaries] if args.binaries else candidates())

    from cni_ipam.datastore import open_datastore
    from cni_ipam.ipam.engine import IPAM
    from cni_ipam.ipam.pool import make_pool

    tmp = tempfile.mkdtemp(prefix="cni-ipam-measure-")
    server = EtcdServer(name="measure")
    results = []
    try:
        server.start()
        confs = []
        for i, (label, argv_, _) in enumerate(cands):
            prefix = f"/measure/{i}"
            ds = open_datastore(server.endpoint)
            try:
                IPAM(ds, prefix).create_pool(make_pool("measure", "10.244.0.0/24", 28))
            finally:
                ds.close()
            confs.append(json.dumps({
                "cniVersion": "1.0.0", "name": "measure", "type": "bridge",
                "ipam": {"type": "cni-ipam", "etcd_endpoints": server.endpoint, "etcd_prefix": prefix,
                         "nodename": "measure-node", "lock_file": os.path.join(tmp, f"lock{i}"),
                         "log_file": os.path.join(tmp, f"log{i}")}}).encode())
        base = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            base["PYTHONDONTWRITEBYTECODE"] = "1"  # as the environment has it (python3 -m only)
        ver_env = {**base, "CNI_COMMAND": "VERSION"}
        times = {label: {"version": [], "add": []} for label, _, _ in cands}
        for _ in range(2):  # warm the page cache, untimed
            for label, argv_, _ in cands:
                run(argv_, {**ver_env, "PYTHONPATH": ROOT} if argv_[0] == sys.executable else ver_env, b"")
        for r in range(args.runs):
            for i, (label, argv_, _) in enumerate(cands):
                extra = {"PYTHONPATH": ROOT} if argv_[0] == sys.executable else {}
                dt, p = run(argv_, {**ver_env, **extra}, b'{"cniVersion":"1.0.0"}')
                if p.returncode != 0:
                    raise SystemExit(f"{label}: VERSION failed: {p.stdout!r} {p.stderr!r}")
                times[label]["version"].append(dt)
                cid = f"measure-{r}"
                env = {**base, **extra, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
                       "CNI_NETNS": "/var/run/netns/measure", "CNI_PATH": "/usr/lib/cni"}
                dt, p = run(argv_, env, confs[i])
                if p.returncode != 0:
                    raise SystemExit(f"{label}: ADD failed: {p.stdout!r} {p.stderr!r}")
                times[label]["add"].append(dt)
                run(argv_, {**env, "CNI_COMMAND": "DEL"}, confs[i])
        for label, argv_, sized in cands:
            t = times[label]
            results.append({"label": label, "argv": argv_, "size_bytes": size_on_disk(sized) if sized else None,
                            "version_median_ms": round(statistics.median(t["version"]) * 1000, 1),
                            "add_median_ms": round(statistics.median(t["add"]) * 1000, 1),
                            "version_ms": [round(x * 1000, 1) for x in t["version"]],
                            "add_ms": [round(x * 1000, 1) for x in t["add"]], "runs": args.runs})
    finally:
        for i in range(len(cands)):
            try:
                delete_prefix(server.endpoint, f"/measure/{i}")
            except Exception:
                pass
        server.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)

    w = max(22, *(len(r["label"]) for r in results))
    print(f"{'layout':<{w}} {'VERSION median':>15} {'ADD median':>11} {'size on disk':>13}   (runs: {args.runs})")
    for r in results:
        size = f"{r['size_bytes'] / 1e6:.1f} MB" if r["size_bytes"] else "-"
        print(f"{r['label']:<{w}} {r['version_median_ms']:>12.1f} ms {r['add_median_ms']:>8.1f} ms {size:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measure PyInstaller layouts side by side: exec time of CNI VERSION and of a real ADD, size on disk.

    python packaging/measure.py --build [--runs 20] [--json FILE]    # build the variants, then measure
    python packaging/measure.py [--runs 20] [BINARY ...]

Variants (``--build`` makes the missing/stale ones): the shipped onedir (dist/cni-ipam), onefile
(dist/cni-ipam-onefile), both again with python3-etcd3/grpc bundled (build/measure/grpc), and
onedir with its modules in the PYZ archive instead of loose .pyc files (build/measure/archive);
plus ``python3 -m cni_ipam`` for reference.  A throw-away etcd is started on loopback
(tests/support/etcd.py); each candidate gets its own key prefix and a pool 10.244.0.0/24
(blockSize 28).  Runs are interleaved (A, B, C, A, B, C, ...) so that noise from other work on
the machine hits every candidate alike.  Per run: CNI VERSION; a real ADD (new container id;
followed by an untimed DEL); the CLI's ``show`` (grpc vs the JSON gateway).  Prints medians and
sizes; ``--json FILE`` writes every sample.
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


# (label, mode, dist dir relative to the root, extra build.py arguments)
VARIANTS = [
    ("onedir (shipped)", "onedir", "dist", []),
    ("onefile", "onefile", "dist", []),
    ("onedir --with-grpc", "onedir", "build/measure/grpc", ["--with-grpc"]),
    ("onefile --with-grpc", "onefile", "build/measure/grpc", ["--with-grpc"]),
    ("onedir, PYZ archive", "onedir", "build/measure/archive", ["--spec-arg=--archive"]),
    ("onedir, default rthooks", "onedir", "build/measure/rthooks", ["--spec-arg=--keep-rthooks"]),
]


def variant_paths(mode: str, dist: str) -> tuple[str, str]:
    """(executable, what counts for the size)"""
    d = os.path.join(ROOT, dist)
    if mode == "onefile":
        return os.path.join(d, "cni-ipam-onefile"), os.path.join(d, "cni-ipam-onefile")
    return os.path.join(d, "cni-ipam", "cni-ipam"), os.path.join(d, "cni-ipam")


def build_variants() -> None:
    for label, mode, dist, extra in VARIANTS:
        print(f"measure: building {label}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "build.py"), "-q", "--if-stale",
                        "--mode", mode, "--dist", os.path.join(ROOT, dist),
                        "--work", os.path.join(ROOT, "build" if dist == "dist" else dist + "-work"), *extra],
                       check=True, stdout=subprocess.DEVNULL)


def candidates() -> list[tuple[str, list[str], str | None]]:
    """(label, argv, path whose size counts) of every variant that has been built."""
    out = []
    for label, mode, dist, _ in VARIANTS:
        exe, sized = variant_paths(mode, dist)
        if os.access(exe, os.X_OK):
            out.append((label, [exe], sized))
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
    ap.add_argument("--build", action="store_true", help="build the missing/stale variants first")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.build:
        build_variants()
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
        times = {label: {"version": [], "add": [], "cli": []} for label, _, _ in cands}
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
                cli_env = {**base, **extra, "ETCD_ENDPOINTS": server.endpoint,
                           "CNI_IPAM_ETCD_PREFIX": f"/measure/{i}"}
                dt, p = run(argv_ + ["show"], cli_env, b"")
                if p.returncode != 0:
                    raise SystemExit(f"{label}: show failed: {p.stdout!r} {p.stderr!r}")
                times[label]["cli"].append(dt)
        for label, argv_, sized in cands:
            t = times[label]
            results.append({"label": label, "argv": argv_, "size_bytes": size_on_disk(sized) if sized else None,
                            "version_median_ms": round(statistics.median(t["version"]) * 1000, 1),
                            "add_median_ms": round(statistics.median(t["add"]) * 1000, 1),
                            "cli_show_median_ms": round(statistics.median(t["cli"]) * 1000, 1),
                            "cli_ms": [round(x * 1000, 1) for x in t["cli"]],
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
    print(f"{'layout':<{w}} {'VERSION median':>15} {'ADD median':>11} {'CLI show median':>16} {'size on disk':>13}"
          f"   (runs: {args.runs})")
    for r in results:
        size = f"{r['size_bytes'] / 1e6:.1f} MB" if r["size_bytes"] else "-"
        print(f"{r['label']:<{w}} {r['version_median_ms']:>12.1f} ms {r['add_median_ms']:>8.1f} ms "
              f"{r['cli_show_median_ms']:>13.1f} ms {size:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

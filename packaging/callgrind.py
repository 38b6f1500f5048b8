#!/usr/bin/env python3
"""Instructions per exec (valgrind/callgrind; deterministic, unlike wall time on a shared machine).

    python3 packaging/callgrind.py dist/cni-ipam/cni-ipam build/hello/cni-ipam/cni-ipam \\
        "python3 -S -c pass"

For each command: CNI ADD, DEL and VERSION against a throw-away etcd on loopback
(tests/support/etcd.py; a pool 10.200.0.0/16, blockSize 26), three warm-up ADD/DEL pairs first,
then one measured exec per verb.  Prints millions of instructions (Ir) per verb and the exit codes.

A PyInstaller onedir program re-executes itself once (same pid, LD_LIBRARY_PATH set): callgrind
then writes the second image's profile over the first one's.  ``--dump-before=execve`` writes the
first image's counts to a file of its own first, and the figure here is the sum of both -- what an
exec costs (the first image is ~0.3 M instructions).
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import cni_env, cni_ipam_conf, exec_once  # noqa: E402
from tests.support.etcd import EtcdServer  # noqa: E402


def instructions(argv: list[str], env: dict, stdin: bytes, keep: str | None = None) -> tuple[int, float | None]:
    """(exit code, M instructions summed over every image of the exec); ``keep``: a directory
    to leave the profiles in (for callgrind_annotate)."""
    with tempfile.TemporaryDirectory(prefix="cni-ipam-cg-") as tmp:
        d = keep or tmp
        os.makedirs(d, exist_ok=True)
        p = subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=yes", "--dump-before=execve",
                            f"--callgrind-out-file={d}/cg.%p"] + argv,
                           env=env, input=stdin, capture_output=True)
        total = 0
        for name in glob.glob(f"{d}/cg.*"):
            with open(name) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total += int(line.split()[1])
                        break
        return p.returncode, (round(total / 1e6, 1) if total else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commands", nargs="+", help="a binary, or a quoted command line")
    ap.add_argument("--keep", metavar="DIR", help="leave the profiles in DIR/<n>-<verb>/ (callgrind_annotate)")
    args = ap.parse_args(argv)
    from cni_ipam.datastore import open_datastore
    from cni_ipam.ipam.engine import IPAM
    from cni_ipam.ipam.pool import make_pool
    etcd = EtcdServer(name="callgrind")
    etcd.start()
    try:
        with open_datastore(etcd.endpoint, timeout=10) as ds:
            IPAM(ds, "/cg").create_pool(make_pool("p", "10.200.0.0/16", 26))
        for i, command in enumerate(args.commands):
            cmd = shlex.split(command)
            conf = cni_ipam_conf(etcd.endpoint, "/cg", Path(tempfile.mkdtemp(prefix="cni-ipam-cg-")),
                                 node=f"n{i}", name="net")
            env = {"PATH": "/usr/bin:/bin", "CNI_PATH": "/usr/lib/cni"}
            for k in range(3):
                exec_once(cmd, dict(env, **cni_env("ADD", f"w{k}")), conf)
                exec_once(cmd, dict(env, **cni_env("DEL", f"w{k}")), conf)
            res = {verb: instructions(cmd, dict(env, **cni_env(verb, "cg1")), conf,
                                      keep=args.keep and os.path.join(args.keep, f"{i}-{verb}"))
                   for verb in ("ADD", "DEL", "VERSION")}
            print(f"{command}: " + ", ".join(f"{v} {n} M (rc {rc})" for v, (rc, n) in res.items()), flush=True)
    finally:
        etcd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

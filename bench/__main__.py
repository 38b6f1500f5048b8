"""Run the benchmarks: ``python -m bench [NAME ...] [--quick] [--no-readme]``.

Starts its own etcd processes (tests/support/etcd.py) and stops everything it
started, also on Ctrl-C / SIGTERM.  Each benchmark prints a table and writes
``bench/results/<name>.json`` (+ a PNG where a picture reads better); at the
end a summary of every figure against its target is printed, written to
``bench/results/summary.{json,md}`` and (unless ``--no-readme``) put into
docs/performance.md between its bench markers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

from bench.common import RESULTS, ROOT, binary_note, log, table, write_json

BENCHES = ["engine", "exec", "burst", "claim", "nodes", "memory", "controller"]
README_BEGIN = "<!-- bench:begin (written by `make bench`; do not edit by hand) -->"
README_END = "<!-- bench:end -->"


class Context:
    def __init__(self, quick: bool):
        self.quick = quick
        self._etcd = None

    @property
    def etcd(self):
        """A single-member etcd shared by benchmarks 1-4 and 6 (each uses its own prefix)."""
        if self._etcd is None:
            from tests.support.etcd import EtcdServer
            self._etcd = EtcdServer(name="bench")
            self._etcd.start()
        return self._etcd

    def close(self):
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release()}
    try:
        info["etcd"] = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                                      timeout=10).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def summary_markdown(results: list[dict], meta: dict) -> str:
    rows = []
    for r in results:
        for fig, value, target, ok in r.get("summary", []):
            rows.append([r["title"].split(".")[0], fig, value, target or "—",
                         "—" if ok is None else ("met" if ok else "MISSED")])
    md = table(["#", "figure", "value", "target", "result"], rows)
    md += (f"\n\n_`make bench` on {meta['date']}: {meta['machine'].get('cpus')} CPUs, Python "
           f"{meta['machine'].get('python')}, {meta['machine'].get('etcd', 'etcd')}; "
           f"{meta['binary']}; total {meta['seconds']:.0f} s{'; QUICK mode' if meta['quick'] else ''}. "
           f"Details and plots: `bench/results/`._")
    return md


PERFORMANCE_DOC = ROOT / "docs" / "performance.md"   # where the table lives (linked from the README)


def update_readme(md: str) -> bool:
    """Put the summary table into docs/performance.md between the bench markers."""
    path = PERFORMANCE_DOC
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_BEGIN + "\n" + md + "\n" + README_END + tail
    if new != text:
        tmp = path.with_suffix(".md.bench-tmp")
        tmp.write_text(new)
        tmp.replace(path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*",
                    help=f"benchmarks to run (default: all): {', '.join(BENCHES)}")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (for developing the harness)")
    ap.add_argument("--no-readme", action="store_true", help="do not update the table in docs/performance.md")
    args = ap.parse_args(argv)
    names = args.names or BENCHES
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(BENCHES)})")

    signal.signal(signal.SIGTERM, _sigterm)
    ctx = Context(args.quick)
    results, failed = [], []
    t_start = time.monotonic()
    log(f"bench: {', '.join(names)}{' (quick)' if args.quick else ''}; {binary_note()}")
    try:
        for name in names:
            mod = importlib.import_module(f"bench.bench_{name}")
            log(f"\n=== {mod.TITLE}")
            t0 = time.monotonic()
            try:
                res = mod.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 -- report, go on with the next benchmark
                traceback.print_exc()
                failed.append(name)
                res = {"name": name, "title": mod.TITLE, "text": f"FAILED: {type(e).__name__}: {e}",
                       "data": {}, "summary": [(f"{name} benchmark ran", False, "runs", False)]}
            res["seconds"] = round(time.monotonic() - t0, 1)
            print(f"\n## {res['title']}  ({res['seconds']} s)\n\n{res['text']}\n", flush=True)
            write_json(name, {"title": res["title"], "seconds": res["seconds"],
                              "summary": [dict(zip(("figure", "value", "target", "met"), s))
                                          for s in res["summary"]], **res["data"]})
            results.append(res)
    finally:
        ctx.close()

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
            "binary": binary_note(), "seconds": time.monotonic() - t_start, "quick": args.quick}
    md = summary_markdown(results, meta)
    print("\n## Summary\n\n" + md, flush=True)
    write_json("summary", {"meta": meta, "benchmarks": {
        r["name"]: [dict(zip(("figure", "value", "target", "met"), s)) for s in r["summary"]] for r in results}})
    (RESULTS / "summary.md").write_text(md + "\n")
    if not args.no_readme and set(names) == set(BENCHES):
        if update_readme(md):
            log(f"bench: {PERFORMANCE_DOC.relative_to(ROOT)} table updated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

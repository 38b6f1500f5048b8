"""Shared helpers for the benchmarks: statistics, tables, JSON/PNG output, plugin execs.

Nothing here asserts a time.  Every benchmark measures the things it compares
side by side in the same run (interleaved), reports medians and p99 over many
repetitions, and states its targets as ratios where the issue does.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the interpreter running the benchmarks (the real one, not a pyenv shim)
PYTHON = os.path.realpath(sys.executable)
BINARY = ROOT / "dist" / "cni-ipam" / "cni-ipam"
HOST_LOCAL = "/usr/lib/cni/host-local"


# ----------------------------------------------------------------------------- statistics
def percentile(values, p: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``p`` in 0..100."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(seconds) -> dict:
    """Summary of a list of durations in seconds, as milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": round(percentile(ms, 50), 3), "p90": round(percentile(ms, 90), 3),
            "p99": round(percentile(ms, 99), 3), "mean": round(sum(ms) / len(ms), 3),
            "min": round(min(ms), 3), "max": round(max(ms), 3)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")


# ----------------------------------------------------------------------------- output
def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3f}" if abs(v) < 10 else (f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}")
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return "" if v is None else str(v)


def table(headers, rows) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001 -- plots are optional
        return None


def save_plot(fig, name: str) -> str | None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return str(path.relative_to(ROOT))


def cdf_plot(name: str, title: str, series: dict[str, list[float]], xlabel="latency (ms)",
             log_x: bool = False) -> str | None:
    """One CDF line per series (values in seconds)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, vals in series.items():
        if not vals:
            continue
        ms = sorted(v * 1000 for v in vals)
        ys = [(i + 1) / len(ms) for i in range(len(ms))]
        ax.step(ms, ys, where="post", label=f"{label} (p50 {percentile(ms, 50):.2f} ms)")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of calls")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_plot(fig, name)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- etcd setup
def bulk_put(ds, items, chunk: int = 120) -> None:
    """Write many (key, value) pairs quickly: big unconditional txns (setup only)."""
    from cni_ipam.datastore import Put
    items = list(items)
    for i in range(0, len(items), chunk):
        if not ds.commit([], [Put(k, v) for k, v in items[i:i + chunk]]):
            raise RuntimeError("bulk put failed")


def bulk_delete_prefix(endpoint: str, prefix: str) -> None:
    from tests.support.etcd import delete_prefix
    delete_prefix(endpoint, prefix, timeout=30)


# ----------------------------------------------------------------------------- plugin execs
@dataclass
class Impl:
    """One way to run an IPAM plugin."""
    name: str
    argv: list[str]
    env: dict
    kind: str  # "cni-ipam" or "host-local"


class ExecEnv:
    """Temp dir + environment for exec'ing plugins (bytecode cached in a temp
    ``PYTHONPYCACHEPREFIX``, as an installed package would have it compiled).

    Use as a context manager; everything is removed on exit."""

    def __init__(self, tag: str = "bench"):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"cni-ipam-{tag}-"))
        self.pycache = self.tmp / "pycache"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def base_env(self) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": "/usr/lib/cni",
               "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(self.pycache)}
        return env

    def impls(self, *, python_s: bool = True, host_local: bool = True, binary: bool = True,
              server: "ExecServer | None" = None) -> list[Impl]:
        out = []
        if binary and BINARY.exists():
            # the binary alone: its launcher is told to use no exec server (CNI_IPAM_EXEC_SOCKET empty)
            out.append(Impl("binary", [str(BINARY)], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                      "CNI_PATH": "/usr/lib/cni", "CNI_IPAM_EXEC_SOCKET": ""},
                            "cni-ipam"))
            if server is not None:
                out.append(Impl(SERVED_LABEL, [str(BINARY)], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                              "CNI_PATH": "/usr/lib/cni",
                                                              "CNI_IPAM_EXEC_SOCKET": str(server.socket)},
                                "cni-ipam"))
        out.append(Impl("python -m", [PYTHON, "-m", "cni_ipam"], self.base_env(), "cni-ipam"))
        if python_s:
            out.append(Impl("python -S -m", [PYTHON, "-S", "-m", "cni_ipam"], self.base_env(), "cni-ipam"))
        if host_local and os.path.exists(HOST_LOCAL):
            out.append(Impl("host-local (Go)", [HOST_LOCAL], {"PATH": "/usr/bin:/bin",
                                                              "CNI_PATH": "/usr/lib/cni"}, "host-local"))
        return out

    def plugin_impl(self) -> Impl:
        """The shipped binary if built, else ``python -m cni_ipam``."""
        return self.impls(python_s=False, host_local=False)[0]


SERVED_LABEL = "binary + exec server"


class ExecServer:
    """``dist/cni-ipam/cni-ipam exec-server`` on a socket in ``tmp`` (cni_ipam/execserver.py): the
    node's warm plugin, which the binary's launcher hands its CNI execs to.  A context manager;
    ``ok`` False when the binary is not built or the server does not come up."""

    def __init__(self, tmp: Path):
        self.socket = Path(tmp) / "exec.sock"
        self.log = Path(tmp) / "exec-server.log"
        self.server = None
        self.ok = False

    def __enter__(self):
        if not BINARY.exists():
            return self
        from tests.support.exec_server import ExecServerProcess
        try:
            self.server = ExecServerProcess(str(BINARY), self.socket, self.log, timeout=60)
            self.ok = True
        except RuntimeError as e:
            log(str(e))
        return self

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.end(10)


def binary_note() -> str:
    if BINARY.exists():
        return f"binary: {BINARY.relative_to(ROOT)}"
    return "binary: dist/cni-ipam/cni-ipam NOT built (make binary); using python -m cni_ipam instead"


def cni_env(command: str, container: str, ifname: str = "eth0", netns: str = "/var/run/netns/bench") -> dict:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": ifname,
            "CNI_NETNS": netns}


def cni_ipam_conf(endpoints, prefix: str, tmp: Path, node: str, *, name: str = "benchnet",
                  log_level: str = "info", lock: str | None = None, **ipam) -> bytes:
    if isinstance(endpoints, (list, tuple)):
        endpoints = ",".join(endpoints)
    conf = {"cniVersion": "1.0.0", "name": name, "type": "bridge",
            "ipam": {"type": "cni-ipam", "etcd_endpoints": endpoints, "etcd_prefix": prefix,
                     "nodename": node, "lock_file": lock or str(tmp / f"lock-{node}"),
                     "log_file": str(tmp / f"cni-ipam-{node}.log"), "log_level": log_level,
                     "timeout_seconds": 30}}
    conf["ipam"].update(ipam)
    return json.dumps(conf).encode()


def host_local_conf(tmp: Path, subnet: str = "10.250.0.0/16") -> bytes:
    data_dir = tmp / "host-local-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    return json.dumps({"cniVersion": "1.0.0", "name": "benchnet", "type": "bridge",
                       "ipam": {"type": "host-local", "subnet": subnet,
                                "dataDir": str(data_dir)}}).encode()


@dataclass
class ExecResult:
    seconds: float
    rc: int
    stdout: bytes
    stderr: bytes
    maxrss_kb: int
    cpu: float = 0.0   # user + system CPU seconds of the child (less noisy than wall time)


def exec_once(argv, env: dict, stdin: bytes, timeout: float = 120.0) -> ExecResult:
    """Run one process to completion; wall time from spawn to reaped, and its peak RSS
    (``ru_maxrss`` from wait4: the process and any children it waited for)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, close_fds=True)
        # a program may exit without reading all of stdin (a VERSION that answers a constant):
        # the write, or the flush when closing, then meets a closed pipe -- not a failure here
        try:
            p.stdin.write(stdin)
            p.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            p.stdin.close()   # (closes the pipe even when its flush fails)
        except BrokenPipeError:
            pass
        killer = threading.Timer(timeout, p.kill)  # a hung exec must not hang the benchmark
        killer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            killer.cancel()
        t1 = time.perf_counter()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ExecResult(t1 - t0, p.returncode, out.read(), err.read(), ru.ru_maxrss,
                          ru.ru_utime + ru.ru_stime)

"""2. The binary vs a Go plugin: sequential ADD then DEL, exec'd as a runtime does.

Implementations, interleaved in the same loop on the same machine:
the shipped binary (dist/cni-ipam/cni-ipam, if built) alone and with the node's exec server
(``cni-ipam exec-server``: its launcher hands the exec over), ``python -m cni_ipam``,
``python -S -m cni_ipam`` (the same without this machine's site-packages .pth
hooks), and Debian's Go ``/usr/lib/cni/host-local`` (temp ``dataDir``).
Reference execs in the same loop: ``python -S -c pass`` (the interpreter's
floor) and ``python -S -c 'import <what ADD imports>'`` (floor + imports).

Then ``python -X importtime`` per verb: what each verb imports, the import
rules (VERSION: no etcd client; DEL: no pyroute2), and where the time goes.
"""
from __future__ import annotations

import random
import re

from bench.common import (BINARY, SERVED_LABEL, ExecEnv, ExecServer, PYTHON, ROOT, binary_note, cni_env, cni_ipam_conf, exec_once,
                          host_local_conf, log, pyplot, ratio, save_plot, stats_ms, table)
from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool

NAME = "exec"
TITLE = "2. Plugin exec: ADD/DEL through the binary and python vs Go host-local"

# what a verb must never import
FORBIDDEN = {
    "VERSION": ("etcd3", "grpc", "cni_ipam.datastore", "http.client", "pyroute2", "yaml"),
    "ADD": ("etcd3", "grpc", "pyroute2"),
    "DEL": ("etcd3", "grpc", "pyroute2"),
}
# who pays for what, by the self time of the modules each group brings in (first importer pays)
GROUPS = [
    ("cni_ipam's own modules (bodies: @dataclass classes, regexes, tables)", ("cni_ipam",)),
    ("dataclasses + inspect (ast, dis, tokenize, linecache, ...)",
     ("dataclasses", "inspect", "ast", "_ast", "dis", "opcode", "_opcode", "tokenize", "token", "linecache",
      "copy", "org")),
    ("logging (traceback, string, threading, weakref, textwrap, ...)",
     ("logging", "traceback", "string", "_string", "threading", "weakref", "_weakrefset", "textwrap", "atexit",
      "warnings")),
    ("typing", ("typing", "_typing")),
    ("re + enum + json", ("re", "_sre", "enum", "json", "_json", "copyreg")),
    ("socket + selectors", ("socket", "_socket", "selectors", "select", "array", "errno", "math")),
    ("ipaddress", ("ipaddress",)),
    ("hashlib (OpenSSL) + random", ("hashlib", "_hashlib", "_blake2", "random", "_random", "_sha512", "bisect",
                                    "_bisect")),
    ("runpy (python -m only)", ("runpy", "importlib", "pkgutil", "contextlib", "collections", "functools",
                                "operator", "keyword", "reprlib", "types", "_collections", "_functools")),
]


def group_of(module: str) -> str:
    top = module.split(".")[0]
    for label, mods in GROUPS:
        if top in mods or module in mods:
            return label
    return "other stdlib"


_IMPORT_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def importtime(verb: str, conf: bytes, env: dict, runs: int = 5) -> dict:
    """``python -X importtime -S -m cni_ipam`` for one verb (bytecode already cached);
    per module the minimum over ``runs`` execs (the least disturbed by other load)."""
    e = dict(env, **cni_env(verb, f"imp-{verb.lower()}"), PYTHONPROFILEIMPORTTIME="1")
    best: dict[str, dict] = {}
    order: list[str] = []
    rc = 0
    for k in range(runs):
        r = exec_once([PYTHON, "-S", "-m", "cni_ipam"], e, conf)
        rc = rc or r.rc
        if verb == "ADD":
            exec_once([PYTHON, "-S", "-m", "cni_ipam"], dict(e, CNI_COMMAND="DEL"), conf)
        for line in r.stderr.decode(errors="replace").splitlines():
            m = _IMPORT_RE.match(line)
            if not m:
                continue
            mod = {"module": m.group(4), "self_us": int(m.group(1)), "cum_us": int(m.group(2)),
                   "depth": (len(m.group(3)) - 1) // 2}
            old = best.get(mod["module"])
            if old is None:
                best[mod["module"]] = mod
                order.append(mod["module"])
            else:
                old["self_us"] = min(old["self_us"], mod["self_us"])
                old["cum_us"] = min(old["cum_us"], mod["cum_us"])
    mods = [best[n] for n in order]
    names = {m["module"] for m in mods}
    top = [m for m in mods if m["depth"] == 0]
    bad = sorted(n for n in names for f in FORBIDDEN.get(verb, ()) if n == f or n.startswith(f + "."))
    own = sum(m["self_us"] for m in mods if m["module"].startswith("cni_ipam"))
    total = sum(m["cum_us"] for m in top)
    groups: dict[str, float] = {}
    for m in mods:
        g = group_of(m["module"])
        groups[g] = groups.get(g, 0) + m["self_us"] / 1000
    return {"verb": verb, "rc": rc, "modules": len(mods),
            "groups_self_ms": dict(sorted(((k, round(v, 2)) for k, v in groups.items()), key=lambda kv: -kv[1])),
            "total_import_ms": round(total / 1000, 2),
            "cni_ipam_self_ms": round(own / 1000, 2),
            "stdlib_ms": round((total - own) / 1000, 2),
            "forbidden_imported": bad,
            "cni_ipam_modules": sorted(n for n in names if n.startswith("cni_ipam")),
            "top_cumulative": sorted(top, key=lambda m: -m["cum_us"])[:12],
            "top_self": sorted(mods, key=lambda m: -m["self_us"])[:15],
            "all": sorted(names)}


HELLO = ROOT / "build" / "hello" / "cni-ipam" / "cni-ipam"
HELLO_LABEL = "hello-world bundle (same spec options)"


def hello_bundle():
    """The packaging's floor (issue 17): packaging/hello.py built by the same spec with
    ``--hello`` into build/hello/ (rebuilt when stale).  None if it cannot be built."""
    import subprocess
    import sys
    if not BINARY.exists():
        return None
    try:
        subprocess.run([sys.executable, str(ROOT / "packaging" / "build.py"), "--dist", str(HELLO.parent.parent),
                        "--work", str(ROOT / "build" / "hello-work"), "--spec-arg=--hello", "--if-stale", "-q"],
                       check=True, timeout=900, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        log(f"exec: no hello-world bundle ({e}); the VERSION floor is not measured")
        return None
    return HELLO if HELLO.exists() else None


def run(ctx) -> dict:
    reps = 30 if ctx.quick else 150
    endpoint = ctx.etcd.endpoint
    prefix = "/bench/exec"
    with open_datastore(endpoint, timeout=10) as ds:
        IPAM(ds, prefix).create_pool(make_pool("p", "10.200.0.0/16", 26))
    with ExecEnv("exec") as xe, ExecServer(xe.tmp) as server:
        impls = xe.impls(server=server if server.ok else None)
        conf = {i.name: (host_local_conf(xe.tmp) if i.kind == "host-local"
                         else cni_ipam_conf(endpoint, prefix, xe.tmp, node="exec-node", name=f"net-{n}"))
                for n, i in enumerate(impls)}
        probe = cni_ipam_conf(endpoint, prefix, xe.tmp, node="exec-node", name="probe")
        # what ADD imports, for the "floor + imports" reference exec
        imp = {v: importtime(v, probe, xe.base_env()) for v in ("VERSION", "ADD", "DEL")}
        add_mods = [m for m in imp["ADD"]["cni_ipam_modules"] if m != "cni_ipam.__main__"]
        hello = hello_bundle()
        refs = [("python -S -c pass", [PYTHON, "-S", "-c", "pass"]),
                ("python -S -c 'import <ADD imports>'", [PYTHON, "-S", "-c", "import " + ", ".join(add_mods)]),
                ("python -c pass", [PYTHON, "-c", "pass"])]
        if hello is not None:
            refs.append((HELLO_LABEL, [str(hello)]))
        times: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        failures: list[str] = []

        def one(i, verb, cid):
            env = dict(i.env, **cni_env(verb, cid))
            r = exec_once(i.argv, env, conf[i.name])
            if r.rc != 0 or (verb == "ADD" and b'"ips"' not in r.stdout):
                failures.append(f"{i.name} {verb}: rc={r.rc} {r.stdout[:200]!r} {r.stderr[-300:]!r}")
            return r

        def sample(n, record: bool):
            order = list(impls)
            random.shuffle(order)
            for i in order:
                cid = f"{i.name.split()[0].replace('-', '')}{n:05d}{'w' if not record else ''}"
                for verb in ("ADD", "DEL", "VERSION"):
                    r = one(i, verb, cid)
                    if record:
                        times.setdefault((i.name, verb), []).append(r.seconds)
                        cpu.setdefault((i.name, verb), []).append(r.cpu)
            for label, argv in refs:
                r = exec_once(argv, dict(xe.base_env(), CNI_COMMAND="VERSION", CNI_IPAM_EXEC_SOCKET=""), b"")
                if record:
                    times.setdefault((label, ""), []).append(r.seconds)
                    cpu.setdefault((label, ""), []).append(r.cpu)

        log(f"exec: {reps} reps x {len(impls)} implementations ({', '.join(i.name for i in impls)})")
        for n in range(5):
            sample(n, record=False)   # warm-up: page cache, bytecode cache, etcd
        failures.clear()
        for n in range(reps):
            sample(n, record=True)

    hl = "host-local (Go)"
    st = {f"{k[0]} {k[1]}".strip(): stats_ms(v) for k, v in times.items()}
    cst = {f"{k[0]} {k[1]}".strip(): stats_ms(v) for k, v in cpu.items()}
    rows = []
    for i in impls:
        for verb in ("ADD", "DEL", "VERSION"):
            s = st[f"{i.name} {verb}"]
            base = st.get(f"{hl} {verb}")
            c = cst[f"{i.name} {verb}"]
            cb = cst.get(f"{hl} {verb}")
            if i.name == SERVED_LABEL:   # wait4 sees the launcher only; the work is in the server's fork
                c, cb = {"p50": None}, None
            rows.append([i.name, verb, s["p50"], s["p99"], ratio(s["p50"], base["p50"]) if base else None,
                         ratio(s["p99"], base["p99"]) if base else None, c["p50"],
                         ratio(c["p50"], cb["p50"]) if cb else None])
    for label, _ in refs:
        s = st[label]
        rows.append([label, "", s["p50"], s["p99"], None, None, cst[label]["p50"], None])
    text = table(["implementation", "verb", "p50 ms", "p99 ms", "p50 / host-local", "p99 / host-local",
                  "CPU p50 ms", "CPU / host-local"], rows)

    main = "binary" if any(i.name == "binary" for i in impls) else "python -m"
    add_ratio = ratio(st[f"{main} ADD"]["p50"], st[f"{hl} ADD"]["p50"]) if f"{hl} ADD" in st else None
    floor = st["python -S -c pass"]["p50"]
    floor_imp = st["python -S -c 'import <ADD imports>'"]["p50"]
    add_s = st["python -S -m ADD"]["p50"]
    breakdown = [
        ["interpreter start (python -S -c pass)", floor],
        ["+ imports of the ADD path", round(floor_imp - floor, 2)],
        ["+ the ADD itself (config, lock, 3 etcd requests, result)", round(add_s - floor_imp, 2)],
        ["= python -S -m cni_ipam ADD", add_s],
        ["python -m (site-packages .pth hooks of this machine) adds", round(st["python -m ADD"]["p50"] - add_s, 2)],
    ]
    text += "\n\nWhere an ADD's time goes (p50 ms, same run):\n\n" + table(["part", "ms"], breakdown)
    irows = []
    for v, d in imp.items():
        irows.append([v, d["modules"], d["total_import_ms"], d["cni_ipam_self_ms"],
                      ", ".join(d["forbidden_imported"]) or "none",
                      ", ".join(f"{m['module']} {m['cum_us'] / 1000:.1f}" for m in d["top_cumulative"][:4])])
    gtotal = sum(imp["ADD"]["groups_self_ms"].values()) or 1
    text += ("\n\nADD's imports by group (self time under -X importtime, which inflates it; shares matter):\n\n"
             + table(["group", "ms", "share"], [[g, v, f"{100 * v / gtotal:.0f}%"]
                                                for g, v in imp["ADD"]["groups_self_ms"].items()]))
    text += ("\n\n`python -X importtime -S -m cni_ipam` per verb:\n\n"
             + table(["verb", "modules", "import ms", "cni_ipam self ms", "forbidden imports",
                      "largest (cumulative ms)"], irows))
    if failures:
        text += f"\n\nFAILED execs ({len(failures)}):\n" + "\n".join(failures[:10])
    text += f"\n\n{reps} interleaved repetitions, order shuffled each round; {binary_note()}"

    plot = None
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, verb in zip(axes, ("ADD", "DEL")):
            for i in impls:
                ms = sorted(t * 1000 for t in times[(i.name, verb)])
                ax.step(ms, [(k + 1) / len(ms) for k in range(len(ms))], where="post",
                        label=f"{i.name} (p50 {st[f'{i.name} {verb}']['p50']:.1f} ms)")
            ax.set_xscale("log")
            ax.set_title(f"{verb}: one exec, sequential")
            ax.set_xlabel("wall time per exec (ms, log)")
            ax.set_ylabel("fraction of execs")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        plot = save_plot(fig, "exec")
    data = {"reps": reps, "implementations": [i.name for i in impls], "stats_ms": st, "cpu_ms": cst,
            "add_p50_ratio_vs_host_local": add_ratio, "measured_impl": main,
            "breakdown_ms": dict((r[0], r[1]) for r in breakdown), "importtime": imp,
            "failures": failures, "plot": plot}
    ok_imports = not imp["VERSION"]["forbidden_imported"] and not imp["DEL"]["forbidden_imported"]

    def hl_st(verb, key, table_=st):
        s_ = table_.get(f"{hl} {verb}")
        return f"{s_[key]:.1f}" if s_ else "n/a (no host-local)"

    def hl_ratio(impl, verb, key, table_=st):
        s_ = table_.get(f"{hl} {verb}")
        return ratio(table_[f"{impl} {verb}"][key], s_[key]) if s_ else None
    del_ratio = hl_ratio(main, "DEL", "p50")
    cpu_ratio = hl_ratio(main, "ADD", "p50", cst)
    hello_st = st.get(HELLO_LABEL)
    ver_ratio = ratio(st[f"{main} VERSION"]["p50"], hello_st["p50"]) if hello_st else None
    summary = [
        (f"ADD p50 {main} / host-local (p50 {st[f'{main} ADD']['p50']:.1f} ms vs "
         f"{hl_st('ADD', 'p50')} ms)", add_ratio, "≤ 8 (issue 17)", add_ratio is not None and add_ratio <= 8),
        (f"DEL p50 {main} / host-local (p50 {st[f'{main} DEL']['p50']:.1f} ms vs {hl_st('DEL', 'p50')} ms)",
         del_ratio, "≤ 8 (issue 17)", del_ratio is not None and del_ratio <= 8),
        (f"CPU per ADD {main} / host-local", cpu_ratio, "≤ 8 (issue 17)", cpu_ratio is not None and cpu_ratio <= 8),
        (f"VERSION p50 {main} / {HELLO_LABEL} (p50 {st[f'{main} VERSION']['p50']:.1f} ms vs "
         + (f"{hello_st['p50']:.1f} ms)" if hello_st else "n/a: not built)"),
         ver_ratio, "≤ 1.25 (issue 17)", ver_ratio is not None and ver_ratio <= 1.25),
        *((f"{verb} p50 {SERVED_LABEL} / host-local (p50 {st[f'{SERVED_LABEL} {verb}']['p50']:.1f} ms)",
           hl_ratio(SERVED_LABEL, verb, "p50"), "", None)
          for verb in ("ADD", "DEL", "VERSION") if f"{SERVED_LABEL} {verb}" in st),
        ("ADD p99 " + main + " / host-local", hl_ratio(main, "ADD", "p99"), "", None),
        ("ADD p50 python -m / host-local", hl_ratio("python -m", "ADD", "p50"), "", None),
        ("VERSION imports no etcd client, DEL no pyroute2", ok_imports, "yes", ok_imports),
        ("all sequential execs succeeded", not failures, "yes", not failures),
    ]
    return {"name": NAME, "title": TITLE, "text": text, "data": data, "summary": summary}

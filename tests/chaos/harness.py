"""The chaos harness: a 3-member etcd cluster, 20 simulated nodes, a fault driver, invariants.

    python -m tests.chaos --ops 1000            # make chaos
    python -m tests.chaos --ops 150 --seed 42   # the short version (what test_chaos.py runs)

What happens:

1. A 3-member etcd cluster on loopback (``tests.support.etcd.EtcdCluster``); two pools are
   created: ``chaos-br-pool`` 10.60.0.0/20 (/28 blocks) for the bridge-mode network
   ``chaos-br`` and ``chaos-rt-pool`` 10.61.0.0/25 (/29 blocks, 16 blocks for 20 nodes: some
   nodes must borrow) for the routed-mode network ``chaos-rt``.
2. 20 node processes (``node.py``; each its own ``nodename``, lock file and log file, etcd
   endpoints in a rotated order) run a random mix of ADD and DEL (and now and then GC) through
   the real plugin -- the PyInstaller binary when it is built and up to date, else
   ``python -m cni_ipam`` -- in rounds.  Each node SIGKILLs some of its plugin processes
   part-way through ADD, DEL and GC (``kill_probability``).
3. During the rounds, the fault driver (this process, main thread) SIGKILLs the etcd leader and
   restarts it (twice), SIGSTOPs a member for a few seconds and resumes it (more in long runs).
4. After each round (nodes idle, cluster healed) a checkpoint reads all state from etcd and checks
   the invariants; at the end: pending DELs are retried, every node GCs (CNI GC, cniVersion
   1.1.0, with its valid attachments) -> etcd must hold exactly the live containers; then every
   live container is DELeted and GC runs with no attachments -> zero addresses allocated.

Invariants (a violation fails the run):

* no address is allocated twice: blocks do not overlap, no address is in two handle records,
  and no two containers ever held the same address at the same time as the runtime saw it
  (ADD end .. first DEL start);
* every allocation's handle record agrees with its block, and the other way round; every block
  has its node's affinity record and every affinity its block;
* every ADD that reported success holds exactly its addresses until its DEL;
* a handle in etcd belongs to a live container, or to one whose ADD or DEL failed / was killed
  (what GC must free); one whose DEL succeeded must be gone (unless its failed ADD was in flight
  while a member was SIGSTOPped: the paused member may apply it on resume -- counted, GC frees it);
* every failure a client sees is exactly one CNI error JSON on stdout with code 11 (etcd
  trouble), never a traceback (stderr and log files are checked); no plugin hangs;
* after GC the live containers are all that is left; after DEL of everything plus GC, zero
  addresses are allocated.

Bounded in operations and time (every wait has a deadline); stops by itself; every process it
started is killed and its temp dir removed, also on failure.  The seed is printed; the same seed
gives the same plan (operations, kill points, faults), not the same timing.
"""
from __future__ import annotations

import argparse
import base64
import collections
import ipaddress
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cni_ipam.ipam.keys import unescape  # noqa: E402
from tests.support.etcd import EtcdCluster, die_with_us, post_json  # noqa: E402

PREFIX = "/chaos"
NETWORKS = {
    # network: (pool name, cidr, block size, mode)
    "chaos-br": ("chaos-br-pool", "10.60.0.0/20", 28, "bridge"),
    "chaos-rt": ("chaos-rt-pool", "10.61.0.0/25", 29, "routed"),
}
ALLOWED_CODES = {11}
NODE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node.py")


class ChaosError(RuntimeError):
    """The run could not be carried out (not an invariant violation)."""


# ----------------------------------------------------------------------------- plugin choice
def plugin_command(choice: str = "auto", log=print) -> tuple[list[str], str]:
    """(argv, label).  ``choice``: ``auto`` (the onedir binary if built from the current sources,
    else python), ``binary`` (build it if stale), ``python``, or a path to an executable."""
    choice = choice or "auto"
    exe = os.path.join(ROOT, "dist", "cni-ipam", "cni-ipam")
    if choice == "python":
        return [sys.executable, "-m", "cni_ipam"], "python -m cni_ipam"
    if choice not in ("auto", "binary"):
        if not os.access(choice, os.X_OK):
            raise ChaosError(f"plugin {choice!r} is not an executable")
        return [os.path.abspath(choice)], choice
    build = os.path.join(ROOT, "packaging", "build.py")
    stale = "packaging/build.py is missing"
    if os.path.exists(build):
        if choice == "binary":
            log(f"chaos: building the plugin binary if stale ({build} --if-stale) ...")
            p = subprocess.run([sys.executable, build, "--if-stale", "--quiet"], cwd=ROOT,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                p = subprocess.run([sys.executable, build, "--if-stale"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                raise ChaosError(f"building the binary failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        p = subprocess.run([sys.executable, build, "--check"], cwd=ROOT, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
        stale = None if p.returncode == 0 else (p.stdout + p.stderr).strip() or "stale"
    if stale is None and os.access(exe, os.X_OK):
        return [exe], os.path.relpath(exe, ROOT)
    if choice == "binary":
        raise ChaosError(f"no up-to-date binary at {exe}: {stale}")
    log(f"chaos: using python -m cni_ipam (binary not usable: {stale})")
    return [sys.executable, "-m", "cni_ipam"], "python -m cni_ipam"


# ----------------------------------------------------------------------------- etcd snapshot
def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def read_prefix(endpoints, prefix: str, timeout: float = 10.0) -> dict[str, bytes]:
    """Every key under ``prefix`` (one linearizable range request, any member that answers)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for ep in endpoints:
            try:
                obj = post_json(ep, "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)},
                                timeout=3)
            except Exception as e:  # noqa: BLE001 -- try the next member
                last = e
                continue
            return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                    for kv in obj.get("kvs", [])}
        time.sleep(0.2)
    raise ChaosError(f"cannot read {prefix} from etcd: {last}")


@dataclass
class Snapshot:
    blocks: dict = field(default_factory=dict)      # block id -> {"net", "node", "alloc": {ip: hid}}
    handles: dict = field(default_factory=dict)     # hid -> {"node", "ips": {ip: block id}}
    affinities: set = field(default_factory=set)    # (node, block id)
    problems: list = field(default_factory=list)    # consistency violations found in etcd alone

    @property
    def allocated(self) -> int:
        return sum(len(b["alloc"]) for b in self.blocks.values())


_unescape = unescape


def parse_state(kvs: dict[str, bytes], prefix: str = PREFIX) -> Snapshot:
    """Decode the stored state independently of the engine's code and check its consistency."""
    s = Snapshot()
    root = prefix + "/v1/"
    for key, value in kvs.items():
        rest = key[len(root):]
        try:
            if rest.startswith("blocks/"):
                bid = rest[len("blocks/"):]
                d = json.loads(value)
                net = ipaddress.ip_network(d["cidr"])
                fam, hexlen = bid.split("/", 1)
                hexaddr, plen = hexlen.split("-")
                if (fam != f"v{net.version}" or int(hexaddr, 16) != int(net.network_address)
                        or int(plen) != net.prefixlen):
                    s.problems.append(f"block key {key} holds cidr {net}")
                alloc = {}
                for o, hid in d["allocations"].items():
                    o = int(o)
                    if not 0 <= o < net.num_addresses:
                        s.problems.append(f"block {net}: ordinal {o} out of range")
                    alloc[str(net.network_address + o)] = hid
                free = [int(x) for x in d["free"]]
                if len(set(free)) != len(free) or set(free) & {int(o) for o in d["allocations"]}:
                    s.problems.append(f"block {net}: free list overlaps allocations or repeats")
                s.blocks[bid] = {"net": net, "node": d.get("node"), "alloc": alloc}
            elif rest.startswith("handles/"):
                d = json.loads(value)
                hid = "/".join(_unescape(p) for p in rest[len("handles/"):].split("/"))   # keys.handle_of_key
                if d["id"] != hid:
                    s.problems.append(f"handle key {key} holds id {d['id']!r}")
                ips = {}
                for a in d["addresses"]:
                    if a["ip"] in ips:
                        s.problems.append(f"handle {hid} lists {a['ip']} twice")
                    ips[a["ip"]] = a["block"]
                s.handles[hid] = {"node": d["node"], "ips": ips}
            elif rest.startswith("affinity/"):
                node, bid = rest[len("affinity/"):].split("/", 1)
                s.affinities.add((_unescape(node), bid))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            s.problems.append(f"undecodable value at {key}: {e}")
    # blocks must not overlap (an address in two blocks could be handed out twice)
    nets = sorted((b["net"] for b in s.blocks.values()), key=lambda n: (n.version, int(n.network_address)))
    for a, b in zip(nets, nets[1:]):
        if a.version == b.version and a.overlaps(b):
            s.problems.append(f"DUPLICATE: blocks {a} and {b} overlap")
    # allocations <-> handles
    holders: dict[str, list[str]] = collections.defaultdict(list)
    for hid, h in s.handles.items():
        for ip in h["ips"]:
            holders[ip].append(hid)
    for ip, hids in holders.items():
        if len(hids) > 1:
            s.problems.append(f"DUPLICATE: {ip} is in handles {hids}")
    by_net = {str(b["net"]): b for b in s.blocks.values()}
    for hid, h in s.handles.items():
        for ip, block in h["ips"].items():
            b = by_net.get(block)
            if b is None:
                s.problems.append(f"handle {hid}: {ip} is in block {block}, which does not exist")
            elif b["alloc"].get(ip) != hid:
                s.problems.append(f"handle {hid}: block {block} records {ip} as held by "
                                  f"{b['alloc'].get(ip)!r}")
    for bid, b in s.blocks.items():
        for ip, hid in b["alloc"].items():
            if ip not in s.handles.get(hid, {}).get("ips", {}):
                s.problems.append(f"block {b['net']}: {ip} is allocated to {hid!r}, whose handle record "
                                  f"{'does not list it' if hid in s.handles else 'does not exist'}")
    # affinities <-> blocks
    owned = {(b["node"], bid) for bid, b in s.blocks.items()}
    for node, bid in s.affinities - owned:
        s.problems.append(f"affinity of {node} to {bid} without a block of that node")
    for node, bid in owned - s.affinities:
        s.problems.append(f"block {bid} of {node} without its affinity record")
    return s


# ----------------------------------------------------------------------------- the model
@dataclass
class Container:
    node: str
    net: str
    cid: str
    state: str = "adding"          # live | add_failed | del_pending | deleted | gced
    ips: list = field(default_factory=list)
    hold_from: float | None = None  # end of the successful ADD
    hold_until: float | None = None  # start of the first DEL
    uncertain_ops: list = field(default_factory=list)  # (t0, t1) of failed/killed ops

    @property
    def hid(self) -> str:
        return f"{self.net}/{self.cid}/eth0"   # keys.handle_id


@dataclass
class Summary:
    seed: int = 0
    plugin: str = ""
    nodes: int = 0
    ops: int = 0
    execs: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    faults: collections.Counter = field(default_factory=collections.Counter)
    plugin_kills: collections.Counter = field(default_factory=collections.Counter)
    error_codes: collections.Counter = field(default_factory=collections.Counter)
    checkpoints: int = 0
    duplicates: int = 0
    leftovers_before_gc: int = 0
    late_applied: int = 0
    leaks_after_gc: int = 0
    leaks_after_drain: int = -1
    tracebacks: int = 0
    max_seconds: dict = field(default_factory=dict)
    check_cli: str = "not run"
    duration: float = 0.0
    violations: list = field(default_factory=list)

    def lines(self) -> list[str]:
        ex = ", ".join(f"{v} {self.execs[v]}" for v in ("ADD", "DEL", "GC") if self.execs[v])
        out = ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items()))
        return [
            f"chaos summary (seed {self.seed}, plugin {self.plugin}, {self.nodes} nodes, 3 etcd members)",
            f"  operations:           {self.ops} random ops in rounds; {sum(self.execs.values())} plugin execs "
            f"in all ({ex})",
            f"  outcomes:             {out}",
            f"  faults injected:      {self.faults['leader_kill']} leader SIGKILL+restart, "
            f"{self.faults['member_pause']} member SIGSTOP/SIGCONT, {self.faults['quorum_loss']} quorum loss "
            f"(2 members SIGSTOPped), {sum(self.plugin_kills.values())} plugin "
            f"SIGKILLs mid-op ({', '.join(f'{k} {v}' for k, v in sorted(self.plugin_kills.items())) or 'none'})",
            f"  client error codes:   {dict(sorted(self.error_codes.items())) or 'none'}; tracebacks: "
            f"{self.tracebacks}",
            f"  checkpoints:          {self.checkpoints}",
            f"  duplicates:           {self.duplicates}",
            f"  leftovers of failed ops found before the final GC: {self.leftovers_before_gc} "
            f"(late-applied after a pause: {self.late_applied})",
            f"  leaks after GC:       {self.leaks_after_gc}; addresses allocated after DEL of everything + GC: "
            f"{self.leaks_after_drain}",
            f"  cni-ipam check:       {self.check_cli}",
            f"  slowest exec:         " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(self.max_seconds.items())),
            f"  duration:             {self.duration:.1f}s",
            f"  violations:           {len(self.violations)}",
        ] + [f"    - {v}" for v in self.violations[:40]]


class Chaos:
    def __init__(self, *, ops: int, nodes: int = 20, seed: int | None = None, plugin: str = "auto",
                 rounds: int | None = None, timeout_seconds: float = 5.0, kill_probability: float = 0.08,
                 max_live: int = 2, max_seconds: float | None = None, log=print):
        if seed is None:
            seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 10**9))
        self.seed = seed
        self.rng = random.Random(seed)
        self.ops = ops
        self.n_nodes = nodes
        self.rounds = rounds or max(4, min(8, ops // 150))
        self.plugin_choice = plugin
        self.timeout_seconds = timeout_seconds
        self.kill_probability = kill_probability
        self.max_live = max_live
        self.max_seconds = max_seconds or (120 + ops * 1.0)   # the whole run's deadline
        self.log = log
        self.summary = Summary(seed=seed, nodes=nodes)
        self.containers: dict[tuple[str, str, str], Container] = {}
        self.fault_windows: list[tuple[float, float, str]] = []
        self.reported: set[tuple[str, str]] = set()
        self.events: queue.Queue = queue.Queue()
        self.procs: dict[str, subprocess.Popen] = {}
        self.readers: list[threading.Thread] = []
        self.cluster: EtcdCluster | None = None
        self.tmp = ""
        self.t_start = 0.0

    # -- helpers --------------------------------------------------------------
    def violation(self, msg: str) -> None:
        self.summary.violations.append(msg)
        self.log(f"chaos: VIOLATION: {msg}")

    def deadline_left(self) -> float:
        return self.t_start + self.max_seconds - time.monotonic()

    @property
    def endpoints(self) -> list[str]:
        return self.cluster.endpoints

    # -- setup ----------------------------------------------------------------
    def _start_cluster(self) -> None:
        self.cluster = EtcdCluster(3, tmp_parent=self.tmp)
        self.cluster.start(timeout=30)
        from cni_ipam.datastore import open_datastore
        from cni_ipam.ipam.engine import IPAM
        from cni_ipam.ipam.pool import make_pool
        with open_datastore(self.endpoints, transport="gateway", timeout=10) as ds:
            ipam = IPAM(ds, PREFIX)
            for pool, cidr, bs, _mode in NETWORKS.values():
                ipam.create_pool(make_pool(pool, cidr, bs))

    def _netconf(self, net: str, node: str, i: int) -> dict:
        pool, _cidr, _bs, mode = NETWORKS[net]
        eps = self.endpoints[i % 3:] + self.endpoints[:i % 3]   # nodes start at different members
        d = os.path.join(self.tmp, node)
        ipam = {"type": "cni-ipam", "etcd_endpoints": ",".join(eps), "etcd_prefix": PREFIX,
                "nodename": node, "lock_file": os.path.join(d, "ipam.lock"),
                "log_file": os.path.join(d, "cni-ipam.log"), "log_level": "info",
                "timeout_seconds": self.timeout_seconds, "mode": mode, "ipv4_pools": [pool]}
        if mode == "routed":
            ipam["gateway"] = "169.254.1.1"
        return {"cniVersion": "1.1.0", "name": net, "type": "bridge" if mode == "bridge" else "ptp",
                "ipam": ipam}

    def _start_nodes(self, plugin: list[str]) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": ROOT, "LANG": "C.UTF-8"}
        for i in range(self.n_nodes):
            node = f"node-{i:02d}"
            os.makedirs(os.path.join(self.tmp, node))
            settings = {"node": node, "seed": self.rng.randrange(2**32), "plugin": plugin, "env": env,
                        "confs": {net: self._netconf(net, node, i) for net in NETWORKS},
                        "kill_probability": self.kill_probability, "max_live": self.max_live,
                        "hang_seconds": 6 * self.timeout_seconds + 20}
            # (no preexec_fn: this process may hold gRPC channels -- support/etcd.py die_with_us)
            p = subprocess.Popen(die_with_us([sys.executable, NODE_SCRIPT, json.dumps(settings)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=self.tmp, env=dict(os.environ, PYTHONPATH=ROOT), close_fds=True)
            self.procs[node] = p
            for stream, kind in ((p.stdout, "out"), (p.stderr, "err")):
                t = threading.Thread(target=self._reader, args=(node, stream, kind), daemon=True)
                t.start()
                self.readers.append(t)

    def _reader(self, node: str, stream, kind: str) -> None:
        for line in stream:
            if kind == "err":
                self.events.put({"ev": "node-stderr", "node": node, "line": line.rstrip()})
                continue
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"ev": "garbage", "node": node, "line": line.rstrip()})
        self.events.put({"ev": "eof", "node": node, "kind": kind})

    def _send(self, node: str, cmd: dict) -> None:
        p = self.procs[node]
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()

    # -- faults ---------------------------------------------------------------
    def _fault(self, kind: str) -> None:
        c = self.cluster
        t0 = time.monotonic()
        if kind == "leader_kill":
            m = c.leader(timeout=20)
            self.log(f"chaos: fault: SIGKILL leader {m.name}")
            m.kill()
            time.sleep(self.rng.uniform(1.5, 3.0))
            self.log(f"chaos: fault: restart {m.name}")
            m.restart(timeout=40)
        elif kind == "quorum_loss":
            ms = self.rng.sample(c.members, 2)
            self.log(f"chaos: fault: SIGSTOP {ms[0].name} and {ms[1].name} (no quorum)")
            for m in ms:
                m.pause()
            time.sleep(self.timeout_seconds + self.rng.uniform(0.5, 2.0))
            self.log(f"chaos: fault: SIGCONT {ms[0].name} and {ms[1].name}")
            for m in ms:
                m.resume()
        elif kind == "member_pause":
            m = self.rng.choice(c.members)
            self.log(f"chaos: fault: SIGSTOP {m.name}{' (leader)' if m.is_leader() else ''}")
            m.pause()
            time.sleep(self.rng.uniform(2.0, 4.0))
            self.log(f"chaos: fault: SIGCONT {m.name}")
            m.resume()
        else:
            raise ValueError(kind)
        self.fault_windows.append((t0, time.monotonic(), kind))
        self.summary.faults[kind] += 1

    def _fault_plan(self) -> list[list[str]]:
        base = ["leader_kill", "member_pause", "leader_kill", "quorum_loss"]
        extra = ["member_pause", "leader_kill", "quorum_loss"]
        plan: list[list[str]] = [[] for _ in range(self.rounds)]
        faults = base + (extra * 4)[:max(0, self.rounds - len(base))]
        for i, f in enumerate(faults):
            plan[i % self.rounds].append(f)
        return plan

    # -- rounds -----------------------------------------------------------------
    def _wait_done(self, cmd: str, timeout: float) -> None:
        waiting = set(self.procs)
        deadline = time.monotonic() + min(timeout, max(10.0, self.deadline_left()))
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChaosError(f"{cmd}: nodes {sorted(waiting)} did not finish in time")
            try:
                ev = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            kind = ev.get("ev")
            if kind == "done":
                waiting.discard(ev["node"])
            elif kind == "exec":
                self._on_exec(ev)
            elif kind == "error":
                self.violation(f"{ev['node']}: {ev['msg']}")
            elif kind == "eof":
                if ev["kind"] == "out" and ev["node"] in waiting:
                    raise ChaosError(f"node {ev['node']} exited unexpectedly")
            elif kind == "node-stderr":
                self.log(f"chaos: {ev['node']} stderr: {ev['line']}")
            else:
                self.violation(f"{ev.get('node')}: unexpected output {ev}")

    def _broadcast(self, cmd: dict) -> None:
        for node in self.procs:
            self._send(node, cmd)

    def _round(self, r: int, ops: int, faults: list[str]) -> None:
        share = [ops // self.n_nodes] * self.n_nodes
        for i in self.rng.sample(range(self.n_nodes), ops % self.n_nodes):
            share[i] += 1
        delays = sorted(self.rng.uniform(0.3, 1.5) for _ in faults)
        self.log(f"chaos: round {r + 1}/{self.rounds}: {ops} ops, faults: {', '.join(faults) or 'none'}")
        t0 = t_round = time.monotonic()
        for node, n in zip(self.procs, share):
            self._send(node, {"cmd": "run", "ops": n})
        for kind, delay in zip(faults, delays):
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            self._fault(kind)
            t0 = time.monotonic()   # next fault of the round: after this one, not overlapping
        self._wait_done("run", timeout=600)
        self.summary.ops += ops
        self.log(f"chaos: round {r + 1} took {time.monotonic() - t_round:.1f}s")

    # -- the model and the checks ------------------------------------------------------
    def _check_output(self, ev: dict) -> None:
        verb = ev["verb"]
        where = f"{ev['node']} {verb} {ev['net']}/{ev['cid'] or '-'}"
        if ev["traceback"]:
            self.summary.tracebacks += 1
            self.violation(f"{where}: traceback on stderr/stdout: {ev['stderr'][-600:]}")
        if ev["hung"]:
            self.violation(f"{where}: plugin still running after {6 * self.timeout_seconds + 20:g}s (killed)")
            return
        if ev["killed"]:
            return
        out = ev["stdout"]
        if ev["rc"] == 0:
            if verb == "ADD":
                try:
                    res = json.loads(out)
                    ips = [ipaddress.ip_interface(i["address"]).ip for i in res["ips"]]
                    assert res["cniVersion"] == "1.1.0" and len(ips) == 1
                    assert ips[0] in ipaddress.ip_network(NETWORKS[ev["net"]][1])
                except (ValueError, KeyError, TypeError, AssertionError):
                    self.violation(f"{where}: rc 0 but not a valid ADD result: {out[:300]!r}")
            elif out.strip():
                self.violation(f"{where}: rc 0 but stdout is not empty: {out[:300]!r}")
            return
        try:
            err = json.loads(out)
            if not (isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("msg"), str)
                    and out.count("\n") == 1 and out.endswith("\n")):
                raise ValueError("not one CNI error object")
        except ValueError:
            self.violation(f"{where}: rc {ev['rc']} without exactly one CNI error JSON on stdout: {out[:300]!r} "
                           f"stderr: {ev['stderr'][-300:]!r}")
            return
        self.summary.error_codes[err["code"]] += 1
        if err["code"] not in ALLOWED_CODES:
            self.violation(f"{where}: error code {err['code']} (want 11): {err['msg']} {err.get('details', '')}")

    def _on_exec(self, ev: dict) -> None:
        verb, node, net = ev["verb"], ev["node"], ev["net"]
        self.summary.execs[verb] += 1
        self.summary.max_seconds[verb] = max(self.summary.max_seconds.get(verb, 0.0), ev["t1"] - ev["t0"])
        ok = ev["rc"] == 0 and not ev["killed"] and not ev["hung"]
        if ev["killed"]:
            self.summary.plugin_kills[verb] += 1
        self.summary.outcomes[f"{verb} {'ok' if ok else 'killed' if ev['killed'] else 'failed'}"] += 1
        self._check_output(ev)
        if verb == "ADD":
            c = Container(node, net, ev["cid"])
            self.containers[(node, net, ev["cid"])] = c
            if ok:
                c.state, c.ips, c.hold_from = "live", ev.get("ips", []), ev["t1"]
            else:
                c.state = "add_failed"
                c.uncertain_ops.append((ev["t0"], ev["t1"]))
        elif verb == "DEL":
            c = self.containers.get((node, net, ev["cid"]))
            if c is None:
                self.violation(f"{node}: DEL of unknown container {ev['cid']}")
                return
            if c.hold_until is None:
                c.hold_until = ev["t0"]
            if ok:
                c.state = "deleted"
            else:
                c.state = "del_pending"
                c.uncertain_ops.append((ev["t0"], ev["t1"]))
        elif verb == "GC" and ok:
            valid = set(ev.get("valid", []))
            for c in self.containers.values():
                if c.node == node and c.net == net and c.state == "add_failed" and c.cid not in valid:
                    c.state = "gced"

    def _during_pause(self, c: Container) -> bool:
        pauses = [(a, b) for a, b, k in self.fault_windows if k in ("member_pause", "quorum_loss")]
        return any(t0 <= b + 1.0 and t1 >= a for t0, t1 in c.uncertain_ops for a, b in pauses)

    def _snapshot(self) -> Snapshot:
        s = parse_state(read_prefix(self.endpoints, PREFIX + "/v1/"))
        for p in s.problems:
            if p.startswith("DUPLICATE"):
                self.summary.duplicates += 1
            self.violation(f"etcd: {p}")
        return s

    def _client_duplicates(self) -> int:
        """Two containers that held the same address at the same time, as the runtime saw it."""
        by_ip: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
        for c in self.containers.values():
            if c.hold_from is None:
                continue
            for ip in c.ips:
                by_ip[ip].append((c.hold_from, c.hold_until if c.hold_until is not None else float("inf"), c.hid))
        dups = 0
        for ip, spans in by_ip.items():
            spans.sort()
            ends: list[tuple[float, str]] = []
            for start, end, hid in spans:
                for e, other in ends:
                    if e > start and (other, hid) not in self.reported:
                        self.reported.add((other, hid))
                        dups += 1
                        self.violation(f"DUPLICATE: {ip} held by {other} and {hid} at the same time")
                ends.append((end, hid))
        return dups

    def checkpoint(self, label: str, *, exact: bool = False) -> Snapshot:
        self.cluster.heal(timeout=40)
        time.sleep(0.3)
        s = self._snapshot()
        self.summary.checkpoints += 1
        seen = set()
        for c in self.containers.values():
            h = s.handles.get(c.hid)
            if c.state == "live":
                seen.add(c.hid)
                if h is None:
                    self.violation(f"{label}: {c.hid}: ADD succeeded ({c.ips}) but etcd has no handle")
                elif sorted(h["ips"]) != sorted(c.ips):
                    self.violation(f"{label}: {c.hid}: ADD returned {c.ips}, etcd handle holds {sorted(h['ips'])}")
            elif h is not None and c.state in ("deleted", "gced"):
                if self._during_pause(c):
                    c.state = "add_failed"    # a late-applied request: GC must free it
                    self.summary.late_applied += 1
                else:
                    self.violation(f"{label}: {c.hid}: {'DEL' if c.state == 'deleted' else 'GC'} succeeded "
                                   f"but etcd still holds {sorted(h['ips'])}")
        known = {c.hid for c in self.containers.values()}
        for hid in s.handles:
            if hid not in known:
                self.violation(f"{label}: handle {hid} in etcd for a container that was never added")
        dups = self._client_duplicates()
        self.summary.duplicates += dups
        extra = [hid for hid in s.handles if hid not in seen]
        self.log(f"chaos: checkpoint {label}: {len(s.handles)} handles ({len(seen)} live, {len(extra)} from "
                 f"failed/killed ops), {s.allocated} addresses allocated, {len(s.blocks)} blocks")
        if exact and extra:
            self.violation(f"{label}: etcd holds handles no live container owns: {sorted(extra)[:10]}")
        return s

    def _run_check_cli(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, ETCD_ENDPOINTS=",".join(self.endpoints),
                   CNI_IPAM_ETCD_PREFIX=PREFIX)
        env.pop("CNI_COMMAND", None)
        try:
            p = subprocess.run([sys.executable, "-m", "cni_ipam", "check"], env=env, capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=self.tmp)
        except subprocess.TimeoutExpired:
            self.violation("cni-ipam check did not finish in 120s")
            return
        if p.returncode == 2 and "invalid choice" in p.stderr:
            self.summary.check_cli = "not available (no `check` command yet)"
            return
        text = (p.stdout + p.stderr).strip()
        self.summary.check_cli = f"exit {p.returncode}: {text.splitlines()[-1] if text else ''}"
        if p.returncode != 0:
            self.violation(f"cni-ipam check found problems (exit {p.returncode}): {text[-1500:]}")

    def _scan_logs(self) -> None:
        for node in self.procs:
            path = os.path.join(self.tmp, node, "cni-ipam.log")
            try:
                st = os.stat(path)
                with open(path, errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if st.st_mode & 0o777 != 0o600:
                self.violation(f"{path} has mode {oct(st.st_mode & 0o777)}, not 0600")
            n = text.count("Traceback")
            if n:
                self.summary.tracebacks += n
                i = text.index("Traceback")
                self.violation(f"{node}: {n} traceback(s) in the log: {text[i:i + 800]}")

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Summary:
        self.t_start = time.monotonic()
        self.log(f"chaos: seed {self.seed} (rerun with CHAOS_SEED={self.seed}); {self.ops} ops, "
                 f"{self.n_nodes} nodes, {self.rounds} rounds")
        plugin, self.summary.plugin = plugin_command(self.plugin_choice, self.log)
        self.tmp = tempfile.mkdtemp(prefix="cni-ipam-chaos-")
        try:
            self._start_cluster()
            self._start_nodes(plugin)
            per_round = [self.ops // self.rounds] * self.rounds
            per_round[-1] += self.ops % self.rounds
            for r, (n, faults) in enumerate(zip(per_round, self._fault_plan())):
                if self.deadline_left() <= 0:
                    raise ChaosError(f"out of time after {r} rounds")
                self._round(r, n, faults)
                self.checkpoint(f"round {r + 1}")
            # the end: retry failed DELs, GC with the live attachments, DEL everything, GC with none
            self._broadcast({"cmd": "settle"})
            self._wait_done("settle", timeout=300)
            s = self.checkpoint("before GC")
            live = {c.hid for c in self.containers.values() if c.state == "live"}
            self.summary.leftovers_before_gc = len(set(s.handles) - live)
            self._broadcast({"cmd": "gc"})
            self._wait_done("gc", timeout=300)
            s = self.checkpoint("after GC", exact=True)
            self.summary.leaks_after_gc = len(set(s.handles) - live) + sum(
                1 for b in s.blocks.values() for hid in b["alloc"].values() if hid not in live)
            self._run_check_cli()
            self._broadcast({"cmd": "drain"})
            self._wait_done("drain", timeout=300)
            s = self.checkpoint("after DEL of everything + GC", exact=True)
            self.summary.leaks_after_drain = s.allocated + len(s.handles)
            if s.allocated or s.handles:
                self.violation(f"after DEL of everything + GC: {s.allocated} addresses allocated, "
                               f"{len(s.handles)} handles left: {sorted(s.handles)[:10]}")
            self._scan_logs()
        finally:
            self._stop()
            self.summary.duration = time.monotonic() - self.t_start
        return self.summary

    def _stop(self) -> None:
        for node, p in self.procs.items():
            try:
                if p.poll() is None:
                    p.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                    p.stdin.flush()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self.procs.values():
            for s in (p.stdin, p.stdout, p.stderr):
                try:
                    s.close()
                except (OSError, ValueError):
                    pass
        if self.cluster is not None:
            self.cluster.stop()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_chaos(**kw) -> Summary:
    return Chaos(**kw).run()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=int(os.environ.get("CHAOS_OPS", 1000)),
                    help="random operations in the rounds (default 1000)")
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="default: $CHAOS_SEED, else random (printed)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--plugin", default=os.environ.get("CNI_IPAM_PLUGIN", "auto"),
                    help="auto (binary if up to date, else python), binary (build if stale), python, or a path")
    ap.add_argument("--timeout-seconds", type=float, default=5.0, help="the plugin's timeout_seconds")
    ap.add_argument("--kill-probability", type=float, default=0.08)
    args = ap.parse_args(argv)
    try:
        summary = run_chaos(ops=args.ops, nodes=args.nodes, seed=args.seed, rounds=args.rounds,
                            plugin=args.plugin, timeout_seconds=args.timeout_seconds,
                            kill_probability=args.kill_probability)
    except ChaosError as e:
        print(f"chaos: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())

"""One simulated node of the chaos test: a separate process that acts as the node's container
runtime.  Standard library only (it is started 20 times).

Started by ``harness.py`` as ``python node.py '<settings json>'``.  Reads commands, one JSON
object per line, on stdin; writes events, one JSON object per line, on stdout:

* ``{"cmd": "run", "ops": N}``  -- N random operations (ADD of a new container, DEL of a live
  one, retry of a DEL that failed, now and then a GC with the live attachments); with
  probability ``kill_probability`` the plugin process is SIGKILLed part-way through.
* ``{"cmd": "settle"}``         -- retry every DEL that failed until it succeeds.
* ``{"cmd": "gc"}``             -- GC every network with the live attachments (must succeed).
* ``{"cmd": "drain"}``          -- DEL every live container, then GC every network with none.
* ``{"cmd": "exit"}``

Every plugin exec produces one ``{"ev": "exec", ...}`` event with what the harness needs to
check it (times are ``time.monotonic()``: one clock for all processes of the machine); every
command ends with ``{"ev": "done"}``.  The node keeps the runtime's view: which containers
are live (ADD succeeded, no DEL tried yet), which DELs must be retried, which failed ADDs are
left for GC.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

try:
    import ctypes
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except Exception:  # pragma: no cover
    _prctl = None


def _pdeathsig() -> None:  # in the child between fork and exec: die with this node
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


class Node:
    def __init__(self, s: dict):
        self.name = s["node"]
        self.rng = random.Random(s["seed"])
        self.plugin = s["plugin"]
        self.env = s["env"]
        self.confs = s["confs"]              # network name -> netconf
        self.nets = sorted(self.confs)
        self.kill_p = s["kill_probability"]
        self.max_live = s["max_live"]
        self.hang = s["hang_seconds"]
        self.live: dict[tuple[str, str], list[str]] = {}
        self.pending: set[tuple[str, str]] = set()   # DEL failed: retry
        self.failed: set[tuple[str, str]] = set()    # ADD failed: left for GC
        self.seq = 0
        self.durations = {"ADD": [0.4], "DEL": [0.4], "GC": [0.4]}

    # -- output ---------------------------------------------------------------
    @staticmethod
    def emit(ev: dict) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    # -- one plugin exec ------------------------------------------------------
    def exec(self, verb: str, net: str, cid: str | None, *, kill_ok: bool, valid=None) -> dict:
        conf = dict(self.confs[net])
        env = dict(self.env, CNI_COMMAND=verb, CNI_PATH="/opt/cni/bin")
        if cid is not None:
            env.update(CNI_CONTAINERID=cid, CNI_IFNAME="eth0", CNI_NETNS=f"/var/run/netns/{cid}")
        if valid is not None:
            conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": "eth0"} for c in valid]
        kill_at = None
        if kill_ok and self.rng.random() < self.kill_p:
            kill_at = _median(self.durations[verb][-9:]) * self.rng.uniform(0.15, 1.1)
        t0 = time.monotonic()
        p = subprocess.Popen(self.plugin, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, close_fds=True, preexec_fn=_pdeathsig)
        killed = hung = False
        data = json.dumps(conf).encode()
        try:
            if kill_at is not None:
                try:
                    out, err = p.communicate(data, timeout=kill_at)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    killed = True
                    out, err = p.communicate(timeout=30)
            else:
                out, err = p.communicate(data, timeout=self.hang)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            hung = True
        t1 = time.monotonic()
        killed = killed and p.returncode == -signal.SIGKILL
        out_s = out.decode("utf-8", "replace")
        err_s = err.decode("utf-8", "replace")
        if p.returncode == 0 and not killed:
            self.durations[verb].append(t1 - t0)
        ev = {"ev": "exec", "node": self.name, "verb": verb, "net": net, "cid": cid, "t0": t0, "t1": t1,
              "rc": p.returncode, "killed": killed, "hung": hung, "stdout": out_s[:4000],
              "traceback": "Traceback" in err_s or "Traceback" in out_s,
              "stderr": err_s[-2000:] if (p.returncode != 0 or "Traceback" in err_s) else ""}
        if valid is not None:
            ev["valid"] = list(valid)
        return ev

    @staticmethod
    def ok(ev: dict) -> bool:
        return ev["rc"] == 0 and not ev["killed"] and not ev["hung"]

    # -- runtime operations ---------------------------------------------------
    def add(self, net: str, kill_ok: bool = True) -> None:
        self.seq += 1
        cid = f"{self.name}-{self.seq:05d}"
        ev = self.exec("ADD", net, cid, kill_ok=kill_ok)
        if self.ok(ev):
            try:
                ips = [ip["address"].split("/")[0] for ip in json.loads(ev["stdout"])["ips"]]
            except (ValueError, KeyError, TypeError, AttributeError):
                ips = []
            ev["ips"] = ips
            self.live[(net, cid)] = ips
            self.emit(ev)
            return
        self.emit(ev)
        # a runtime DELs what failed to come up; sometimes it does not get to (crash): GC's job
        if self.rng.random() < 0.5:
            self.delete((net, cid), kill_ok=kill_ok)
        else:
            self.failed.add((net, cid))

    def delete(self, key: tuple[str, str], kill_ok: bool = True) -> bool:
        net, cid = key
        ev = self.exec("DEL", net, cid, kill_ok=kill_ok)
        self.emit(ev)
        self.live.pop(key, None)
        if self.ok(ev):
            self.pending.discard(key)
            self.failed.discard(key)
            return True
        self.failed.discard(key)
        self.pending.add(key)
        return False

    def gc(self, net: str, kill_ok: bool = True) -> bool:
        valid = sorted(cid for (n, cid) in set(self.live) | self.pending if n == net)
        ev = self.exec("GC", net, None, kill_ok=kill_ok, valid=valid)
        self.emit(ev)
        if self.ok(ev):
            self.failed = {k for k in self.failed if k[0] != net}
            return True
        return False

    def step(self) -> None:
        r = self.rng.random()
        if self.pending and r < 0.5:
            self.delete(self.rng.choice(sorted(self.pending)))
            return
        if r < 0.04:
            self.gc(self.rng.choice(self.nets))
            return
        net = self.rng.choice(self.nets)
        mine = sorted(k for k in self.live if k[0] == net)
        if not mine or (len(mine) < self.max_live and self.rng.random() < 0.55):
            self.add(net)
        else:
            self.delete(self.rng.choice(mine))

    def retry(self, fn, *args, attempts: int = 15) -> None:
        for i in range(attempts):
            if fn(*args, kill_ok=False):
                return
            time.sleep(min(0.2 * (i + 1), 2.0))
        self.emit({"ev": "error", "node": self.name, "msg": f"{fn.__name__}{args} failed {attempts} times"})

    # -- commands -------------------------------------------------------------
    def serve(self) -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            c = cmd["cmd"]
            if c == "run":
                for _ in range(cmd["ops"]):
                    self.step()
            elif c == "settle":
                for key in sorted(self.pending):
                    self.retry(self.delete, key)
            elif c == "gc":
                for net in self.nets:
                    self.retry(self.gc, net)
            elif c == "drain":
                for key in sorted(set(self.live) | self.pending):
                    self.retry(self.delete, key)
                for net in self.nets:
                    self.retry(self.gc, net)
            elif c == "exit":
                return
            self.emit({"ev": "done", "node": self.name, "cmd": c,
                       "live": sorted(f"{n}.{cid}" for n, cid in self.live),
                       "pending": sorted(f"{n}.{cid}" for n, cid in self.pending)})


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops us (exit / SIGKILL), not ^C
    Node(json.loads(sys.argv[1])).serve()

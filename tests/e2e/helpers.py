"""Helpers for the end-to-end tests: network namespaces, links, ping, pools in etcd, cnitool.

Everything here touches only loopback and the namespaces/links the tests create themselves.
Importable as ``tests.e2e.helpers`` (the fixtures in tests/e2e/conftest.py use it; so can
other e2e tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
DEBIAN_CNI_DIR = Path("/usr/lib/cni")
NETNS_DIR = Path("/var/run/netns")
GO_LIBCNI = Path("/usr/share/gocode/src/github.com/containernetworking/cni/libcni/api.go")


def rand_suffix(n: int = 8) -> str:
    return secrets.token_hex(n // 2)


def run(argv, *, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check,
                          stdin=subprocess.DEVNULL, **kw)


# ----------------------------------------------------------------------------- what the machine has
def missing_tools(*names: str) -> list[str]:
    """Names (commands or absolute paths) that are not on this machine."""
    out = []
    for n in names:
        if n.startswith("/"):
            if not os.path.exists(n):
                out.append(n)
        elif shutil.which(n) is None:
            out.append(n)
    return out


# ----------------------------------------------------------------------------- namespaces and links
class Netns:
    """A network namespace ``cnit-<random>`` made with ``ip netns add``; deleted on exit, always."""

    def __init__(self, name: str | None = None):
        self.name = name or f"cnit-{rand_suffix()}"
        self.path = str(NETNS_DIR / self.name)

    def __enter__(self) -> "Netns":
        run(["ip", "netns", "add", self.name])
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def delete(self) -> None:
        if os.path.exists(self.path):
            run(["ip", "netns", "del", self.name], check=False)

    def exec(self, *argv, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout)

    def addresses(self, ifname: str = "eth0", family: int = 4) -> list[ipaddress.IPv4Interface]:
        """The addresses on ``ifname`` inside the namespace, read with pyroute2."""
        return netns_addresses(self.name, ifname, family)

    def __repr__(self) -> str:
        return f"<Netns {self.name}>"


def _iface_addresses(ipr, ifname: str, family: int):
    import socket
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        return []
    out = []
    for a in ipr.get_addr(index=idx[0], family=fam):
        out.append(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
    return out


def netns_addresses(netns: str, ifname: str = "eth0", family: int = 4) -> list:
    from pyroute2 import NetNS
    with NetNS(netns) as ns:
        return _iface_addresses(ns, ifname, family)


def host_addresses(ifname: str, family: int = 4) -> list:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return _iface_addresses(ipr, ifname, family)


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return run(argv, check=False).returncode == 0


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "del", "dev", name], check=False)


def host_routes_to(ip: str) -> list[str]:
    """``ip route`` lines for exactly ``ip``/32 (or /128) in the main table."""
    r = run(["ip", "route", "show", "exact", f"{ip}/{32 if ':' not in ip else 128}"], check=False)
    return [ln for ln in r.stdout.splitlines() if ln.strip()]


def ping(ip: str, netns: Netns | str | None = None) -> bool:
    """One ping, one second: only ever aimed at addresses the tests created."""
    ns = netns.name if isinstance(netns, Netns) else netns
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["ping", "-c1", "-W1", "-n", "-q", ip]
    for _ in range(3):  # the first packet may race with DAD / neighbour setup
        if run(argv, check=False, timeout=10).returncode == 0:
            return True
    return False


def used_ipv4_networks() -> list:
    """Every IPv4 route destination and interface address on the host (to keep test subnets clear)."""
    nets = []
    for argv in (["ip", "-4", "route", "show", "table", "all"], ["ip", "-4", "-o", "addr", "show"]):
        for ln in run(argv, check=False).stdout.splitlines():
            for tok in ln.split():
                if "/" in tok or tok.count(".") == 3:
                    try:
                        nets.append(ipaddress.ip_network(tok, strict=False))
                    except ValueError:
                        pass
    return nets


def free_test_subnet(base: str = "10.244.0.0/16", prefixlen: int = 24, lo: int = 100) -> ipaddress.IPv4Network:
    """A random /24 of 10.244.0.0/16 (third octet >= ``lo``) that overlaps no route or address
    on this host, so two test runs (or a runtime test next door) never share a subnet."""
    used = [n for n in used_ipv4_networks() if n.prefixlen > 0]  # a default route overlaps everything
    subnets = [s for s in ipaddress.ip_network(base).subnets(new_prefix=prefixlen)
               if int(s.network_address.packed[2]) >= lo]
    random.shuffle(subnets)
    for s in subnets:
        if not any(s.overlaps(u) for u in used):
            return s
    raise RuntimeError(f"no free /{prefixlen} left in {base}")


@contextlib.contextmanager
def sysctl_restored(*keys: str):
    """Put the given /proc/sys values back afterwards (bridge/ptp turn on ip_forward)."""
    saved = {}
    for k in keys:
        p = Path("/proc/sys") / k.replace(".", "/")
        try:
            saved[p] = p.read_text()
        except OSError:
            pass
    try:
        yield
    finally:
        for p, v in saved.items():
            try:
                if p.read_text() != v:
                    p.write_text(v)
            except OSError:
                pass


def remove_cni_iptables(network: str) -> None:
    """Remove nat rules/chains the plugins made for ``network`` (ipMasq chains carry a comment
    ``name: "<network>"``).  The tests run with ipMasq false, so this is a safety net."""
    if shutil.which("iptables") is None:
        return
    r = run(["iptables", "-w", "5", "-t", "nat", "-S"], check=False)
    if r.returncode != 0:
        return
    marker = f'name: \\"{network}\\"'
    chains = set()
    for ln in r.stdout.splitlines():
        if ln.startswith("-A ") and (marker in ln or f'name: "{network}"' in ln):
            parts = ln.split()
            if "-j" in parts:
                chains.add(parts[parts.index("-j") + 1])
            run(["iptables", "-w", "5", "-t", "nat", "-D", *parts[1:]], check=False)
    for c in chains:
        if c.startswith("CNI-"):
            run(["iptables", "-w", "5", "-t", "nat", "-F", c], check=False)
            run(["iptables", "-w", "5", "-t", "nat", "-X", c], check=False)


# ----------------------------------------------------------------------------- etcd: pools and state
@contextlib.contextmanager
def ipam_for(endpoint: str, prefix: str):
    """An engine over the JSON gateway transport; the connection is closed afterwards."""
    from cni_ipam.datastore import open_datastore
    from cni_ipam.ipam.engine import IPAM
    ds = open_datastore(endpoint)
    try:
        yield IPAM(ds, prefix)
    finally:
        ds.close()


def create_pools(endpoint: str, prefix: str, *pools) -> list:
    """Create pools in etcd with the engine.  Each item: a ``Pool``, or ``(name, cidr, block_size)``,
    or a dict of ``make_pool`` keyword arguments."""
    from cni_ipam.ipam.pool import Pool, make_pool
    made = []
    with ipam_for(endpoint, prefix) as ipam:
        for p in pools:
            if isinstance(p, Pool):
                pool = p
            elif isinstance(p, dict):
                pool = make_pool(**p)
            else:
                pool = make_pool(*p)
            ipam.create_pool(pool)
            made.append(pool)
    return made


def allocated_ips(endpoint: str, prefix: str, network: str | None = None) -> dict[str, str]:
    """``{ip: handle id}`` of every address held by a handle (of ``network``) in etcd."""
    with ipam_for(endpoint, prefix) as ipam:
        return {str(a.ip): h.id for h in ipam.handles(network=network) for a in h.addresses}


def block_holders(endpoint: str, prefix: str) -> dict[str, str]:
    """``{ip: handle id}`` of every allocated address, read from the blocks themselves."""
    from cni_ipam.ipam.block import Block
    out = {}
    with ipam_for(endpoint, prefix) as ipam:
        for kv in ipam.ds.get_prefix(ipam.keys.blocks):
            b = Block.from_json(kv.value)
            out.update({str(b.ip(o)): h for o, h in b.allocations.items()})
    return out


def blocks(endpoint: str, prefix: str) -> list:
    """Every block stored under ``prefix`` (``Block`` objects)."""
    from cni_ipam.ipam.block import Block
    with ipam_for(endpoint, prefix) as ipam:
        return [Block.from_json(kv.value) for kv in ipam.ds.get_prefix(ipam.keys.blocks)]


# ----------------------------------------------------------------------------- configs
def example_conflist(filename: str, *, name: str, plugin: dict | None = None, ipam: dict | None = None) -> dict:
    """One of the shipped examples in conf/, with the network name and fields of its first plugin
    and of that plugin's ``ipam`` section overridden (None values delete a key)."""
    doc = json.loads((CONF_DIR / filename).read_text())
    doc["name"] = name
    first = doc["plugins"][0]
    for k, v in (plugin or {}).items():
        if v is None:
            first.pop(k, None)
        else:
            first[k] = v
    for k, v in (ipam or {}).items():
        if v is None:
            first["ipam"].pop(k, None)
        else:
            first["ipam"][k] = v
    return doc


# ----------------------------------------------------------------------------- cnitool
def cnitool_container_id(netns_path: str) -> str:
    """The container ID cnitool (upstream and ours) derives from the netns path."""
    return "cnitool-" + hashlib.sha512(os.path.abspath(netns_path).encode()).hexdigest()[:20]


class CniTool:
    """Runs the cnitool-equivalent (tests/e2e/cnitool) with its own conf dir, plugin path and cache."""

    def __init__(self, exe: str, conf_dir: str | Path, cni_path: str | Path, cache_dir: str | Path):
        self.exe = str(exe)
        self.conf_dir, self.cni_path, self.cache_dir = str(conf_dir), str(cni_path), str(cache_dir)
        os.makedirs(self.conf_dir, exist_ok=True)
        os.makedirs(self.cache_dir, exist_ok=True)

    def write_conflist(self, doc: dict, filename: str | None = None) -> str:
        path = os.path.join(self.conf_dir, filename or f"10-{doc['name']}.conflist")
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        return path

    def env(self, extra: dict | None = None) -> dict:
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETCONFPATH": self.conf_dir, "CNI_PATH": self.cni_path,
             "CNI_CACHE_DIR": self.cache_dir}
        e.update(extra or {})
        return e

    def run(self, verb: str, network: str, netns, *, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        path = netns.path if isinstance(netns, Netns) else str(netns)
        return subprocess.run([self.exe, verb, network, path], env=self.env(env), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def add(self, network: str, netns, **kw) -> dict:
        r = self.run("add", network, netns, **kw)
        if r.returncode != 0:
            raise AssertionError(f"cnitool add {network} failed (rc {r.returncode}):\n{r.stderr}{r.stdout}")
        return json.loads(r.stdout)

    def check(self, network: str, netns, **kw) -> subprocess.CompletedProcess:
        return self.run("check", network, netns, **kw)

    def delete(self, network: str, netns, **kw) -> subprocess.CompletedProcess:
        return self.run("del", network, netns, **kw)

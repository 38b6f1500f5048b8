"""End to end with Debian's `ptp` plugin: cnitool (libcni) -> ptp -> cni-ipam binary -> etcd.

Routed mode is what the shipped example (conf/20-cni-ipam-ptp.conflist: mode routed, gateway
169.254.1.1, routed_prefix block) asks for: every address of the block usable, 169.254.1.1 on the
host side of every veth, a host route per address.  Debian's ptp (containernetworking-plugins
1.1.x, and upstream's ptp to this day) cannot take a /32: after putting the address on eth0 it
deletes "the route that was automatically added" for the address's prefix, and the kernel adds
no prefix route for a /32, so ADD fails with "failed to delete route ... no such process".  So
the example sets ``routed_prefix: block``: the address carries the block's prefix length and ptp
replaces the on-link prefix route with its route via the gateway.  (ptp also installs the
result's ``routes`` before its on-link route to the gateway, so a route via 169.254.1.1 fails
with "network is unreachable"; the example has no ``routes`` for that reason.)
"""
from __future__ import annotations

import ipaddress
import json

import pytest

from tests.e2e import helpers

GATEWAY = "169.254.1.1"

pytestmark = pytest.mark.usefixtures("need_root")


@pytest.fixture(autouse=True)
def _tools(need_root, need_tools):
    need_tools("ip", "ping", "/usr/lib/cni/ptp")


def host_veth(result: dict) -> str:
    """The host side of the pair: the result's interface without a sandbox."""
    hosts = [i["name"] for i in result.get("interfaces", []) if not i.get("sandbox")]
    assert len(hosts) == 1, result
    return hosts[0]


def ptp_conf(net, etcd_server, etcd_prefix, pool, tmp_path, **ipam):
    conf = helpers.example_conflist(
        "20-cni-ipam-ptp.conflist", name=net, plugin={"ipMasq": False},
        ipam={"etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix, "nodename": "e2e-node",
              "ipv4_pools": [pool.name], "lock_file": str(tmp_path / "ipam.lock"),
              "log_file": str(tmp_path / "cni-ipam.log"), "log_level": "debug", **ipam})
    assert conf["plugins"][0]["type"] == "ptp"
    return conf


def run_two_namespaces(cnitool, net, etcd_server, etcd_prefix, pool, netns_factory, host_cleanup, *,
                       prefixlen: int, gateway_of):
    """ADD two namespaces through ptp; check addresses, host side, routes, reachability, etcd, CHECK, DEL."""
    a, b = netns_factory(), netns_factory()
    veths, ips = {}, {}
    for ns in (a, b):
        r = cnitool.run("add", net, ns)
        assert r.returncode == 0, f"cnitool add {net} failed (rc {r.returncode}):\n{r.stderr}"
        res = json.loads(r.stdout)
        veths[ns.name] = host_cleanup.link(host_veth(res))   # removed on teardown if DEL never runs
        (ipc,) = res["ips"]
        iface = ipaddress.ip_interface(ipc["address"])
        assert iface.network.prefixlen == prefixlen and iface.ip in pool.cidr, ipc
        gw = gateway_of(iface)
        assert ipc["gateway"] == gw
        assert ns.addresses("eth0") == [iface], f"{ns}: eth0 holds {ns.addresses('eth0')}"
        ips[ns.name] = iface.ip
        # the host side of the veth carries the gateway, and a /32 route leads to the address
        assert ipaddress.ip_interface(f"{gw}/32") in helpers.host_addresses(veths[ns.name])
        routes = helpers.host_routes_to(str(iface.ip))
        assert any(f"dev {veths[ns.name]}" in r for r in routes), routes
        # inside: an on-link route to the gateway
        r = ns.exec("ip", "-4", "route", "show", "dev", "eth0", check=True)
        assert any(ln.startswith(f"{gw} ") and "scope link" in ln for ln in r.stdout.splitlines()), r.stdout
    assert ips[a.name] != ips[b.name]

    # reachability: host -> each namespace; each namespace -> its gateway (the host side)
    for ns in (a, b):
        assert helpers.ping(str(ips[ns.name])), f"host cannot reach {ips[ns.name]} in {ns}"
        assert helpers.ping(gateway_of(ipaddress.ip_interface(f"{ips[ns.name]}/{prefixlen}")), ns), \
            f"{ns} cannot reach its gateway"

    held = helpers.allocated_ips(etcd_server.endpoint, etcd_prefix, network=net)
    assert held == {str(ips[ns.name]): f"{net}/{helpers.cnitool_container_id(ns.path)}/eth0" for ns in (a, b)}

    for ns in (a, b):
        r = cnitool.check(net, ns)
        assert r.returncode == 0, f"CHECK {ns}: {r.stderr}"

    for ns in (a, b):
        r = cnitool.delete(net, ns)
        assert r.returncode == 0, f"DEL {ns}: {r.stderr}"
        assert not helpers.link_exists(veths[ns.name]), "ptp DEL removes the host veth"
        assert helpers.host_routes_to(str(ips[ns.name])) == []
    assert helpers.allocated_ips(etcd_server.endpoint, etcd_prefix) == {}
    assert helpers.block_holders(etcd_server.endpoint, etcd_prefix) == {}


def test_ptp_routed_two_namespaces(cnitool, etcd_server, etcd_prefix, e2e_pool, netns_factory, host_cleanup,
                                   tmp_path):
    """The example as shipped: routed mode (block-length prefixes for ptp), gateway 169.254.1.1."""
    net = host_cleanup.network(f"cnit-ptp-{helpers.rand_suffix()}")
    conf = ptp_conf(net, etcd_server, etcd_prefix, e2e_pool, tmp_path)
    ipam = conf["plugins"][0]["ipam"]
    assert ipam["mode"] == "routed" and ipam["gateway"] == GATEWAY and ipam["routed_prefix"] == "block"
    cnitool.write_conflist(conf)
    run_two_namespaces(cnitool, net, etcd_server, etcd_prefix, e2e_pool, netns_factory, host_cleanup,
                       prefixlen=e2e_pool.block_size, gateway_of=lambda iface: GATEWAY)
    assert {blk.mode for blk in helpers.blocks(etcd_server.endpoint, etcd_prefix)} == {"routed"}


def test_ptp_bridge_mode_two_namespaces(cnitool, etcd_server, etcd_prefix, e2e_pool, netns_factory, host_cleanup,
                                        tmp_path):
    """ptp with cni-ipam in bridge mode: block-prefix addresses, the block's gateway on every host veth."""
    net = host_cleanup.network(f"cnit-ptpb-{helpers.rand_suffix()}")
    cnitool.write_conflist(ptp_conf(net, etcd_server, etcd_prefix, e2e_pool, tmp_path, mode="bridge",
                                    gateway=None))
    run_two_namespaces(cnitool, net, etcd_server, etcd_prefix, e2e_pool, netns_factory, host_cleanup,
                       prefixlen=28, gateway_of=lambda iface: str(iface.network.network_address + 1))


def test_ptp_failure_after_ipam_gives_the_address_back(cnitool, etcd_server, etcd_prefix, e2e_pool,
                                                       netns_factory, host_cleanup, tmp_path):
    """ptp fails after cni-ipam allocated (a route via 169.254.1.1 to a /32 cannot be installed);
    ptp's error path calls the IPAM DEL, and nothing stays allocated."""
    net = host_cleanup.network(f"cnit-ptpfail-{helpers.rand_suffix()}")
    cnitool.write_conflist(ptp_conf(net, etcd_server, etcd_prefix, e2e_pool, tmp_path,
                                    routes=[{"dst": "0.0.0.0/0"}]))
    ns = netns_factory()
    r = cnitool.run("add", net, ns)
    assert r.returncode != 0 and 'plugin type="ptp" failed (add)' in r.stderr, r.stderr
    log = (tmp_path / "cni-ipam.log").read_text()
    assert "ADD " in log and "DEL " in log, "cni-ipam allocated, then ptp released it"
    assert helpers.allocated_ips(etcd_server.endpoint, etcd_prefix) == {}
    assert helpers.block_holders(etcd_server.endpoint, etcd_prefix) == {}
    assert cnitool.delete(net, ns).returncode == 0

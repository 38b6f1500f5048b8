"""End to end with Debian's `ptp` plugin in routed mode: cnitool (libcni) -> ptp -> cni-ipam binary.

The shipped example conflist (conf/20-cni-ipam-ptp.conflist: mode routed, gateway 169.254.1.1),
with ipMasq off and this test's etcd: /32 addresses, 169.254.1.1 on the host side of every veth,
a host route per address, reachability from the host.
"""
from __future__ import annotations

import ipaddress

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


def test_ptp_routed_two_namespaces(cnitool, etcd_server, etcd_prefix, e2e_pool, netns_factory, host_cleanup,
                                   tmp_path):
    suffix = helpers.rand_suffix()
    net = host_cleanup.network(f"cnit-ptp-{suffix}")
    conf = helpers.example_conflist(
        "20-cni-ipam-ptp.conflist", name=net, plugin={"ipMasq": False},
        ipam={"etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix, "nodename": "e2e-node",
              "ipv4_pools": [e2e_pool.name], "lock_file": str(tmp_path / "ipam.lock"),
              "log_file": str(tmp_path / "cni-ipam.log"), "log_level": "debug"})
    ipam = conf["plugins"][0]["ipam"]
    assert conf["plugins"][0]["type"] == "ptp" and ipam["mode"] == "routed" and ipam["gateway"] == GATEWAY
    cnitool.write_conflist(conf)
    a, b = netns_factory(), netns_factory()

    results, veths, ips = {}, {}, {}
    for ns in (a, b):
        res = cnitool.add(net, ns)
        veths[ns.name] = host_cleanup.link(host_veth(res))   # removed on teardown if DEL never runs
        results[ns.name] = res
        (ipc,) = res["ips"]
        iface = ipaddress.ip_interface(ipc["address"])
        assert iface.network.prefixlen == 32 and iface.ip in e2e_pool.cidr, ipc
        assert ipc["gateway"] == GATEWAY
        assert ns.addresses("eth0") == [iface], f"{ns}: eth0 holds {ns.addresses('eth0')}"
        ips[ns.name] = iface.ip
        # the host side of the veth carries the gateway, and a /32 route leads to the address
        assert ipaddress.ip_interface(f"{GATEWAY}/32") in helpers.host_addresses(veths[ns.name])
        routes = helpers.host_routes_to(str(iface.ip))
        assert any(f"dev {veths[ns.name]}" in r for r in routes), routes
        # inside: the default route goes via the gateway (routes: 0.0.0.0/0 in the example)
        r = ns.exec("ip", "-4", "route", "show", "default", check=True)
        assert f"via {GATEWAY}" in r.stdout, r.stdout
    assert ips[a.name] != ips[b.name]
    assert all(ip in e2e_pool.cidr for ip in ips.values())

    # reachability: host -> each namespace; each namespace -> its gateway
    for ns in (a, b):
        assert helpers.ping(str(ips[ns.name])), f"host cannot reach {ips[ns.name]} in {ns}"
        assert helpers.ping(GATEWAY, ns), f"{ns} cannot reach its gateway {GATEWAY}"

    # etcd: routed blocks, the handles hold exactly these addresses
    held = helpers.allocated_ips(etcd_server.endpoint, etcd_prefix, network=net)
    assert held == {str(ips[ns.name]): f"{net}.{helpers.cnitool_container_id(ns.path)}.eth0" for ns in (a, b)}
    assert {blk.mode for blk in helpers.blocks(etcd_server.endpoint, etcd_prefix)} == {"routed"}

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

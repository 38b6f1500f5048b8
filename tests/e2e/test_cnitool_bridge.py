"""End to end with Debian's `bridge` plugin: cnitool (libcni) -> bridge -> cni-ipam binary -> etcd.

Two network namespaces join one bridge through the shipped example conflist
(conf/10-cni-ipam-bridge.conflist, with a test bridge name, ipMasq off and this test's etcd).
"""
from __future__ import annotations

import ipaddress

import pytest

from tests.e2e import helpers

pytestmark = pytest.mark.usefixtures("need_root")


@pytest.fixture(autouse=True)
def _tools(need_root, need_tools):
    need_tools("ip", "ping", "/usr/lib/cni/bridge")


def test_bridge_two_namespaces(cnitool, etcd_server, etcd_prefix, e2e_pool, netns_factory, host_cleanup,
                               tmp_path):
    suffix = helpers.rand_suffix()
    bridge = host_cleanup.link(f"cnit{suffix}")          # deleted on teardown, even on failure
    net = host_cleanup.network(f"cnit-bridge-{suffix}")
    conf = helpers.example_conflist(
        "10-cni-ipam-bridge.conflist", name=net,
        plugin={"bridge": bridge, "ipMasq": False, "hairpinMode": False},
        ipam={"etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix, "nodename": "e2e-node",
              "ipv4_pools": [e2e_pool.name], "lock_file": str(tmp_path / "ipam.lock"),
              "log_file": str(tmp_path / "cni-ipam.log"), "log_level": "debug", "routes": []})
    assert conf["plugins"][0]["type"] == "bridge" and conf["plugins"][0]["ipam"]["mode"] == "bridge"
    cnitool.write_conflist(conf)
    a, b = netns_factory(), netns_factory()

    # ADD in both namespaces
    results = {ns.name: cnitool.add(net, ns) for ns in (a, b)}
    ips = {}
    for ns in (a, b):
        res = results[ns.name]
        assert res["cniVersion"] == "1.0.0"
        (ipc,) = res["ips"]
        iface = ipaddress.ip_interface(ipc["address"])
        assert iface.ip in e2e_pool.cidr and iface.network.prefixlen == 28, ipc
        gw = ipaddress.ip_address(ipc["gateway"])
        assert gw == iface.network.network_address + 1, "the block's first host address is the gateway"
        assert iface.ip not in (gw, iface.network.network_address, iface.network.broadcast_address)
        # the address is really on eth0 inside the namespace (read with pyroute2)
        assert ns.addresses("eth0") == [iface], f"{ns}: eth0 holds {ns.addresses('eth0')}"
        ips[ns.name] = iface
    ia, ib = ips[a.name], ips[b.name]
    assert ia.ip != ib.ip and ia.network == ib.network, "same node -> same block, different addresses"
    gateway = ia.network.network_address + 1

    # the bridge holds the block's gateway (isGateway)
    assert ipaddress.ip_interface(f"{gateway}/28") in helpers.host_addresses(bridge)

    # the two namespaces reach each other and the gateway
    assert helpers.ping(str(ib.ip), a), f"{a} cannot reach {ib.ip}"
    assert helpers.ping(str(ia.ip), b), f"{b} cannot reach {ia.ip}"
    assert helpers.ping(str(gateway), a) and helpers.ping(str(gateway), b), "namespaces cannot reach the gateway"

    # etcd agrees: one handle per attachment, the blocks record the same holders
    held = helpers.allocated_ips(etcd_server.endpoint, etcd_prefix, network=net)
    want = {str(ia.ip): f"{net}/{helpers.cnitool_container_id(a.path)}/eth0",
            str(ib.ip): f"{net}/{helpers.cnitool_container_id(b.path)}/eth0"}
    assert held == want
    assert helpers.block_holders(etcd_server.endpoint, etcd_prefix) == want

    # CHECK passes for both
    for ns in (a, b):
        r = cnitool.check(net, ns)
        assert r.returncode == 0, f"CHECK {ns}: {r.stderr}"

    # DEL releases (and a repeated DEL still succeeds)
    for ns in (a, b):
        r = cnitool.delete(net, ns)
        assert r.returncode == 0, f"DEL {ns}: {r.stderr}"
        assert not helpers.link_exists("eth0", ns.name)
    assert helpers.allocated_ips(etcd_server.endpoint, etcd_prefix) == {}
    assert helpers.block_holders(etcd_server.endpoint, etcd_prefix) == {}
    r = cnitool.delete(net, a)
    assert r.returncode == 0, f"repeated DEL: {r.stderr}"

    # the plugin logged to its own file, never to stdout (cnitool printed pure JSON above)
    log = (tmp_path / "cni-ipam.log").read_text()
    assert "ADD" in log and "DEL" in log


def test_bridge_requested_address_and_conflict(cnitool, etcd_server, etcd_prefix, e2e_pool, netns_factory,
                                               host_cleanup, tmp_path):
    """CAP_ARGS ips (runtimeConfig, capability `ips`) reaches cni-ipam through libcni; asking for an
    address that is taken fails cleanly and leaves nothing behind."""
    suffix = helpers.rand_suffix()
    bridge = host_cleanup.link(f"cnit{suffix}")
    net = host_cleanup.network(f"cnit-req-{suffix}")
    conf = helpers.example_conflist(
        "10-cni-ipam-bridge.conflist", name=net,
        plugin={"bridge": bridge, "ipMasq": False, "capabilities": {"ips": True}},
        ipam={"etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix, "nodename": "e2e-node",
              "ipv4_pools": [e2e_pool.name], "lock_file": str(tmp_path / "ipam.lock"),
              "log_file": str(tmp_path / "cni-ipam.log"), "routes": []})
    cnitool.write_conflist(conf)
    # warm the bridge with a plain ADD first: Debian's bridge plugin leaves a bridge whose first
    # ADD failed in IPAM with MAC 00:00:00:00:00:00 (see /work/shared/notes/real-runtimes.md)
    first = netns_factory()
    first_ip = ipaddress.ip_interface(cnitool.add(net, first)["ips"][0]["address"])
    wanted = first_ip.network.network_address + 9
    a, b = netns_factory(), netns_factory()
    res = cnitool.add(net, a, env={"CAP_ARGS": f'{{"ips": ["{wanted}/28"]}}'})
    assert ipaddress.ip_interface(res["ips"][0]["address"]).ip == wanted
    assert a.addresses("eth0") == [ipaddress.ip_interface(f"{wanted}/28")]

    r = cnitool.run("add", net, b, env={"CAP_ARGS": f'{{"ips": ["{wanted}/28"]}}'})
    assert r.returncode != 0 and str(wanted) in r.stderr, r.stderr
    held = helpers.allocated_ips(etcd_server.endpoint, etcd_prefix)
    assert sorted(held) == sorted([str(first_ip.ip), str(wanted)]), "the failed ADD left nothing allocated"
    for ns in (first, a, b):
        assert cnitool.delete(net, ns).returncode == 0
    assert helpers.allocated_ips(etcd_server.endpoint, etcd_prefix) == {}

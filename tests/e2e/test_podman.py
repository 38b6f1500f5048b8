"""A second runtime: podman 4.3 (CNI backend, runc) -> Debian's bridge plugin -> the cni-ipam binary.

``podman run --rm --network <net>`` must get its address from cni-ipam (read with ``ip addr``
inside the container, matched against the handle in etcd) and release it when the container is
removed.  podman is configured only through CONTAINERS_CONF / CONTAINERS_STORAGE_CONF / TMPDIR;
its storage, run state and network configs live in the test's temp dir.
"""
from __future__ import annotations

import ipaddress
import json
import re
import types

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from tests.e2e.helpers import sysctl_restored
from tests.e2e.runtimes import (IMAGE_REF, Podman, bridge_conflist, build_busybox_image, delete_link,
                                etcd_allocations, free_test_subnet, link_exists, missing_tools,
                                unique_name, wait_released)

_why = missing_tools("podman", "runc", "conmon", "/bin/busybox", "/usr/lib/cni/bridge")
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

INET = re.compile(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)")


@pytest.fixture
def podman_node(tmp_path, etcd_server, etcd_prefix, cni_bin_dir):
    subnet = ipaddress.ip_network(free_test_subnet())
    cidr = str(list(subnet.subnets(new_prefix=26))[0])
    node = unique_name("node-", 6)
    bridge = unique_name("pmt", 8)
    net = unique_name("e2enet-", 6)
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("e2e-podman", cidr, 29))
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conflist = bridge_conflist(name=net, bridge=bridge, endpoint=etcd_server.endpoint, prefix=etcd_prefix,
                               node=node, work_dir=str(tmp_path))
    (conf_dir / f"{net}.conflist").write_text(json.dumps(conflist, indent=2))
    _, rootfs = build_busybox_image(str(tmp_path / "image"))
    # the bridge plugin may switch on ip_forward: put it back afterwards
    with sysctl_restored("net.ipv4.ip_forward"):
        # podman's own dir stays short: under pytest's long tmp_path conmon never reported the
        # container's exit and every `podman run --rm` waited out podman's 20 s conmon timeout
        pm = Podman(cni_plugin_dirs=[cni_bin_dir], network_config_dir=str(conf_dir))
        try:
            pm.import_rootfs(rootfs)
            yield types.SimpleNamespace(pm=pm, ipam=ipam, net=net, node=node, bridge=bridge,
                                        pool=ipaddress.ip_network(cidr), tmp=tmp_path)
        finally:
            problems = pm.stop()
            delete_link(bridge)
            ipam.ds.close()
            if problems:
                print("podman teardown:", *problems, sep="\n  ")
            assert not link_exists(bridge)


def test_podman_run_rm_gets_an_address_and_releases_it(podman_node):
    n = podman_node
    p = n.pm.run_container("--rm", "--network", n.net, IMAGE_REF, "/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0")
    out = p.stdout.decode()
    m = INET.search(out)
    assert m, out
    ip = ipaddress.ip_address(m.group(1))
    assert ip in n.pool and m.group(2) == "29", out
    # allocated by cni-ipam: the plugin's log names it; --rm released it in etcd
    log = (n.tmp / "cni-ipam.log").read_text()
    assert any("ADD" in line and str(ip) in line for line in log.splitlines()), log[-2000:]
    handles, blocks = wait_released(n.ipam, timeout=10)
    assert handles == [] and not any(blocks.values()), (handles, blocks)


def test_podman_detached_containers_hold_their_addresses_until_removed(podman_node):
    n = podman_node
    cids = []
    for _ in range(2):
        p = n.pm.run_container("-d", "--rm", "--network", n.net, IMAGE_REF, "/bin/sleep", "600")
        cids.append(p.stdout.decode().strip())
    handles, blocks = etcd_allocations(n.ipam)
    by_cid = {h.container_id: h for h in handles}
    assert set(by_cid) == set(cids), (by_cid.keys(), cids)
    seen = set()
    for cid in cids:
        out = n.pm.run("exec", cid, "/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.decode()
        ip = ipaddress.ip_address(INET.search(out).group(1))
        assert ip in n.pool
        assert [a.ip for a in by_cid[cid].addresses] == [ip]
        assert by_cid[cid].node == n.node
        assert any(blocks[b].get(str(ip)) == by_cid[cid].id for b in blocks)
        seen.add(ip)
    assert len(seen) == 2
    # stop: --rm removes the containers and the DELs release both addresses
    n.pm.run("stop", "--time", "0", *cids)
    handles, blocks = wait_released(n.ipam, timeout=15)
    assert handles == [] and not any(blocks.values()), (handles, blocks)

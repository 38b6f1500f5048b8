"""The kubelet path: containerd's CRI plugin -> Debian's bridge plugin -> the cni-ipam binary.

Pods are created over CRI (RunPodSandbox with metadata name/namespace/uid, exactly what kubelet
sends), so containerd hands the plugin the real ``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` in
CNI_ARGS.  The namespace -> pool choice comes from namespace annotations stored in etcd with
``cni-ipam namespace annotate``.  Every pod's IP (PodSandboxStatus) must lie in its namespace's
pool; StopPodSandbox + RemovePodSandbox (containerd calls DEL twice) must leave nothing allocated.

The network is Debian's bridge plugin with cni-ipam in mode ``bridge`` and ``isGateway`` off:
Debian's bridge plugin (1.1.1) keeps ONE IPv4 address per bridge, so with two pools (two blocks
on this node) the second block's gateway could not be put on the bridge ("already has an IP
address different from ...").  (Debian's ptp 1.1.1 cannot take routed mode's /32 addresses
either: it deletes the subnet route of the container address, which a /32 does not have.)
"""
from __future__ import annotations

import ipaddress
import json
import os
import types
import uuid

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from tests.e2e.helpers import sysctl_restored
from tests.e2e.runtimes import (Containerd, build_busybox_image, bridge_conflist, delete_link,
                                etcd_allocations, free_test_subnet, link_exists, make_cni_bin_dir,
                                missing_tools, read_calls, recording_plugin, run_cli,
                                unique_name, wait_released)
from tests.support.exec_server import ExecServerProcess

_why = missing_tools("containerd", "ctr", "runc", "/bin/busybox", "/usr/lib/cni/bridge",
                     modules=("grpc", "cri_api"))
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

POOLS_ANNOTATION = "cni.projectcalico.org/ipv4pools"


@pytest.fixture
def cri_node(request, tmp_path, etcd_server, etcd_prefix, plugin_binary):
    """containerd (CRI) on a one-file CNI config: bridge ``crt<hex>`` + cni-ipam (through a
    recording wrapper that logs what containerd passed), two pools in a free 10.244.N.0/24,
    namespaces annotated in etcd.  Everything is torn down even when the test fails.
    With the indirect parameter ``"exec-server"``: the plugin's execs go to an exec server
    (``n.stop_exec_server()`` stops it and returns its log)."""
    server = None
    target = plugin_binary
    if getattr(request, "param", None) == "exec-server":
        server = ExecServerProcess(plugin_binary, tmp_path / "exec.sock", tmp_path / "exec-server.log")
        target = str(tmp_path / "served-cni-ipam")
        with open(target, "w") as f:   # the runtime's environment names the server's socket
            f.write(f"#!/bin/sh\nCNI_IPAM_EXEC_SOCKET={server.sock} exec {plugin_binary} \"$@\"\n")
        os.chmod(target, 0o755)

    def stop_exec_server() -> str:
        server.end()
        return server.stderr()
    subnet = ipaddress.ip_network(free_test_subnet())
    ext_cidr = str(list(subnet.subnets(new_prefix=26))[0])   # 64 addresses, like the seed's
    int_cidr = str(list(subnet.subnets(new_prefix=25))[1])
    node = unique_name("node-", 6)
    bridge = unique_name("crt", 8)
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("e2e-external", ext_cidr, 29))
    ipam.create_pool(make_pool("e2e-internal", int_cidr, 29))
    calls = str(tmp_path / "calls.log")
    wrapper = recording_plugin(str(tmp_path / "wrap"), target, calls)
    bin_dir = make_cni_bin_dir(str(tmp_path / "bin"), wrapper)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conflist = bridge_conflist(name="k8s-pod-network", bridge=bridge, is_gateway=False,
                               endpoint=etcd_server.endpoint, prefix=etcd_prefix, node=node,
                               work_dir=str(tmp_path))
    (conf_dir / "10-cni-ipam.conflist").write_text(json.dumps(conflist, indent=2))
    image_tar, _ = build_busybox_image(str(tmp_path / "image"))
    # the bridge plugin may switch on ip_forward: put it back afterwards
    with sysctl_restored("net.ipv4.ip_forward"):
        ctrd = Containerd(cni_bin_dir=bin_dir, cni_conf_dir=str(conf_dir), base_dir=str(tmp_path / "containerd"),
                          keep_logs_in=str(tmp_path / "logs"))
        try:
            ctrd.start()
            ctrd.import_image(image_tar)
            ns = {"external-ns": "e2e-external", "internal-ns": "e2e-internal"}
            for name, pool in ns.items():
                run_cli(plugin_binary, ["namespace", "annotate", name, f"{POOLS_ANNOTATION}={json.dumps([pool])}"],
                        endpoint=etcd_server.endpoint, prefix=etcd_prefix)
            yield types.SimpleNamespace(
                ctrd=ctrd, cri=ctrd.cri(), ipam=ipam, node=node, bridge=bridge, calls=calls, tmp=tmp_path,
                binary=plugin_binary, endpoint=etcd_server.endpoint, prefix=etcd_prefix,
                pools={p.name: p.cidr for p in ipam.pools()}, ns_pool=ns,
                stop_exec_server=stop_exec_server if server else None)
        finally:
            if server:
                server.end()
            problems = ctrd.stop()
            delete_link(bridge)
            ipam.ds.close()
            if problems:
                print("containerd teardown:", *problems, sep="\n  ")
            assert not link_exists(bridge)


def _run_pod(n, name: str, namespace: str):
    uid = str(uuid.uuid4())
    cfg = n.cri.pod_config(name, namespace, uid)
    pod_id = n.cri.run_pod_sandbox(cfg)
    return pod_id, uid, cfg


@pytest.mark.parametrize("cri_node", [None, "exec-server"], ids=["cold", "exec-server"], indirect=True)
def test_pods_get_addresses_from_their_namespace_pool_and_release_them(cri_node):
    """... the same through the node's exec server (containerd -> bridge -> the launcher -> a fork
    of the warm plugin): every one of the plugin's execs was served."""
    n = cri_node
    pods = []  # (namespace, name, uid, sandbox id, ip)
    for namespace in ("external-ns", "internal-ns"):
        for i in range(2):
            name = f"web-{i}"
            pod_id, uid, _ = _run_pod(n, name, namespace)
            st = n.cri.pod_sandbox_status(pod_id)
            assert n.cri.pb.PodSandboxState.Name(st.state) == "SANDBOX_READY"
            ips = n.cri.pod_ips(pod_id)
            assert len(ips) == 1, ips
            pods.append((namespace, name, uid, pod_id, ipaddress.ip_address(ips[0])))

    # every pod's IP lies in its namespace's pool, all distinct
    for namespace, name, _uid, _pid, ip in pods:
        pool = n.pools[n.ns_pool[namespace]]
        assert ip in pool, f"{namespace}/{name} got {ip}, not in {n.ns_pool[namespace]} ({pool})"
    assert len({p[4] for p in pods}) == len(pods)

    # containerd passed kubelet's CNI_ARGS; etcd records the pod on each handle
    adds = [c for c in read_calls(n.calls) if c["command"] == "ADD"]
    assert len(adds) == len(pods)
    handles = {h.container_id: h for h in n.ipam.handles()}
    for namespace, name, uid, pod_id, ip in pods:
        add = [c for c in adds if c["container_id"] == pod_id]
        assert len(add) == 1, add
        args = add[0]["args"]
        assert args.get("K8S_POD_NAMESPACE") == namespace and args.get("K8S_POD_NAME") == name
        assert args.get("K8S_POD_UID") == uid and args.get("K8S_POD_INFRA_CONTAINER_ID") == pod_id
        assert add[0]["ifname"] == "eth0" and add[0]["netns"]
        h = handles[pod_id]
        assert (h.namespace, h.pod, h.node) == (namespace, name, n.node)
        assert [a.ip for a in h.addresses] == [ip]

    # the address is really on the pod's eth0 (a container in the pod shares its netns)
    namespace, name, uid, pod_id, ip = pods[0]
    cfg = n.cri.pod_config(name, namespace, uid)
    cid = n.cri.run_container(pod_id, cfg, "app", ["/bin/sleep", "600"])
    rc, out, err = n.cri.exec_sync(cid, ["/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert rc == 0, err
    assert f"inet {ip}/29" in out, out
    # every pod's host-side veth is a port of our bridge
    ports = os.listdir(f"/sys/class/net/{n.bridge}/brif")
    assert len(ports) == len(pods), ports

    # Stop + Remove: containerd calls DEL twice (with the netns, then without); both succeed
    for *_, pod_id, _ip in pods:
        n.cri.stop_pod_sandbox(pod_id)
        n.cri.remove_pod_sandbox(pod_id)
    assert n.cri.list_pod_sandboxes() == []
    dels = [c for c in read_calls(n.calls) if c["command"] == "DEL"]
    for *_, pod_id, _ip in pods:
        mine = [c for c in dels if c["container_id"] == pod_id]
        assert len(mine) >= 2, f"expected two DELs for {pod_id[:12]}, saw {mine}"
    handles, blocks = wait_released(n.ipam, timeout=5)
    assert handles == [], handles
    assert not any(blocks.values()), blocks
    if n.stop_exec_server:
        log = n.stop_exec_server()
        execs = len(read_calls(n.calls))
        assert f"stopped after {execs} execs" in log, (execs, log)
        assert "left an exec" not in log, log


def test_failed_add_leaves_nothing_and_the_node_keeps_working(cri_node):
    n = cri_node
    # a working pod first (the bridge plugin breaks a bridge whose very first ADD failed)
    good_id, *_ = _run_pod(n, "first", "external-ns")
    run_cli(n.binary, ["namespace", "annotate", "broken-ns", f"{POOLS_ANNOTATION}=[\"no-such-pool\"]"],
            endpoint=n.endpoint, prefix=n.prefix)
    with pytest.raises(Exception) as exc:
        _run_pod(n, "doomed", "broken-ns")
    assert "no-such-pool" in str(exc.value), str(exc.value)
    # containerd keeps a NotReady sandbox for the failed pod; stop + remove it like kubelet does
    for sb in n.cri.find_pod("doomed", "broken-ns"):
        n.cri.stop_pod_sandbox(sb.id)
        n.cri.remove_pod_sandbox(sb.id)
    assert n.cri.find_pod("doomed", "broken-ns") == []
    handles, blocks = etcd_allocations(n.ipam)
    assert [h.container_id for h in handles] == [good_id]
    assert sum(len(v) for v in blocks.values()) == 1

    # the node still works: a new pod in internal-ns gets an internal address
    pod_id, *_ = _run_pod(n, "after", "internal-ns")
    ip = ipaddress.ip_address(n.cri.pod_ips(pod_id)[0])
    assert ip in n.pools["e2e-internal"]
    for pid in (good_id, pod_id):
        n.cri.stop_pod_sandbox(pid)
        n.cri.remove_pod_sandbox(pid)
    handles, blocks = wait_released(n.ipam, timeout=5)
    assert handles == [] and not any(blocks.values()), (handles, blocks)

"""Pool features (issue #16) end to end: the real plugin exec'd as a runtime does, the CLI as a
subprocess, the real etcd, and the Kubernetes API stand-in for namespace labels."""
from __future__ import annotations

import ipaddress

import pytest

from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import assert_error, exec_plugin, netconf
from tests.support.k8s_standin import K8sStandin
from tests.test_cli_common import cli, ipam  # noqa: F401 (fixtures)

N = ipaddress.ip_network
V4 = "cni.projectcalico.org/ipv4pools"


def k8s_args(ns, pod, cid):
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"


def ip_of(r):
    assert r.rc == 0, r.stdout + r.stderr
    return ipaddress.ip_interface(r.out["ips"][0]["address"]).ip


def three_pools(ipam):
    ipam.create_pool(make_pool("blue", "10.95.0.0/24", 29, namespace_selector="team == 'blue'"))
    ipam.create_pool(make_pool("general", "10.96.0.0/24", 29, namespace_selector="!has(team)"))
    ipam.create_pool(make_pool("special", "10.97.0.0/24", 29, assignment_mode="Manual"))


def test_namespace_selector_and_manual_pools_with_kubernetes(ipam, etcd_server, etcd_prefix, tmp_path):
    three_pools(ipam)
    with K8sStandin(tmp_path) as api:
        api.add_namespace("web", labels={"team": "blue"})
        api.add_namespace("batch")
        api.add_namespace("red", labels={"team": "red"})
        api.add_namespace("vip", labels={"team": "red"}, annotations={V4: '["special"]'})
        api.add_node("node-a")
        for ns, pod in (("web", "w"), ("batch", "b"), ("red", "r"), ("vip", "v")):
            api.add_pod(ns, pod, node="node-a")
        api.add_pod("batch", "pinned", node="node-a", annotations={V4: '["special"]'})
        conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path,
                       kubernetes={"kubeconfig": api.write_kubeconfig(tmp_path / "kc")})

        def add(ns, pod):
            return exec_plugin("ADD", conf, container=f"{ns}-{pod}", args=k8s_args(ns, pod, f"{ns}-{pod}"))
        assert ip_of(add("web", "w")) in N("10.95.0.0/24")        # namespaceSelector matches
        assert ip_of(add("batch", "b")) in N("10.96.0.0/24")      # !has(team); never the Manual pool
        # the Manual pool named by a pod or a namespace annotation
        assert ip_of(add("batch", "pinned")) in N("10.97.0.0/24")
        assert ip_of(add("vip", "v")) in N("10.97.0.0/24")
        # no pool's namespaceSelector matches "red" (the Manual one is never chosen automatically)
        e = assert_error(add("red", "r"), 7, names="matches this node and the pod's namespace")
        assert "blue" in e["msg"] and "special" not in e["msg"]


def test_namespace_label_command_without_kubernetes(cli, ipam, etcd_server, etcd_prefix, tmp_path):
    three_pools(ipam)
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    assert cli("namespace", "annotate", "web", "owner=me").rc == 0
    r = cli("namespace", "label", "web", "team=blue")
    assert r.rc == 0 and r.stdout == "namespace/web labeled\n", r.stderr
    got = cli("namespace", "get", "web", "-o", "json").json()
    assert got == {"name": "web", "annotations": {"owner": "me"}, "labels": {"team": "blue"}}
    assert "team=blue" in cli("namespace", "get", "web").stdout
    r = cli("namespace", "label", "web", "team=r d")
    assert r.rc != 0 and "invalid label value" in r.stderr

    def add(ns, pod):
        return exec_plugin("ADD", conf, container=f"{ns}-{pod}", args=k8s_args(ns, pod, f"{ns}-{pod}"))
    assert ip_of(add("web", "a")) in N("10.95.0.0/24")
    assert ip_of(add("plain", "a")) in N("10.96.0.0/24")
    # relabel: the next pod of the namespace follows the labels (the snapshot's compare sees the change)
    assert cli("namespace", "label", "web", "team-").rc == 0
    assert ip_of(add("web", "b")) in N("10.96.0.0/24")
    # removing the labels kept the annotations
    assert cli("namespace", "get", "web", "-o", "json").json() == {"name": "web", "annotations": {"owner": "me"}}


def test_reservation_through_the_plugin_and_the_cli(cli, ipam, etcd_server, etcd_prefix, tmp_path):
    ipam.create_pool(make_pool("p", "10.93.0.0/28", 29))    # 2 blocks of 5 bridge addresses
    assert cli("apply", "-f", "-", stdin=RESERVATION).rc == 0, "apply IPReservation"
    r = cli("reservation", "list")
    assert r.rc == 0 and "infra" in r.stdout and "10.93.0.8/29, 10.93.0.3/32" in r.stdout
    got = cli("reservation", "get", "infra", "-o", "json").json()
    assert got == {"apiVersion": "projectcalico.org/v3", "kind": "IPReservation", "metadata": {"name": "infra"},
                   "spec": {"reservedCIDRs": ["10.93.0.8/29", "10.93.0.3/32"]}}
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    # a requested address inside the reservation: code 111 naming it, nothing allocated
    e = assert_error(exec_plugin("ADD", conf, container="req", args="IP=10.93.0.3"), 111,
                     names="reserved by IPReservation 'infra'")
    assert "10.93.0.3" in e["msg"]
    # automatic: 4 addresses (.2, .4, .5, .6); never .3 nor the reserved block
    ips = [ip_of(exec_plugin("ADD", conf, container=f"c{i}")) for i in range(4)]
    assert sorted(map(str, ips)) == ["10.93.0.2", "10.93.0.4", "10.93.0.5", "10.93.0.6"]
    assert_error(exec_plugin("ADD", conf, container="c4"), 110)
    # show: the reserved addresses apart
    pool = next(p for p in cli("show", "-o", "json").json()["pools"] if p["name"] == "p")
    assert pool["ipReserved"] == 6 and pool["inUse"] == 4 and pool["free"] == 0
    # delete: the addresses can be handed out again
    assert cli("reservation", "delete", "infra").rc == 0
    assert cli("reservation", "list", "-o", "json").json()["items"] == []
    assert ip_of(exec_plugin("ADD", conf, container="c4")) == ipaddress.ip_address("10.93.0.3")
    r = cli("reservation", "delete", "infra")
    assert r.rc != 0 and 'IPReservation "infra" does not exist' in r.stderr


RESERVATION = """\
apiVersion: projectcalico.org/v3
kind: IPReservation
metadata:
  name: infra
spec:
  reservedCIDRs:
  - 10.93.0.8/29
  - 10.93.0.3
"""

COOLDOWN = """\
apiVersion: projectcalico.org/v3
kind: IPAMConfig
metadata:
  name: default
spec:
  ipCooldownSeconds: 1200
  strictAffinity: true
"""


def test_cooldown_through_the_plugin(cli, ipam, etcd_server, etcd_prefix, tmp_path):
    ipam.create_pool(make_pool("p", "10.94.0.0/29", 29))     # one bridge block: 5 addresses
    assert cli("apply", "-f", "-", stdin=COOLDOWN).rc == 0
    assert cli("config", "show", "-o", "json").json()["ipCooldownSeconds"] == 1200
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    ips = [ip_of(exec_plugin("ADD", conf, container=f"c{i}")) for i in range(4)]
    assert exec_plugin("DEL", conf, container="c0").rc == 0
    # the last never-used address first, then nothing: c0's address cools for 20 minutes
    assert ip_of(exec_plugin("ADD", conf, container="c4")) not in ips
    e = assert_error(exec_plugin("ADD", conf, container="c5"), 110, names="cooling down")
    assert "ipCooldownSeconds 1200" in e["msg"] and "frees up at" in e["msg"]
    # an explicit request may take a cooling address
    assert ip_of(exec_plugin("ADD", conf, container="c6", args=f"IP={ips[0]}")) == ips[0]


def test_check_reports_allocations_inside_a_reservation(cli, ipam, etcd_server, etcd_prefix, tmp_path):
    ipam.create_pool(make_pool("p", "10.93.0.0/28", 29))
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    first = ip_of(exec_plugin("ADD", conf, container="c0", args="IP=10.93.0.3"))
    assert cli("check").rc == 0
    assert cli("apply", "-f", "-", stdin=RESERVATION).rc == 0     # reserves 10.93.0.3 (and .8/29)
    r = cli("check", "-o", "json")
    assert r.rc == 1
    f = r.json()["findings"]
    assert [x["kind"] for x in f] == ["allocation-in-reservation"]
    assert f[0]["ip"] == str(first) and f[0]["reservation"] == "infra" and "release --ip 10.93.0.3" in f[0]["fix"]
    assert "allocation-in-reservation: 10.93.0.3" in cli("check").stdout
    # the pod keeps its address until released; then check is clean and the address is never handed out
    assert ip_of(exec_plugin("ADD", conf, container="c0", args="IP=10.93.0.3")) == first
    assert exec_plugin("DEL", conf, container="c0").rc == 0
    assert cli("check").rc == 0
    assert_error(exec_plugin("ADD", conf, container="c1", args="IP=10.93.0.3"), 111, names="IPReservation 'infra'")

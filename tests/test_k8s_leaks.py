"""Leaks against live pods: `cni-ipam check --kubeconfig` and `release --leaked`
(CLI as a subprocess, the Kubernetes stand-in, the real etcd)."""
import json
import os
import subprocess
import sys

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam import leaks
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.pool import make_pool
from cni_ipam.k8s import KubeClient
from tests.plugin_helpers import ROOT
from tests.support.k8s_standin import K8sStandin


@pytest.fixture
def api(tmp_path):
    with K8sStandin(tmp_path) as s:
        yield s


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint)
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("p", "10.60.0.0/24", 29))
    yield ipam
    ds.close()


@pytest.fixture
def cli(etcd_server, etcd_prefix):
    env = {k: v for k, v in os.environ.items() if k != "CNI_COMMAND"}
    env.update(ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix, PYTHONPATH=ROOT)

    def run(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, input=stdin,
                              capture_output=True, text=True, timeout=60)
    return run


def populate(api, ipam):
    """Four pods with addresses, one non-Kubernetes container; then two pods are deleted."""
    api.add_namespace("ns")
    for i in range(4):
        api.add_pod("ns", f"p{i}", node="n1")
        ipam.assign(AssignRequest(handle_id=f"net.c{i}.eth0", node="n1", network="net", container_id=f"c{i}",
                                  ifname="eth0", namespace="ns", pod=f"p{i}"))
    ipam.assign(AssignRequest(handle_id="net.podman1.eth0", node="n1", network="net"))
    api.delete_pod("ns", "p1")
    api.delete_pod("ns", "p3")
    return {h.id: str(h.addresses[0].ip) for h in ipam.handles()}


def test_find_and_release_in_process(api, ipam, tmp_path):
    ips = populate(api, ipam)
    with KubeClient.from_kubeconfig(api.write_kubeconfig(tmp_path / "kc"), timeout=5) as c:
        found = leaks.find_leaks(ipam, c)
        assert [lk.handle_id for lk in found] == ["net.c1.eth0", "net.c3.eth0"]
        assert found[0].addresses == [ips["net.c1.eth0"]] and "pod ns/p1 does not exist" in found[0].reason
        # a pod that comes back between listing and releasing is left alone
        api.add_pod("ns", "p3", node="n1")
        done, skipped = leaks.release_leaks(ipam, c, found)
    assert [lk.handle_id for lk in done] == ["net.c1.eth0"]
    assert [(lk.handle_id, why) for lk, why in skipped] == [("net.c3.eth0", "pod ns/p3 exists again")]
    assert {h.id for h in ipam.handles()} == {"net.c0.eth0", "net.c2.eth0", "net.c3.eth0", "net.podman1.eth0"}


def test_check_and_release_leaked_cli(api, ipam, cli, tmp_path):
    ips = populate(api, ipam)
    kc = api.write_kubeconfig(tmp_path / "kc")
    assert cli("check").returncode == 0                     # without a kubeconfig: consistent store
    p = cli("check", "--kubeconfig", kc)
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("leaked: ") for ln in lines)
    assert ips["net.c1.eth0"] in lines[0] and "pod ns/p1 does not exist" in lines[0]
    rep = json.loads(cli("check", "--kubeconfig", kc, "-o", "json").stdout)
    assert not rep["clean"] and rep["summary"] == {"leaked": 2}
    assert [f["handle"] for f in rep["findings"]] == ["net.c1.eth0", "net.c3.eth0"]

    # shows what it will do and asks; "n" (or no answer) releases nothing
    for answer in ("n\n", ""):
        p = cli("release", "--leaked", "--kubeconfig", kc, stdin=answer)
        assert "2 handle(s) whose pod no longer exists will be released" in p.stderr
        assert ips["net.c3.eth0"] in p.stderr
        if answer:
            assert p.returncode == 0 and "nothing released" in p.stderr
        else:   # no terminal to answer on: refused, naming --yes (as every command that asks)
            assert p.returncode == 1 and "add --yes" in p.stderr.splitlines()[-1]
        assert len(ipam.handles()) == 5
    p = cli("release", "--leaked", "--kubeconfig", kc, stdin="y\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("released ") == 2 and ips["net.c1.eth0"] in p.stdout
    assert {h.id for h in ipam.handles()} == {"net.c0.eth0", "net.c2.eth0", "net.podman1.eth0"}
    assert cli("check", "--kubeconfig", kc).returncode == 0
    # --yes skips the prompt
    api.delete_pod("ns", "p0")
    p = cli("release", "--leaked", "--kubeconfig", kc, "--yes", "-o", "json")
    res = json.loads(p.stdout)
    assert p.returncode == 0 and res["confirmed"] and [r["handle"] for r in res["released"]] == ["net.c0.eth0"]
    p = cli("release", "--leaked", "--kubeconfig", kc, "--yes")
    assert p.returncode == 0 and "no leaked addresses" in p.stderr


def test_leak_cli_errors(api, ipam, cli, tmp_path):
    populate(api, ipam)
    bad = api.write_kubeconfig(tmp_path / "bad", token="nope")
    for args in (("check", "--kubeconfig", bad), ("release", "--leaked", "--kubeconfig", bad, "--yes")):
        p = cli(*args)
        # check: 3 = could not check (bad credentials); release: 1
        assert p.returncode == (3 if args[0] == "check" else 1) and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("cni-ipam: error: ") and "HTTP 403" in p.stderr
    p = cli("release", "--leaked")
    assert p.returncode == 1 and "--leaked and --kubeconfig go together" in p.stderr
    p = cli("check", "--kubeconfig", str(tmp_path / "missing"))
    assert p.returncode == 3 and "cannot read it" in p.stderr
    assert len(ipam.handles()) == 5


def test_recreated_pod_with_same_name_is_a_leak(api, ipam, tmp_path):
    """A StatefulSet pod recreated under the same name is another pod (another uid):
    the old attachment's address is leaked, the new one's is not."""
    api.add_namespace("ns")
    old = api.add_pod("ns", "web-0", node="n1")
    ipam.assign(AssignRequest(handle_id="net.old.eth0", node="n1", network="net", namespace="ns", pod="web-0",
                              pod_uid=old["metadata"]["uid"]))
    api.delete_pod("ns", "web-0")
    new = api.add_pod("ns", "web-0", node="n1")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    ipam.assign(AssignRequest(handle_id="net.new.eth0", node="n1", network="net", namespace="ns", pod="web-0",
                              pod_uid=new["metadata"]["uid"]))
    with KubeClient.from_kubeconfig(api.write_kubeconfig(tmp_path / "kc"), timeout=5) as c:
        found = leaks.find_leaks(ipam, c)
    assert [lk.handle_id for lk in found] == ["net.old.eth0"] and "recreated" in found[0].reason

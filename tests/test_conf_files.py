"""Every file in conf/ is used here, so none can rot.

* pools.yaml          -- exactly the seed's calicoctl manifest; applied with `cni-ipam apply -f`.
* 10-cni-ipam-bridge.conflist, 20-cni-ipam-ptp.conflist
                      -- parsed by the plugin's own parsers; their ipam sections allocate from the
                         seed's pools through the plugin (bridge: /29 + block gateway; ptp: routed
                         /32 + 169.254.1.1); the CLI reads its etcd settings from them (--cni-conf).
* ipamconfig.yaml     -- applied with `cni-ipam apply -f`; etcd holds what it says.
* kubeconfig.template -- filled in, it authenticates to the Kubernetes stand-in, and the plugin
                         picks the namespace's pool through it (the seed scenario).
(The e2e tests also run both conflists through libcni and Debian's bridge/ptp plugins.)
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.plugin_helpers import ROOT, exec_plugin

CONF = Path(ROOT) / "conf"
TESTED = {"pools.yaml", "10-cni-ipam-bridge.conflist", "20-cni-ipam-ptp.conflist", "ipamconfig.yaml",
          "kubeconfig.template"}

from tests.test_cli_common import SEED_POOLS as SEED_POOLS_YAML  # noqa: E402 (the seed's text, once)


def cli(etcd_server, prefix, *args, timeout=60) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT, "ETCD_ENDPOINTS": etcd_server.endpoint,
           "CNI_IPAM_ETCD_PREFIX": prefix}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def engine(etcd_server, prefix):
    from cni_ipam.datastore import open_datastore
    from cni_ipam.ipam.engine import IPAM
    return IPAM(open_datastore(etcd_server.endpoint), prefix)


@pytest.fixture
def seed_pools(etcd_server, etcd_prefix):
    r = cli(etcd_server, etcd_prefix, "apply", "-f", str(CONF / "pools.yaml"))
    assert r.returncode == 0, f"apply -f conf/pools.yaml: rc {r.returncode}\n{r.stdout}{r.stderr}"
    return r


def plugin_conf(filename: str, etcd_server, prefix, tmp_path, **ipam) -> dict:
    """The first plugin of a shipped conflist as the single config the runtime hands the plugin,
    pointed at the test's etcd, lock and log files."""
    doc = json.loads((CONF / filename).read_text())
    conf = {"cniVersion": doc["cniVersion"], "name": doc["name"], **doc["plugins"][0]}
    conf["ipam"] = {**conf["ipam"], "etcd_endpoints": etcd_server.endpoint, "etcd_prefix": prefix,
                    "nodename": "conf-node", "lock_file": str(tmp_path / "lock"),
                    "log_file": str(tmp_path / "cni-ipam.log"), **ipam}
    return conf


def test_every_conf_file_is_tested():
    have = {p.name for p in CONF.iterdir() if p.is_file()}
    assert have == TESTED, f"untested: {sorted(have - TESTED)}; missing: {sorted(TESTED - have)}"


# ----------------------------------------------------------------------------- pools.yaml
def test_pools_yaml_is_the_seed_manifest():
    assert (CONF / "pools.yaml").read_text() == SEED_POOLS_YAML
    docs = list(yaml.safe_load_all(SEED_POOLS_YAML))
    assert [(d["kind"], d["metadata"]["name"], d["spec"]["cidr"], d["spec"]["blockSize"]) for d in docs] == [
        ("IPPool", "external-pool", "172.16.0.0/26", 29), ("IPPool", "internal-pool", "192.168.0.0/16", 29)]
    assert ipaddress.ip_network("172.16.0.0/26").num_addresses == 64


def test_pools_yaml_applies_through_the_cli(etcd_server, etcd_prefix, seed_pools):
    ipam = engine(etcd_server, etcd_prefix)
    try:
        pools = {p.name: p for p in ipam.pools()}
    finally:
        ipam.ds.close()
    assert set(pools) == {"external-pool", "internal-pool"}
    ext, internal = pools["external-pool"], pools["internal-pool"]
    assert (str(ext.cidr), ext.block_size, ext.cidr.num_addresses) == ("172.16.0.0/26", 29, 64)
    assert (str(internal.cidr), internal.block_size) == ("192.168.0.0/16", 29)
    assert not ext.disabled and not internal.disabled
    # the same file again is a no-op
    again = cli(etcd_server, etcd_prefix, "apply", "-f", str(CONF / "pools.yaml"))
    assert again.returncode == 0, again.stderr
    shown = cli(etcd_server, etcd_prefix, "show", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    rows = {p["name"]: p for p in json.loads(shown.stdout)["pools"]}
    assert rows["external-pool"]["addresses"] == 64 and rows["external-pool"]["blockSize"] == 29


# ----------------------------------------------------------------------------- conflists
@pytest.mark.parametrize("filename, plugin_type, mode", [
    ("10-cni-ipam-bridge.conflist", "bridge", "bridge"),
    ("20-cni-ipam-ptp.conflist", "ptp", "routed"),
])
def test_example_conflist_parses(filename, plugin_type, mode):
    from cni_ipam.cli.install import validate_conflist
    from cni_ipam.config import parse_ipam_config
    data = (CONF / filename).read_bytes()
    doc = validate_conflist(data, filename)           # CNI parser per plugin + the ipam parser
    assert doc["cniVersion"] == "1.0.0" and len(doc["plugins"]) == 1
    plugin = doc["plugins"][0]
    assert plugin["type"] == plugin_type and plugin["ipam"]["type"] == "cni-ipam"
    ic = parse_ipam_config(plugin["ipam"])
    assert ic.mode == mode
    if plugin_type == "bridge":
        assert plugin["isGateway"] is True and ic.gateway == []
    else:
        assert [str(g) for g in ic.gateway] == ["169.254.1.1"]
        assert not ic.routes, "Debian's ptp installs routes before its route to 169.254.1.1 (see README)"


def test_a_broken_conflist_is_refused_with_the_reason():
    from cni_ipam.cli.install import InstallError, validate_conflist
    doc = json.loads((CONF / "10-cni-ipam-bridge.conflist").read_text())
    doc["plugins"][0]["ipam"]["mode"] = "bridged"
    with pytest.raises(InstallError, match="mode"):
        validate_conflist(json.dumps(doc).encode(), "x.conflist")
    with pytest.raises(InstallError, match="not JSON"):
        validate_conflist(b"{", "x.conflist")


@pytest.mark.parametrize("filename", ["10-cni-ipam-bridge.conflist", "20-cni-ipam-ptp.conflist"])
def test_example_conflist_allocates_from_the_seed_pools(filename, etcd_server, etcd_prefix, seed_pools, tmp_path):
    conf = plugin_conf(filename, etcd_server, etcd_prefix, tmp_path)
    add = exec_plugin("ADD", conf, container="conf-c1")
    assert add.rc == 0, add.stdout + add.stderr
    (ipc,) = add.out["ips"]
    iface = ipaddress.ip_interface(ipc["address"])
    pools = [ipaddress.ip_network("172.16.0.0/26"), ipaddress.ip_network("192.168.0.0/16")]
    assert any(iface.ip in p for p in pools), ipc
    if conf["ipam"]["mode"] == "bridge":
        assert iface.network.prefixlen == 29                      # the block
        assert ipc["gateway"] == str(iface.network.network_address + 1)
        assert add.out.get("routes") == [{"dst": "0.0.0.0/0"}]
    else:
        # routed mode with routed_prefix "block": the block's length, for Debian's ptp
        assert conf["ipam"]["routed_prefix"] == "block"
        assert iface.network.prefixlen == 29 and ipc["gateway"] == "169.254.1.1"
    check = exec_plugin("CHECK", {**conf, "prevResult": add.out}, container="conf-c1")
    assert check.rc == 0, check.stdout + check.stderr
    # the CLI finds the same store through the conflist (--cni-conf), and sees the address
    conflist = json.loads((CONF / filename).read_text())
    conflist["plugins"][0]["ipam"].update(etcd_endpoints=etcd_server.endpoint, etcd_prefix=etcd_prefix)
    cfile = tmp_path / filename
    cfile.write_text(json.dumps(conflist))
    shown = subprocess.run([sys.executable, "-m", "cni_ipam", "show", "--ip", str(iface.ip), "--cni-conf",
                            str(cfile)], env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "conf-c1" in shown.stdout, shown.stdout + shown.stderr
    dele = exec_plugin("DEL", conf, container="conf-c1")
    assert dele.rc == 0, dele.stdout + dele.stderr
    ipam = engine(etcd_server, etcd_prefix)
    try:
        assert ipam.handles() == []
    finally:
        ipam.ds.close()


# ----------------------------------------------------------------------------- ipamconfig.yaml
def test_ipamconfig_yaml_applies_through_the_cli(etcd_server, etcd_prefix):
    (doc,) = yaml.safe_load_all((CONF / "ipamconfig.yaml").read_text())
    assert doc["kind"] == "IPAMConfig" and doc["apiVersion"] == "cni-ipam/v1"
    spec = doc["spec"]
    assert set(spec) == {"strictAffinity", "autoAllocateBlocks", "maxBlocksPerHost"}
    r = cli(etcd_server, etcd_prefix, "apply", "-f", str(CONF / "ipamconfig.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    ipam = engine(etcd_server, etcd_prefix)
    try:
        assert ipam.ds.get(ipam.keys.config) is not None, "the config record was written"
        assert ipam.get_config().to_dict() == spec
    finally:
        ipam.ds.close()
    shown = cli(etcd_server, etcd_prefix, "config", "show", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == spec


# ----------------------------------------------------------------------------- kubeconfig.template
def fill_kubeconfig_template(api, token: str) -> str:
    text = (CONF / "kubeconfig.template").read_text()
    for ph in ("__KUBERNETES_SERVICE_HOST__", "__KUBERNETES_SERVICE_PORT__", "__CA_DATA__",
               "__SERVICEACCOUNT_TOKEN__"):
        assert ph in text, ph
    ca_data = base64.b64encode(Path(api.pki["ca"]).read_bytes()).decode()
    return (text.replace("__KUBERNETES_SERVICE_HOST__", "127.0.0.1")
                .replace("__KUBERNETES_SERVICE_PORT__", str(api.port))
                .replace("__CA_DATA__", ca_data).replace("__SERVICEACCOUNT_TOKEN__", token))


def test_kubeconfig_template_drives_pool_choice(etcd_server, etcd_prefix, seed_pools, tmp_path):
    from cni_ipam.k8s import KubeClient
    from tests.support.k8s_standin import GOOD_TOKEN, K8sStandin
    with K8sStandin(tmp_path) as api:
        api.add_namespace("external-ns", annotations={"cni.projectcalico.org/ipv4pools": '["external-pool"]'})
        api.add_namespace("internal-ns", annotations={"cni.projectcalico.org/ipv4pools": '["internal-pool"]'})
        api.add_pod("external-ns", "web-1", node="conf-node")
        api.add_pod("internal-ns", "db-1", node="conf-node")
        kc = tmp_path / "cni-ipam-kubeconfig"
        kc.write_text(fill_kubeconfig_template(api, GOOD_TOKEN))
        os.chmod(kc, 0o600)
        with KubeClient.from_kubeconfig(str(kc), timeout=5) as client:
            ns = client.get_namespace("external-ns")
        assert ns["metadata"]["annotations"]["cni.projectcalico.org/ipv4pools"] == '["external-pool"]'

        conf = plugin_conf("10-cni-ipam-bridge.conflist", etcd_server, etcd_prefix, tmp_path,
                           kubernetes={"kubeconfig": str(kc)})
        for ns_name, pod, pool in (("external-ns", "web-1", "172.16.0.0/26"),
                                   ("internal-ns", "db-1", "192.168.0.0/16")):
            add = exec_plugin("ADD", conf, container=f"k-{pod}",
                              args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns_name};K8S_POD_NAME={pod}")
            assert add.rc == 0, add.stdout + add.stderr
            ip = ipaddress.ip_interface(add.out["ips"][0]["address"]).ip
            assert ip in ipaddress.ip_network(pool), f"{ns_name}/{pod} got {ip}, not in {pool}"
            assert exec_plugin("DEL", conf, container=f"k-{pod}").rc == 0
        # a wrong token is refused by the API (and the template is what carried it)
        kc.write_text(fill_kubeconfig_template(api, "not-the-token"))
        bad = exec_plugin("ADD", conf, container="k-bad",
                          args="IgnoreUnknown=1;K8S_POD_NAMESPACE=external-ns;K8S_POD_NAME=web-1")
        assert bad.rc != 0 and bad.out and "403" in json.dumps(bad.out), bad.stdout + bad.stderr

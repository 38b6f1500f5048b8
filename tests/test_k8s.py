"""The Kubernetes client against the API stand-in (HTTPS, generated CA, bearer tokens),
and the real plugin exec'd with a kubeconfig pointing at it, against the real etcd."""
import ipaddress
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import make_pool
from cni_ipam.k8s import K8sError, KubeClient, NotFound, client_from_config
from tests.plugin_helpers import exec_plugin, netconf, seed_store
from tests.support.k8s_standin import GOOD_TOKEN, K8sStandin

P = "cni.projectcalico.org"
V4, V6, ADDRS = f"{P}/ipv4pools", f"{P}/ipv6pools", f"{P}/ipAddrs"
EXTERNAL, INTERNAL = ipaddress.ip_network("172.16.0.0/26"), ipaddress.ip_network("192.168.0.0/16")


@pytest.fixture
def api(tmp_path):
    with K8sStandin(tmp_path) as s:
        yield s


# -- the client ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(), dict(ca="data"), dict(ca="insecure"), dict(token_file=True), dict(fmt="json"),
    dict(token=None, client_cert="file"), dict(token=None, client_cert="data"),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "ca-file+token")
def test_kubeconfig_variants(api, tmp_path, kw):
    api.add_namespace("ns1", annotations={V4: '["a"]'})
    api.add_pod("ns1", "p1", node="n1", annotations={"x": "y"})
    api.add_node("n1", labels={"zone": "a"})
    with KubeClient.from_kubeconfig(api.write_kubeconfig(tmp_path / "kc", **kw), timeout=5) as c:
        assert c.get_namespace("ns1")["metadata"]["annotations"] == {V4: '["a"]'}
        pod = c.get_pod("ns1", "p1")
        assert pod["kind"] == "Pod" and pod["metadata"]["namespace"] == "ns1" and pod["spec"]["nodeName"] == "n1"
        assert c.get_pod("ns1", "missing") is None
        assert c.get_node("n1")["metadata"]["labels"]["zone"] == "a"
    user = "cni-ipam-client" if kw.get("client_cert") else "system:serviceaccount:kube-system:cni-ipam"
    assert {u for _, _, u in api.requests} == {user}
    # the current-context is used (the kubeconfig also has a decoy cluster on port 1)
    assert len(api.requests) == 4


def test_auth_and_tls_errors_are_clear(api, tmp_path):
    api.add_namespace("ns1")
    cases = [
        (dict(token=None), 401, "HTTP 401 Unauthorized: Unauthorized (check the token or client certificate"),
        (dict(token="wrong-token"), 403, 'HTTP 403 Forbidden: namespaces "ns1" is forbidden'),
        (dict(ca="other"), None, "TLS verification failed"),
        (dict(ca="none"), None, "TLS verification failed"),
    ]
    for kw, status, msg in cases:
        with KubeClient.from_kubeconfig(api.write_kubeconfig(tmp_path / "kc", **kw), timeout=5) as c:
            with pytest.raises(K8sError) as ei:
                c.get_namespace("ns1")
        assert ei.value.status == status and msg in str(ei.value), str(ei.value)
        assert "GET namespace ns1" in str(ei.value) and not ei.value.transient


def test_not_found_server_error_timeout_and_unreachable(api, tmp_path):
    kc = api.write_kubeconfig(tmp_path / "kc")
    with KubeClient.from_kubeconfig(kc, timeout=5) as c:
        with pytest.raises(NotFound, match='HTTP 404 NotFound: namespaces "nope" not found'):
            c.get_namespace("nope")
        api.fail_status = 500
        with pytest.raises(K8sError, match="HTTP 500 InternalError") as ei:
            c.get_node("n1")
        assert ei.value.transient
    api.fail_status = None
    api.delay = 2
    with KubeClient.from_kubeconfig(kc, timeout=0.3) as c:
        # the outcome proves the 0.3 s deadline was applied (the answer would come after 2 s)
        with pytest.raises(K8sError, match=r"no answer within 0.3s") as ei:
            c.get_namespace("ns1")
        assert ei.value.transient
    api.delay = 0
    port = api.port
    api.stop()
    with KubeClient(f"https://127.0.0.1:{port}", ca_file=api.pki["ca"], token=GOOD_TOKEN, timeout=2) as c:
        with pytest.raises(K8sError, match="Connection refused") as ei:
            c.get_namespace("ns1")
        assert ei.value.transient


def test_bad_kubeconfigs(tmp_path):
    cases = [
        ("", "not a kubeconfig"),
        ("current-context: x\n", "no context named 'x'"),
        ("clusters: [}\n", "invalid YAML"),
        ("{bad json", "invalid JSON"),
        (json.dumps({"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}],
                     "clusters": [{"name": "k", "cluster": {"server": "ftp://x"}}]}), "is not an https:// URL"),
        (json.dumps({"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                     "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],
                     "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}]}), "'exec' is not supported"),
    ]
    for text, msg in cases:
        (tmp_path / "kc").write_text(text)
        with pytest.raises(K8sError, match=msg) as ei:
            KubeClient.from_kubeconfig(str(tmp_path / "kc"))
        assert ei.value.config_error
    with pytest.raises(K8sError, match="cannot read it"):
        KubeClient.from_kubeconfig(str(tmp_path / "missing"))


def test_in_cluster(api, tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    api.add_node("n1")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
    with pytest.raises(K8sError, match="not running in a Kubernetes cluster"):
        KubeClient.in_cluster(sa_dir=str(sa), environ=env)
    (sa / "token").write_text(GOOD_TOKEN)
    (sa / "ca.crt").write_bytes(open(api.pki["ca"], "rb").read())
    with KubeClient.in_cluster(sa_dir=str(sa), environ=env, timeout=5) as c:
        assert c.get_node("n1")["kind"] == "Node"
        (sa / "token").write_text("rotated-and-unknown")   # the token file is re-read per request
        with pytest.raises(K8sError, match="HTTP 403"):
            c.get_node("n1")
    with pytest.raises(K8sError, match="not running in a Kubernetes cluster"):
        KubeClient.in_cluster(sa_dir=str(sa), environ={})
    # the ipam section without kubeconfig means in-cluster (none here)
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        with pytest.raises(K8sError, match="not running in a Kubernetes cluster"):
            client_from_config({})


def test_list_endpoints_page_with_continue(api, tmp_path):
    for ns in ("a", "b"):
        api.add_namespace(ns)
        for i in range(7):
            api.add_pod(ns, f"p{i}", node="n1")
    api.add_node("n1")
    with KubeClient.from_kubeconfig(api.write_kubeconfig(tmp_path / "kc"), timeout=5) as c:
        pods = c.list("/api/v1/pods", "pods", page=3)
        assert len(pods) == 14 and len({(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods}) == 14
        assert "kind" not in pods[0] and pods[0]["metadata"]["uid"]
        assert len(api.requests) == 5
        assert len(c.list_pods("b")) == 7
        assert [n["metadata"]["name"] for n in c.list_namespaces()] == ["a", "b"]
        assert [n["metadata"]["name"] for n in c.list_nodes()] == ["n1"]
        res = c.get("/api/v1/pods", "pods", {"limit": 1})
        assert res["kind"] == "PodList" and res["apiVersion"] == "v1" and res["metadata"]["continue"]


def test_unknown_path_is_a_status_object(api, tmp_path):
    with KubeClient.from_kubeconfig(api.write_kubeconfig(tmp_path / "kc"), timeout=5) as c:
        with pytest.raises(NotFound, match="could not find the requested resource"):
            c.get("/api/v1/secrets")


# -- the plugin with Kubernetes ------------------------------------------------------

@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    with seed_store(etcd_server.endpoint, etcd_prefix) as store:
        yield store


@pytest.fixture
def kconf(etcd_server, etcd_prefix, tmp_path, api):
    kc = api.write_kubeconfig(tmp_path / "kubeconfig")

    def make(node="node-a", kubeconfig=kc, **kw):
        kw.setdefault("kubernetes", {"kubeconfig": kubeconfig})
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, node=node, **kw)
    return make


def k8s_args(ns, pod, cid="c"):
    # what kubelet/containerd pass
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"


def add(conf, ns, pod, cid=None):
    cid = cid or f"{ns}-{pod}"
    r = exec_plugin("ADD", conf, container=cid, args=k8s_args(ns, pod, cid))
    return r


def ip_of(r):
    assert r.rc == 0, r.stdout + r.stderr
    return ipaddress.ip_interface(r.out["ips"][0]["address"]).ip


def seed(api):
    api.add_namespace("external-ns", annotations={V4: '["external-pool"]'})
    api.add_namespace("internal-ns", annotations={V4: '["internal-pool"]'})
    api.add_node("node-a")
    api.add_node("node-b")
    pods = []
    for ns in ("external-ns", "internal-ns"):
        for i in range(3):
            node = "node-a" if i % 2 == 0 else "node-b"
            api.add_pod(ns, f"web-{i}", node=node)
            pods.append((ns, f"web-{i}", node))
    return pods


def test_seed_scenario_namespaces_choose_pools(api, ipam, kconf):
    pods = seed(api)
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda p: (p, add(kconf(node=p[2]), p[0], p[1])), pods))
    got = {}
    for (ns, pod, node), r in results:
        ip = ip_of(r)
        assert ip in (EXTERNAL if ns == "external-ns" else INTERNAL), (ns, pod, ip)
        got[(ns, pod)] = ip
    assert len(set(got.values())) == 6
    # the handles record the pod, and each node got its own blocks
    hs = {(h.namespace, h.pod): h for h in ipam.handles()}
    assert set(hs) == set(got)
    for (ns, pod, node) in pods:
        assert hs[(ns, pod)].node == node
    # pod, then namespace (no pool annotation on the pods); never the Node (all() selectors)
    paths = api.paths()
    assert sum(p.startswith("/api/v1/namespaces/") and "/pods/" in p for p in paths) == 6
    assert sum(p in ("/api/v1/namespaces/external-ns", "/api/v1/namespaces/internal-ns") for p in paths) == 6
    assert not any(p.startswith("/api/v1/nodes") for p in paths)


def test_pod_annotation_overrides_namespace_and_skips_namespace_get(api, ipam, kconf):
    seed(api)
    api.add_pod("external-ns", "special", node="node-a", annotations={V4: '["192.168.0.0/16"]'})
    n = len(api.requests)
    ip = ip_of(add(kconf(), "external-ns", "special"))
    assert ip in INTERNAL
    assert api.paths()[n:] == ["/api/v1/namespaces/external-ns/pods/special"]
    h = ipam.handles()[0]
    assert h.pod == "special" and h.namespace == "external-ns" and h.addresses[0].pool == "internal-pool"


def test_pod_not_found_falls_back_to_namespace(api, ipam, kconf):
    seed(api)
    ip = ip_of(add(kconf(), "external-ns", "not-yet-visible"))
    assert ip in EXTERNAL


def test_namespace_not_found_is_an_error(api, ipam, kconf):
    seed(api)
    r = add(kconf(), "ghost-ns", "web-0")
    assert r.rc != 0 and r.out["code"] == 7, r.stdout
    assert "GET namespace ghost-ns: HTTP 404 NotFound" in r.out["msg"], r.out
    assert ipam.handles() == []


def test_ipaddrs_gives_that_address_and_fails_cleanly_when_taken(api, ipam, kconf):
    seed(api)
    api.add_pod("internal-ns", "fixed", annotations={ADDRS: '["192.168.7.77"]'})
    api.add_pod("internal-ns", "fixed-too", annotations={ADDRS: '["192.168.7.77"]'})
    n = len(api.requests)
    assert str(ip_of(add(kconf(), "internal-ns", "fixed"))) == "192.168.7.77"
    assert api.paths()[n:] == ["/api/v1/namespaces/internal-ns/pods/fixed"]   # no namespace needed
    before = {kv.key: kv.value for kv in ipam.ds.get_prefix(ipam.keys.root)}
    r = add(kconf(node="node-b"), "internal-ns", "fixed-too")
    assert r.rc != 0 and r.out["code"] == 111, r.stdout
    assert "192.168.7.77" in r.out["msg"]
    assert {kv.key: kv.value for kv in ipam.ds.get_prefix(ipam.keys.root)} == before


def test_malformed_annotation_is_code_7_naming_key_and_object(api, ipam, kconf):
    seed(api)
    api.add_namespace("broken-ns", annotations={V4: "external-pool"})
    api.add_pod("external-ns", "broken-pod", annotations={V4: '["172.16.0.0/99"]'})
    api.add_pod("external-ns", "two-v4", annotations={ADDRS: '["172.16.0.5", "172.16.0.6"]'})
    for ns, pod, want in [("broken-ns", "p", f"invalid annotation '{V4}' on namespace broken-ns: not JSON"),
                          ("external-ns", "broken-pod",
                           f"invalid annotation '{V4}' on pod external-ns/broken-pod: '172.16.0.0/99' is not a valid CIDR"),
                          ("external-ns", "two-v4",
                           f"invalid annotation '{ADDRS}' on pod external-ns/two-v4: more than one IPv4 address")]:
        r = add(kconf(), ns, pod)
        assert r.rc != 0 and r.out["code"] == 7 and want in r.out["msg"], r.stdout
    assert ipam.handles() == []


def test_unknown_or_disabled_pool_named_by_annotation(api, ipam, kconf):
    ipam.create_pool(make_pool("off-pool", "10.9.0.0/24", 29, disabled=True))
    api.add_namespace("ns", annotations={V4: '["no-such-pool"]'})
    api.add_pod("ns", "off", annotations={V4: '["off-pool"]'})
    r = add(kconf(), "ns", "p")
    assert r.out["code"] == 7 and f"'no-such-pool' (from annotation {V4} of namespace ns) does not exist" in r.out["msg"]
    r = add(kconf(), "ns", "off")
    assert r.out["code"] == 7 and f"'off-pool' (from annotation {V4} of pod ns/off) is disabled" in r.out["msg"]


def test_node_selector_pools_only_serve_matching_nodes(api, etcd_server, etcd_prefix, kconf):
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("rack1-pool", "10.31.0.0/24", 29, node_selector="rack == 'r1'"))
    ipam.create_pool(make_pool("rack2-pool", "10.32.0.0/24", 29, node_selector="rack == 'r2' && !has(drain)"))
    api.add_node("node-a", labels={"rack": "r1"})
    api.add_node("node-b", labels={"rack": "r2"})
    api.add_node("node-c", labels={"rack": "r2", "drain": "true"})
    api.add_namespace("default")
    for i, node in enumerate(["node-a", "node-b", "node-a", "node-b"]):
        api.add_pod("default", f"p{i}", node=node)
        ip = ip_of(add(kconf(node=node), "default", f"p{i}"))
        assert ip in ipaddress.ip_network("10.31.0.0/24" if node == "node-a" else "10.32.0.0/24")
    assert sum(p == "/api/v1/nodes/node-a" for p in api.paths()) == 2   # one Node GET per ADD
    api.add_pod("default", "c0", node="node-c")
    r = add(kconf(node="node-c"), "default", "c0")
    assert r.out["code"] == 7 and "no enabled IPv4 pool matches this node" in r.out["msg"], r.stdout
    # named by an annotation: used even though its nodeSelector does not match node-c
    api.add_pod("default", "c1", node="node-c", annotations={V4: '["rack2-pool"]'})
    assert ip_of(add(kconf(node="node-c"), "default", "c1")) in ipaddress.ip_network("10.32.0.0/24")
    # a node Kubernetes does not know: clear error
    r = add(kconf(node="node-x"), "default", "p0", cid="x")
    assert r.out["code"] == 7 and "GET node node-x: HTTP 404" in r.out["msg"], r.stdout
    ipam.ds.close()


def test_wrong_or_missing_token_gives_clear_error(api, ipam, kconf, tmp_path):
    seed(api)
    for kw, status in ((dict(token=None), "HTTP 401"), (dict(token="stolen"), "HTTP 403")):
        kc = api.write_kubeconfig(tmp_path / "bad-kubeconfig", **kw)
        r = add(kconf(kubeconfig=kc), "external-ns", "web-0")
        assert r.rc != 0 and r.out["code"] == 7, r.stdout
        assert status in r.out["msg"] and "GET pod external-ns/web-0" in r.out["msg"], r.out
        assert r.stdout.count("\n") <= 1 and "Traceback" not in r.stderr
    r = add(kconf(kubeconfig=str(tmp_path / "missing")), "external-ns", "web-0")
    assert r.out["code"] == 7 and "ipam.kubernetes: kubeconfig" in r.out["msg"] and "cannot read it" in r.out["msg"]
    assert ipam.handles() == []


def test_api_down_is_try_again(api, ipam, kconf):
    seed(api)
    conf = kconf()
    api.fail_status = 503
    r = add(conf, "external-ns", "web-0")
    assert r.out["code"] == 11 and "HTTP 503" in r.out["msg"], r.stdout
    api.fail_status = None
    api.stop()
    r = add(conf, "external-ns", "web-0")
    assert r.out["code"] == 11 and "GET pod external-ns/web-0" in r.out["msg"], r.stdout
    assert ipam.handles() == []


def test_no_pod_args_means_no_lookup_and_del_needs_no_api(api, ipam, kconf):
    seed(api)
    conf = kconf()
    r = exec_plugin("ADD", conf, container="plain")
    assert r.rc == 0 and api.requests == []            # nothing to look up; pools all() -> no Node GET
    api.stop()                                          # DEL never talks to Kubernetes
    assert exec_plugin("DEL", conf, container="plain").rc == 0
    assert ipam.handles() == []


def test_config_pools_are_below_annotations_and_status(api, ipam, kconf):
    seed(api)
    api.add_namespace("plain-ns")
    conf = kconf(ipv4_pools=["internal-pool"])
    assert ip_of(add(conf, "plain-ns", "x")) in INTERNAL            # no annotation: config
    assert ip_of(add(conf, "external-ns", "web-0")) in EXTERNAL     # namespace beats config
    s = exec_plugin("STATUS", dict(conf, cniVersion="1.1.0"), container=None, ifname=None, netns=None)
    assert s.rc == 0, s.stdout


def test_status_with_selector_pools_reads_the_node(api, etcd_server, etcd_prefix, kconf):
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("only-r1", "10.33.0.0/24", 29, node_selector="rack == 'r1'"))
    api.add_node("node-a", labels={"rack": "r1"})
    api.add_node("node-b", labels={"rack": "r9"})
    for node, rc in (("node-a", 0), ("node-b", 50)):
        s = exec_plugin("STATUS", dict(kconf(node=node), cniVersion="1.1.0"), container=None, ifname=None,
                        netns=None)
        assert s.rc == (0 if rc == 0 else 1) and (rc == 0 or s.out["code"] == 50), s.stdout
    assert api.paths() == ["/api/v1/nodes/node-a", "/api/v1/nodes/node-b"]
    ipam.ds.close()


def test_kubernetes_api_timeout_comes_from_timeout_seconds(api, ipam, kconf):
    seed(api)
    # the API answers after 4 s: with the default timeout (10 s) the ADD would succeed; with
    # timeout_seconds=1 it must fail saying so (an outcome, not a wall-clock budget)
    api.delay = 4
    r = add(kconf(timeout_seconds=1), "external-ns", "web-0")
    assert r.out is not None and r.out["code"] == 11 and "no answer within 1s" in r.out["msg"], r.stdout
    assert ipam.handles() == []


def test_in_cluster_section_without_cluster_is_a_clear_error(ipam, etcd_server, etcd_prefix, tmp_path):
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, kubernetes={})
    r = exec_plugin("ADD", conf, args=k8s_args("ns", "p"), env={"KUBERNETES_SERVICE_HOST": None})
    assert r.out["code"] == 7 and "not running in a Kubernetes cluster" in r.out["msg"], r.stdout


IMPORTTIME = [sys.executable, "-X", "importtime", "-m", "cni_ipam"]


def _imported(stderr):
    return {ln.rsplit("|", 1)[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")}


def test_exec_path_imports_only_what_it_needs(api, ipam, kconf, tmp_path, etcd_server, etcd_prefix):
    """No kubernetes section: neither the client nor ssl-heavy extras nor PyYAML are imported;
    with a JSON kubeconfig the client is, PyYAML still is not."""
    seed(api)
    plain = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    r = exec_plugin("ADD", plain, container="imp1", args=k8s_args("external-ns", "web-0"), argv=IMPORTTIME)
    assert r.rc == 0, r.stdout
    mods = _imported(r.stderr)
    # (the namespace has no annotations in etcd: the pool choice runs without annotations.py)
    assert not {"cni_ipam.k8s", "cni_ipam.ipam.annotations", "yaml", "kubernetes", "etcd3", "grpc"} & mods
    kc = api.write_kubeconfig(tmp_path / "kc.json", fmt="json")
    r = exec_plugin("ADD", kconf(kubeconfig=kc), container="imp2", args=k8s_args("external-ns", "web-1"),
                    argv=IMPORTTIME)
    assert r.rc == 0, r.stdout
    mods = _imported(r.stderr)
    assert "cni_ipam.k8s" in mods and not {"yaml", "kubernetes", "etcd3", "grpc"} & mods

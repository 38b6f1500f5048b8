"""Pool choice by annotations and node labels: the pure rules, and the engine with
namespace/node records stored in etcd (real etcd, no mocks)."""
import ipaddress
import json

import pytest
from hypothesis import given, settings, strategies as st

from cni_ipam.datastore import Put, open_datastore
from cni_ipam.ipam import annotations as ann
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import CorruptData, InvalidRequest
from cni_ipam.ipam.pool import make_pool

P = "cni.projectcalico.org"
V4, V6, ADDRS = f"{P}/ipv4pools", f"{P}/ipv6pools", f"{P}/ipAddrs"
A = ipaddress.ip_address


# -- values --------------------------------------------------------------------------

def test_pool_list_values():
    assert ann.parse_pools('["a", "10.0.0.0/24", "a"]', V4, "namespace ns", 4) == ["a", "10.0.0.0/24"]
    assert ann.parse_pools('["fd00::/64"]', V6, "namespace ns", 6) == ["fd00::/64"]
    assert ann.parse_pools("[]", V4, "namespace ns", 4) == []


@pytest.mark.parametrize("value, why", [
    ("external-pool", "not JSON"),
    ("['external-pool']", "not JSON"),
    ('{"pool": "a"}', "not a JSON list"),
    ('"a"', "not a JSON list"),
    ('[1, 2]', "every item must be a non-empty string"),
    ('[""]', "every item must be a non-empty string"),
    ('["10.0.0.0/33"]', "'10.0.0.0/33' is not a valid CIDR"),
    ('["fd00::/64"]', "'fd00::/64' is not an IPv4 CIDR"),
])
def test_malformed_pool_annotation_is_code_7_quoting_key_and_object(value, why):
    with pytest.raises(ann.AnnotationError) as ei:
        ann.parse_pools(value, V4, "pod ns1/web-0", 4)
    e = ei.value
    assert e.code == 7
    assert f"invalid annotation '{V4}' on pod ns1/web-0" in e.msg and why in e.msg
    assert repr(value) in e.msg


@pytest.mark.parametrize("value, why", [
    ('["10.0.0.1", "10.0.0.2"]', "more than one IPv4 address"),
    ('["10.0.0.1/32"]', "is not an IP address"),
    ('["nope"]', "is not an IP address"),
    ('10.0.0.1', "not JSON"),
])
def test_malformed_ipaddrs(value, why):
    with pytest.raises(ann.AnnotationError, match=why) as ei:
        ann.parse_ip_addrs(value, ADDRS, "pod ns1/web-0")
    assert ei.value.code == 7 and ADDRS in ei.value.msg


def test_ipaddrs_one_per_family():
    assert ann.parse_ip_addrs('["10.0.0.5", "fd00::5"]', ADDRS, "pod a/b") == [A("10.0.0.5"), A("fd00::5")]


# -- precedence ----------------------------------------------------------------------

LEVELS = ["pod", "namespace", "config", None]


def _choose(v4_at, v6_at):
    pod, ns, cfg = {}, {}, {4: None, 6: None}
    for fam, at, k in ((4, v4_at, V4), (6, v6_at, V6)):
        # every level below the chosen one is set too, so precedence is what decides
        for lvl in LEVELS[LEVELS.index(at):] if at else []:
            if lvl == "pod":
                pod[k] = json.dumps([f"pod-v{fam}"])
            elif lvl == "namespace":
                ns[k] = json.dumps([f"ns-v{fam}"])
            elif lvl == "config":
                cfg[fam] = [f"cfg-v{fam}"]
    return ann.choose(P, config_pools=cfg, namespace="ns", pod="p", ns_annotations=ns, pod_annotations=pod)


@pytest.mark.parametrize("v4_at", LEVELS)
@pytest.mark.parametrize("v6_at", LEVELS)
def test_precedence_table_per_family(v4_at, v6_at):
    c = _choose(v4_at, v6_at)
    expect = {"pod": "pod-v{}", "namespace": "ns-v{}", "config": "cfg-v{}"}
    for fam, at in ((4, v4_at), (6, v6_at)):
        if at is None:
            assert c.pools[fam] is None and c.sources[fam] == "nodeSelector"
        else:
            assert c.pools[fam] == [expect[at].format(fam)]
    if v4_at == "pod":
        assert c.sources[4] == f"annotation {V4} of pod ns/p"
    if v4_at == "namespace":
        assert c.sources[4] == f"annotation {V4} of namespace ns"
    if v4_at == "config":
        assert c.sources[4] == "config ipv4_pools"


@settings(max_examples=200, deadline=None)
@given(levels=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       names=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), min_size=1, max_size=4))
def test_precedence_property(levels, names):
    """Whatever is present, the highest present level wins, and its list round-trips."""
    has_pod, has_ns, has_cfg = levels
    pod = {V4: json.dumps(names)} if has_pod else {}
    ns = {V4: json.dumps(names[::-1] + ["ns-only"])} if has_ns else {}
    cfg = {4: ["cfg-only"] if has_cfg else None, 6: None}
    c = ann.choose(P, config_pools=cfg, namespace="n", pod="p", ns_annotations=ns, pod_annotations=pod)
    if has_pod:
        assert c.pools[4] == list(dict.fromkeys(names))
    elif has_ns:
        assert c.pools[4] == list(dict.fromkeys(names[::-1] + ["ns-only"]))
    elif has_cfg:
        assert c.pools[4] == ["cfg-only"]
    else:
        assert c.pools[4] is None
    assert c.pools[6] is None


def test_empty_list_falls_through_and_malformed_lower_level_is_not_read():
    c = ann.choose(P, config_pools={4: ["cfg"], 6: None}, namespace="n", pod="p",
                   pod_annotations={V4: "[]"}, ns_annotations={V4: '["ns"]'})
    assert c.pools[4] == ["ns"]
    # the pod decides: the namespace's broken value is never parsed
    c = ann.choose(P, config_pools={4: None, 6: None}, namespace="n", pod="p",
                   pod_annotations={V4: '["p"]'}, ns_annotations={V4: "garbage"})
    assert c.pools[4] == ["p"]


def test_other_prefix():
    c = ann.choose("ipam.example.com", config_pools={4: None, 6: None}, namespace="n",
                   ns_annotations={V4: '["calico"]', "ipam.example.com/ipv4pools": '["mine"]'})
    assert c.pools[4] == ["mine"]


def test_ipaddrs_and_runtime_request():
    c = ann.choose(P, config_pools={4: None, 6: None}, namespace="n", pod="p",
                   pod_annotations={ADDRS: '["10.1.0.9"]'})
    req = AssignRequest(handle_id="h", node="n", assign_v4=True, assign_v6=True)
    ann.apply_choice(req, c)
    assert req.requested == [A("10.1.0.9")]
    assert not req.assign_v4 and not req.assign_v6   # exactly the listed addresses, as Calico
    req = AssignRequest(handle_id="h", node="n", requested=[A("10.1.0.9")])
    ann.apply_choice(req, c)             # agreeing: fine
    req = AssignRequest(handle_id="h", node="n", requested=[A("10.1.0.7")])
    with pytest.raises(InvalidRequest, match="runtime requested 10.1.0.7 but annotation"):
        ann.apply_choice(req, c)


# -- node selectors ------------------------------------------------------------------

def test_node_matcher_reads_labels_once_and_only_when_needed():
    calls = []

    def labels():
        calls.append(1)
        return {"zone": "a", "role": "edge"}

    m = ann.node_matcher("n1", labels)
    assert m(make_pool("p", "10.0.0.0/24", node_selector="all()"))
    assert calls == []
    assert m(make_pool("p", "10.0.0.0/24", node_selector="zone == 'a' && has(role)"))
    assert not m(make_pool("p", "10.0.0.0/24", node_selector="zone in {'b','c'}"))
    assert m(make_pool("p", "10.0.0.0/24", node_selector="!has(gpu)"))
    assert calls == [1]
    bad = make_pool("bad", "10.0.0.0/24")
    bad.node_selector = "zone == "    # as a stored record could hold it: make_pool refuses it
    with pytest.raises(CorruptData, match="pool 'bad' has an invalid nodeSelector"):
        m(bad)


# -- the engine with records in etcd -------------------------------------------------

@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, timeout=5)
    yield IPAM(ds, etcd_prefix)
    ds.close()


def put_ns(ipam, ns, annotations):
    ipam.ds.commit([], [Put(ipam.keys.namespace(ns), ann.encode_record(ns, "annotations", annotations))])


def put_node(ipam, node, labels):
    ipam.ds.commit([], [Put(ipam.keys.node(node), ann.encode_record(node, "labels", labels))])


def req(hid, node="n1", namespace="", **kw):
    kw.setdefault("labels_from_etcd", True)
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0",
                         namespace=namespace, pod=f"pod-{hid}" if namespace else "", **kw)


def pool_of(ipam, r):
    return ipam.assign(r).handle.addresses[0].pool


def test_fast_path_with_namespace_and_labels_is_three_requests(ipam):
    ipam.create_pool(make_pool("p", "10.70.0.0/24", 26, node_selector="zone == 'a'"))
    ipam.create_pool(make_pool("q", "10.71.0.0/24", 26))
    put_ns(ipam, "ns1", {V4: '["p"]', "unrelated": "x"})
    put_node(ipam, "n1", {"zone": "a"})
    ipam.assign(req("warm", namespace="ns1"))
    n = ipam.ds.requests
    r = ipam.assign(req("fast", namespace="ns1"))
    assert ipam.ds.requests - n == 3
    assert r.handle.addresses[0].pool == "p"
    n = ipam.ds.requests
    assert pool_of(ipam, req("fast2")) == "p"     # by nodeSelector + labels: still 3
    assert ipam.ds.requests - n == 3


def test_namespace_annotation_beats_config_and_missing_record_uses_config(ipam):
    ipam.create_pool(make_pool("external-pool", "172.16.0.0/26", 29))
    ipam.create_pool(make_pool("internal-pool", "192.168.0.0/16", 29))
    put_ns(ipam, "external-ns", {V4: '["external-pool"]'})
    put_ns(ipam, "internal-ns", {V4: '["192.168.0.0/16"]'})
    assert pool_of(ipam, req("a", namespace="external-ns", v4_pools=["internal-pool"])) == "external-pool"
    assert pool_of(ipam, req("b", namespace="internal-ns")) == "internal-pool"
    assert pool_of(ipam, req("c", namespace="other-ns", v4_pools=["internal-pool"])) == "internal-pool"
    # labels_from_etcd off: the records are not read
    assert pool_of(ipam, req("d", namespace="external-ns", v4_pools=["internal-pool"],
                             labels_from_etcd=False)) == "internal-pool"


def test_named_pool_errors_name_the_annotation(ipam):
    ipam.create_pool(make_pool("p", "10.72.0.0/24", 29))
    ipam.create_pool(make_pool("off", "10.73.0.0/24", 29, disabled=True))
    put_ns(ipam, "ns1", {V4: '["nope"]'})
    put_ns(ipam, "ns2", {V4: '["off"]'})
    put_ns(ipam, "ns3", {V4: "nope"})
    with pytest.raises(InvalidRequest, match=rf"'nope' \(from annotation {V4} of namespace ns1\) does not exist"):
        ipam.assign(req("a", namespace="ns1"))
    with pytest.raises(InvalidRequest, match=rf"'off' \(from annotation {V4} of namespace ns2\) is disabled"):
        ipam.assign(req("b", namespace="ns2"))
    with pytest.raises(ann.AnnotationError, match=f"invalid annotation '{V4}' on namespace ns3: not JSON"):
        ipam.assign(req("c", namespace="ns3"))
    assert ipam.handles() == []


def test_node_selector_pools_only_serve_matching_nodes(ipam):
    ipam.create_pool(make_pool("edge", "10.74.0.0/24", 29, node_selector="role == 'edge'"))
    ipam.create_pool(make_pool("core", "10.75.0.0/24", 29, node_selector="role in {'core'} || has(core)"))
    put_node(ipam, "e1", {"role": "edge"})
    put_node(ipam, "c1", {"role": "core"})
    put_node(ipam, "c2", {"core": ""})
    assert pool_of(ipam, req("a", node="e1")) == "edge"
    assert pool_of(ipam, req("b", node="c1")) == "core"
    assert pool_of(ipam, req("c", node="c2")) == "core"
    with pytest.raises(InvalidRequest, match="no enabled IPv4 pool matches this node"):
        ipam.assign(req("d", node="unlabelled"))
    # named explicitly (config or annotation): used even though the selector does not match
    assert pool_of(ipam, req("e", node="unlabelled", v4_pools=["edge"])) == "edge"
    put_ns(ipam, "ns", {V4: '["core"]'})
    assert pool_of(ipam, req("f", node="e1", namespace="ns")) == "core"


def test_corrupt_records_are_reported_by_key(ipam):
    ipam.create_pool(make_pool("p", "10.76.0.0/24", 29))
    ipam.ds.commit([], [Put(ipam.keys.namespace("ns"), b"{garbage")])
    with pytest.raises(CorruptData, match=ipam.keys.namespace("ns")):
        ipam.assign(req("a", namespace="ns"))
    ipam.ds.commit([], [Put(ipam.keys.node("n1"), b'{"labels": {"a": 1}}')])
    with pytest.raises(CorruptData, match=ipam.keys.node("n1")):
        ipam.assign(req("b"))


def test_free_pools_uses_node_labels(ipam):
    ipam.create_pool(make_pool("edge", "10.77.0.0/24", 29, node_selector="role == 'edge'"))
    ipam.create_pool(make_pool("any", "10.78.0.0/24", 29))
    put_node(ipam, "e1", {"role": "edge"})
    assert ipam.free_pools(req("x", node="e1")) == ["any", "edge"]
    assert ipam.free_pools(req("x", node="other")) == ["any"]

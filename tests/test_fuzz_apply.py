"""Property-based tests (hypothesis) of ``cni-ipam apply -f``: malformed YAML/JSON, wrong types,
invalid CIDRs and selectors, duplicate names, overlapping pools (inside the manifest and with a
pool already in etcd), unknown kinds and versions, hostile names, huge manifests.

Every case: exit 0 (then etcd holds a consistent set of valid, non-overlapping pools, and applying
the same manifest again changes nothing), or exit 1 with ONE error line on stderr,
``cni-ipam: error: ...`` -- followed, when a manifest has several problems, by one indented line
per problem -- (never an "internal error", never a traceback) and nothing applied (the prefix
holds exactly what it held before).  Most cases call ``cni_ipam.cli.main.main(argv)``
in-process (the same code path, ~50x faster than a subprocess); a sample, and the YAML bombs,
run as real subprocesses.  The number of cases is printed at the end of the module.
"""
from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.pool import Pool, make_pool
from tests.plugin_helpers import ROOT

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
CASES = {"in-process": 0, "subprocess": 0}
OUTCOMES: collections.Counter = collections.Counter()
_seq = itertools.count()


def fuzz_settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def report_cases(pytestconfig):
    yield
    tr = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line(f"\nfuzz (apply): {sum(CASES.values())} cases run ({CASES['in-process']} in-process, "
                          f"{CASES['subprocess']} as subprocesses); outcomes: "
                          + ", ".join(f"{k}: {v}" for k, v in sorted(OUTCOMES.items())))


class Store:
    def __init__(self, endpoint, prefix, tmp_path):
        self.endpoint, self.base, self.tmp = endpoint, prefix, tmp_path
        self.ds = open_datastore(endpoint, timeout=10)

    def fresh(self) -> str:
        """A new sub-prefix holding one pool, ``existing`` (172.31.0.0/16)."""
        prefix = f"{self.base}/c{next(_seq)}"
        IPAM(self.ds, prefix).create_pool(make_pool("existing", "172.31.0.0/16", 26))
        return prefix

    def dump(self, prefix) -> dict:
        return {kv.key: (kv.value, kv.mod_revision) for kv in self.ds.get_prefix(prefix + "/")}


@pytest.fixture
def store(etcd_server, etcd_prefix, tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ETCD_", "CNI_")):
            monkeypatch.delenv(k)
    s = Store(etcd_server.endpoint, etcd_prefix, tmp_path)
    yield s
    s.ds.close()


def run_apply(store: Store, prefix: str, manifest: bytes, *, subprocess_: bool = False):
    path = store.tmp / f"m{next(_seq)}.yaml"
    path.write_bytes(manifest)
    argv = ["apply", "-f", str(path), "--etcd-endpoints", store.endpoint, "--etcd-prefix", prefix, "--timeout", "10"]
    if subprocess_:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
        env["PYTHONPATH"] = ROOT
        p = subprocess.run([sys.executable, "-m", "cni_ipam", *argv], env=env, capture_output=True, text=True,
                           timeout=120)
        CASES["subprocess"] += 1
        return p.returncode, p.stdout, p.stderr
    from cni_ipam.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:     # argparse
            rc = e.code
    CASES["in-process"] += 1
    return rc, out.getvalue(), err.getvalue()


def check_apply(store: Store, manifest: bytes, *, subprocess_: bool = False) -> tuple[int, str]:
    prefix = store.fresh()
    before = store.dump(prefix)
    rc, out, err = run_apply(store, prefix, manifest, subprocess_=subprocess_)
    assert "Traceback" not in err + out, err
    if rc != 0:
        OUTCOMES["error"] += 1
        lines = err.strip().splitlines()
        assert rc == 1, (rc, out, err)
        assert lines[0].startswith("cni-ipam: error: "), err
        assert all(ln.startswith("  ") for ln in lines[1:]), err      # one problem per line
        assert len(lines) == 1 or "problems in the manifests; nothing was applied" in lines[0], err
        assert "internal error" not in err, lines[0]
        assert store.dump(prefix) == before, f"a failed apply changed etcd: {lines[0]}"
        return rc, "\n".join(lines)
    OUTCOMES["applied"] += 1
    # applied: every stored pool is valid, no two overlap
    pools = []
    for key, (value, _) in store.dump(prefix).items():
        if "/v1/pools/" in key:
            p = Pool.from_json(value)
            make_pool(p.name, str(p.cidr), p.block_size)     # the rules every pool satisfies
            pools.append(p)
    for a, b in itertools.combinations(pools, 2):
        assert a.name != b.name
        assert a.cidr.version != b.cidr.version or not a.cidr.overlaps(b.cidr), (a, b)
    # ... and applying the same manifest again is a no-op
    after = store.dump(prefix)
    rc2, out2, err2 = run_apply(store, prefix, manifest, subprocess_=subprocess_)
    assert rc2 == 0, err2
    assert store.dump(prefix) == after, out2
    return rc, out


# --------------------------------------------------------------------------- strategies
leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([2**63, -1, 0, 10**40]),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                 st.sampled_from(["", "10.1.0.0/24", "10.1.0.0/16", "172.31.0.0/24", "fd00:1::/64", "10.3.0.0/33",
                                  "300.0.0.0/8", "10.4.0.1/24", "0.0.0.0/0", "169.254.0.0/16", "all()", "has(",
                                  "zone == 'a'", "!!", "Always", "Never", "CrossSubnet", "Sometimes",
                                  "Workload", "Tunnel", "true", "x" * 300, "../x", "UPPER", "a_b", "ü"]))
values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                      max_leaves=8)
SPEC_KEYS = ["cidr", "blockSize", "disabled", "nodeSelector", "allowedUses", "ipipMode", "vxlanMode", "natOutgoing",
             "disableBGPExport", "unknownField"]
CONFIG_KEYS = ["strictAffinity", "autoAllocateBlocks", "maxBlocksPerHost", "bogus"]
API_VERSIONS = ["projectcalico.org/v3", "cni-ipam/v1", "projectcalico.org/v2", "v1", "", "crd.projectcalico.org/v1"]
KINDS = ["IPPool", "IPAMConfig", "IPPoolList", "List", "Pod", "ippool", ""]


def pool_doc(i: int) -> dict:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": f"p{i}"},
            "spec": {"cidr": f"10.{i}.0.0/24", "blockSize": 29}}


@st.composite
def manifests(draw) -> list:
    docs = [pool_doc(i) for i in range(1, draw(st.integers(1, 4)) + 1)]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["spec", "spec", "spec", "name", "api", "kind", "drop", "dup", "overlap",
                                     "config", "random", "list"]))
        i = draw(st.integers(0, len(docs) - 1))
        d = docs[i]
        if not isinstance(d, dict):
            continue
        if kind == "spec" and isinstance(d.get("spec"), dict):
            d["spec"][draw(st.sampled_from(SPEC_KEYS))] = draw(values)
        elif kind == "name" and isinstance(d.get("metadata"), dict):
            d["metadata"]["name"] = draw(st.one_of(values, st.sampled_from(["existing", "p1", "a" * 254, ".."])))
        elif kind == "api":
            d["apiVersion"] = draw(st.one_of(st.sampled_from(API_VERSIONS), values))
        elif kind == "kind":
            d["kind"] = draw(st.one_of(st.sampled_from(KINDS), values))
        elif kind == "drop":
            d.pop(draw(st.sampled_from(["apiVersion", "kind", "metadata", "spec"])), None)
        elif kind == "dup":
            docs.append(json.loads(json.dumps(d)))
        elif kind == "overlap":
            o = pool_doc(50 + i)
            o["spec"]["cidr"] = draw(st.sampled_from(["10.1.0.0/16", "172.31.5.0/24", "10.0.0.0/8", "10.1.0.128/25"]))
            docs.append(o)
        elif kind == "config":
            docs.append({"apiVersion": "cni-ipam/v1", "kind": "IPAMConfig", "metadata": {"name": "default"},
                         "spec": {draw(st.sampled_from(CONFIG_KEYS)): draw(values)}})
        elif kind == "random":
            docs[i] = draw(values)
        elif kind == "list":
            docs = [{"apiVersion": "v1", "kind": draw(st.sampled_from(["List", "IPPoolList"])), "items": docs}]
    return docs


def serialise(docs: list, how: str) -> bytes:
    if how == "json":
        return json.dumps(docs if len(docs) != 1 else docs[0]).encode()
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True).encode()


@st.composite
def manifest_bytes(draw) -> bytes:
    data = serialise(draw(manifests()), draw(st.sampled_from(["yaml", "yaml", "json"])))
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "splice", "tab", "bom", "nonutf8", "nul",
                                "quote"]))
    if how == "truncate" and len(data) > 1:
        data = data[:draw(st.integers(1, len(data) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]
    elif how == "tab":
        data = data.replace(b"  ", b"\t", 1)
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    elif how == "nonutf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xc0" + data[at:]
    elif how == "nul":
        data = data + b"\x00"
    elif how == "quote":
        data = data.replace(b"name: ", b"name: '", 1)
    return data


# --------------------------------------------------------------------------- tests
@fuzz_settings(600)
@given(manifest=manifest_bytes())
def test_fuzz_apply(store, manifest):
    check_apply(store, manifest)


@fuzz_settings(12)
@given(manifest=manifest_bytes())
def test_fuzz_apply_as_subprocess(store, manifest):
    check_apply(store, manifest, subprocess_=True)


def test_duplicate_names_and_overlaps_apply_nothing(store):
    cases = {
        "duplicate name": [pool_doc(1), dict(pool_doc(2), metadata={"name": "p1"})],
        "overlap inside the manifest": [pool_doc(1), dict(pool_doc(2), spec={"cidr": "10.1.0.0/16", "blockSize": 26})],
        "overlap with a stored pool": [pool_doc(1), dict(pool_doc(2), spec={"cidr": "172.31.128.0/20"})],
        "duplicate key": None,
        "one bad document of many": [pool_doc(i) for i in range(1, 20)] + [dict(pool_doc(30), spec={"cidr": "x"})],
    }
    for name, docs in cases.items():
        data = (serialise(docs, "yaml") if docs is not None
                else b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p1}\n"
                     b"spec: {cidr: 10.1.0.0/24, cidr: 10.2.0.0/24}\n")
        rc, line = check_apply(store, data)
        assert rc == 1, (name, line)


def test_huge_manifests(store):
    # as many pools as one transaction can carry: applied, all of them
    n_max = 126
    rc, out = check_apply(store, serialise([pool_doc(i) for i in range(1, n_max + 1)], "yaml"))
    assert rc == 0 and out.count("created") == n_max, out[-300:]
    # one more than that: refused as a whole, with the reason
    rc, line = check_apply(store, serialise([pool_doc(i) for i in range(1, 200)], "yaml"))
    assert rc == 1 and "at most" in line
    # 16 MiB + 1 byte, and many megabytes of comments / one enormous string
    rc, line = check_apply(store, b"#" * (16 * 1024 * 1024 + 1))
    assert rc == 1 and "larger" in line
    rc, line = check_apply(store, serialise([dict(pool_doc(1), metadata={"name": "x" * (4 << 20)})], "json"))
    assert rc == 1


BOMBS = {
    # "billion laughs": aliases that expand to 10^9 strings if anything walks them
    "alias bomb": b"a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                  b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                  b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
                  b"g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
                  b"i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
                  b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p1}\n"
                  b"spec: {cidr: 10.1.0.0/24, nodeSelector: *i, unknownField: *i}\n",
    "alias bomb in the name": b"x: &x [a,a,a,a,a,a,a,a,a,a]\ny: &y [*x,*x,*x,*x,*x,*x,*x,*x,*x,*x]\n"
                              b"z: &z [*y,*y,*y,*y,*y,*y,*y,*y,*y,*y]\nw: &w [*z,*z,*z,*z,*z,*z,*z,*z,*z,*z]\n"
                              b"v: &v [*w,*w,*w,*w,*w,*w,*w,*w,*w,*w]\nu: &u [*v,*v,*v,*v,*v,*v,*v,*v,*v,*v]\n"
                              b"t: &t [*u,*u,*u,*u,*u,*u,*u,*u,*u,*u]\n"
                              b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: *t}\n"
                              b"spec: {cidr: *t}\n",
    "deep YAML nesting": b"a: " + b"[" * 20000 + b"]" * 20000 + b"\n",
    "deep JSON nesting": b"[" * 200000 + b"]" * 200000,
    "python tag": b"!!python/object/apply:os.system ['touch /tmp/cni-ipam-pwned']\n",
    "recursive alias": b"&a [*a]\n",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_yaml_bombs_and_tags(store, name):
    """Run as subprocesses with a deadline: a bomb must be refused quickly, never expanded."""
    rc, line = check_apply(store, BOMBS[name], subprocess_=True)
    assert rc == 1, line
    assert not os.path.exists("/tmp/cni-ipam-pwned")

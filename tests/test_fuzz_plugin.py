"""Property-based tests (hypothesis) over the plugin's stdin and environment.

Every case: the plugin exits 0 with a valid result (or no output, as the verb requires), or
non-zero with stdout exactly ONE CNI error JSON object whose code is a spec code (never 999,
the internal-error code); and etcd holds exactly what it held before (a successful ADD is
checked, released, and then the allocations must be what they were before).

Most cases run in-process through ``cni_ipam.plugin.run_plugin(environ, stdin, stdout)`` (the
code path of the exec'd plugin, ~100x faster); a smaller sample runs as real subprocesses (which
also checks that stderr holds no traceback).  The number of cases run is printed at the end of
the module (``FUZZ_SCALE=N`` multiplies the example counts).

Inputs: mutated valid configs (wrong types, huge numbers, invalid CIDRs/IPs, unknown versions,
missing keys, random JSON), raw stdin (random bytes, truncated JSON, non-UTF-8, BOMs, NaN,
enormous and deeply nested documents), and the environment (missing/malformed CNI_* variables,
CNI_ARGS garbage, hostile CNI_CONTAINERID / CNI_IFNAME such as ``../x`` or 4 KB strings).  Keys
that would make the plugin touch something outside the test (etcd endpoints and prefix, lock and
log files, credentials files, ``kubernetes``) are only ever mutated to values of the wrong type.
"""
from __future__ import annotations

import collections
import io
import json
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.pool import make_pool
from cni_ipam.plugin import run_plugin
from tests.plugin_helpers import exec_plugin, netconf

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
SUPPORTED = {"0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
# spec codes (1-7, 11, 50, 51) and this plugin's documented ones; 999 (internal error) is a bug here
ALLOWED_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 110, 111, 113, 114}
VERBS = ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]
PINNED = ("etcd_endpoints", "etcd_prefix", "lock_file", "log_file", "nodename_file", "etcd_ca_cert_file",
          "etcd_cert_file", "etcd_key_file", "etcd_password_file", "timeout_seconds", "kubernetes")
IPAM_KEYS = ["type", "etcd_username", "etcd_password", "nodename", "assign_ipv4", "assign_ipv6",
             "ipv4_pools", "ipv6_pools", "routes", "dns", "mode", "gateway", "log_level",
             "annotation_prefix", "unknown_key"]

CASES = {"in-process": 0, "subprocess": 0}
OUTCOMES: collections.Counter = collections.Counter()   # result code (0: success) -> cases


def fuzz_settings(n: int, **kw):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example],
                    **kw)


@pytest.fixture(scope="module", autouse=True)
def report_cases(pytestconfig):
    yield
    tr = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    line = (f"fuzz (plugin): {sum(CASES.values())} cases run ({CASES['in-process']} in-process, "
            f"{CASES['subprocess']} as subprocesses); result codes: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(OUTCOMES.items())))
    capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line("\n" + line)


# --------------------------------------------------------------------------- fixtures
class Env:
    """A prefix with a pool and some allocations of another network; dump/compare helpers."""

    def __init__(self, endpoint, prefix, tmp_path):
        self.endpoint, self.prefix, self.tmp = endpoint, prefix, tmp_path
        self.ds = open_datastore(endpoint, timeout=5)
        self.ipam = IPAM(self.ds, prefix)
        self.ipam.create_pool(make_pool("fuzz-pool", "10.220.0.0/24", 29))
        self.ipam.create_pool(make_pool("fuzz-pool6", "fd20:220::/120", 124))
        for i in range(3):
            self.ipam.assign(AssignRequest(handle_id=f"seedednet.seed{i}.eth0", node="seed-node",
                                           network="seedednet", container_id=f"seed{i}", ifname="eth0"))
        self.base = netconf(endpoint, prefix, tmp_path, version="1.1.0", name="fuzznet", node="fuzz-node",
                            timeout_seconds=3, log_level="debug")

    def dump(self) -> dict:
        return {kv.key: (kv.value, kv.mod_revision) for kv in self.ds.get_prefix(self.prefix + "/")}

    def outside(self) -> dict:
        """Every key in etcd that is not under the prefix (nothing may ever be written there)."""
        return {kv.key: kv.mod_revision for kv in self.ds.range("\0", "\xff") if not kv.key.startswith(self.prefix + "/")}

    def allocations(self) -> dict:
        out = {}
        for key, (value, _) in self.dump().items():
            if "/v1/blocks/" in key:
                out[key] = json.loads(value)["allocations"]
        return out

    def base_env(self, verb="ADD", container="fz-1", ifname="eth0") -> dict:
        e = {"CNI_COMMAND": verb, "CNI_PATH": "/opt/cni/bin", "CNI_NETNS": "/var/run/netns/fz"}
        if verb in ("ADD", "DEL", "CHECK"):
            e.update(CNI_CONTAINERID=container, CNI_IFNAME=ifname)
        return e


@pytest.fixture
def fz(etcd_server, etcd_prefix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a relative path in a fuzzed value can only land here
    monkeypatch.delenv("NODENAME", raising=False)
    e = Env(etcd_server.endpoint, etcd_prefix, tmp_path)
    yield e
    e.ds.close()


# --------------------------------------------------------------------------- the property
def run_inprocess(environ: dict, stdin: bytes) -> tuple[int, str]:
    out = io.StringIO()
    rc = run_plugin(environ, stdin, stdout=out)
    return rc, out.getvalue()


def check_case(fz: Env, verb: str, rc: int, out: str, before: dict, where: str) -> None:
    """The property every case must satisfy (see the module docstring)."""
    if rc != 0:
        assert out.endswith("\n") and out.count("\n") == 1, f"{where}: not one JSON line: {out!r}"
        err = json.loads(out)
        assert isinstance(err, dict) and set(err) <= {"cniVersion", "code", "msg", "details"}, (where, out)
        assert isinstance(err["code"], int) and err["code"] in ALLOWED_CODES, (where, out)
        assert isinstance(err["msg"], str) and err["msg"], (where, out)
        assert isinstance(err.get("details", ""), str), (where, out)
        assert err["cniVersion"] in SUPPORTED, (where, out)
        after = fz.dump()
        assert after == before, f"{where}: a failed {verb} changed etcd"
        return
    if verb == "VERSION":
        doc = json.loads(out)
        assert set(doc["supportedVersions"]) <= SUPPORTED, (where, out)
        assert fz.dump() == before
        return
    if verb != "ADD":
        assert out == "", f"{where}: {verb} succeeded but printed {out!r}"
        assert fz.dump() == before, f"{where}: a successful {verb} changed etcd"
        return
    # a successful ADD: a valid result whose addresses the handle holds; then undo it
    res = json.loads(out)
    assert out.count("\n") == 1 and isinstance(res, dict) and res.get("cniVersion") in SUPPORTED, (where, out)
    new = {k: v for k, v in fz.dump().items() if "/v1/handles/" in k and k not in before}
    assert len(new) == 1, f"{where}: ADD succeeded, new handles: {list(new)}"
    ((key, (value, _)),) = new.items()
    # a handle key: <net>/<cid>/<ifname>, each ONE escaped path segment (no name can add a level)
    assert key.startswith(fz.prefix + "/v1/handles/") and key[len(fz.prefix + "/v1/handles/"):].count("/") == 2
    h = json.loads(value)
    ips = sorted(a["ip"] for a in h["addresses"])
    if "ips" in res:
        got = sorted(i["address"].split("/")[0] for i in res["ips"])
    else:  # 0.1.0 / 0.2.0
        got = sorted(res[f].get("ip", "").split("/")[0] for f in ("ip4", "ip6") if f in res)
    assert got == ips, (where, out, h)
    assert fz.ipam.release(h["id"]) is not None
    old_alloc = {k: json.loads(v[0])["allocations"] for k, v in before.items() if "/v1/blocks/" in k}
    now = fz.allocations()
    assert {k: v for k, v in now.items() if v} == {k: v for k, v in old_alloc.items() if v}, where


def one_case(fz: Env, environ: dict, stdin: bytes, *, subprocess_: bool = False) -> tuple[int, str]:
    verb = environ.get("CNI_COMMAND", "")
    before = fz.dump()
    outside = fz.outside()
    if subprocess_:
        over = {k: environ.get(k) for k in ("CNI_COMMAND", "CNI_PATH", "CNI_CONTAINERID", "CNI_IFNAME",
                                            "CNI_NETNS", "CNI_ARGS")}
        r = exec_plugin(None, None, raw_stdin=stdin, container=None, ifname=None, netns=None,
                        env={**environ, **over}, timeout=60)
        rc, out = r.rc, r.stdout
        assert "Traceback" not in r.stderr, r.stderr
        CASES["subprocess"] += 1
    else:
        rc, out = run_inprocess(environ, stdin)
        CASES["in-process"] += 1
    OUTCOMES[json.loads(out)["code"] if rc and out.strip() else rc] += 1
    check_case(fz, verb, rc, out, before, f"{verb} env={ {k: v[:80] for k, v in environ.items()} } "
                                          f"stdin={stdin[:300]!r}")
    assert fz.outside() == outside, "a key outside the test prefix changed"
    log = fz.tmp / "cni-ipam.log"
    if log.exists():
        assert "Traceback" not in log.read_text(errors="replace")
    return rc, out


# --------------------------------------------------------------------------- strategies
json_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 2**31, 2**63, 10**30, -10**30, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324, 0.5]),
    st.text(max_size=40),
    st.sampled_from(["", "../x", "/etc/passwd", "10.0.0.0/33", "300.1.2.3", "10.220.0.0/24", "::/0",
                     "fd20:220::/120", "fe80::1%eth0", "0.0.0.0/0", "10.220.0.9", "x" * 4096,
                     "fuzz-pool", "fuzz-pool6", "nope", "routed", "bridge", "debug", "true", "false",
                     "1.1.0", "0.4.0", "9.9.9", "1.1", "ünïcødé", "\u202e", "a\nb"]),
)
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
wrong_type = st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                       st.lists(st.none(), min_size=1, max_size=2))
ip_lists = st.lists(st.one_of(st.sampled_from(["10.220.0.10", "10.220.0.10/29", "10.220.0.0", "10.220.0.7",
                                               "10.221.0.1", "fd20:220::5", "fd20:220::5/124", "bogus",
                                               "10.220.0.10,10.220.0.11", ""]), json_leaf), max_size=3)
versions = st.one_of(st.sampled_from(sorted(SUPPORTED) + ["", "0.0.1", "1.2.0", "2.0.0", "1.0", "v1.0.0",
                                                          "1.0.0 ", "01.0.0"]), json_leaf)


@st.composite
def mutated_conf(draw, base: dict) -> dict:
    conf = json.loads(json.dumps(base))
    ipam = conf["ipam"]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["ipam_set", "ipam_set", "ipam_set", "ipam_del", "pinned", "top_set",
                                     "top_del", "version", "ips", "prev", "attachments", "ipam_replace"]))
        if kind == "ipam_set" and isinstance(ipam, dict):
            ipam[draw(st.sampled_from(IPAM_KEYS))] = draw(json_values)
        elif kind == "ipam_del" and isinstance(ipam, dict):
            keys = [k for k in ipam if k not in PINNED]
            if keys:
                del ipam[draw(st.sampled_from(sorted(keys)))]
        elif kind == "pinned" and isinstance(ipam, dict):
            ipam[draw(st.sampled_from(PINNED))] = draw(wrong_type)
        elif kind == "top_set":
            conf[draw(st.sampled_from(["name", "type", "runtimeConfig", "args", "prevResult", "ipam",
                                       "dns", "capabilities", "cniVersions"]))] = draw(json_values)
        elif kind == "top_del":
            conf.pop(draw(st.sampled_from(["name", "cniVersion", "type", "ipam"])), None)
        elif kind == "version":
            conf["cniVersion"] = draw(versions)
        elif kind == "ips":
            where = draw(st.sampled_from(["runtimeConfig", "args"]))
            conf[where] = ({"ips": draw(ip_lists)} if where == "runtimeConfig"
                           else {"cni": {"ips": draw(ip_lists)}})
        elif kind == "prev":
            conf["prevResult"] = draw(st.one_of(json_values, st.fixed_dictionaries(
                {"cniVersion": versions, "ips": st.lists(st.fixed_dictionaries({"address": json_leaf}),
                                                         max_size=2)})))
        elif kind == "attachments":
            conf[draw(st.sampled_from(["cni.dev/valid-attachments", "cni.dev/attachments"]))] = draw(
                st.one_of(json_values, st.lists(st.fixed_dictionaries(
                    {"containerID": json_leaf, "ifname": json_leaf}), max_size=3)))
        elif kind == "ipam_replace":
            conf["ipam"] = draw(json_values)
        ipam = conf.get("ipam")
    # a mutation may not point the plugin at anything outside the test: no ipam section at all
    # would mean the default endpoint (127.0.0.1:2379), lock file and log file
    if conf.get("ipam") is None:
        conf["ipam"] = dict(base["ipam"])
    if isinstance(conf.get("ipam"), dict):
        for k in ("etcd_endpoints", "etcd_prefix", "lock_file", "log_file", "timeout_seconds"):
            conf["ipam"].setdefault(k, base["ipam"][k])
        for k in PINNED:
            v = conf["ipam"].get(k)
            if isinstance(v, str) or (k == "etcd_endpoints" and isinstance(v, list)
                                      and all(isinstance(x, str) for x in v)) or (
                    k == "kubernetes" and isinstance(v, dict)) or (
                    k == "timeout_seconds" and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0 < v <= 3600):
                conf["ipam"][k] = base["ipam"].get(k)
                if conf["ipam"][k] is None:
                    del conf["ipam"][k]
    return conf


hostile_ids = st.one_of(
    st.sampled_from(["../x", "..", ".", "a/b", "/", "x" * 4096, "a" * 300, "-x", "_x", "a..b", "a%2Fb",
                     "ctr\n2", "ctr 2", "ü", "\udcff", "c1;IP=1.2.3.4", "", "c" + "\u0000" + "x"]),
    st.text(max_size=30), st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1,
                                  max_size=4200))
hostile_ifnames = st.one_of(
    st.sampled_from(["../x", "..", ".", "eth0/1", "eth0:1", "eth 0", "x" * 15, "x" * 16, "üüüüü", "üüüüüx",
                     "\t", "eth0\n", "\u3000", "\udcff", "", "x" * 4096]),
    st.text(max_size=20))
cni_args = st.one_of(
    st.sampled_from(["", "a", "a=b", "a=b=c", ";", ";;", "IgnoreUnknown=1", "IgnoreUnknown=maybe",
                     "IgnoreUnknown=1;x=y", "IP=", "IP=garbage", "IP=10.220.0.20", "IP=10.220.0.20,fd20:220::9",
                     "IP=10.220.0.20,10.220.0.21", "IP=1.2.3.4/99", "K8S_POD_NAME=../../x;K8S_POD_NAMESPACE=/",
                     "K8S_POD_NAME=" + "p" * 4096, "IgnoreUnknown=1;" + "k=v;" * 500 + "x=y",
                     "K8S_POD_NAMESPACE=ns%2F..;IgnoreUnknown=true;FOO=\udcff"]),
    st.text(max_size=60))


@st.composite
def mutated_env(draw, fz: Env, verb: str | None = None) -> dict:
    verb = verb or draw(st.sampled_from(VERBS))
    env = fz.base_env(verb)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cid", "ifname", "args", "drop", "command", "netns", "path", "junk"]))
        if kind == "cid":
            env["CNI_CONTAINERID"] = draw(hostile_ids)
        elif kind == "ifname":
            env["CNI_IFNAME"] = draw(hostile_ifnames)
        elif kind == "args":
            env["CNI_ARGS"] = draw(cni_args)
        elif kind == "drop":
            env.pop(draw(st.sampled_from(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS",
                                          "CNI_PATH"])), None)
        elif kind == "command":
            env["CNI_COMMAND"] = draw(st.one_of(st.sampled_from(["add", "ADD ", " ADD", "DELETE", "Add", "",
                                                                 "VERSIONS", "GC\n", "\udcff"]), st.text(max_size=8)))
        elif kind == "netns":
            env["CNI_NETNS"] = draw(st.one_of(st.sampled_from(["", "../../x", "/proc/1/ns/net", "x" * 4096]),
                                              st.text(max_size=20)))
        elif kind == "path":
            env["CNI_PATH"] = draw(st.one_of(st.sampled_from(["", ":", "::::", "/nonexistent"]), st.text(max_size=20)))
        elif kind == "junk":
            env[draw(st.sampled_from(["CNI_IGNORED", "NODENAME_", "CNI_IFNAME_"]))] = draw(st.text(max_size=10))
    return env


def clean_for_exec(env: dict) -> dict:
    """A real process environment cannot hold NUL bytes (values with them are dropped)."""
    return {k: v for k, v in env.items() if "\0" not in v}


def raw_stdin(base_bytes: bytes):
    n = len(base_bytes)
    return st.one_of(
        st.binary(max_size=300),
        st.integers(0, n - 1).map(lambda i: base_bytes[:i]),                        # truncated JSON
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=4)).map(          # garbage spliced in
            lambda t: base_bytes[:t[0]] + t[1] + base_bytes[t[0]:]),
        st.sampled_from([b"\xff\xfe{}", b"\xef\xbb\xbf" + base_bytes, base_bytes.replace(b'"fuzznet"', b'"fuzz\xc3"'),
                         base_bytes.replace(b"1.1.0", b"\xc0\xaf"), b"", b" ", b"null", b"[]", b"1", b'"x"',
                         b'{"cniVersion": NaN}', b'{"cniVersion": Infinity, "name": "n"}',
                         b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000,
                         base_bytes[:-1] + b', "pad": "' + b"x" * (4 << 20) + b'"}',
                         base_bytes[:-1] + b', "big": [' + b"1," * 300000 + b'1]}',
                         base_bytes + base_bytes, base_bytes + b"\x00", base_bytes.replace(b"{", b"{\x00", 1),
                         b'{"cniVersion":"1.1.0","name":"fuzznet","name":"..","ipam":{}}']),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


# --------------------------------------------------------------------------- tests
@fuzz_settings(400)
@given(data=st.data())
def test_fuzz_config(fz, data):
    """Mutated valid configs through every verb, valid environment."""
    verb = data.draw(st.sampled_from(VERBS))
    conf = data.draw(mutated_conf(fz.base))
    try:
        stdin = json.dumps(conf).encode()
    except (ValueError, OverflowError):
        stdin = json.dumps(conf, allow_nan=True).encode()
    one_case(fz, fz.base_env(verb, container=f"fz-{verb.lower()}"), stdin)


@fuzz_settings(300)
@given(data=st.data())
def test_fuzz_stdin_bytes(fz, data):
    """Random, truncated, non-UTF-8, enormous and deeply nested stdin."""
    verb = data.draw(st.sampled_from(VERBS))
    stdin = data.draw(raw_stdin(json.dumps(fz.base).encode()))
    one_case(fz, fz.base_env(verb), stdin)


@fuzz_settings(400)
@given(data=st.data())
def test_fuzz_environment(fz, data):
    """Missing and malformed CNI_* variables, hostile container IDs and ifnames, CNI_ARGS garbage."""
    env = data.draw(mutated_env(fz))
    conf = dict(fz.base)
    rc, out = one_case(fz, env, json.dumps(conf).encode())
    cid, ifname = env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", "")
    if rc == 0 and env.get("CNI_COMMAND") == "ADD":
        # only well-formed names get this far
        assert cid and cid[0].isascii() and cid[0].isalnum() and ".." != cid
        assert ifname not in (".", "..") and "/" not in ifname and len(ifname.encode("utf-8", "surrogateescape")) <= 15


@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_everything(fz, data):
    """Config, stdin bytes and environment mutated at once."""
    env = data.draw(mutated_env(fz))
    if data.draw(st.booleans()):
        conf = data.draw(mutated_conf(fz.base))
        stdin = json.dumps(conf, allow_nan=True).encode()
    else:
        stdin = data.draw(raw_stdin(json.dumps(fz.base).encode()))
    one_case(fz, env, stdin)


@fuzz_settings(30)
@given(data=st.data())
def test_fuzz_as_subprocess(fz, data):
    """A sample through a real exec: also no traceback on stderr, and a real environment."""
    env = clean_for_exec(data.draw(mutated_env(fz)))
    if not any(k in env for k in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH",
                                  "CNI_ARGS")):
        # without any CNI_* variable the program is the admin CLI (by design), not the plugin
        env["CNI_COMMAND"] = data.draw(st.sampled_from(VERBS))
    kind = data.draw(st.sampled_from(["conf", "conf", "bytes"]))
    if kind == "conf":
        stdin = json.dumps(data.draw(mutated_conf(fz.base)), allow_nan=True).encode()
    else:
        stdin = data.draw(raw_stdin(json.dumps(fz.base).encode()))
    one_case(fz, env, stdin, subprocess_=True)


# --------------------------------------------------------------------------- fixed hostile cases
HOSTILE = [
    ("4 KB container id", {"CNI_CONTAINERID": "a" * 4096}, None),
    ("traversal container id", {"CNI_CONTAINERID": "../x"}, 4),
    ("traversal ifname", {"CNI_IFNAME": "../x"}, 4),
    ("4 KB ifname", {"CNI_IFNAME": "x" * 4096}, 4),
    ("CNI_ARGS garbage", {"CNI_ARGS": "a=b=c;;"}, 4),
    ("CNI_ARGS bad IP", {"CNI_ARGS": "IP=999.1.1.1"}, 4),
    ("hostile pod names", {"CNI_ARGS": "K8S_POD_NAME=../../v1/pools/x;K8S_POD_NAMESPACE=/../.."}, None),
    ("no CNI_PATH", {"CNI_PATH": None}, 4),
    ("unknown command", {"CNI_COMMAND": "DESTROY"}, 4),
]


@pytest.mark.parametrize("name,env,code", HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("how", ["in-process", "subprocess"])
def test_hostile_environment(fz, name, env, code, how):
    e = fz.base_env("ADD")
    for k, v in env.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    rc, out = one_case(fz, e, json.dumps(fz.base).encode(), subprocess_=(how == "subprocess"))
    if code is None:
        assert rc == 0, out
    else:
        assert rc != 0 and json.loads(out)["code"] == code, out


BIG = [
    ("8 MB of JSON", lambda b: b[:-1] + b', "pad": "' + b"x" * (8 << 20) + b'"}', 7),   # over cni.skel.MAX_STDIN
    ("just under the stdin cap", lambda b: b[:-1] + b', "pad": "' + b"x" * ((4 << 20) - len(b) - 20) + b'"}', None),
    ("nesting 1e5 deep", lambda b: b"[" * 100000 + b"]" * 100000, 6),
    ("non-UTF-8", lambda b: b.replace(b"fuzznet", b"fuzz\xffnet"), 6),
    ("truncated", lambda b: b[: len(b) // 2], 6),
    ("unknown version", lambda b: b.replace(b'"1.1.0"', b'"7.0.0"'), 1),
    ("huge timeout", lambda b: b.replace(b'"timeout_seconds": 3', b'"timeout_seconds": 1e400'), 7),
    ("huge integer", lambda b: b.replace(b'"timeout_seconds": 3', b'"timeout_seconds": ' + b"9" * 4000), 7),
    ("invalid CIDR pool", lambda b: b.replace(b'"type": "cni-ipam"', b'"type": "cni-ipam", "ipv4_pools": ["10.0.0.0/33"]'), 7),
]


@pytest.mark.parametrize("name,make,code", BIG, ids=[b[0] for b in BIG])
@pytest.mark.parametrize("how", ["in-process", "subprocess"])
def test_enormous_and_broken_stdin(fz, name, make, code, how):
    stdin = make(json.dumps(fz.base).encode())
    rc, out = one_case(fz, fz.base_env("ADD"), stdin, subprocess_=(how == "subprocess"))
    if code is None:
        assert rc == 0, out
    else:
        assert rc != 0 and json.loads(out)["code"] == code, out


BAD_CONFIGS = [
    ("username without password", {"etcd_username": "u"}),
    ("password without username", {"etcd_password": "pw"}),
    ("password file without username", {"etcd_password_file": "/nonexistent"}),
    ("endpoint without host", {"etcd_endpoints": "http://"}),
    ("endpoint with a bad port", {"etcd_endpoints": "http://127.0.0.1:port"}),
    ("endpoint port out of range", {"etcd_endpoints": "http://127.0.0.1:99999"}),
    ("endpoint with credentials", {"etcd_endpoints": "http://user:hunter2@127.0.0.1:2379"}),
    ("unclosed IPv6 endpoint", {"etcd_endpoints": "http://[::1"}),
    ("empty endpoint list", {"etcd_endpoints": []}),
    ("ftp endpoint", {"etcd_endpoints": "ftp://127.0.0.1:2379"}),
    ("relative prefix", {"etcd_prefix": "cni"}),
    ("cert without key", {"etcd_cert_file": "/nonexistent"}),
    ("zero timeout", {"timeout_seconds": 0}),
    ("kubernetes not an object", {"kubernetes": "yes"}),
]


@pytest.mark.parametrize("name,ipam", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_invalid_connection_settings_are_code_7(fz, name, ipam):
    conf = json.loads(json.dumps(fz.base))
    conf["ipam"].update(ipam)
    for verb in ("ADD", "DEL", "STATUS"):
        rc, out = one_case(fz, fz.base_env(verb), json.dumps(conf).encode())
        err = json.loads(out)
        assert rc != 0 and err["code"] == 7, out
        assert "hunter2" not in out

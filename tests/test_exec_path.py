"""The plugin's exec path without json/re/socket/contextlib (issue 17): the stand-ins behave
exactly like what they replace, and the ADD path does not import the heavy modules again."""
import json
import os
import random
import re
import subprocess
import sys
import threading

import pytest

from cni_ipam import _json
from cni_ipam._records import dataclass, field
from cni_ipam.cni.env import _valid_name
from cni_ipam.cni.version import parse_version
from cni_ipam.constants import DNS_SUBDOMAIN_RE, is_dns_subdomain as _dns_subdomain
from cni_ipam.hostenv import LockTimeout, host_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outcome(fn, *a, **kw):
    try:
        return ("ok", repr(fn(*a, **kw)))
    except Exception as e:  # noqa: BLE001 -- comparing the exact error
        return ("error", type(e).__name__, str(e))


LOADS_CASES = ['{"a": 1, "b": [1.5, -2e10, "x\\u00e9\\ud800", null, true, false, NaN, -Infinity]}',
               '  [1,2] \n', '"s"', '1', '[1] x', '', '\ufeff{}', '{"a":', '[' * 50000, '{"k": "v\\"q"}',
               'nul', '1.0e', '{"a":1,"a":2}', '{"cniVersion": "1.1.0", "name": "n", "ipam": {}}']


@pytest.mark.parametrize("text", LOADS_CASES)
def test_json_loads_is_the_stdlib(text):
    for inp in (text, text.encode("utf-8", "surrogatepass"), b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass"),
                text.encode("utf-16"), bytearray(text.encode("utf-8", "surrogatepass"))):
        assert _outcome(_json.loads, inp) == _outcome(json.loads, inp)

    def reject(name):
        raise ValueError(f"no {name}")
    assert _outcome(_json.loads, text, parse_constant=reject) == _outcome(json.loads, text, parse_constant=reject)


def test_json_dumps_is_the_stdlib():
    loop = []
    loop.append(loop)
    objs = [{"a": [1, 2.5, float("nan"), "é\u2028", None, True], 3: "x", 1.5: 2, None: 1, True: 0}, "str\u00e9",
            5, [], {}, {"z": 1, "a": {"b": [set()]}}, {(1, 2): 3}, float("inf"), loop, {"b": 1, "a": [1, 2]}]
    for o in objs:
        for kw in ({}, {"separators": (",", ":")}, {"sort_keys": True}, {"indent": 2},
                   {"separators": (",", ":"), "sort_keys": True}):
            assert _outcome(_json.dumps, o, **kw) == _outcome(json.dumps, o, **kw), (o, kw)


def test_string_checks_are_the_regexes():
    version = re.compile(r"([0-9]+)(?:\.([0-9]+))?(?:\.([0-9]+))?")
    name = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
    dns = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
    assert dns.pattern == DNS_SUBDOMAIN_RE   # the one the CLI compiles (cli/labels.py)
    rnd = random.Random(17)
    alphabet = "0a9Zz.-_.\u0661é \n"
    for _ in range(20000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 8)))
        m = version.fullmatch(s)
        assert _outcome(parse_version, s)[0] == ("ok" if m else "error"), s
        if m:
            assert parse_version(s) == tuple(int(p) if p is not None else 0 for p in m.groups())
        assert _valid_name(s) == bool(name.fullmatch(s)), s
        assert _dns_subdomain(s) == bool(dns.fullmatch(s)), s
        assert _dns_subdomain(s.lower()) == bool(dns.fullmatch(s.lower())), s


@dataclass(frozen=True, slots=True)
class A:
    a: int
    b: str = "x"
    c: list = field(default_factory=list)


@dataclass
class B:
    x: int
    y: int = 2

    def __post_init__(self):
        self.z = self.x + self.y


def test_records_behave_like_compiled_dataclasses():
    assert repr(A(1)) == "A(a=1, b='x', c=[])"
    assert A(1, c=[3]) == A(a=1, b="x", c=[3]) and A(1) != A(2)
    assert A(1).c is not A(1).c
    assert hash(A(1, "b", ())) == hash(A(1, "b", ()))
    assert (B(1).z, B(1, y=5).z) == (3, 6)
    with pytest.raises(AttributeError, match="cannot assign to field 'a'"):
        A(1).a = 2
    # argument errors are Python's own, as from a compiled __init__
    for call, msg in ((lambda: A(), "missing 1 required positional argument: 'a'"),
                      (lambda: A(1, a=2), "got multiple values for argument 'a'"),
                      (lambda: A(1, q=2), "got an unexpected keyword argument 'q'"),
                      (lambda: A(1, 2, 3, 4), "takes from 2 to 4 positional arguments but 5 were given"),
                      (lambda: B(y=1), "missing 1 required positional argument: 'x'")):
        with pytest.raises(TypeError) as ei:
            call()
        assert str(ei.value) == f"__init__() {msg}"


def test_add_path_imports_none_of_the_heavy_modules():
    code = ("import sys; import cni_ipam.main, cni_ipam.plugin, cni_ipam.cni.skel, cni_ipam.ipam.engine, "
            "cni_ipam.datastore.gateway, cni_ipam.ipam.annotations, cni_ipam.ipam.snapshot, cni_ipam.ipam.reclaim; "
            "print(' '.join(sorted(m for m in ('re', 'json', 'socket', 'enum', 'contextlib', 'selectors', "
            "'dataclasses', 'typing', 'cni_ipam.ipam.selector') if m in sys.modules)))")
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""


def test_contended_host_lock_is_handed_over_and_times_out(tmp_path):
    path = str(tmp_path / "lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cni_ipam.hostenv import host_lock\n"
         f"with host_lock({path!r}, 5):\n print('held', flush=True); time.sleep(0.8)"],
        cwd=ROOT, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="within 0.2s"):
            with host_lock(path, 0.2):
                pass
        with host_lock(path, 30):   # waits in flock() until the holder lets go
            assert holder.wait(timeout=30) == 0
        import signal
        assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    finally:
        holder.wait(timeout=30)
    # outside the main thread (no SIGALRM there) it still times out
    errors = []

    def other():
        try:
            with host_lock(path, 0.2):
                errors.append("got the lock")
        except LockTimeout:
            errors.append("timeout")
    with host_lock(path, 5):
        t = threading.Thread(target=other)
        t.start()
        t.join(30)
    assert errors == ["timeout"]
    with host_lock(path, 0):   # free again: taken without waiting (timeout 0 would raise otherwise)
        pass


#: a plugin run that says, on stderr, which cni_ipam modules it loaded
_REPORT_MODULES = [sys.executable, "-S", "-c",
                   "import sys, atexit; atexit.register(lambda: sys.stderr.write('MODULES ' + ' '.join("
                   "sorted(m for m in sys.modules if m.startswith('cni_ipam') or m == '__future__')) + chr(10)))\n"
                   "from cni_ipam.main import main; sys.exit(main())"]


def _modules_of(run) -> set[str]:
    line = [ln for ln in run.stderr.splitlines() if ln.startswith("MODULES ")]
    assert line, run.stderr
    return set(line[-1].split()[1:])


def test_del_gc_check_load_no_add_code(etcd_server, etcd_prefix, tmp_path):
    """A DEL, GC or CHECK runs the engine without its ADD code (ipam/releases.py's ``Releases``;
    issue 17): the ADD's modules stay unloaded, and the release is done all the same."""
    from tests.plugin_helpers import exec_plugin, netconf, seed_store
    with seed_store(etcd_server.endpoint, etcd_prefix):
        pass
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    add = exec_plugin("ADD", conf, argv=_REPORT_MODULES, container="c-light")
    assert add.rc == 0, add.stdout + add.stderr
    add_only = {"cni_ipam.ipam.engine", "cni_ipam.ipam.request", "cni_ipam.ipam.pool", "cni_ipam.ipam.reclaim",
                "cni_ipam.cni.result"}
    assert add_only <= _modules_of(add)   # (the names are right: an ADD loads them)
    from cni_ipam.datastore import open_datastore
    with open_datastore(etcd_server.endpoint) as ds:
        assert len(ds.get_prefix(f"{etcd_prefix}/v1/handles/")) == 1
    check_conf = dict(conf, prevResult=add.out)
    runs = {"CHECK": exec_plugin("CHECK", check_conf, argv=_REPORT_MODULES, container="c-light"),
            "DEL": exec_plugin("DEL", conf, argv=_REPORT_MODULES, container="c-light"),
            "GC": exec_plugin("GC", dict(conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}),
                              argv=_REPORT_MODULES)}
    for verb, r in runs.items():
        assert r.rc == 0, (verb, r.stdout + r.stderr)
        loaded = _modules_of(r)
        assert "cni_ipam.ipam.releases" in loaded and not add_only & loaded, (verb, sorted(add_only & loaded))
    with open_datastore(etcd_server.endpoint) as ds:
        assert ds.get_prefix(f"{etcd_prefix}/v1/handles/") == []   # the DEL released it


def test_the_bundles_module_groups_are_what_the_verbs_load(etcd_server, etcd_prefix, tmp_path):
    """packaging/modblob.py's groups (each unmarshalled at once by the bundle) are exactly what a
    VERSION, then a DEL, then an ADD load: a module a verb stops or starts importing must move
    (else a group loads code nobody runs, or a verb pays for one more unmarshalling)."""
    sys.path.insert(0, os.path.join(ROOT, "packaging"))
    import modblob
    from tests.plugin_helpers import exec_plugin, netconf, seed_store
    with seed_store(etcd_server.endpoint, etcd_prefix):
        pass
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    loaded = {}
    for verb in ("VERSION", "ADD", "DEL"):
        r = exec_plugin(verb, conf, argv=_REPORT_MODULES, container="c-groups")
        assert r.rc == 0, r.stdout + r.stderr
        loaded[verb] = _modules_of(r)
    version = set(modblob.VERSION_GROUP) - {"cni_exec"}   # (packaging/entry.py imports it first)
    assert loaded["VERSION"] == version
    assert loaded["DEL"] - version == set(modblob.DEL_GROUP)
    assert loaded["ADD"] - loaded["DEL"] == set(modblob.ADD_GROUP)

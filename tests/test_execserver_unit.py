"""cni_ipam/execserver.py without the binary: the launcher's message (``encode_request`` /
``parse_request``) and ``PRELOAD``'s completeness (a verb served by the exec server's fork must
import no module of cni_ipam the server did not import before forking)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cni_ipam.execserver import MAGIC, encode_request, parse_request
from tests.plugin_helpers import ROOT, netconf, seed_store


# ----------------------------------------------------------------------------- the message
def test_round_trip():
    argv = ["/opt/cni/bin/cni-ipam", "--flag", "", "a b"]
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns", "EMPTY": "",
           "EQ": "a=b=c", "PATH": "/usr/bin:/bin"}
    data = encode_request("0.2.0-abcdef012345", argv, env, cwd="/var/run/x y", umask=0o027)
    assert data.startswith(MAGIC + b"\0") and data.endswith(b"\0")
    req = parse_request(data)
    assert req == {"build": "0.2.0-abcdef012345", "umask": 0o027, "cwd": b"/var/run/x y",
                   "argv": argv, "env": env}


def test_round_trip_non_utf8():
    bad = os.fsdecode(b"caf\xe9")            # surrogateescape
    argv = ["cni-ipam", bad]
    env = {"V": bad, bad: "x"}
    req = parse_request(encode_request("b", argv, env, cwd=bad))
    assert req["argv"] == argv and req["env"] == env
    assert req["cwd"] == b"caf\xe9"
    assert os.fsencode(req["argv"][1]) == b"caf\xe9"


def test_round_trip_empty():
    req = parse_request(encode_request("b", [], {}))
    assert req == {"build": "b", "umask": 0o022, "cwd": b"/", "argv": [], "env": {}}


def test_the_launchers_layout():
    """The exact bytes packaging/launcher.c builds (the protocol in the module docstring)."""
    data = MAGIC + b"\0b1\0" + b"22\0/\0" + b"2\0x\0y\0" + b"1\0A=1\0"
    assert parse_request(data) == {"build": "b1", "umask": 0o022, "cwd": b"/", "argv": ["x", "y"],
                                   "env": {"A": "1"}}
    assert encode_request("b1", ["x", "y"], {"A": "1"}) == data


@pytest.mark.parametrize("data", [
    b"cni-ipam-exec/2\0b\0" b"22\0/\0" b"0\0" b"0\0",           # another protocol
    b"\0b\0" b"22\0/\0" b"0\0" b"0\0",                          # no magic
    b"GET / HTTP/1.1\r\n\r\n",                                  # not even NUL-separated
    b"",
], ids=["wrong-magic", "no-magic", "http", "empty"])
def test_parse_refuses_another_message(data):
    with pytest.raises(ValueError):
        parse_request(data)


def test_parse_refuses_no_trailing_nul():
    data = encode_request("b", ["x"], {"A": "1"})
    with pytest.raises(ValueError):
        parse_request(data[:-1])


@pytest.mark.parametrize("argc,envc", [(3, 1), (5, 1), (2, 0), (2, 2), (1, 2), (-1, 1)])
def test_parse_refuses_counts_that_do_not_match(argc, envc):
    data = (MAGIC + b"\0b\0" + b"22\0/\0" + b"%d\0" % argc + b"x\0y\0" + b"%d\0" % envc + b"A=1\0")
    with pytest.raises(ValueError):
        parse_request(data)


def test_parse_refuses_non_numbers():
    for data in (MAGIC + b"\0b\0" + b"zz\0/\0" + b"0\0" + b"0\0",
                 MAGIC + b"\0b\0" + b"22\0/\0" + b"one\0" + b"0\0",
                 MAGIC + b"\0b\0" + b"22\0/\0" + b"0\0" + b"none\0"):
        with pytest.raises(ValueError):
            parse_request(data)


# ----------------------------------------------------------------------------- PRELOAD
PRELOAD_SCRIPT = textwrap.dedent(r"""
    import io, json, os, sys
    from cni_ipam import execserver
    execserver.preload()
    before = {m for m in sys.modules if m == "cni_ipam" or m.startswith("cni_ipam.")}
    from cni_ipam.main import main     # what the server's child runs (execserver._run_verb)

    conf, base = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}

    def verb(name, command, doc, **env):
        e = dict(base, CNI_COMMAND=command, **env)
        os.environ.clear()
        os.environ.update({k: v for k, v in e.items() if v is not None})
        sys.stdin = io.TextIOWrapper(io.BytesIO(json.dumps(doc).encode()))
        sys.stdout = buf = io.StringIO()
        try:
            rc = main([])
        finally:
            sys.stdout, sys.stdin = sys.__stdout__, sys.__stdin__
        now = {m for m in sys.modules if m == "cni_ipam" or m.startswith("cni_ipam.")}
        out[name] = {"rc": rc, "stdout": buf.getvalue(), "new": sorted(now - before)}
        return buf.getvalue()

    verb("VERSION", "VERSION", conf)
    add = json.loads(verb("ADD", "ADD", conf))
    verb("ADD-again", "ADD", conf)   # the same attachment: the existing allocation
    verb("CHECK", "CHECK", dict(conf, prevResult=add))
    verb("ADD-gone", "ADD", conf, CNI_CONTAINERID="gone")
    if conf["cniVersion"] == "1.1.0":    # (STATUS and GC are verbs of spec 1.1.0)
        verb("STATUS", "STATUS", conf, CNI_CONTAINERID=None, CNI_IFNAME=None, CNI_NETNS=None)
        gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})
        verb("GC", "GC", gc, CNI_CONTAINERID=None, CNI_IFNAME=None, CNI_NETNS=None)
    else:
        verb("DEL-gone", "DEL", conf, CNI_CONTAINERID="gone")
    verb("DEL", "DEL", conf)
    verb("DEL-again", "DEL", conf)   # nothing held: still 0
    print(json.dumps(out))
""")


@pytest.mark.parametrize("version,kubernetes", [("1.1.0", False), ("0.4.0", False), ("1.1.0", True)],
                         ids=["1.1.0", "0.4.0", "1.1.0-kubernetes"])
def test_preload_covers_every_verb(etcd_server, etcd_prefix, tmp_path, version, kubernetes):
    """What ``cni-ipam exec-server`` imports before it forks is all a served verb needs: after
    ``preload()`` the happy path of every verb (run as the server's child runs it:
    ``cni_ipam.main.main`` with the exec's environment, stdin and stdout, which ends in
    ``plugin.run_plugin``) imports no further module of cni_ipam (a verb that did would pay that
    import in every served exec).  ``kubernetes``: the conf has the ``kubernetes`` section the
    DaemonSet's conflist has (deploy/examples/conflist-configmap.yaml), against the API stand-in."""
    with seed_store(etcd_server.endpoint, etcd_prefix):
        pass
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, version=version, ipv4_pools=["external-pool"])
    base = {"PATH": "/usr/bin:/bin", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
            "CNI_NETNS": "/var/run/netns/x", "CNI_PATH": "/opt/cni/bin"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with contextlib.ExitStack() as stack:
        if kubernetes:
            from tests.support.k8s_standin import K8sStandin
            api = stack.enter_context(K8sStandin(tmp_path / "api"))
            api.add_namespace("ns", annotations={"cni.projectcalico.org/ipv4pools": '["external-pool"]'})
            api.add_node("node-a")
            api.add_pod("ns", "web-0", node="node-a")
            conf["ipam"]["kubernetes"] = {"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig"))}
            base["CNI_ARGS"] = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0"
        p = _run_preload_script(conf, base, cwd)
    assert p.returncode == 0, p.stdout + p.stderr
    results = json.loads(p.stdout.splitlines()[-1])
    expected = ["VERSION", "ADD", "ADD-again", "CHECK", "ADD-gone"]
    expected += ["STATUS", "GC"] if version == "1.1.0" else ["DEL-gone"]
    expected += ["DEL", "DEL-again"]
    assert list(results) == expected
    for name in expected:
        r = results[name]
        assert r["rc"] == 0, (name, r)
        assert r["new"] == [], f"{name} imported modules the exec server did not preload: {r['new']}"
    assert json.loads(results["ADD"]["stdout"])["ips"][0]["address"].startswith("172.16.0.")
    assert results["ADD-again"]["stdout"] == results["ADD"]["stdout"]
    # GC (or DEL) released "gone" (GC kept c1), DEL released c1: nothing is left
    with _engine(etcd_server.endpoint, etcd_prefix) as ipam:
        assert ipam.handles() == []


def _run_preload_script(conf, base, cwd):
    return subprocess.run([sys.executable, "-c", PRELOAD_SCRIPT, json.dumps(conf), json.dumps(base)],
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


class _engine:
    def __init__(self, endpoint, prefix):
        self.endpoint, self.prefix = endpoint, prefix

    def __enter__(self):
        from cni_ipam.datastore import open_datastore
        from cni_ipam.ipam.engine import IPAM
        self.ds = open_datastore(self.endpoint)
        return IPAM(self.ds, self.prefix)

    def __exit__(self, *exc):
        self.ds.close()

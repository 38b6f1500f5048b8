"""Secrets stay secret, files are private, and names from the outside stay in their place.

* The log file (and the lock file) is created 0600, also under umask 000.
* No secret -- the etcd password (inline or from a file), a Kubernetes bearer token (inline or
  tokenFile), private key material (etcd TLS key, kubeconfig client-key-data) -- ever appears in a
  log line (debug level), on stdout or on stderr, in runs that succeed and in runs that fail
  (wrong password, wrong token, unreachable API server, bad key), for the plugin and the CLI.
* Names from the outside (container IDs, interface names, node names, pod and namespace names,
  pool names, network names) cannot leave the etcd prefix: every key written is under
  ``<prefix>/v1/`` with the name as ONE percent-encoded path segment, and no key outside the
  prefix changes.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from cni_ipam.ipam.keys import escape, unescape
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import PLUGIN, ROOT, exec_plugin, netconf
from tests.support.etcd import EtcdServer

PASSWORD = "etcd-pw-" + secrets.token_hex(10)
ROOT_PASSWORD = "root-pw-" + secrets.token_hex(10)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture(scope="module")
def auth_etcd():
    """Plain-HTTP etcd with RBAC: user ``cni`` (password ``PASSWORD``) may use ``/sec/`` only."""
    s = EtcdServer(name="secrets")
    try:
        s.start()
        s.api("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
        s.api("/v3/auth/user/grant", {"user": "root", "role": "root"})
        s.api("/v3/auth/role/add", {"name": "cni-rw"})
        s.api("/v3/auth/user/add", {"name": "cni", "password": PASSWORD})
        s.api("/v3/auth/user/grant", {"user": "cni", "role": "cni-rw"})
        s.api("/v3/auth/enable", {})
        token = s.api("/v3/auth/authenticate", {"name": "root", "password": ROOT_PASSWORD})["token"]
        s.api("/v3/auth/role/grant", {"name": "cni-rw", "perm": {"permType": "READWRITE", "key": b64("/sec/"),
                                                                 "range_end": b64("/sec0")}}, token=token)
        yield s
    finally:
        s.stop()


def everything(tmp_path: Path, *runs) -> str:
    """stdout + stderr of the runs and every log file under tmp_path."""
    text = "".join((r.stdout or "") + (r.stderr or "") for r in runs)
    logs = [p for p in tmp_path.rglob("*.log") if p.is_file()]
    assert logs
    for p in logs:
        text += p.read_text(errors="replace")
    return text


def assert_no_secret(text: str, *secret_values: str) -> None:
    for s in secret_values:
        assert s and s not in text, f"secret {s[:6]}... leaked"


# --------------------------------------------------------------------------- file modes
def test_log_and_lock_files_are_created_0600_even_with_umask_000(etcd_server, etcd_prefix, tmp_path):
    ds = open_datastore(etcd_server.endpoint)
    IPAM(ds, etcd_prefix).create_pool(make_pool("p", "10.240.0.0/24", 29))
    ds.close()
    logdir = tmp_path / "new" / "log"
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, log_file=str(logdir / "cni-ipam.log"),
                   lock_file=str(tmp_path / "new" / "run" / "ipam.lock"))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
           "CNI_IFNAME": "eth0", "CNI_NETNS": "/x", "CNI_PATH": "/opt/cni/bin"}
    p = subprocess.run(PLUGIN, input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60,
                       preexec_fn=lambda: os.umask(0))
    assert p.returncode == 0, p.stdout + p.stderr
    for f in (logdir / "cni-ipam.log", tmp_path / "new" / "run" / "ipam.lock"):
        assert f.stat().st_mode & 0o777 == 0o600, (f, oct(f.stat().st_mode))
    # also when the call fails before touching etcd (the log is opened first)
    conf2 = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, log_file=str(tmp_path / "l2" / "x.log"),
                    ipv4_pools=["does-not-exist"])
    p = subprocess.run(PLUGIN, input=json.dumps(conf2).encode(), env=dict(env, CNI_CONTAINERID="c2"),
                       capture_output=True, timeout=60, preexec_fn=lambda: os.umask(0))
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 7, p.stdout
    assert (tmp_path / "l2" / "x.log").stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- etcd password
def test_etcd_password_never_logged_or_echoed(auth_etcd, tmp_path):
    prefix = f"/sec/pw-{secrets.token_hex(3)}"
    ipam = IPAM(open_datastore(auth_etcd.endpoint, username="cni", password=PASSWORD), prefix)
    ipam.create_pool(make_pool("p", "10.241.0.0/24", 29))
    ipam.ds.close()
    pw_file = tmp_path / "pw"
    pw_file.write_text(PASSWORD + "\n")
    runs = []
    for i, creds in enumerate([{"etcd_username": "cni", "etcd_password": PASSWORD},
                               {"etcd_username": "cni", "etcd_password_file": str(pw_file)}]):
        conf = netconf(auth_etcd.endpoint, prefix, tmp_path, version="1.1.0", log_level="debug", **creds)
        add = exec_plugin("ADD", conf, container=f"c{i}")
        assert add.rc == 0, add.stdout + add.stderr
        runs += [add, exec_plugin("CHECK", dict(conf, prevResult=add.out), container=f"c{i}"),
                 exec_plugin("STATUS", conf, container=None, ifname=None, netns=None),
                 exec_plugin("GC", dict(conf, **{"cni.dev/valid-attachments": []}), container=None, ifname=None,
                             netns=None),
                 exec_plugin("DEL", conf, container=f"c{i}")]
        assert all(r.rc == 0 for r in runs), [r.stdout for r in runs]
    # failures: a wrong password; the right password for a prefix the user may not touch
    wrong = "wrong-" + secrets.token_hex(8)
    for creds, pfx in (({"etcd_username": "cni", "etcd_password": wrong}, prefix),
                       ({"etcd_username": "cni", "etcd_password": PASSWORD}, "/not-granted")):
        conf = netconf(auth_etcd.endpoint, pfx, tmp_path, version="1.1.0", log_level="debug", timeout_seconds=3,
                       **creds)
        for verb in ("ADD", "DEL"):
            r = exec_plugin(verb, conf, container="bad")
            assert r.rc != 0 and r.out["code"] == 11, r.stdout
            runs.append(r)
        r = exec_plugin("STATUS", conf, container=None, ifname=None, netns=None)
        assert r.rc != 0 and r.out["code"] == 50
        runs.append(r)
    assert_no_secret(everything(tmp_path, *runs), PASSWORD, wrong, ROOT_PASSWORD)
    # the CLI: with the password from --cni-conf (inline) and from a file, right and wrong
    cli_runs = []
    for pw in (PASSWORD, wrong):
        conf_file = tmp_path / f"net-{pw[:5]}.conf"
        conf_file.write_text(json.dumps(netconf(auth_etcd.endpoint, prefix, tmp_path, etcd_username="cni",
                                                etcd_password=pw, timeout_seconds=3)))
        pwf = tmp_path / f"pwfile-{pw[:5]}"
        pwf.write_text(pw)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
        env["PYTHONPATH"] = ROOT
        for args in (["pool", "list", "--cni-conf", str(conf_file)],
                     ["show", "--etcd-endpoints", auth_etcd.endpoint, "--etcd-prefix", prefix,
                      "--etcd-username", "cni", "--etcd-password-file", str(pwf), "--timeout", "3"],
                     ["config", "show", "--cni-conf", str(conf_file), "-o", "json"]):
            p = subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, capture_output=True,
                               text=True, timeout=60)
            assert (p.returncode == 0) == (pw == PASSWORD), (args, p.stdout, p.stderr)
            if p.returncode:
                assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
            cli_runs.append(p)
    assert_no_secret("".join(p.stdout + p.stderr for p in cli_runs), PASSWORD, wrong, ROOT_PASSWORD)


# --------------------------------------------------------------------------- Kubernetes token, key data
@pytest.fixture
def k8s(tmp_path):
    from tests.support.k8s_standin import K8sStandin
    token = "k8s-token-" + secrets.token_hex(12)
    api = K8sStandin(tmp_path, tokens={token: "system:serviceaccount:kube-system:cni-ipam"})
    api.start()
    api.add_namespace("ns1")
    api.add_pod("ns1", "pod1", node="node-a")
    api.add_node("node-a")
    try:
        yield api, token
    finally:
        api.stop()


def test_kubernetes_token_and_key_data_never_logged(etcd_server, etcd_prefix, tmp_path, k8s):
    api, token = k8s
    ds = open_datastore(etcd_server.endpoint)
    IPAM(ds, etcd_prefix).create_pool(make_pool("p", "10.242.0.0/24", 29))
    ds.close()
    wrong = "wrong-token-" + secrets.token_hex(8)
    key_data = base64.b64encode(Path(api.pki["client_key"]).read_bytes()).decode()
    key_body = Path(api.pki["client_key"]).read_text().split("-----")[2].strip()
    args = "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1;IgnoreUnknown=1"
    runs = []
    cases = [  # (kubeconfig kwargs, should ADD succeed)
        (dict(token=token), True),
        (dict(token=token, token_file=True), True),
        (dict(token=token, client_cert="data"), True),
        (dict(token=wrong), False),
        (dict(token=wrong, client_cert="data"), None),    # the client certificate may authenticate
        (dict(token=token, ca="other"), False),
    ]
    for i, (kw, ok) in enumerate(cases):
        kc = api.write_kubeconfig(tmp_path / f"kc{i}", **kw)
        conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, log_level="debug", timeout_seconds=3,
                       kubernetes={"kubeconfig": kc})
        r = exec_plugin("ADD", conf, container=f"k{i}", args=args)
        assert ok is None or (r.rc == 0) == ok, (kw, r.stdout, r.stderr)
        if r.rc != 0:
            # a refused token (401) or an unverifiable server certificate: the kubeconfig is wrong (7)
            assert r.out and r.out["code"] == 7 and "Traceback" not in r.stderr, r.stdout + r.stderr
        runs += [r, exec_plugin("DEL", conf, container=f"k{i}", args=args)]
    # the API server gone: the token must not show up in the connection error either
    kc = api.write_kubeconfig(tmp_path / "kc-down", token=token)
    api.stop()
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, log_level="debug", timeout_seconds=2,
                   kubernetes={"kubeconfig": kc})
    r = exec_plugin("ADD", conf, container="down", args=args)
    assert r.rc != 0 and r.out["code"] == 11 and "Traceback" not in r.stderr, r.stdout   # unreachable: try again
    runs.append(r)
    text = "".join(x.stdout + x.stderr for x in runs) + (tmp_path / "cni-ipam.log").read_text()
    assert_no_secret(text, token, wrong, key_data[:40], key_body[:40])


# --------------------------------------------------------------------------- names stay in their place
HOSTILE_NAMES = ["../../x", "..", "/", "a/../../b", "%2F..%2F", "v1/pools/evil", "\\..\\x", "ü/ß", "x" * 2048,
                 "name with spaces", "*", "?", "#frag", "a\nb", "\u202e"]


def test_hostile_names_stay_under_the_prefix(etcd_server, etcd_prefix, tmp_path):
    ds = open_datastore(etcd_server.endpoint)
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("p", "10.243.0.0/22", 28))
    outside = {kv.key: kv.mod_revision for kv in ds.range("\0", "\U0010ffff")
               if not kv.key.startswith(etcd_prefix + "/")}
    runs = []
    # node names and pod / namespace names: anything; interface names: what the CNI rules allow
    for i, node in enumerate(HOSTILE_NAMES):
        conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, node=node,
                       lock_file=str(tmp_path / f"lock{i}"))
        pod, ns = HOSTILE_NAMES[(i + 3) % len(HOSTILE_NAMES)], HOSTILE_NAMES[(i + 7) % len(HOSTILE_NAMES)]
        args = None
        if ";" not in pod + ns and "=" not in pod + ns:
            args = f"K8S_POD_NAME={pod};K8S_POD_NAMESPACE={ns}"
        ifname = ["eth0", "ü%x", "a\\b", "*?", "x" * 15, "%2F"][i % 6]
        r = exec_plugin("ADD", conf, container=f"c{i}", ifname=ifname, args=args)
        assert r.rc == 0, (node, r.stdout, r.stderr)
        runs.append((conf, f"c{i}", ifname, args, r))
    kvs = ds.get_prefix(etcd_prefix + "/")
    root = etcd_prefix + "/v1/"
    shapes = {"pools": 1, "blocks": 2, "affinity": 3, "handles": 3, "config": 0, "schema": 0, "poolset": 0}
    for kv in kvs:
        assert kv.key.startswith(root), kv.key
        rest = kv.key[len(root):]
        kind = rest.split("/", 1)[0]
        assert kind in shapes, kv.key
        parts = rest.split("/")[1:]
        assert len(parts) == shapes[kind], kv.key          # a name is ONE path segment
        assert all(p == escape(unescape(p)) for p in parts[:shapes[kind] if kind == "handles" else 1]), kv.key
    nodes = {unescape(kv.key[len(root + "affinity/"):].split("/")[0]) for kv in kvs if "/affinity/" in kv.key}
    assert nodes == set(HOSTILE_NAMES)
    handles = {json.loads(kv.value)["id"]: kv.key for kv in kvs if "/handles/" in kv.key}
    for conf, cid, ifname, args, r in runs:
        hid = f"testnet/{cid}/{ifname}"
        assert handles[hid] == root + "handles/testnet/" + escape(cid) + "/" + escape(ifname)
    for conf, cid, ifname, args, r in runs:
        assert exec_plugin("DEL", conf, container=cid, ifname=ifname, args=args).rc == 0
    assert not [kv for kv in ds.get_prefix(root + "handles/")]
    assert {kv.key: kv.mod_revision for kv in ds.range("\0", "\U0010ffff")
            if not kv.key.startswith(etcd_prefix + "/")} == outside
    ds.close()


def test_hostile_names_through_the_cli_stay_under_the_prefix(etcd_server, etcd_prefix, tmp_path):
    """Pool names (validated: refused) and namespace / node names (escaped) from the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
    env.update(PYTHONPATH=ROOT, ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix)

    def cli(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, capture_output=True, text=True,
                              timeout=60, input=stdin)

    ds = open_datastore(etcd_server.endpoint)
    outside = {kv.key: kv.mod_revision for kv in ds.range("\0", "\U0010ffff")
               if not kv.key.startswith(etcd_prefix + "/")}
    for i, name in enumerate(["../../evil", "a/b", "..", "x" * 300, "UPPER", "a b"]):
        doc = json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
                          "spec": {"cidr": f"10.244.{i}.0/24", "blockSize": 29}})
        p = cli("apply", "-f", "-", stdin=doc)
        assert "Traceback" not in p.stderr
        if p.returncode != 0:
            assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for name in ["../../evil", "a/b/c", "..", "%2F"]:
        p = cli("namespace", "annotate", name, "cni.projectcalico.org/ipv4pools=[]")
        assert "Traceback" not in p.stderr
        p = cli("node", "label", name, "zone=a")
        assert "Traceback" not in p.stderr
    root = etcd_prefix + "/v1/"
    for kv in ds.get_prefix(etcd_prefix + "/"):
        assert kv.key.startswith(root), kv.key
        kind, _, rest = kv.key[len(root):].partition("/")
        if kind in ("pools", "namespaces", "nodes"):
            assert "/" not in rest and rest == escape(unescape(rest)), kv.key
    assert {kv.key: kv.mod_revision for kv in ds.range("\0", "\U0010ffff")
            if not kv.key.startswith(etcd_prefix + "/")} == outside
    ds.close()

"""The plugin and the CLI end to end against an etcd with TLS and client-certificate auth
(``--client-cert-auth``, certificates generated here), and against one that also has etcd
user/password auth (RBAC) -- and how both fail without certificates, with a certificate from
another CA, with a CA that did not sign the server, with a wrong password: a clean CNI error
(code 11, quickly, no traceback) from the plugin, one ``cni-ipam: error:`` line from the CLI.

(The transports' TLS/RBAC handling is in test_datastore_contract.py; here: the real programs.)
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from tests.plugin_helpers import ROOT, exec_plugin, netconf
from tests.support.etcd import EtcdServer, make_test_certs

ROOT_PASSWORD = "root-" + secrets.token_hex(8)
CNI_PASSWORD = "cni-pw-" + secrets.token_hex(8)
PREFIX = "/cni-tls"
POOLS_YAML = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: tls-pool
spec:
  cidr: 10.230.0.0/24
  blockSize: 29
"""


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    good = make_test_certs(str(d / "good"))
    other = make_test_certs(str(d / "other"))   # a second, unrelated CA with its own client cert
    return good, other


@pytest.fixture(scope="module")
def tls_etcd(pki):
    """TLS + --client-cert-auth, no RBAC."""
    good, _ = pki
    s = EtcdServer(name="tls", cert_file=good.server_cert, key_file=good.server_key, ca_file=good.ca,
                   client_cert_file=good.client_cert, client_key_file=good.client_key)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def auth_etcd(pki):
    """TLS + --client-cert-auth + RBAC: user ``cni`` may read and write ``/cni-tls`` only."""
    good, _ = pki
    s = EtcdServer(name="tlsauth", cert_file=good.server_cert, key_file=good.server_key, ca_file=good.ca,
                   client_cert_file=good.client_cert, client_key_file=good.client_key)
    try:
        s.start()
        s.api("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
        s.api("/v3/auth/user/grant", {"user": "root", "role": "root"})
        s.api("/v3/auth/role/add", {"name": "cni-rw"})
        s.api("/v3/auth/user/add", {"name": "cni", "password": CNI_PASSWORD})
        s.api("/v3/auth/user/grant", {"user": "cni", "role": "cni-rw"})
        s.api("/v3/auth/enable", {})
        token = s.api("/v3/auth/authenticate", {"name": "root", "password": ROOT_PASSWORD})["token"]
        s.api("/v3/auth/role/grant", {"name": "cni-rw", "perm": {
            "permType": "READWRITE", "key": b64(PREFIX + "/"), "range_end": b64(PREFIX + "0")}}, token=token)
        yield s
    finally:
        s.stop()


def tls_keys(certs) -> dict:
    return {"etcd_ca_cert_file": certs.ca, "etcd_cert_file": certs.client_cert, "etcd_key_file": certs.client_key}


def conf_for(server, tmp_path, prefix, **ipam):
    return netconf(server.endpoint, prefix, tmp_path, version="1.1.0", **ipam)


def assert_clean_error(r, code: int, *, secrets_=(), budget: float | None = None, elapsed: float = 0.0):
    assert r.rc != 0, r.stdout
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1, r.stdout
    err = json.loads(r.stdout)
    assert err["code"] == code, err
    assert "Traceback" not in r.stderr, r.stderr
    for s in secrets_:
        assert s not in r.stdout and s not in r.stderr
    if budget is not None:
        assert elapsed < budget, f"took {elapsed:.1f}s"
    return err


def timed_exec(*a, **kw):
    t0 = time.monotonic()
    r = exec_plugin(*a, **kw)
    return r, time.monotonic() - t0


def cli(args, *, env_extra=None, stdin=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
    env["PYTHONPATH"] = ROOT
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "-m", "cni_ipam", *args], env=env, capture_output=True, text=True,
                       timeout=timeout, input=stdin, cwd=ROOT)
    return p


def assert_cli_error(p, *secrets_):
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cni-ipam: error: "), p.stderr
    assert "Traceback" not in p.stderr
    for s in secrets_:
        assert s not in p.stdout + p.stderr
    return lines[0]


def store(server, prefix, **kw) -> IPAM:
    return IPAM(open_datastore(server.endpoint, timeout=5, **kw), prefix)


def held(ipam: IPAM) -> dict:
    return {str(a.ip): h.id for h in ipam.handles() for a in h.addresses}


# --------------------------------------------------------------------------- TLS + client certs
def test_cli_and_plugin_work_with_client_certificates(tls_etcd, pki, tmp_path):
    good, _ = pki
    prefix = f"{PREFIX}/ok-{secrets.token_hex(3)}"
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS_YAML)
    flags = ["--etcd-endpoints", tls_etcd.endpoint, "--etcd-prefix", prefix, "--etcd-ca-cert-file", good.ca,
             "--etcd-cert-file", good.client_cert, "--etcd-key-file", good.client_key]
    p = cli(["apply", "-f", str(pools), *flags])
    assert p.returncode == 0, p.stderr
    # the plugin: ADD, CHECK, STATUS, GC, DEL with etcd_ca_cert_file / etcd_cert_file / etcd_key_file
    conf = conf_for(tls_etcd, tmp_path, prefix, **tls_keys(good))
    r = exec_plugin("ADD", conf)
    assert r.rc == 0, r.stdout + r.stderr
    ip = r.out["ips"][0]["address"].split("/")[0]
    assert exec_plugin("CHECK", dict(conf, prevResult=r.out)).rc == 0
    assert exec_plugin("STATUS", conf, container=None, ifname=None, netns=None).rc == 0
    # the CLI sees it, by flags, by environment and through --cni-conf (the plugin's own config)
    out = json.loads(cli(["show", "--ip", ip, "-o", "json", *flags]).stdout)
    assert "c1" in json.dumps(out)
    env = {"ETCD_ENDPOINTS": tls_etcd.endpoint, "CNI_IPAM_ETCD_PREFIX": prefix, "ETCD_CA_CERT_FILE": good.ca,
           "ETCD_CERT_FILE": good.client_cert, "ETCD_KEY_FILE": good.client_key}
    p = cli(["pool", "list", "-o", "json"], env_extra=env)
    assert p.returncode == 0 and "tls-pool" in p.stdout, p.stderr
    conf_file = tmp_path / "net.conf"
    conf_file.write_text(json.dumps(conf))
    p = cli(["check", "--cni-conf", str(conf_file)])
    assert p.returncode == 0, p.stdout + p.stderr
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})
    assert exec_plugin("GC", gc, container=None, ifname=None, netns=None).rc == 0
    assert exec_plugin("DEL", conf).rc == 0
    ipam = store(tls_etcd, prefix, ca_cert=good.ca, cert=good.client_cert, key=good.client_key)
    try:
        assert held(ipam) == {}
    finally:
        ipam.ds.close()


TLS_FAILURES = {
    # name: (ipam TLS settings given the good and the other PKI)
    "no TLS settings": lambda g, o: {},
    "CA but no client certificate": lambda g, o: {"etcd_ca_cert_file": g.ca},
    "client certificate from another CA": lambda g, o: {"etcd_ca_cert_file": g.ca, "etcd_cert_file": o.client_cert,
                                                        "etcd_key_file": o.client_key},
    "CA that did not sign the server": lambda g, o: {"etcd_ca_cert_file": o.ca, "etcd_cert_file": g.client_cert,
                                                     "etcd_key_file": g.client_key},
    "key that does not match the certificate": lambda g, o: {"etcd_ca_cert_file": g.ca,
                                                             "etcd_cert_file": g.client_cert,
                                                             "etcd_key_file": o.client_key},
    "missing CA file": lambda g, o: {"etcd_ca_cert_file": g.ca + ".missing", "etcd_cert_file": g.client_cert,
                                     "etcd_key_file": g.client_key},
    "missing key file": lambda g, o: {"etcd_ca_cert_file": g.ca, "etcd_cert_file": g.client_cert,
                                      "etcd_key_file": g.client_key + ".missing"},
    "a key file that is not a key": lambda g, o: {"etcd_ca_cert_file": g.ca, "etcd_cert_file": g.client_cert,
                                                  "etcd_key_file": g.ca},
}


@pytest.mark.parametrize("case", sorted(TLS_FAILURES))
def test_plugin_fails_cleanly_with_bad_tls(tls_etcd, pki, tmp_path, case):
    good, other = pki
    timeout = 4
    conf = conf_for(tls_etcd, tmp_path, f"{PREFIX}/bad", timeout_seconds=timeout, **TLS_FAILURES[case](good, other))
    key_material = [Path(f).read_text().split("-----")[2].strip()[:40]
                    for f in (good.client_key, other.client_key)]
    for verb in ("ADD", "DEL"):
        r, took = timed_exec(verb, conf)
        err = assert_clean_error(r, 11, secrets_=key_material, budget=timeout + 3, elapsed=took)
        assert tls_etcd.endpoint in err["msg"] + err["details"] or "etcd" in err["msg"], err
    r, took = timed_exec("STATUS", conf, container=None, ifname=None, netns=None)
    assert_clean_error(r, 50, secrets_=key_material, budget=timeout + 3, elapsed=took)
    log = (tmp_path / "cni-ipam.log").read_text()
    assert "Traceback" not in log and not any(k in log for k in key_material)


@pytest.mark.parametrize("case", ["no TLS settings", "CA but no client certificate",
                                  "client certificate from another CA", "CA that did not sign the server"])
def test_cli_fails_cleanly_with_bad_tls(tls_etcd, pki, case):
    good, other = pki
    flags = {"etcd_ca_cert_file": "--etcd-ca-cert-file", "etcd_cert_file": "--etcd-cert-file",
             "etcd_key_file": "--etcd-key-file"}
    args = ["pool", "list", "--etcd-endpoints", tls_etcd.endpoint, "--etcd-prefix", PREFIX, "--timeout", "4"]
    for k, v in TLS_FAILURES[case](good, other).items():
        args += [flags[k], v]
    t0 = time.monotonic()
    p = cli(args)
    assert time.monotonic() - t0 < 20
    assert_cli_error(p)


# --------------------------------------------------------------------------- TLS + user/password (RBAC)
def test_plugin_and_cli_with_password_auth(auth_etcd, pki, tmp_path):
    good, _ = pki
    prefix = f"{PREFIX}/auth-{secrets.token_hex(3)}"
    pw_file = tmp_path / "etcd-password"
    pw_file.write_text(CNI_PASSWORD + "\n")
    os.chmod(pw_file, 0o600)
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS_YAML)
    flags = ["--etcd-endpoints", auth_etcd.endpoint, "--etcd-prefix", prefix, "--etcd-ca-cert-file", good.ca,
             "--etcd-cert-file", good.client_cert, "--etcd-key-file", good.client_key,
             "--etcd-username", "cni", "--etcd-password-file", str(pw_file)]
    p = cli(["apply", "-f", str(pools), *flags])
    assert p.returncode == 0, p.stderr
    # etcd_username + etcd_password
    conf = conf_for(auth_etcd, tmp_path, prefix, etcd_username="cni", etcd_password=CNI_PASSWORD, **tls_keys(good))
    r = exec_plugin("ADD", conf)
    assert r.rc == 0, r.stdout + r.stderr
    # etcd_username + etcd_password_file
    conf2 = conf_for(auth_etcd, tmp_path, prefix, etcd_username="cni", etcd_password_file=str(pw_file),
                     **tls_keys(good))
    r2 = exec_plugin("ADD", conf2, container="c2")
    assert r2.rc == 0, r2.stdout + r2.stderr
    assert r.out["ips"] != r2.out["ips"]
    p = cli(["check", *flags])
    assert p.returncode == 0, p.stdout + p.stderr
    p = cli(["show", "-o", "json", *flags])
    assert p.returncode == 0 and json.loads(p.stdout)["pools"][0]["inUse"] == 2, p.stdout + p.stderr
    assert exec_plugin("DEL", conf).rc == 0 and exec_plugin("DEL", conf2, container="c2").rc == 0
    for out in (r.stdout, r.stderr, r2.stdout, r2.stderr, (tmp_path / "cni-ipam.log").read_text()):
        assert CNI_PASSWORD not in out


@pytest.mark.parametrize("case", ["wrong password", "unknown user", "no credentials", "prefix not granted"])
def test_password_auth_failures_are_clean(auth_etcd, pki, tmp_path, case):
    good, _ = pki
    wrong = "wrong-" + secrets.token_hex(6)
    ipam = {"wrong password": dict(etcd_username="cni", etcd_password=wrong),
            "unknown user": dict(etcd_username="nobody-" + secrets.token_hex(3), etcd_password=CNI_PASSWORD),
            "no credentials": {},
            "prefix not granted": dict(etcd_username="cni", etcd_password=CNI_PASSWORD)}[case]
    prefix = "/elsewhere" if case == "prefix not granted" else f"{PREFIX}/denied"
    conf = conf_for(auth_etcd, tmp_path, prefix, timeout_seconds=4, **ipam, **tls_keys(good))
    for verb in ("ADD", "DEL"):
        r, took = timed_exec(verb, conf)
        err = assert_clean_error(r, 11, secrets_=(wrong, CNI_PASSWORD, ROOT_PASSWORD), budget=7, elapsed=took)
        assert err["msg"]
    log = (tmp_path / "cni-ipam.log").read_text()
    assert wrong not in log and CNI_PASSWORD not in log and "Traceback" not in log
    # the CLI: one line, no password
    pw_file = tmp_path / "pw"
    pw_file.write_text(ipam.get("etcd_password", wrong))
    args = ["pool", "list", "--etcd-endpoints", auth_etcd.endpoint, "--etcd-prefix", prefix, "--timeout", "4",
            "--etcd-ca-cert-file", good.ca, "--etcd-cert-file", good.client_cert, "--etcd-key-file", good.client_key]
    if "etcd_username" in ipam:
        args += ["--etcd-username", ipam["etcd_username"], "--etcd-password-file", str(pw_file)]
    assert_cli_error(cli(args), wrong, CNI_PASSWORD, ROOT_PASSWORD)

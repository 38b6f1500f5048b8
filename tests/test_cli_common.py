"""The admin CLI as a subprocess (`python -m cni_ipam ...`, CNI_COMMAND unset) against the real etcd:
connection settings, error lines, output formats.  Also the helpers the other test_cli_* files use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM
from tests.support.etcd import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEED_POOLS = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: external-pool
spec:
  cidr: 172.16.0.0/26
  blockSize: 29
  ipipMode: Always
  natOutgoing: true
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: internal-pool
spec:
  cidr: 192.168.0.0/16
  blockSize: 29
  ipipMode: Always
  natOutgoing: true
"""


@dataclass
class Out:
    rc: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    @property
    def error_line(self) -> str:
        """The one stderr line of a failed command (asserts there is exactly one and no traceback)."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        assert "Traceback" not in self.stderr, self.stderr
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("cni-ipam: error: "), lines[0]
        return lines[0]


def cli_env(endpoint: str | None, prefix: str | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
    env["PYTHONPATH"] = ROOT
    if endpoint is not None:
        env["ETCD_ENDPOINTS"] = endpoint
    if prefix is not None:
        env["CNI_IPAM_ETCD_PREFIX"] = prefix
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def run_cli(args, *, env, stdin: str | bytes | None = None, timeout: float = 60) -> Out:
    if isinstance(stdin, str):
        stdin = stdin.encode()
    p = subprocess.run([sys.executable, "-m", "cni_ipam", *args], input=stdin, env=env, capture_output=True,
                       timeout=timeout, cwd=ROOT)
    return Out(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


@pytest.fixture
def cli(etcd_server, etcd_prefix):
    """``cli(*args, stdin=None, **env)`` runs the CLI against this test's prefix."""
    def run(*args, stdin=None, timeout=60, **extra_env):
        return run_cli(list(args), env=cli_env(etcd_server.endpoint, etcd_prefix, **extra_env), stdin=stdin,
                       timeout=timeout)
    return run


@pytest.fixture
def ipam(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint, timeout=10)
    yield IPAM(ds, etcd_prefix)
    ds.close()


def dump(ipam) -> dict:
    """Every key under the prefix with its value and mod revision (to assert nothing changed)."""
    return {kv.key: (kv.value, kv.mod_revision) for kv in ipam.ds.get_prefix(ipam.keys.root)}


def write_file(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ============================================================================ tests

def test_version_and_help_need_no_etcd():
    env = cli_env("http://127.0.0.1:1", "/x")
    r = run_cli(["version"], env=env)
    assert r.rc == 0 and r.stdout.startswith("cni-ipam ") and "1.1.0" in r.stdout
    r = run_cli(["--version"], env=env)
    assert r.rc == 0 and r.stdout.startswith("cni-ipam ")
    r = run_cli(["--help"], env=env)
    assert r.rc == 0
    for cmd in ("apply", "pool", "show", "config", "configure", "release", "check"):
        assert cmd in r.stdout


def test_usage_errors_exit_2():
    env = cli_env("http://127.0.0.1:1", "/x")
    r = run_cli(["show", "--no-such-flag"], env=env)
    assert r.rc == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["configure", "--strict-affinity", "maybe"], env=env)
    assert r.rc == 2 and "expected true or false" in r.stderr
    r = run_cli(["pool"], env=env)
    assert r.rc == 2 and "SUBCOMMAND" in r.stderr


def test_unreachable_etcd_is_one_error_line_within_the_timeout():
    env = cli_env(f"http://127.0.0.1:{free_port()}", "/x")
    for args in (["show"], ["pool", "list"], ["check"], ["apply", "-f", "-"]):
        r = run_cli(args + ["--timeout", "1"], env=env, stdin=SEED_POOLS, timeout=30)
        assert r.rc == (3 if args == ["check"] else 1), (args, r)   # check: 3 = could not check
        line = r.error_line
        assert "etcd unavailable" in line and "127.0.0.1" in line
        assert r.stdout == ""


def test_bad_connection_settings_are_clear_errors(tmp_path):
    env = cli_env("ftp://127.0.0.1:2379", "/x")
    assert "is not an http:// or https:// URL" in run_cli(["show"], env=env).error_line
    env = cli_env("http://127.0.0.1:2379", "no-slash")
    assert "must start with '/'" in run_cli(["show"], env=env).error_line
    env = cli_env("http://127.0.0.1:2379", "/x", ETCD_CERT_FILE=str(tmp_path / "c.pem"))
    assert "go together" in run_cli(["show"], env=env).error_line
    env = cli_env("http://127.0.0.1:2379", "/x", ETCD_USERNAME="root",
                  ETCD_PASSWORD_FILE=str(tmp_path / "missing"))
    assert "cannot read the etcd password file" in run_cli(["show"], env=env).error_line


def test_cni_conf_points_the_cli_at_the_plugins_store(etcd_server, etcd_prefix, tmp_path, ipam):
    """--cni-conf reads endpoints/prefix from the cni-ipam ipam section (plain config and conflist);
    flags win over it, and it wins over the environment."""
    pools = write_file(tmp_path, "pools.yaml", SEED_POOLS)
    conflist = {"cniVersion": "1.0.0", "name": "pods", "plugins": [
        {"type": "bridge", "bridge": "cni0",
         "ipam": {"type": "cni-ipam", "etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    conf_path = write_file(tmp_path, "10-pods.conflist", json.dumps(conflist))
    # the environment points somewhere else entirely: --cni-conf must win
    env = cli_env(f"http://127.0.0.1:{free_port()}", "/elsewhere")
    r = run_cli(["apply", "-f", pools, "--cni-conf", conf_path], env=env)
    assert r.rc == 0, r.stderr
    assert {p.name for p in ipam.pools()} == {"external-pool", "internal-pool"}
    # a plain network config works the same
    plain = write_file(tmp_path, "10-pods.conf", json.dumps(
        {"cniVersion": "1.0.0", "name": "pods", "type": "bridge", **{"ipam": conflist["plugins"][0]["ipam"]}}))
    r = run_cli(["pool", "list", "-o", "json", "--cni-conf", plain], env=env)
    assert r.rc == 0 and len(r.json()["items"]) == 2
    # an explicit flag beats the file
    r = run_cli(["pool", "list", "-o", "json", "--cni-conf", plain, "--etcd-prefix", etcd_prefix + "-other"],
                env=env)
    assert r.rc == 0 and r.json()["items"] == []
    # no cni-ipam section / not JSON / missing file: one clear line
    other = write_file(tmp_path, "host-local.conf", json.dumps(
        {"cniVersion": "1.0.0", "name": "x", "type": "bridge", "ipam": {"type": "host-local"}}))
    assert "no ipam section of type cni-ipam" in run_cli(["show", "--cni-conf", other], env=env).error_line
    bad = write_file(tmp_path, "bad.conf", "{not json")
    assert "is not valid JSON" in run_cli(["show", "--cni-conf", bad], env=env).error_line
    assert "cannot read" in run_cli(["show", "--cni-conf", str(tmp_path / "nope")], env=env).error_line


def test_output_formats_parse(cli, tmp_path):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    for args in (["show"], ["show", "--blocks"], ["pool", "list"], ["pool", "get", "external-pool"],
                 ["config", "show"], ["check"]):
        j = cli(*args, "-o", "json")
        y = cli(*args, "-o", "yaml")
        t = cli(*args)
        assert j.rc == y.rc == t.rc == 0, (args, j.stderr, y.stderr, t.stderr)
        assert json.loads(j.stdout) == yaml.safe_load(y.stdout), args
        assert t.stdout.strip() and not t.stdout.lstrip().startswith("{")

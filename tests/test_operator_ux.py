"""Operator experience: errors that say what to do, the CLI config file, safety prompts,
`check` exit codes, typo hints (against the real etcd; refused endpoints are closed loopback ports)."""
from __future__ import annotations

import json
import os

from tests.support.etcd import free_port
from tests.test_cli_common import SEED_POOLS, cli, cli_env, dump, ipam, run_cli, write_file  # noqa: F401


# ----------------------------------------------------------------------------- refused endpoints

def test_refused_endpoints_fail_at_once_and_say_how_to_set_them(tmp_path):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    env = cli_env(",".join(dead), "/x")
    # --timeout 3600: the command must not wait for it (the subprocess gets 60 s)
    for args in (["show"], ["pool", "list"], ["apply", "-f", "-"]):
        r = run_cli(args + ["--timeout", "3600"], env=env, stdin=SEED_POOLS, timeout=60)
        assert r.rc == 1 and r.stdout == "", (args, r)
        line = r.error_line
        assert f"{dead[0]} (connection refused)" in line and f"{dead[1]} (connection refused)" in line
        assert "(endpoints from ETCD_ENDPOINTS)" in line
        for how in ("--etcd-endpoints", "ETCD_ENDPOINTS", "--cni-conf", "/etc/cni-ipam/cli.yaml",
                    "CNI_IPAM_CONFIG"):
            assert how in line, (how, line)
        assert "Error:" not in line and "ConnectionRefusedError" not in line
    # the same from the flag / the CLI config file: the message says where the endpoints came from
    r = run_cli(["show", "--etcd-endpoints", dead[0]], env=cli_env(None, "/x"), timeout=60)
    assert "(endpoints from --etcd-endpoints)" in r.error_line
    conf = write_file(tmp_path, "cli.yaml", f"etcdEndpoints: {dead[1]}\n")
    r = run_cli(["show"], env=cli_env(None, "/x", CNI_IPAM_CONFIG=conf), timeout=60)
    assert f"{dead[1]} (connection refused)" in r.error_line
    assert f"(endpoints from the CLI config file {conf})" in r.error_line


def test_https_against_plain_etcd_hint(etcd_server):
    if not etcd_server.endpoint.startswith("http://"):
        return
    env = cli_env(etcd_server.endpoint.replace("http://", "https://"), "/x")
    r = run_cli(["show", "--timeout", "3600"], env=env, timeout=60)
    assert r.rc == 1 and "then use an http:// URL" in r.error_line


# ----------------------------------------------------------------------------- unknown ipam keys

def test_unknown_ipam_key_is_warned_with_the_closest_key(etcd_server, etcd_prefix, tmp_path):
    """A typo (`etcd_endpoint`) is ignored but said: on stderr and in the log file, never on
    stdout (the CNI result stays valid JSON)."""
    from tests.plugin_helpers import exec_plugin, netconf, seed_store
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, etcd_endpoint="http://127.0.0.1:1")
    with seed_store(etcd_server.endpoint, etcd_prefix):
        r = exec_plugin("ADD", conf)
    assert r.rc == 0, r.stdout + r.stderr
    assert r.out["ips"] and json.loads(r.stdout) == r.out
    assert "unknown key 'etcd_endpoint' is ignored (did you mean 'etcd_endpoints'?)" in r.stderr
    log = (tmp_path / "cni-ipam.log").read_text()
    assert "WARNING" in log and "did you mean 'etcd_endpoints'?" in log
    # a correct config says nothing on stderr
    good = netconf(etcd_server.endpoint, etcd_prefix, tmp_path)
    r = exec_plugin("ADD", good, container="c2")
    assert r.rc == 0 and "unknown key" not in r.stderr
    # nested sections too; the error result on stdout stays the spec's JSON
    bad = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, kubernetes={"kubeconfg": "/nope"})
    r = exec_plugin("ADD", bad, container="c3")
    assert r.rc != 0 and r.out["code"] == 7
    assert "ipam.kubernetes: unknown key 'kubeconfg' is ignored (did you mean 'kubeconfig'?)" in r.stderr


def test_known_keys_list_matches_the_config_fields():
    from cni_ipam import config
    assert set(config._KNOWN_KEYS) == set(config.IpamConfig.__record_fields__)


def test_a_clean_config_does_not_load_difflib():
    import subprocess
    import sys
    code = ("import sys; from cni_ipam.config import parse_ipam_config\n"
            "parse_ipam_config({'type': 'cni-ipam', 'etcd_endpoints': 'http://127.0.0.1:2379'})\n"
            "a = 'difflib' in sys.modules\n"
            "parse_ipam_config({'type': 'cni-ipam', 'etcd_endpoint': 'http://127.0.0.1:2379'})\n"
            "print(a, 'difflib' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["False", "True"], p.stderr
    assert "did you mean 'etcd_endpoints'?" in p.stderr


# ----------------------------------------------------------------------------- check exit codes

def test_check_exit_codes(cli, ipam, tmp_path):
    # no pools at all under the prefix: said, and "could not check" (3), not "clean"
    r = cli("check")
    assert r.rc == 3 and "nothing to check: no pools" in r.error_line and "prefix" in r.error_line
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    r = cli("check")
    assert r.rc == 0 and r.stdout.startswith("clean: 2 pool(s)")
    # a problem: 1
    from cni_ipam.datastore import Put
    ipam.ds.commit([], [Put(ipam.keys.handle("junk"), b"not json")])
    r = cli("check")
    assert r.rc == 1 and r.stdout.startswith("undecodable: ") and "  fix: " in r.stdout
    # etcd unreachable, bad settings: 3 (distinct from "problems found")
    r = cli("check", "--etcd-endpoints", f"http://127.0.0.1:{free_port()}")
    assert r.rc == 3 and "connection refused" in r.error_line
    r = cli("check", ETCD_USERNAME="root")
    assert r.rc == 3 and "needs both a user name" in r.error_line
    # usage errors stay argparse's 2
    assert cli("check", "--no-such").rc == 2


# ----------------------------------------------------------------------------- destructive commands ask

def _req(hid, node="node-a", **kw):
    from cni_ipam.ipam.engine import AssignRequest
    return AssignRequest(handle_id=hid, node=node, network="net", container_id=hid, ifname="eth0", **kw)


def test_release_shows_asks_and_needs_yes_without_a_terminal(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    h = ipam.assign(_req("net.web.eth0", pod="web-1", namespace="shop", v4_pools=["external-pool"])).handle
    ip = str(h.addresses[0].ip)
    before = dump(ipam)
    # --dry-run: shows, changes nothing
    r = cli("release", "--ip", ip, "--dry-run")
    assert r.rc == 0 and "would release 1 address(es)" in r.stderr and "shop/web-1 on node-a" in r.stderr
    assert "dry run: nothing released" in r.stdout
    d = cli("release", "--ip", ip, "--dry-run", "-o", "json").json()
    assert d["dryRun"] is True and d["wouldRelease"][0]["ip"] == ip and d["wouldRelease"][0]["pod"] == "web-1"
    # no terminal, no answer: refused with the way out (--yes)
    r = cli("release", "--ip", ip)
    assert r.rc == 1 and "will release 1 address(es)" in r.stderr
    assert "add --yes" in r.stderr.splitlines()[-1] and r.stderr.splitlines()[-1].startswith("cni-ipam: error:")
    # "n": nothing
    r = cli("release", "--handle", "net.web.eth0", stdin="n\n")
    assert r.rc == 0 and "nothing released" in r.stderr
    assert dump(ipam) == before
    # "y" (or --yes): released
    r = cli("release", "--ip", ip, stdin="y\n")
    assert r.rc == 0 and r.stdout.strip() == f"released {ip} (handle net.web.eth0)"
    assert ipam.get_handle("net.web.eth0") is None


def test_pool_delete_force_shows_asks_dry_run(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    h = ipam.assign(_req("net.db.eth0", pod="db-0", namespace="data", v4_pools=["external-pool"])).handle
    ip = str(h.addresses[0].ip)
    before = dump(ipam)
    r = cli("pool", "delete", "external-pool", "--force", "--dry-run")
    assert r.rc == 0 and "1 address(es) in use" in r.stderr and "data/db-0 on node-a" in r.stderr and ip in r.stderr
    assert 'dry run: pool "external-pool" not deleted' in r.stdout
    d = cli("pool", "delete", "external-pool", "--dry-run", "-o", "json").json()
    assert d["refusedWithoutForce"] is True and d["wouldRelease"][0]["inPool"] == [ip]
    r = cli("pool", "delete", "external-pool", "--force")
    assert r.rc == 1 and "add --yes" in r.stderr.splitlines()[-1]
    r = cli("pool", "delete", "external-pool", "--force", stdin="no\n")
    assert r.rc == 0 and "nothing deleted" in r.stderr
    assert dump(ipam) == before
    r = cli("pool", "delete", "external-pool", "--force", stdin="y\n")
    assert r.rc == 0 and "deleted" in r.stdout and "released 1 handle(s)" in r.stdout
    assert {p.name for p in ipam.pools()} == {"internal-pool"}
    # an empty pool is deleted without a question (nothing to release)
    assert cli("pool", "delete", "internal-pool").rc == 0


# ----------------------------------------------------------------------------- apply: every problem at once

FOUR_MISTAKES = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pods}
spec:
  cidr: 10.20.0.0/16
  blockSize: 40
  nodeSelectr: all()
  disabled: "true"
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: more}
spec:
  cidr: 10.30.0.1/16
"""


def test_apply_reports_every_problem_at_once(cli, ipam):
    r = cli("apply", "-f", "-", stdin=FOUR_MISTAKES)
    assert r.rc == 1 and r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "cni-ipam: error: 4 problems in the manifests; nothing was applied"
    body = lines[1:]
    assert len(body) == 4 and all(ln.startswith("  <stdin> document ") for ln in body)
    text = "\n".join(body)
    assert "spec.nodeSelectr: unknown field (did you mean spec.nodeSelector?)" in text
    assert "spec.blockSize: 40 is out of range 20-32" in text
    # a quoted boolean: said to be a quoted string, with the fix
    assert ("spec.disabled: must be a YAML boolean, not the quoted string 'true' (write disabled: true, "
            "without quotes)") in text
    assert 'IPPool "more": spec.cidr: \'10.30.0.1/16\' has host bits set (did you mean 10.30.0.0/16?)' in text
    assert ipam.pools() == []
    # one problem: still exactly one line
    r = cli("apply", "-f", "-", stdin=FOUR_MISTAKES.split("---")[1])
    assert r.rc == 1 and "host bits set" in r.error_line
    # problems against the stored pools are all reported too (overlap + cidr change)
    assert cli("apply", "-f", "-", stdin="apiVersion: cni-ipam/v1\nkind: IPPool\nmetadata: {name: a}\n"
                                        "spec: {cidr: 10.40.0.0/24}\n").rc == 0
    r = cli("apply", "-f", "-", stdin="apiVersion: cni-ipam/v1\nkind: IPPool\nmetadata: {name: a}\n"
                                     "spec: {cidr: 10.41.0.0/24}\n---\napiVersion: cni-ipam/v1\nkind: IPPool\n"
                                     "metadata: {name: b}\nspec: {cidr: 10.40.0.0/25}\n")
    assert r.rc == 1 and r.stderr.splitlines()[0].endswith("2 problems in the manifests; nothing was applied")
    assert "cannot change on an existing pool" in r.stderr and 'overlaps pool "a"' in r.stderr


def test_annotate_warns_about_unknown_keys_and_pools(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    r = cli("namespace", "annotate", "shop", "cni.projectcalico.org/ipv4pool=[\"external-pool\"]")
    assert r.rc == 0 and "namespace/shop annotated" in r.stdout
    assert ("annotation 'cni.projectcalico.org/ipv4pool' is not one the plugin reads (did you mean "
            "cni.projectcalico.org/ipv4pools?)") in r.stderr
    r = cli("namespace", "annotate", "shop", "cni.projectcalico.org/ipv4pools=[\"externl-pool\"]")
    assert r.rc == 0 and "IPv4 pool 'externl-pool' does not exist (yet) (did you mean 'external-pool'?)" in r.stderr
    # an unrelated annotation is nobody's typo: no warning
    r = cli("namespace", "annotate", "shop", "team=payments")
    assert r.rc == 0 and r.stderr == ""


# ----------------------------------------------------------------------------- discoverability

def test_mistyped_commands_get_did_you_mean():
    env = cli_env(f"http://127.0.0.1:{free_port()}", "/x")
    for args, want in ((["shwo"], "did you mean 'show'?"), (["pools"], "did you mean 'pool'?"),
                       (["pool", "lsit"], "did you mean 'list'?"), (["chek"], "did you mean 'check'?")):
        r = run_cli(args, env=env)
        assert r.rc == 2 and want in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_help_shows_examples_environment_and_topics():
    env = cli_env(f"http://127.0.0.1:{free_port()}", "/x")
    top = run_cli(["--help"], env=env).stdout
    assert "examples:" in top and "ETCD_ENDPOINTS" in top and "CNI_IPAM_CONFIG" in top
    assert "cni-ipam help connection" in top
    show = run_cli(["show", "--help"], env=env).stdout
    # the connection block is short in every command's help; the rest is one topic away
    assert "--etcd-endpoints" in show and "--etcd-key-file" not in show and "help connection" in show
    conn = run_cli(["help", "connection"], env=env)
    assert conn.rc == 0 and "--etcd-key-file" in conn.stdout and "etcdCACertFile" in conn.stdout
    assert run_cli(["help", "exit-codes"], env=env).stdout.count("could not check") == 1
    # hidden flags still work
    r = run_cli(["show", "--etcd-key-file", "/nope", "--etcd-cert-file", "/nope"], env=env)
    assert r.rc == 1 and "is not readable" in r.error_line


def test_output_shapes_are_documented():
    """`cni-ipam help output` and docs/cli-output.md are the same text."""
    from cni_ipam.cli.helptext import OUTPUT
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "cli-output.md")) as f:
        assert f.read() == OUTPUT
    env = cli_env(f"http://127.0.0.1:{free_port()}", "/x")
    assert run_cli(["help", "output"], env=env).stdout == OUTPUT


def test_json_fields_documented_are_present(cli, ipam):
    """Every field docs/cli-output.md names for show / check exists in the real output."""
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    ipam.assign(_req("h1", v4_pools=["external-pool"]))
    pool = cli("show", "--blocks", "-o", "json").json()
    assert set(pool["pools"][0]) >= {"name", "cidr", "blockSize", "disabled", "addresses", "capacity", "reserved",
                                     "inUse", "free", "utilization", "blocksClaimed", "blocksTotal",
                                     "blockAddresses", "unclaimedBlocks", "unclaimedBlocksCountedAs"}
    assert set(pool["blocks"][0]) == {"cidr", "pool", "node", "mode", "inUse", "capacity", "free"}
    chk = cli("check", "-o", "json").json()
    assert set(chk) == {"clean", "findings", "summary", "scanned"}
    assert set(cli("config", "show", "-o", "json").json()) == {"strictAffinity", "autoAllocateBlocks",
                                                               "maxBlocksPerHost"}


def test_config_set_is_configure(cli):
    r = cli("config", "set", "--max-blocks-per-host", "4", "-o", "json")
    assert r.rc == 0 and r.json()["maxBlocksPerHost"] == 4
    assert cli("config", "show", "-o", "json").json()["maxBlocksPerHost"] == 4
    assert cli("configure", "--max-blocks-per-host", "0", "-o", "json").json()["maxBlocksPerHost"] == 0


def test_cli_config_file_sets_endpoints_prefix(etcd_server, etcd_prefix, tmp_path, ipam):
    pools = write_file(tmp_path, "pools.yaml", SEED_POOLS)
    env = cli_env(None, None)
    # calicoctl.cfg's shape (apiVersion/kind/spec) ...
    conf = write_file(tmp_path, "cli.yaml", f"apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\n"
                                            f"metadata: {{}}\nspec:\n  datastoreType: etcdv3\n"
                                            f"  etcdEndpoints: {etcd_server.endpoint}\n  etcdPrefix: {etcd_prefix}\n")
    r = run_cli(["apply", "-f", pools], env=dict(env, CNI_IPAM_CONFIG=conf))
    assert r.rc == 0, r.stderr
    assert {p.name for p in ipam.pools()} == {"external-pool", "internal-pool"}
    # ... or a bare mapping; the environment and flags win over the file
    bare = write_file(tmp_path, "bare.yaml", f"etcdEndpoints: [{etcd_server.endpoint}]\n"
                                             f"etcdPrefix: {etcd_prefix}\ntimeoutSeconds: 5\n")
    r = run_cli(["pool", "list", "-o", "json"], env=dict(env, CNI_IPAM_CONFIG=bare))
    assert r.rc == 0 and len(r.json()["items"]) == 2
    r = run_cli(["pool", "list", "-o", "json"], env=dict(env, CNI_IPAM_CONFIG=bare,
                                                         CNI_IPAM_ETCD_PREFIX=etcd_prefix + "-env"))
    assert r.rc == 0 and r.json()["items"] == []
    r = run_cli(["pool", "list", "-o", "json", "--etcd-prefix", etcd_prefix + "-flag"],
                env=dict(env, CNI_IPAM_CONFIG=bare))
    assert r.rc == 0 and r.json()["items"] == []
    # mistakes in the file: one line, with the key it probably meant
    typo = write_file(tmp_path, "typo.yaml", f"etcdEndpoint: {etcd_server.endpoint}\n")
    r = run_cli(["show"], env=dict(env, CNI_IPAM_CONFIG=typo))
    assert "unknown setting 'etcdEndpoint' (did you mean etcdEndpoints?)" in r.error_line
    r = run_cli(["show"], env=dict(env, CNI_IPAM_CONFIG=str(tmp_path / "missing.yaml")))
    assert "no such file" in r.error_line

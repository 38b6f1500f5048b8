"""`cni-ipam apply`: the seed's calicoctl manifest, every validation rule, idempotence, atomicity,
concurrent applies.  The CLI runs as a subprocess against the real etcd."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from cni_ipam.ipam.pool import make_pool
from tests.test_cli_common import (ROOT, SEED_POOLS, cli, cli_env, dump, ipam,  # noqa: F401 (fixtures)
                                   write_file)


def pool_doc(name="p1", api="projectcalico.org/v3", **spec):
    spec.setdefault("cidr", "10.70.0.0/24")
    return {"apiVersion": api, "kind": "IPPool", "metadata": {"name": name}, "spec": spec}


def to_yaml(*docs) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def test_seed_pools_apply_unchanged_and_show_64_addresses(cli, ipam, tmp_path):
    path = write_file(tmp_path, "pools.yaml", SEED_POOLS)
    r = cli("apply", "-f", path)
    assert r.rc == 0, r.stderr
    assert r.stdout.splitlines() == ['IPPool "external-pool" created', 'IPPool "internal-pool" created']
    pools = {p.name: p for p in ipam.pools()}
    ext = pools["external-pool"]
    assert str(ext.cidr) == "172.16.0.0/26" and ext.block_size == 29
    assert ext.ipip_mode == "Always" and ext.nat_outgoing is True and not ext.disabled
    assert ext.node_selector == "all()"
    assert str(pools["internal-pool"].cidr) == "192.168.0.0/16"
    show = cli("show", "-o", "json").json()
    rows = {p["name"]: p for p in show["pools"]}
    assert rows["external-pool"]["addresses"] == 64
    assert rows["external-pool"]["blocksTotal"] == 8 and rows["external-pool"]["inUse"] == 0
    assert rows["internal-pool"]["addresses"] == 65536
    table = cli("show").stdout
    ext_line = next(ln for ln in table.splitlines() if ln.startswith("external-pool"))
    assert " 40 " in ext_line and "172.16.0.0/26" in ext_line      # capacity: 8 bridge /29s of 5
    assert " 64 " in next(ln for ln in cli("show", "-o", "wide").stdout.splitlines()
                          if ln.startswith("external-pool"))      # ADDRESSES (wide)


def test_apply_twice_is_a_noop(cli, ipam, tmp_path):
    path = write_file(tmp_path, "pools.yaml", SEED_POOLS)
    assert cli("apply", "-f", path).rc == 0
    before = dump(ipam)
    r = cli("apply", "-f", path)
    assert r.rc == 0
    assert r.stdout.splitlines() == ['IPPool "external-pool" unchanged', 'IPPool "internal-pool" unchanged']
    assert dump(ipam) == before        # not even a revision moved


def test_json_stdin_our_api_version_and_lists(cli, ipam):
    doc = pool_doc("json-pool", api="cni-ipam/v1", cidr="fd00:10::/112", blockSize=120,
                   nodeSelector="rack == 'r1'", allowedUses=["Workload"], disabled=True)
    r = cli("apply", "-f", "-", stdin=json.dumps(doc))
    assert r.rc == 0, r.stderr
    p = ipam.pools()[0]
    assert (str(p.cidr), p.block_size, p.node_selector, p.allowed_uses, p.disabled) == \
        ("fd00:10::/112", 120, "rack == 'r1'", ["Workload"], True)
    # a JSON array and a kind: List of resources
    r = cli("apply", "-f", "-", stdin=json.dumps([pool_doc("a", cidr="10.1.0.0/24"), pool_doc("b", cidr="10.2.0.0/24")]))
    assert r.rc == 0, r.stderr
    lst = {"apiVersion": "projectcalico.org/v3", "kind": "List",
           "items": [pool_doc("c", cidr="10.3.0.0/24"),
                     {"apiVersion": "cni-ipam/v1", "kind": "IPAMConfig", "spec": {"maxBlocksPerHost": 3}}]}
    r = cli("apply", "-f", "-", stdin=yaml.safe_dump(lst))
    assert r.rc == 0, r.stderr
    assert {p.name for p in ipam.pools()} == {"json-pool", "a", "b", "c"}
    assert ipam.get_config().max_blocks_per_host == 3
    # default block size: 26 for IPv4, 122 for IPv6
    assert cli("apply", "-f", "-", stdin=to_yaml(pool_doc("d4", cidr="10.9.0.0/16"),
                                                 pool_doc("d6", cidr="fd00:99::/64"))).rc == 0
    sizes = {p.name: p.block_size for p in ipam.pools()}
    assert sizes["d4"] == 26 and sizes["d6"] == 122


def test_ipam_config_apply_and_configure(cli, ipam):
    cfg = {"apiVersion": "projectcalico.org/v3", "kind": "IPAMConfiguration", "metadata": {"name": "default"},
           "spec": {"strictAffinity": True, "autoAllocateBlocks": False, "maxBlocksPerHost": 2}}
    r = cli("apply", "-f", "-", stdin=yaml.safe_dump(cfg))
    assert r.rc == 0, r.stderr
    assert cli("config", "show", "-o", "json").json() == {"strictAffinity": True, "autoAllocateBlocks": False,
                                                          "maxBlocksPerHost": 2}
    # configure changes only what it is given; nonsense combinations are refused
    r = cli("configure", "--strict-affinity", "false")
    assert r.rc == 1 and "autoAllocateBlocks false needs strictAffinity true" in r.error_line
    assert ipam.get_config().strict_affinity is True
    r = cli("configure", "--auto-allocate-blocks", "true", "--max-blocks-per-host", "0")
    assert r.rc == 0, r.stderr
    r = cli("configure", "--strict-affinity", "false", "-o", "json")
    assert r.json() == {"strictAffinity": False, "autoAllocateBlocks": True, "maxBlocksPerHost": 0}
    c = ipam.get_config()
    assert (c.strict_affinity, c.auto_allocate_blocks, c.max_blocks_per_host) == (False, True, 0)
    assert "nothing to change" in cli("configure").error_line
    assert cli("configure", "--max-blocks-per-host", "-1").rc == 2


def test_update_and_round_trip(cli, ipam):
    assert cli("apply", "-f", "-", stdin=SEED_POOLS).rc == 0
    changed = SEED_POOLS.replace("  natOutgoing: true\n---", "  natOutgoing: false\n  disabled: true\n---", 1)
    r = cli("apply", "-f", "-", stdin=changed)
    assert r.rc == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith('IPPool "external-pool" configured')
    assert "disabled: false -> true" in first and "natOutgoing: true -> false" in first
    assert r.stdout.splitlines()[1] == 'IPPool "internal-pool" unchanged'
    # pool get -o yaml is a manifest apply accepts: applying it changes nothing
    y = cli("pool", "get", "external-pool", "-o", "yaml").stdout
    before = dump(ipam)
    r = cli("apply", "-f", "-", stdin=y)
    assert r.rc == 0 and r.stdout.strip() == 'IPPool "external-pool" unchanged'
    lst = cli("pool", "list", "-o", "yaml").stdout
    r = cli("apply", "-f", "-", stdin=lst)
    assert r.rc == 0 and r.stdout.count("unchanged") == 2
    assert dump(ipam) == before


def test_dry_run_writes_nothing(cli, ipam):
    r = cli("apply", "-f", "-", "--dry-run", stdin=SEED_POOLS)
    assert r.rc == 0 and "created (dry run)" in r.stdout
    assert dump(ipam) == {}


# --------------------------------------------------------------------------- validation

EXISTING = pool_doc("existing", cidr="10.50.0.0/16", blockSize=26)

BAD = [
    # (id, manifest text, substrings of the error line)
    ("host-bits", to_yaml(pool_doc(cidr="10.70.0.1/24")), ['IPPool "p1"', "spec.cidr", "host bits",
                                                           "10.70.0.0/24"]),
    ("bad-cidr", to_yaml(pool_doc(cidr="10.70.0.0/33")), ['IPPool "p1"', "spec.cidr", "not a valid CIDR"]),
    ("cidr-garbage", to_yaml(pool_doc(cidr="banana/8")), ['IPPool "p1"', "spec.cidr"]),
    ("cidr-no-prefix", to_yaml(pool_doc(cidr="10.70.0.0")), ['IPPool "p1"', "spec.cidr", "prefix length"]),
    ("cidr-not-string", to_yaml(pool_doc(cidr=167772160)), ['IPPool "p1"', "spec.cidr", "must be a string"]),
    ("cidr-missing", to_yaml({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p1"},
                              "spec": {"blockSize": 26}}), ['IPPool "p1"', "spec.cidr: missing"]),
    ("block-too-big-v4", to_yaml(pool_doc(blockSize=19, cidr="10.0.0.0/8")),
     ['IPPool "p1"', "spec.blockSize", "out of range 20-32"]),
    ("block-too-small-v4", to_yaml(pool_doc(blockSize=33)), ['IPPool "p1"', "spec.blockSize", "20-32"]),
    ("block-range-v6", to_yaml(pool_doc(cidr="fd00::/64", blockSize=115)),
     ['IPPool "p1"', "spec.blockSize", "116-128 for IPv6"]),
    ("block-larger-than-pool", to_yaml(pool_doc(cidr="10.70.0.0/24", blockSize=22)),
     ['IPPool "p1"', "spec.blockSize", "larger than the pool 10.70.0.0/24"]),
    ("block-not-int", to_yaml(pool_doc(blockSize="29")), ['IPPool "p1"', "spec.blockSize", "integer"]),
    ("link-local-v4", to_yaml(pool_doc(cidr="169.254.0.0/16", blockSize=26)),
     ['IPPool "p1"', "spec.cidr", "link-local", "169.254.0.0/16"]),
    ("link-local-v4-inside", to_yaml(pool_doc(cidr="169.254.10.0/24")), ['IPPool "p1"', "link-local"]),
    ("link-local-v6", to_yaml(pool_doc(cidr="fe80::/64")), ['IPPool "p1"', "spec.cidr", "link-local", "fe80::/10"]),
    ("unknown-spec-field", to_yaml(pool_doc(blocksize=26)),
     ['IPPool "p1"', "spec.blocksize: unknown field", "did you mean spec.blockSize"]),
    ("unknown-spec-field-2", to_yaml(pool_doc(natOutgoingg=True)), ['IPPool "p1"', "spec.natOutgoingg", "unknown"]),
    ("unknown-top-field", to_yaml({**pool_doc(), "status": {}}), ["status: unknown field"]),
    ("unknown-metadata-field", to_yaml({**pool_doc(), "metadata": {"name": "p1", "nmespace": "x"}}),
     ["metadata.nmespace: unknown field"]),
    ("bad-selector", to_yaml(pool_doc(nodeSelector="has(rack) && ")),
     ['IPPool "p1"', "spec.nodeSelector", "invalid selector at position 13"]),
    ("bad-selector-2", to_yaml(pool_doc(nodeSelector="rack = 'a'")),
     ['IPPool "p1"', "spec.nodeSelector", "position 5"]),
    ("ipip-mode", to_yaml(pool_doc(ipipMode="Sometimes")), ['IPPool "p1"', "spec.ipipMode", "Never, Always, CrossSubnet"]),
    ("ipip-v6", to_yaml(pool_doc(cidr="fd00::/112", blockSize=122, ipipMode="Always")),
     ['IPPool "p1"', "spec.ipipMode", "IPv6"]),
    ("ipip-and-vxlan", to_yaml(pool_doc(ipipMode="Always", vxlanMode="Always")), ['IPPool "p1"', "spec.vxlanMode"]),
    ("disabled-not-bool", to_yaml(pool_doc(disabled="yes please")), ['IPPool "p1"', "spec.disabled", "true or false"]),
    ("nat-not-bool", to_yaml(pool_doc(natOutgoing=1)), ['IPPool "p1"', "spec.natOutgoing"]),
    ("allowed-uses", to_yaml(pool_doc(allowedUses=["Workload", "Bananas"])), ['IPPool "p1"', "spec.allowedUses",
                                                                            "Bananas"]),
    ("missing-name", to_yaml({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {},
                              "spec": {"cidr": "10.70.0.0/24"}}), ["metadata.name: missing"]),
    ("bad-name", to_yaml(pool_doc("Bad_Name")), ["metadata.name", "'Bad_Name' is not a valid name"]),
    ("bad-api-version", to_yaml(pool_doc(api="projectcalico.org/v1")), ["apiVersion", "projectcalico.org/v1",
                                                                        "not supported"]),
    ("bad-kind", to_yaml({**pool_doc(), "kind": "IPPoool"}), ["kind", "IPPoool", "not supported"]),
    ("not-a-mapping", "- just\n- a list\n", ["not a mapping"]),
    ("duplicate-name", to_yaml(pool_doc("dup", cidr="10.1.0.0/24"), pool_doc("dup", cidr="10.2.0.0/24")),
     ['IPPool "dup"', "metadata.name: defined twice"]),
    ("overlap-in-file", to_yaml(pool_doc("a", cidr="10.1.0.0/16"), pool_doc("b", cidr="10.1.128.0/24")),
     ["spec.cidr", "overlaps pool", "10.1.0.0/16", "10.1.128.0/24"]),
    ("overlap-existing", to_yaml(pool_doc("newer", cidr="10.50.128.0/20")),
     ['IPPool "newer"', "spec.cidr", 'overlaps pool "existing" (10.50.0.0/16)']),
    ("cidr-immutable", to_yaml(pool_doc("existing", cidr="10.50.0.0/17", blockSize=26)),
     ['IPPool "existing"', "spec.cidr: cannot change on an existing pool", "10.50.0.0/16 -> 10.50.0.0/17"]),
    ("blocksize-immutable", to_yaml(pool_doc("existing", cidr="10.50.0.0/16", blockSize=28)),
     ['IPPool "existing"', "spec.blockSize: cannot change", "26 -> 28"]),
    ("invalid-yaml", "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: [unclosed\n",
     ["invalid YAML at line"]),
    ("duplicate-yaml-key", "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: p1\nspec:\n"
                           "  cidr: 10.70.0.0/24\n  cidr: 10.71.0.0/24\n", ["invalid YAML", "duplicate key 'cidr'"]),
    ("invalid-json", '{"apiVersion": "projectcalico.org/v3", "kind": ', ["invalid JSON"]),
    ("config-nonsense", to_yaml({"apiVersion": "cni-ipam/v1", "kind": "IPAMConfig",
                                 "spec": {"strictAffinity": False, "autoAllocateBlocks": False}}),
     ["IPAMConfig", "spec", "autoAllocateBlocks false needs strictAffinity true"]),
    ("config-negative", to_yaml({"apiVersion": "cni-ipam/v1", "kind": "IPAMConfig",
                                 "spec": {"maxBlocksPerHost": -1}}), ["IPAMConfig", "spec.maxBlocksPerHost"]),
    ("config-name", to_yaml({"apiVersion": "cni-ipam/v1", "kind": "IPAMConfig", "metadata": {"name": "mine"},
                             "spec": {}}), ["IPAMConfig", "metadata.name", "'default'"]),
    ("config-unknown", to_yaml({"apiVersion": "cni-ipam/v1", "kind": "IPAMConfig",
                                "spec": {"strictAfinity": True}}), ["spec.strictAfinity", "did you mean spec.strictAffinity"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_validation_errors_are_one_line_and_apply_nothing(cli, ipam, case):
    _, text, needles = case
    ipam.create_pool(make_pool("existing", "10.50.0.0/16", 26))    # == EXISTING, set up in-process
    # a valid pool first in the same file: it must not be applied either
    good = to_yaml(pool_doc("good-one", cidr="10.200.0.0/24"))
    before = dump(ipam)
    r = cli("apply", "-f", "-", stdin=good + "---\n" + text if not text.lstrip().startswith("{") else text)
    assert r.rc == 1, r
    line = r.error_line
    for n in needles:
        assert n in line, (n, line)
    assert r.stdout == ""
    assert dump(ipam) == before


def test_overlap_across_families_is_fine_and_v6_overlap_is_not(cli, ipam):
    r = cli("apply", "-f", "-", stdin=to_yaml(pool_doc("v4", cidr="10.1.0.0/16"),
                                              pool_doc("v6", cidr="fd00:1::/64")))
    assert r.rc == 0, r.stderr
    r = cli("apply", "-f", "-", stdin=to_yaml(pool_doc("v6b", cidr="fd00:1::/96", blockSize=122)))
    assert r.rc == 1 and 'overlaps pool "v6" (fd00:1::/64)' in r.error_line


def test_unreadable_manifests(cli, tmp_path):
    assert "cannot read" in cli("apply", "-f", str(tmp_path / "nope.yaml")).error_line
    assert "is a directory" in cli("apply", "-f", str(tmp_path)).error_line
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: caf\xe9\n")
    assert "not UTF-8" in cli("apply", "-f", str(p)).error_line
    assert "no resources found" in cli("apply", "-f", "-", stdin="# nothing here\n---\n").error_line


def test_multiple_files_are_one_transaction(cli, ipam, tmp_path):
    a = write_file(tmp_path, "a.yaml", to_yaml(pool_doc("a", cidr="10.1.0.0/24")))
    b = write_file(tmp_path, "b.yaml", to_yaml(pool_doc("b", cidr="10.1.0.128/25")))
    r = cli("apply", "-f", a, "-f", b)
    assert r.rc == 1 and "b.yaml" in r.error_line and "overlaps" in r.error_line
    assert ipam.pools() == []


# --------------------------------------------------------------------------- concurrency

def _spawn_apply(env, text):
    return subprocess.Popen([sys.executable, "-m", "cni_ipam", "apply", "-f", "-"], env=env, cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _race(etcd_server, etcd_prefix, texts, delay):
    env = cli_env(etcd_server.endpoint, etcd_prefix, CNI_IPAM_TEST_APPLY_DELAY=delay)
    procs = [_spawn_apply(env, t) for t in texts]
    outs = []
    try:
        for p, t in zip(procs, texts):   # feed every stdin first: they all read and plan at once
            p.stdin.write(t.encode())
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
            outs.append((p.returncode, p.stdout.read().decode(), p.stderr.read().decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
    return outs


@pytest.mark.parametrize("delay", ["1.5", None], ids=["forced-overlap", "free-running"])
def test_concurrent_applies_on_one_pool_have_one_winner(etcd_server, etcd_prefix, ipam, delay):
    """Two applies of the same pool name with different CIDRs.  With the read->commit window
    widened (both read before either commits) the loser fails its CAS; free-running, it may
    instead see the winner's pool and refuse the CIDR change.  Either way: exactly one
    winner, a clear one-line error for the other, and the stored pool is one complete spec."""
    a = to_yaml(pool_doc("race", cidr="10.60.0.0/24", blockSize=28, natOutgoing=True))
    b = to_yaml(pool_doc("race", cidr="10.61.0.0/24", blockSize=29, ipipMode="Always"))
    outs = _race(etcd_server, etcd_prefix, [a, b], delay)
    rcs = sorted(o[0] for o in outs)
    assert rcs == [0, 1], outs
    winner = 0 if outs[0][0] == 0 else 1
    loser_err = outs[1 - winner][2]
    lines = [ln for ln in loser_err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cni-ipam: error: ") and "Traceback" not in loser_err
    if delay:
        assert "changed while this apply was running" in lines[0] and "nothing was applied" in lines[0]
    else:
        assert ("changed while this apply was running" in lines[0]) or ("cannot change" in lines[0])
    (p,) = ipam.pools()
    if winner == 0:
        assert (str(p.cidr), p.block_size, p.nat_outgoing, p.ipip_mode) == ("10.60.0.0/24", 28, True, None)
    else:
        assert (str(p.cidr), p.block_size, p.nat_outgoing, p.ipip_mode) == ("10.61.0.0/24", 29, None, "Always")


def test_concurrent_applies_of_different_overlapping_pools(etcd_server, etcd_prefix, ipam):
    """Different names, overlapping CIDRs, both read before either commits: the pool-set
    marker makes the second commit fail, so the store never holds two overlapping pools."""
    a = to_yaml(pool_doc("left", cidr="10.80.0.0/16"))
    b = to_yaml(pool_doc("right", cidr="10.80.64.0/20"))
    outs = _race(etcd_server, etcd_prefix, [a, b], "1.5")
    assert sorted(o[0] for o in outs) == [0, 1], outs
    assert len(ipam.pools()) == 1

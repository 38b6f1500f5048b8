"""The short chaos run (~150 operations, part of ``make test``); ``make chaos`` runs >= 1,000.

Plugin: ``$CNI_IPAM_PLUGIN`` (auto | binary | python | path); by default the onedir binary when
it is built from the current sources, else ``python -m cni_ipam``.  Seed: ``$CHAOS_SEED``, else
random (printed in the summary, which is shown on failure and with ``-s``).
"""
import json
import os

import pytest

from tests.chaos.harness import run_chaos


@pytest.mark.slow
def test_chaos_short(capsys):
    lines: list[str] = []
    summary = run_chaos(ops=int(os.environ.get("CHAOS_SHORT_OPS", 150)), nodes=20,
                        plugin=os.environ.get("CNI_IPAM_PLUGIN", "auto"), log=lines.append)
    report = "\n".join(lines + summary.lines())
    with capsys.disabled():
        print("\n" + "\n".join(summary.lines()))
    assert not summary.violations, report
    s = summary
    assert s.ops >= 150 and s.execs["ADD"] > 0 and s.execs["DEL"] > 0 and s.execs["GC"] > 0, report
    assert s.faults["leader_kill"] == 2 and s.faults["member_pause"] >= 1, report
    assert s.duplicates == 0 and s.leaks_after_gc == 0 and s.leaks_after_drain == 0, report
    assert sum(s.plugin_kills.values()) > 0, report
    assert set(s.error_codes) <= {11} and s.tracebacks == 0, report


# ----------------------------------------------------------------------------- the checker has teeth
def _block(cidr, alloc, node="n1", free=()):
    return json.dumps({"cidr": cidr, "pool": "p", "node": node, "mode": "bridge",
                       "allocations": alloc, "free": list(free)}).encode()


def _handle(hid, node, *ips_blocks):
    return json.dumps({"id": hid, "node": node,
                       "addresses": [{"ip": ip, "block": b} for ip, b in ips_blocks]}).encode()


def test_checker_finds_each_kind_of_inconsistency():
    from tests.chaos.harness import PREFIX, parse_state
    r = PREFIX + "/v1/"
    good = {
        r + "blocks/v4/0a3c0000-28": _block("10.60.0.0/28", {"2": "net.a.eth0"}, free=[3]),
        r + "affinity/n1/v4/0a3c0000-28": b"{}",
        r + "handles/net.a.eth0": _handle("net.a.eth0", "n1", ("10.60.0.2", "10.60.0.0/28")),
    }
    assert parse_state(good).problems == []
    cases = {
        "overlap": {r + "blocks/v4/0a3c0000-27": _block("10.60.0.0/27", {}),
                    r + "affinity/n1/v4/0a3c0000-27": b"{}"},
        "same ip in two handles": {r + "handles/net.b.eth0": _handle("net.b.eth0", "n1",
                                                                      ("10.60.0.2", "10.60.0.0/28"))},
        "allocation without handle": {r + "blocks/v4/0a3c0000-28": _block("10.60.0.0/28", {"2": "net.a.eth0",
                                                                                             "4": "net.x.eth0"})},
        "handle pointing nowhere": {r + "handles/net.c.eth0": _handle("net.c.eth0", "n1",
                                                                       ("10.60.1.2", "10.60.1.0/28"))},
        "affinity without block": {r + "affinity/n2/v4/0a3c0100-28": b"{}"},
        "block without affinity": {r + "affinity/n1/v4/0a3c0000-28": None},
        "key and cidr disagree": {r + "blocks/v4/0a3c0000-28": _block("10.60.0.16/28", {"2": "net.a.eth0"})},
        "free list overlaps allocations": {r + "blocks/v4/0a3c0000-28": _block("10.60.0.0/28", {"2": "net.a.eth0"},
                                                                                free=[2])},
        "undecodable": {r + "handles/net.z.eth0": b"{"},
    }
    for name, change in cases.items():
        kvs = dict(good)
        for k, v in change.items():
            if v is None:
                kvs.pop(k)
            else:
                kvs[k] = v
        assert parse_state(kvs).problems, name


def test_model_finds_client_side_duplicates_and_unexplained_handles():
    from tests.chaos.harness import Chaos
    c = Chaos(ops=10, seed=1, log=lambda *a: None)
    ev = {"ev": "exec", "stdout": "", "traceback": False, "hung": False, "killed": False, "stderr": ""}
    add = lambda node, cid, ip, t0, t1: dict(ev, verb="ADD", node=node, net="chaos-br", cid=cid, t0=t0, t1=t1,  # noqa
                                            rc=0, ips=[ip], stdout=json.dumps(
                                                {"cniVersion": "1.1.0", "ips": [{"address": ip + "/28"}]}))
    c._on_exec(add("n1", "a", "10.60.0.2", 0.0, 1.0))
    c._on_exec(dict(ev, verb="DEL", node="n1", net="chaos-br", cid="a", t0=5.0, t1=6.0, rc=0))
    c._on_exec(add("n2", "b", "10.60.0.2", 5.5, 7.0))    # after a's DEL started: fine
    assert c._client_duplicates() == 0
    c._on_exec(add("n3", "c", "10.60.0.2", 6.5, 8.0))    # b still holds it: a duplicate
    assert c._client_duplicates() == 1 and c.summary.violations
    # an ADD whose result was not one CNI error JSON, and a 999, are violations too
    n = len(c.summary.violations)
    c._on_exec(dict(ev, verb="ADD", node="n1", net="chaos-br", cid="d", t0=9, t1=10, rc=1, stdout="oops\n"))
    c._on_exec(dict(ev, verb="ADD", node="n1", net="chaos-br", cid="e", t0=9, t1=10, rc=1,
                    stdout='{"cniVersion": "1.1.0", "code": 999, "msg": "internal error"}\n'))
    assert len(c.summary.violations) == n + 2

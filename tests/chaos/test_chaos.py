"""The short chaos run (~150 operations, part of ``make test``); ``make chaos`` runs >= 1,000.

Plugin: ``$CNI_IPAM_PLUGIN`` (auto | binary | python | path); by default the onedir binary when
it is built from the current sources, else ``python -m cni_ipam``.  Seed: ``$CHAOS_SEED``, else
random (printed in the summary, which is shown on failure and with ``-s``).
"""
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

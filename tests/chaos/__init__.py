"""Chaos test: 20 simulated nodes run ADD/DEL through the real plugin against a 3-member etcd
cluster while members are killed and paused and plugin processes are SIGKILLed.

``python -m tests.chaos --ops 1000`` (what ``make chaos`` runs) or the short version in
``tests/chaos/test_chaos.py`` (part of ``make test``).  See ``harness.py``.
"""

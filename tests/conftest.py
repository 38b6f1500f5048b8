"""Shared pytest fixtures: a real etcd (session), a per-test key prefix, a 3-member cluster."""
from __future__ import annotations

import os
import re
import secrets
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(ROOT))

from tests.support.etcd import EtcdCluster, EtcdServer, delete_prefix  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long-running test (deselect with -m 'not slow')")


#: tests that share machine-wide things (the built bundle in dist/, containerd, podman, network
#: namespaces, the image build): under ``pytest -n 2 --dist loadgroup`` (``make test``) they all
#: run one after the other on ONE worker, while the other worker runs the rest
SERIAL_DIRS = ("e2e", "chaos")


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            part = Path(str(item.fspath)).resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        if part in SERIAL_DIRS:
            item.add_marker(pytest.mark.xdist_group("serial"))


@pytest.fixture(scope="session")
def etcd_server():
    """An etcd for the whole session: ``$CNI_IPAM_TEST_ETCD`` (an endpoint URL) if set,
    else a throw-away single-member ``EtcdServer``.  Has ``.endpoint``."""
    external = os.environ.get("CNI_IPAM_TEST_ETCD", "").strip()
    if external:
        yield types.SimpleNamespace(endpoint=external, endpoints=[external])
        return
    server = EtcdServer(name="pytest")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix(request, etcd_server):
    """A key prefix unique to this test (``/t/<test>-<hex>``); everything under it is deleted after."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:80] or "test"
    prefix = f"/t/{name}-{secrets.token_hex(4)}"
    yield prefix
    delete_prefix(etcd_server.endpoint, prefix)


@pytest.fixture(scope="module")
def etcd_cluster():
    """A 3-member ``EtcdCluster`` for failover tests (call ``.heal()`` after breaking it)."""
    cluster = EtcdCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

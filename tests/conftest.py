"""Shared pytest fixtures: a real etcd (session), a per-test key prefix, a 3-member cluster."""
from __future__ import annotations

import faulthandler
import os
import re
import secrets
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(ROOT))

from tests.support.etcd import EtcdCluster, EtcdServer, delete_prefix  # noqa: E402


def pytest_configure(config):
    global _STDERR_FD
    config.addinivalue_line("markers", "slow: a long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "time_limit(seconds): a hard limit on the test's setup + call + teardown: "
                                       "past it the test fails with every thread's stack on stderr (see conftest)")
    if _STDERR_FD is None:
        _STDERR_FD = os.dup(2)   # the real stderr (output capture is suspended here): dumps reach the CI log


# ----------------------------------------------------------------------------- time limit
#: (pytest-timeout is not a dependency: this is the whole mechanism, standard library only)
#: how long past its limit a test that cannot be interrupted may take before the run is ended
TIME_LIMIT_GRACE = float(os.environ.get("CNI_IPAM_TEST_TIME_LIMIT_GRACE", "30"))
#: a teardown still gets this long after the limit failed the call (closing clients, healing etcd)
TEARDOWN_MIN = 10.0
_STDERR_FD: int | None = None
_limit: dict = {}   # the current test's {"nodeid", "seconds", "deadline"}


class TimeLimitExceeded(BaseException):
    """Raised in the main thread when a ``time_limit`` test overruns (a BaseException: an ``except
    Exception`` in the code under test does not swallow it; pytest reports it as the test's failure)."""


def _on_alarm(signum, frame):
    fd = _STDERR_FD if _STDERR_FD is not None else 2
    msg = (f"{_limit.get('nodeid')}: still running after its time limit of {_limit.get('seconds', 0):g}s")
    try:
        os.write(fd, f"\n=== {msg}: the stack of every thread ===\n".encode())
        faulthandler.dump_traceback(file=fd, all_threads=True)
    except OSError:
        pass
    raise TimeLimitExceeded(f"{msg} (time_limit marker; every thread's stack is dumped on stderr)")


def _time_limited(item) -> bool:
    return bool(_limit) and _limit.get("nodeid") == item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """``@pytest.mark.time_limit(s)``: a hang fails the test instead of the CI job's own limit.

    At the limit the main thread gets SIGALRM (armed during each phase only, never in pytest's
    own code between them): every thread's stack is written to stderr and ``TimeLimitExceeded``
    fails the phase.  A test stuck where Python cannot interrupt it (in C, holding the GIL):
    ``faulthandler`` dumps every stack and ends the process ``TIME_LIMIT_GRACE`` s later --
    a failed run with a diagnosis, never a hang.  (Not combined with pytest's own
    ``faulthandler_timeout``: faulthandler keeps one timer.)"""
    marker = item.get_closest_marker("time_limit")
    if marker is None:
        yield
        return
    seconds = float(marker.args[0] if marker.args else marker.kwargs["seconds"])
    _limit.update(nodeid=item.nodeid, seconds=seconds, deadline=time.monotonic() + seconds)
    faulthandler.dump_traceback_later(seconds + TIME_LIMIT_GRACE, exit=True,
                                      file=_STDERR_FD if _STDERR_FD is not None else sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        _limit.clear()


def _phase(item, minimum: float = 0.5):
    """Arm SIGALRM for the rest of the test's time (main thread only: elsewhere the faulthandler
    backstop alone applies); disarm after the phase."""
    if not _time_limited(item) or threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining = max(minimum, _limit["deadline"] - time.monotonic())
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _phase(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _phase(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield from _phase(item, TEARDOWN_MIN)


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

"""The ``time_limit`` marker (tests/conftest.py): an overrunning test fails with every thread's
stack, and one that Python cannot interrupt ends the run -- never a hang.  Each case runs a small
test file in its own pytest process, with this repository's conftest as a plugin."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pytest(tmp_path: Path, body: str, *, grace: float = 30.0) -> subprocess.CompletedProcess:
    test_file = tmp_path / "test_limited.py"
    test_file.write_text(textwrap.dedent(body))
    env = dict(os.environ, CNI_IPAM_TEST_TIME_LIMIT_GRACE=str(grace))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(test_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_overrun_fails_with_every_stack(tmp_path):
    r = _pytest(tmp_path, """
        import threading, time
        import pytest

        def helper_thread_waiting(ev):
            ev.wait()

        @pytest.mark.time_limit(1)
        def test_hangs():
            ev = threading.Event()
            threading.Thread(target=helper_thread_waiting, args=(ev,), daemon=True).start()
            try:
                threading.Event().wait()      # a hang
            except Exception:                 # not swallowed: the limit is no Exception
                pass
            finally:
                ev.set()

        @pytest.mark.time_limit(5)
        def test_after():
            time.sleep(0.1)                   # the run goes on
        """)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed" in r.stdout, r.stdout
    assert "TimeLimitExceeded" in r.stdout and "still running after its time limit of 1s" in r.stdout
    # every thread's stack, on the real stderr: the main thread's test and the helper thread
    assert "the stack of every thread" in r.stderr, r.stderr
    assert "test_hangs" in r.stderr and "helper_thread_waiting" in r.stderr, r.stderr


def test_uninterruptible_hang_ends_the_run(tmp_path):
    """Stuck in C while holding the GIL (no signal handler can run): the stacks are dumped and the
    process ends once the grace period is over."""
    r = _pytest(tmp_path, """
        import ctypes
        import pytest

        @pytest.mark.time_limit(1)
        def test_stuck_in_c():
            libc = ctypes.PyDLL(None)         # PyDLL: the call keeps the GIL
            mutex = ctypes.create_string_buffer(64)   # zeroed = PTHREAD_MUTEX_INITIALIZER
            libc.pthread_mutex_lock(mutex)
            libc.pthread_mutex_lock(mutex)    # a self-deadlock that no signal ends
        """, grace=2)
    assert r.returncode != 0
    assert "passed" not in r.stdout
    assert "Timeout" in r.stderr and "test_stuck_in_c" in r.stderr, r.stderr

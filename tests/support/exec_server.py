"""``cni-ipam exec-server`` of a built binary as a child process: what the tests, the benchmarks
and ``make demo`` start (cni_ipam/execserver.py)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


class ExecServerProcess:
    """The server on ``sock``, its stderr appended to ``log``.  Ready when its start-up line
    (written once it listens on ``sock``) names its pid -- not when ``sock`` exists, which a
    server it takes the socket over from has already made; no probe connection either, so its
    count of connections stays exact.  ``shell``: run it through ``/bin/sh -c shell`` (e.g.
    ``'exec "$0" "$@" <&-'``).  Raises RuntimeError if it does not start."""

    def __init__(self, binary: str, sock, log, *args: str, shell: str | None = None, timeout: float = 30.0):
        self.sock, self.log = Path(sock), Path(log)
        argv = [str(binary), "exec-server", "--socket", str(self.sock), *args]
        if shell is not None:
            argv = ["/bin/sh", "-c", shell, *argv]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/")
        self.terminated = False
        deadline = time.monotonic() + timeout
        while f"(pid {self.proc.pid})" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.end()
                raise RuntimeError(f"the exec server did not start (exit {self.proc.returncode}): "
                                   f"{self.stderr()[-1000:]}")
            time.sleep(0.02)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self) -> None:
        """SIGTERM, once (a second one ends its wait for the execs being served)."""
        self.terminated = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def end(self, timeout: float = 20.0) -> tuple[int, bool]:
        """SIGTERM (unless sent already) and wait: (exit code, whether it had to be killed)."""
        if self.proc.poll() is None and not self.terminated:
            self.terminate()
        try:
            return self.proc.wait(timeout), False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(), True

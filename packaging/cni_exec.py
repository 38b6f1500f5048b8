"""How a CNI exec of the bundle starts and ends; shared by packaging/entry.py (the binary) and
packaging/hello.py (the hello-world bundle, the floor), so both pay exactly the same.

A CNI exec is short and bounded (one verb, then ``exit_now``): no cyclic-garbage collection (the
collector ran 18 times during an ADD, 76.3 -> 72.4 M instructions) and no interpreter
finalization (docs/performance.md, "The bundle's floor").  The CLI keeps both."""
import os
import sys

CNI = "CNI_COMMAND" in os.environ


def begin() -> None:
    if CNI:
        import gc
        gc.disable()


def exit_now(code) -> None:
    """End a CNI exec without ``Py_Finalize``: it tears down every module and collects every
    object, 8-12 M instructions per exec for nothing (the kernel frees the memory anyway).  What
    finalization does that matters is done first (``finish``).  The plugin closes its files,
    sockets and locks itself."""
    os._exit(finish(code))


def finish(code: int) -> int:
    """What Python's finalization does that matters at the end of a CNI exec: non-daemon threads
    are waited for, atexit handlers run, stdout/stderr are flushed.  Returns the exit code (120
    when a flush failed, as Python's own).  Also how the exec server's child ends a served exec
    (cni_ipam/execserver.py)."""
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            if f is not None and not f.closed:
                f.flush()
        except (OSError, ValueError):
            code = 120
    return code

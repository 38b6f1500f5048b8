"""PyInstaller entry point of the cni-ipam binary: the CNI plugin when CNI_COMMAND is set, else the CLI."""
import os
import sys

if "CNI_COMMAND" in os.environ:
    # A CNI exec is short and bounded (one verb, then _exit_now): no cyclic-garbage collection.  The
    # collector ran 18 times during an ADD, 76.3 -> 72.4 M instructions (docs/performance.md,
    # "The bundle's floor"); everything still goes when the process ends.  The CLI keeps it.
    import gc
    gc.disable()

from cni_ipam.main import main  # noqa: E402


def _exit_now(code) -> None:
    """End a CNI exec without the interpreter's finalization (docs/performance.md, "The bundle's floor").

    Py_Finalize tears down every module and collects every object: 8-12 M instructions per exec
    for nothing, the kernel frees the memory anyway.  What finalization does that matters is done
    here: non-daemon threads are waited for, atexit handlers run, stdout/stderr are flushed (a
    failed flush exits 120, as Python does).  The plugin closes its files, sockets and locks itself."""
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
    os._exit(code)


if __name__ == "__main__":
    rc = main()
    if "CNI_COMMAND" in os.environ and (rc is None or isinstance(rc, int)):
        _exit_now(rc or 0)
    sys.exit(rc)

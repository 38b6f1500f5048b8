"""The floor of the packaging: a hello-world bundle built by packaging/cni-ipam.spec with
``--hello`` (same bootloader, spec options, excludes and run-time hooks as the shipped binary,
but none of cni_ipam).  It answers like a CNI VERSION with a constant, importing nothing, so
``bench exec`` can say how much of the binary's VERSION is the packaging itself.  It ends a
CNI exec the way packaging/entry.py does (``_exit_now``: no interpreter finalization)."""
import os
import sys

if "CNI_COMMAND" in os.environ:  # as packaging/entry.py
    import gc
    gc.disable()


def _exit_now(code) -> None:
    """The same as packaging/entry.py's ``_exit_now`` (keep the two alike: this is the floor)."""
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


if sys.argv[1:] == ["version"]:
    sys.stdout.write("cni-ipam hello-world bundle (packaging floor)\n")
else:
    sys.stdin.buffer.read()
    sys.stdout.write('{"cniVersion": "1.1.0", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", '
                     '"0.4.0", "1.0.0", "1.1.0"]}\n')
if "CNI_COMMAND" in os.environ:
    _exit_now(0)

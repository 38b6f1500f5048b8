"""The floor of the packaging: a hello-world bundle built by packaging/cni-ipam.spec with
``--hello`` (same bootloader, spec options, excludes and run-time hooks as the shipped binary,
but none of cni_ipam).  It answers like a CNI VERSION with a constant, importing nothing, so
``bench exec`` can say how much of the binary's VERSION is the packaging itself.  It ends a
CNI exec the way packaging/entry.py does (packaging/cni_exec.py: no interpreter finalization)."""
import sys

import cni_exec  # as packaging/entry.py: the same start and end of a CNI exec

cni_exec.begin()

if sys.argv[1:] == ["version"]:
    sys.stdout.write("cni-ipam hello-world bundle (packaging floor)\n")
else:
    sys.stdin.buffer.read()
    sys.stdout.write('{"cniVersion": "1.1.0", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", '
                     '"0.4.0", "1.0.0", "1.1.0"]}\n')
if cni_exec.CNI:
    cni_exec.exit_now(0)

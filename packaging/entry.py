"""PyInstaller entry point of the cni-ipam binary: the CNI plugin when CNI_COMMAND is set, else the CLI."""
import sys

import cni_exec  # packaging/cni_exec.py: how a CNI exec starts and ends (no GC, no finalization)

cni_exec.begin()

from cni_ipam.main import main  # noqa: E402

if __name__ == "__main__":
    rc = main()
    if cni_exec.CNI and (rc is None or isinstance(rc, int)):
        cni_exec.exit_now(rc or 0)
    sys.exit(rc)

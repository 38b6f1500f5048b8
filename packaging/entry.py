"""PyInstaller entry point of the cni-ipam binary: the CNI plugin when CNI_COMMAND is set, else the CLI."""
import sys

from cni_ipam.main import main

if __name__ == "__main__":
    sys.exit(main())

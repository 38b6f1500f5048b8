"""The admin CLI (CNI_COMMAND unset)."""
from __future__ import annotations

import argparse
import sys

from .. import __version__

SUPPORTED = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def version_text() -> str:
    return f"cni-ipam {__version__}\nCNI spec versions: {', '.join(SUPPORTED)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cni-ipam", description=(
        "cni-ipam: a CNI IPAM plugin (node-affine blocks in etcd). Run by a container runtime with "
        "CNI_COMMAND set it is the plugin; without it, this admin CLI."))
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("version", help="print the version and the supported CNI versions")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.version or args.cmd == "version":
        print(version_text())
        return 0
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``cni-ipam exec-server``: the node's warm plugin (cni_ipam/execserver.py).

    cni-ipam exec-server [--socket /run/cni-ipam/exec.sock] [--max-children 128]

Long-running; SIGTERM or SIGINT stops it (the socket file is removed if it is still its own).
"""
from __future__ import annotations

from .common import CLIError


def register(sub) -> None:
    from ..constants import EXEC_SERVER_MAX_CHILDREN as DEFAULT_MAX_CHILDREN, EXEC_SERVER_SOCKET as DEFAULT_SOCKET
    p = sub.add_parser(
        "exec-server", help="long-running, one per node: serve CNI execs from an already started plugin (faster pod starts)",
        description="Imports the plugin once and listens on a unix socket (root only). The installed "
                    "cni-ipam launcher hands each CNI exec of the same build to it: the exec is served by a "
                    "fork of this process with the exec's own stdin, stdout, stderr and environment, "
                    "~40 ms less per pod start. Without it (or with another build) every exec starts the "
                    "plugin itself, as before. Logs to stderr.")
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"listen here (default {DEFAULT_SOCKET}; the launcher also reads CNI_IPAM_EXEC_SOCKET)")
    p.add_argument("--max-children", type=int, default=DEFAULT_MAX_CHILDREN, metavar="N",
                   help=f"execs served at once (default {DEFAULT_MAX_CHILDREN}); more start the plugin themselves")
    p.set_defaults(func=cmd_exec_server)


def cmd_exec_server(args) -> int:
    from ..execserver import ExecServerError, run
    try:
        if args.max_children < 1:
            raise CLIError("--max-children must be at least 1")
        return run(args.socket, max_children=args.max_children)
    except ExecServerError as e:
        raise CLIError(str(e)) from None

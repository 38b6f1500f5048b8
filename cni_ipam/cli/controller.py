"""`cni-ipam controller` (automatic GC, metrics, one leader) and `cni-ipam node remove`.

The controller's modules (kubernetes, prometheus_client, grpc) are imported only when
the command runs: the plugin's exec path never loads this file's dependencies.
"""
from __future__ import annotations

import argparse
import sys

from .common import CLIError, add_connection_args, add_output_arg, connection_settings, emit


def _seconds(lo: float, hi: float):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g} seconds")
        return v
    return parse


class _Addr(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        setattr(ns, self.dest, values)
        ns.metrics_address_given = True


def register(sub) -> None:
    c = sub.add_parser(
        "controller", help="long-running: free leaked addresses, clean up deleted nodes, Prometheus metrics",
        description="Frees addresses whose Kubernetes pod is gone (after --leak-grace-period, seen twice, "
                    "re-checked against the API just before), releases the blocks and affinities of nodes "
                    "that no longer exist, releases long-empty extra blocks of live nodes, and serves "
                    "Prometheus metrics. Replicas elect one leader through etcd. Without Kubernetes "
                    "credentials it serves metrics only. Logs one line per action on stderr.")
    c.add_argument("--kubeconfig", metavar="FILE",
                   help="the cluster's kubeconfig (default: in-cluster credentials if present, else no Kubernetes)")
    c.add_argument("--leak-grace-period", type=_seconds(0, 86400 * 30), default=900.0, metavar="SECONDS",
                   help="how long an allocation must be without its pod before it is released "
                        "(default 900; 0: at once, after a re-check)")
    c.add_argument("--interval", type=_seconds(0.1, 86400), default=60.0, metavar="SECONDS",
                   help="period of the full reconcile pass (default 60)")
    c.add_argument("--metrics-address", default="0.0.0.0:9094", action=_Addr, metavar="HOST:PORT",
                   help="serve /metrics, /healthz and /readyz here (default 0.0.0.0:9094)")
    c.add_argument("--lease-ttl", type=int, default=15, metavar="SECONDS",
                   help="the leader's lease in etcd; a follower takes over within it (default 15, minimum 2)")
    c.add_argument("--once", action="store_true",
                   help="one full reconcile pass, then exit (0: done; 1: failed). Serves no metrics unless "
                        "--metrics-address is given")
    c.add_argument("--log-file", metavar="FILE", help="also append the log here")
    c.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    add_connection_args(c)
    c.set_defaults(func=cmd_controller, metrics_address_given=False)

    node = sub.choices.get("node")
    if node is not None:    # `node label/get/list` (labels.py) gets a `remove`
        nsub = next(a for a in node._actions if isinstance(a, argparse._SubParsersAction))
    else:
        node = sub.add_parser("node", help="nodes in the IPAM store")
        nsub = node.add_subparsers(dest="node_cmd", metavar="COMMAND")
    r = nsub.add_parser("remove", help="a node is gone for good: release its addresses, blocks and affinities",
                        description="For clusters without the controller's Kubernetes view: releases every "
                                    "address recorded for NODE, deletes its blocks that are then empty and "
                                    "their affinities; blocks still holding addresses of other nodes "
                                    "(borrowed) stay. Shows what it will do and asks, unless --yes.")
    r.add_argument("name", metavar="NODE")
    r.add_argument("-y", "--yes", action="store_true", help="do not ask")
    add_output_arg(r)
    add_connection_args(r)
    r.set_defaults(func=cmd_node_remove)


def cmd_controller(args) -> int:
    from ..datastore import open_datastore
    from ..ipam.engine import IPAM
    from ..log import log
    if args.lease_ttl < 2 or args.lease_ttl > 3600:
        raise CLIError("--lease-ttl must be between 2 and 3600 seconds")
    log.configure(args.log_file, args.log_level, tag="controller")
    log.stderr_level = {"debug": 10, "info": 20, "warning": 30, "error": 40}[args.log_level]
    try:
        import prometheus_client  # noqa: F401
        import kubernetes  # noqa: F401
        import etcd3  # noqa: F401
    except ImportError as e:
        raise CLIError(f"the controller needs the {e.name} Python package (pip install 'cni-ipam[controller]')") \
            from None
    from ..controller.main import ControllerError, parse_address, run
    if not args.once or args.metrics_address_given:
        try:
            parse_address(args.metrics_address)
        except ControllerError as e:
            raise CLIError(str(e)) from None
    c = connection_settings(args)
    try:   # leases need the gRPC transport
        ds = open_datastore(c.endpoints, transport="grpc", timeout=c.timeout, ca_cert=c.ca_cert, cert=c.cert,
                            key=c.key, username=c.username, password=c.password)
    except (ValueError, OSError) as e:
        raise CLIError(f"cannot set up the etcd client: {e}") from None
    try:
        return run(args, IPAM(ds, c.prefix))
    except ControllerError as e:
        raise CLIError(str(e)) from None
    finally:
        ds.close()


def cmd_node_remove(args) -> int:
    from ..ipam import gc
    from .common import open_ipam
    ipam = open_ipam(args)
    rec = gc.node_records(ipam, args.name)
    if not (rec["handles"] or rec["blocks"] or rec["affinities"]):
        raise CLIError(f"node {args.name!r} has nothing in the IPAM store (no address, block or affinity)")
    out = sys.stderr
    n_addr = sum(len(h.addresses) for h in rec["handles"])
    print(f"node {args.name}: {len(rec['handles'])} handle(s) holding {n_addr} address(es), "
          f"{len(rec['blocks'])} block(s), {len(rec['affinities'])} affinity record(s)", file=out)
    for h in rec["handles"]:
        pod = f" pod {h.namespace}/{h.pod}" if h.pod else ""
        print(f"  release {', '.join(str(a.ip) for a in h.addresses) or '-'} (handle {h.id}{pod})", file=out)
    if not args.yes:
        from ..ipam.leaks import _ask
        if not _ask(f"release everything of node {args.name}? [y/N] "):
            print("nothing changed", file=out)
            return 0
    res = gc.remove_node(ipam, args.name)
    emit(args, res, lambda d: "\n".join(
        [f'released {", ".join(r["addresses"]) or "-"} (handle {r["handle"]})' for r in d["released"]] +
        [f"deleted block {b}" for b in d["blocksDeleted"]] +
        [f'kept block {b["block"]}: {b["inUse"]} address(es) of other nodes in use' for b in d["blocksKept"]] +
        [f"deleted affinity for {a}" for a in d["affinitiesDeleted"]]) or f"node {args.name}: nothing to do")
    return 0

"""`show`, `config show`, `configure`."""
from __future__ import annotations

import ipaddress

from .common import (CLIError, add_connection_args, add_output_arg, bar, emit, is_wide, kv_table, open_ipam,
                     parse_bool, pct, table, warn)


def register(sub) -> None:
    s = sub.add_parser("show", help="address usage per pool (and per block), one address, borrowed addresses",
                       description="One row per pool: addresses total / in use / free, blocks claimed, "
                                   "utilization. Streams the blocks page by page.")
    s.add_argument("--blocks", action="store_true", help="also one row per claimed block")
    s.add_argument("--node", metavar="NODE", help="only this node's blocks (pool rows count only them)")
    s.add_argument("--ip", metavar="ADDR", help="who holds this address")
    s.add_argument("--borrowed", action="store_true",
                   help="addresses allocated from a block owned by another node")
    add_output_arg(s, wide=True)
    add_connection_args(s)
    s.set_defaults(func=cmd_show)

    c = sub.add_parser("config", help="the global IPAM settings")
    cs = c.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND")
    show = cs.add_parser("show", help="print the global IPAM settings")
    add_output_arg(show)
    add_connection_args(show)
    show.set_defaults(func=cmd_config_show)

    desc = ("Change some of the global IPAM settings (the others keep their values). Combinations that "
            "make no sense are refused. `cni-ipam configure` and `cni-ipam config set` are the same command.")
    for conf in (sub.add_parser("configure", help="change the global IPAM settings (also: config set)",
                                description=desc),
                 cs.add_parser("set", help="change the global IPAM settings (same as configure)",
                               description=desc)):
        conf.add_argument("--strict-affinity", type=parse_bool, metavar="true|false",
                          help="never borrow addresses from other nodes' blocks")
        conf.add_argument("--auto-allocate-blocks", type=parse_bool, metavar="true|false",
                          help="let nodes claim new blocks when theirs are full")
        conf.add_argument("--max-blocks-per-host", type=_nonneg_int, metavar="N",
                          help="blocks one node may claim (0: no limit)")
        add_output_arg(conf)
        add_connection_args(conf)
        conf.set_defaults(func=cmd_configure)


def _nonneg_int(s: str) -> int:
    import argparse
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if not 0 <= v <= 1_000_000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000000")
    return v


# ----------------------------------------------------------------------------- show

def cmd_show(args) -> int:
    from ..ipam import report
    modes = [m for m, on in (("--ip", args.ip is not None), ("--borrowed", args.borrowed)) if on]
    if len(modes) > 1:
        raise CLIError(f"{' and '.join(modes)} cannot be combined")
    if args.ip is not None:
        if args.blocks:
            raise CLIError("--ip and --blocks cannot be combined")
        try:
            ip = ipaddress.ip_address(args.ip.strip())
        except ValueError:
            raise CLIError(f"--ip: {args.ip!r} is not an IP address") from None
        return _show_ip(args, report.ip_info(open_ipam(args), ip))
    ipam = open_ipam(args)
    if args.borrowed:
        rows = report.borrowed(ipam, node=args.node)

        def fmt(d):
            if not d["borrowed"]:
                return "no borrowed addresses"
            return table(["IP", "BLOCK", "POOL", "BLOCK NODE", "USED BY NODE", "HANDLE", "NAMESPACE", "POD"],
                         [[r["ip"], r["block"], r["pool"], r["blockNode"], r["node"], r["handle"],
                           r["namespace"] or None, r["pod"] or None] for r in d["borrowed"]])
        emit(args, {"borrowed": rows}, fmt)
        return 0
    usages, blocks, bad = report.usage(ipam, node=args.node, blocks=args.blocks)
    for key in bad:
        warn(f"{key} is undecodable and was not counted (run `cni-ipam check`)")
    empty_node = _no_blocks_for_node(ipam, args.node) if (
        args.node and not any(u.blocks_claimed for u in usages)) else None
    data = {"pools": [u.to_dict(args.node) for u in usages]}
    if args.blocks:
        data["blocks"] = blocks
    wide = is_wide(args)

    def fmt(d):  # type: ignore[no-redef]
        if not d["pools"]:
            return "no pools"
        if empty_node:
            return empty_node
        rows = []
        for u in d["pools"]:
            frac = u["inUse"] / u["capacity"] if u["capacity"] else (1.0 if u["addresses"] else 0.0)
            name = u["name"] + (" (disabled)" if u["disabled"] else "")
            blocks_col = f'{u["blocksClaimed"]}/{u["blocksTotal"]}'
            if wide:
                ua = u["unclaimedBlocksCountedAs"]
                rows.append([name, u["cidr"], f'/{u["blockSize"]}', u["addresses"], u["capacity"], u["reserved"],
                             u["ipReserved"], u["inUse"], u["free"], blocks_col,
                             f'{ua["mode"]} ({ua["capacityPerBlock"]}/{u["blockAddresses"]})'
                             if u["unclaimedBlocks"] else None, f"{bar(frac)} {pct(frac)}"])
            else:
                rows.append([name, u["cidr"], u["capacity"], u["inUse"], u["free"], blocks_col,
                             f"{bar(frac, 5)} {pct(frac)}"])
        title = f"node {args.node}: " if args.node else ""
        headers = (["POOL", "CIDR", "BLOCK", "ADDRESSES", "CAPACITY", "RESERVED", "IPRESERVATION", "IN USE", "FREE",
                    "BLOCKS CLAIMED", "UNCLAIMED AS", "UTILIZATION"] if wide else
                   ["POOL", "CIDR", "CAPACITY", "IN USE", "FREE", "BLOCKS", "UTILIZATION"])
        out = (title + "\n" if title else "") + table(headers, rows)
        notes = _capacity_notes(d["pools"])
        held = [u for u in d["pools"] if u.get("ipReserved")]
        if held:   # addresses IPReservations keep out of CAPACITY, counted apart
            line = "Reserved by IPReservations (not in CAPACITY): " + ", ".join(
                f'{u["name"]} {u["ipReserved"]}' for u in held)
            import textwrap
            notes = (notes + "\n" if notes else "") + textwrap.fill(line, 80, break_on_hyphens=False)
        if notes:
            out += "\n" + notes
        if "blocks" in d:
            out += "\n\n" + (table(["BLOCK", "POOL", "NODE", "MODE", "IN USE/CAPACITY", "FREE"],
                                   [[b["cidr"], b["pool"], b["node"], b["mode"],
                                     f'{b["inUse"]}/{b["capacity"]}', b["free"]] for b in d["blocks"]])
                             if d["blocks"] else "no blocks claimed")
        return out
    emit(args, data, fmt)
    return 0


def _capacity_notes(pools: list[dict]) -> str:
    """How unclaimed blocks were counted (one line per mode), under the pool table."""
    by: dict = {}
    for u in pools:
        if u["unclaimedBlocks"]:
            ua = u["unclaimedBlocksCountedAs"]
            by.setdefault((ua["mode"], ua["capacityPerBlock"], u["blockAddresses"]), []).append(u["name"])
    lines = []
    for (mode, per, size), names in by.items():
        why = ("network, gateway and broadcast are never handed out" if mode == "bridge"
               else "every address is handed out")
        lines.append(f"CAPACITY counts each unclaimed block of {', '.join(names)} as a {mode}-mode block: "
                     f"{per} of {size} addresses ({why})")
    import textwrap
    return "\n".join(textwrap.fill(ln, 80, break_on_hyphens=False) for ln in lines)


def _no_blocks_for_node(ipam, node: str) -> str:
    """`show --node X` where X holds nothing: say so, and which nodes do hold blocks."""
    from ..ipam import report
    nodes = report.block_nodes(ipam)
    if not nodes:
        return f"node {node!r} holds no blocks; no node holds any block yet"
    from difflib import get_close_matches
    close = get_close_matches(node, nodes, n=1)
    did = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(nodes[:20]) + (f" and {len(nodes) - 20} more" if len(nodes) > 20 else "")
    return f"node {node!r} holds no blocks ({did}nodes holding blocks: {shown})"


def _show_ip(args, d: dict) -> int:
    def fmt(d):
        if not d["allocated"]:
            where = f' (pool {d["pool"]}, block {d["block"]})' if d["pool"] else ""
            return f'{d["ip"]} is not allocated: {d["reason"]}{where}'
        pod = f'{d["namespace"]}/{d["pod"]}' if d["pod"] else None
        pairs = [("handle", d["handle"]), ("pod", pod), ("node", d["node"]), ("network", d["network"]),
                 ("container", d["containerID"]), ("interface", d["interface"]), ("allocated at", d["created"]),
                 ("pool", d["pool"]), ("block", f'{d["block"]} (node {d["blockNode"]})')]
        kept = d.get("keptFor")
        if kept:   # (ipam/sticky.py) no attachment holds it: it waits for the pod's next incarnation
            pairs[1:2] = [("kept for", f'pod {kept.get("namespace")}/{kept.get("pod")} (StatefulSet '
                                       f'{kept.get("namespace")}/{kept.get("statefulSet")}, ordinal {kept.get("ordinal")}) '
                                       f'since {kept.get("since")}')]
            pairs[3:6] = [("last attachment", f'{kept.get("network")}/{kept.get("containerID")}/{kept.get("ifname")}')]
        if d["reason"]:
            pairs.append(("note", d["reason"]))
        return f'{d["ip"]} is allocated\n' + "\n".join("  " + line for line in kv_table(pairs).splitlines())
    emit(args, d, fmt)
    return 0


# ----------------------------------------------------------------------------- config

def _config_table(cfg) -> str:
    return kv_table([("strictAffinity", "true" if cfg["strictAffinity"] else "false"),
                     ("autoAllocateBlocks", "true" if cfg["autoAllocateBlocks"] else "false"),
                     ("maxBlocksPerHost", f'{cfg["maxBlocksPerHost"]}' + (" (no limit)" if not
                                                                         cfg["maxBlocksPerHost"] else "")),
                     ("ipCooldownSeconds", f'{cfg.get("ipCooldownSeconds", 0)}' + (
                         "" if cfg.get("ipCooldownSeconds") else " (off)")),
                     ("keepStatefulSetIPs", "true" if cfg.get("keepStatefulSetIPs") else "false")])


def cmd_config_show(args) -> int:
    from ..ipam import pools
    kv, cfg = pools.get_config(open_ipam(args))
    emit(args, cfg.to_dict(), lambda d: _config_table(d) + ("" if kv else "\n(defaults: nothing stored yet)"))
    return 0


def cmd_configure(args) -> int:
    from ..ipam import pools
    if args.strict_affinity is None and args.auto_allocate_blocks is None and args.max_blocks_per_host is None:
        raise CLIError("nothing to change: give --strict-affinity, --auto-allocate-blocks and/or "
                       "--max-blocks-per-host")
    before, after = pools.configure(open_ipam(args), strict_affinity=args.strict_affinity,
                                    auto_allocate_blocks=args.auto_allocate_blocks,
                                    max_blocks_per_host=args.max_blocks_per_host)
    changed = before != after

    def fmt(d):
        return ("IPAM config updated:" if changed else "IPAM config unchanged:") + "\n" + _config_table(d)
    emit(args, after.to_dict(), fmt)
    return 0

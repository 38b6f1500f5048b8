"""`apply` and `pool list|get|enable|disable|delete`."""
from __future__ import annotations

import os
import sys
import time

from .common import CLIError, add_connection_args, add_output_arg, emit, is_wide, open_ipam, table, warn, yes_no


def register(sub) -> None:
    a = sub.add_parser("apply", help="create or update pools / the IPAM config from manifests",
                       description="Apply IPPool and IPAMConfig manifests (YAML, multi-document, or JSON; "
                                   "calicoctl's projectcalico.org/v3 or cni-ipam/v1). Everything is "
                                   "validated first; then all changes are written in ONE etcd transaction, "
                                   "or nothing is.")
    a.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                   help="manifest file, or - for stdin (repeatable)")
    a.add_argument("--dry-run", action="store_true", help="validate and show what would change; write nothing")
    add_output_arg(a)
    add_connection_args(a)
    a.set_defaults(func=cmd_apply)

    pool = sub.add_parser("pool", help="list, show, enable, disable, delete pools")
    ps = pool.add_subparsers(dest="pool_cmd", metavar="SUBCOMMAND")
    ls = ps.add_parser("list", aliases=["ls"], help="list pools")
    add_output_arg(ls, wide=True)
    add_connection_args(ls)
    ls.set_defaults(func=cmd_list)
    g = ps.add_parser("get", help="show one pool (-o yaml gives a manifest `apply` accepts)")
    g.add_argument("name")
    add_output_arg(g)
    add_connection_args(g)
    g.set_defaults(func=cmd_get)
    for verb, disabled in (("enable", False), ("disable", True)):
        e = ps.add_parser(verb, help=f"{verb} a pool" + (" (it hands out nothing new; existing "
                                                         "addresses stay)" if disabled else ""))
        e.add_argument("name")
        add_connection_args(e)
        e.set_defaults(func=cmd_enable_disable, disabled=disabled)
    d = ps.add_parser("delete", aliases=["rm"], help="delete a pool with its blocks and affinities",
                      description="Delete a pool. Refuses while addresses are allocated in it unless "
                                  "--force, which releases the handles holding them (all their addresses). "
                                  "Then deletes the pool's blocks and affinities and the pool; never leaves "
                                  "orphan blocks.")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="release allocated addresses first (shows them and asks)")
    d.add_argument("-y", "--yes", action="store_true", help="--force: release without asking")
    d.add_argument("--dry-run", action="store_true", help="show what would be released and deleted; change nothing")
    add_output_arg(d)
    add_connection_args(d)
    d.set_defaults(func=cmd_delete)
    sp = ps.add_parser("split", help="replace a pool by N pools covering the same range (no address moves)",
                       description="Replace pool NAME by N pools NAME-0 .. NAME-(N-1) (N a power of two), each "
                                   "with NAME's settings and an equal part of its cidr. Every block goes to the "
                                   "part that contains it; no allocation moves. One guarded etcd transaction "
                                   "when it fits; else the pool is disabled, its blocks are rewritten in chunks "
                                   "and the pool is replaced by its parts (an interrupted split leaves it "
                                   "disabled: run the command again).")
    sp.add_argument("name")
    sp.add_argument("--into", type=int, required=True, metavar="N", help="number of parts (a power of two)")
    sp.add_argument("--dry-run", action="store_true", help="show the parts; change nothing")
    add_output_arg(sp)
    add_connection_args(sp)
    sp.set_defaults(func=cmd_split)


# ----------------------------------------------------------------------------- apply

def _read_manifest(path: str) -> tuple[bytes, str]:
    from ..ipam.manifest import MAX_MANIFEST_BYTES
    try:
        if path == "-":
            return sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1), "<stdin>"
        if os.path.isdir(path):
            raise CLIError(f"{path} is a directory; give a manifest file")
        with open(path, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1), path
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from None


def cmd_apply(args) -> int:
    from ..ipam import apply, manifest
    if args.filename.count("-") > 1:
        raise CLIError("stdin (-f -) can be given only once")
    resources = []
    docs = []
    for path in args.filename:
        data, source = _read_manifest(path)
        docs.extend(manifest.load_documents(data, source))
    if len(docs) > manifest.MAX_RESOURCES:
        raise CLIError(f"{len(docs)} resources; at most {manifest.MAX_RESOURCES} can be applied at once")
    resources = manifest.parse_resources(docs)
    ipam = open_ipam(args)
    pause = os.environ.get("CNI_IPAM_TEST_APPLY_DELAY")   # test hook: widen the read->commit window

    def before_commit():
        if pause:
            time.sleep(float(pause))
    changes = apply.apply(ipam, resources, dry_run=args.dry_run, before_commit=before_commit)
    suffix = " (dry run)" if args.dry_run else ""

    def fmt(data):
        lines = []
        for c in changes:
            detail = ""
            if c.fields:
                detail = " (" + ", ".join(f"{k}: {_v(o)} -> {_v(n)}" for k, (o, n) in c.fields.items()) + ")"
            lines.append(f'{c.kind} "{c.name}" {c.action}{detail}{suffix}')
        return "\n".join(lines)
    emit(args, {"dryRun": bool(args.dry_run), "resources": [c.to_dict() for c in changes]}, fmt)
    return 0


def _v(x) -> str:
    if x is None:
        return "unset"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, list):
        return ",".join(map(str, x))
    return str(x)


# ----------------------------------------------------------------------------- pool commands

def cmd_list(args) -> int:
    from ..ipam import manifest
    from ..ipam.pools import read_pools
    ipam = open_ipam(args)
    pools, bad = read_pools(ipam)
    for key in bad:
        warn(f"pool record {key} is undecodable (run `cni-ipam check`)")
    data = {"apiVersion": manifest.OUR_API_VERSION, "kind": "IPPoolList",
            "items": [manifest.pool_manifest(p) for p in pools]}

    def fmt(_):
        if not pools:
            return "no pools"
        if is_wide(args):
            rows = [[p.name, p.cidr, p.block_size, yes_no(p.disabled), p.node_selector, ",".join(p.allowed_uses),
                     p.ipip_mode, p.vxlan_mode, yes_no(p.nat_outgoing), yes_no(p.disable_bgp_export)]
                    for p in pools]
            return table(["NAME", "CIDR", "BLOCK SIZE", "DISABLED", "NODE SELECTOR", "ALLOWED USES", "IPIP",
                          "VXLAN", "NAT OUTGOING", "DISABLE BGP EXPORT"], rows)
        rows = [[p.name, p.cidr, p.block_size, yes_no(p.disabled), p.node_selector] for p in pools]
        return table(["NAME", "CIDR", "BLOCK SIZE", "DISABLED", "NODE SELECTOR"], rows)
    emit(args, data, fmt)
    return 0


def cmd_get(args) -> int:
    from ..ipam import manifest, pools, report
    ipam = open_ipam(args)
    _, p = pools.get_pool(ipam, args.name)
    data = manifest.pool_manifest(p)

    def fmt(_):
        from .common import kv_table
        s = data["spec"]
        claimed = report.claimed_blocks(ipam, p)
        pairs = [("name", p.name), ("cidr", s["cidr"]), ("blockSize", s["blockSize"]),
                 ("blocks", f"{p.n_blocks} \u00d7 /{p.block_size} ({p.block_addresses} address"
                            f"{'es' if p.block_addresses != 1 else ''} each), {claimed} claimed"),
                 ("disabled", _v(p.disabled)), ("nodeSelector", p.node_selector),
                 ("allowedUses", ",".join(p.allowed_uses)),
                 ("assignmentMode", p.assignment_mode + ("  (used only when named)" if p.assignment_mode == "Manual"
                                                         else "")),
                 ("namespaceSelector", p.namespace_selector)]
        for k in ("ipipMode", "vxlanMode", "natOutgoing", "disableBGPExport"):
            if k in s:
                pairs.append((k, _v(s[k]) + "  (kept for Calico; no effect on allocation)"))
        return kv_table(pairs)
    emit(args, data, fmt)
    return 0


def cmd_enable_disable(args) -> int:
    from ..ipam import pools
    ipam = open_ipam(args)
    changed = pools.set_pool_disabled(ipam, args.name, args.disabled)
    state = "disabled" if args.disabled else "enabled"
    print(f'pool "{args.name}" {state}' if changed else f'pool "{args.name}" was already {state}')
    return 0


def cmd_split(args) -> int:
    from ..ipam.split import split_pool
    out = split_pool(open_ipam(args), args.name, args.into, dry_run=args.dry_run)

    def text(d):
        verb = "would be split" if args.dry_run else "split"
        lines = [f'pool "{d["pool"]}" ({d["cidr"]}) {verb} into:']
        lines += [f'  {p["name"]:<24} {p["cidr"]}' for p in d["into"]]
        lines.append(f'{d["blocks"]} block(s) {"would move" if args.dry_run else "moved"} to their part'
                     + (f' ({"; ".join(d["steps"])})' if d.get("steps") else ""))
        return "\n".join(lines)
    emit(args, out, text)
    return 0


def cmd_delete(args) -> int:
    from ..ipam import errors, pools, report
    from .common import confirm
    ipam = open_ipam(args)
    holders = []
    try:
        holders = report.pool_holders(ipam, args.name)
    except errors.NotFound:
        raise
    except errors.AdminError:
        pass   # an undecodable pool record: delete_pool says what to do
    n_addr = sum(len(h["inPool"]) for h in holders)
    if holders and (args.force or args.dry_run) and not args.yes:
        verb = "would release" if args.dry_run else "will release"
        print(f'pool "{args.name}": {n_addr} address(es) in use; --force {verb} the {len(holders)} handle(s) '
              f'holding them (with every address they hold):', file=sys.stderr)
        for h in holders[:50]:
            pod = f'{h["namespace"]}/{h["pod"]}' if h["pod"] else "no pod recorded"
            print(f'  {",".join(h["inPool"]):<18} {pod} on {h["node"] or "?"} (handle {h["handle"]})',
                  file=sys.stderr)
        if len(holders) > 50:
            print(f"  ... and {len(holders) - 50} more (-o json --dry-run lists all)", file=sys.stderr)
    if args.dry_run:
        emit(args, {"dryRun": True, "pool": args.name, "wouldRelease": holders,
                    "refusedWithoutForce": bool(holders) and not args.force},
             lambda d: f'dry run: pool "{args.name}" not deleted' + (
                 "; without --force the delete would be refused (addresses in use)"
                 if d["refusedWithoutForce"] else ""))
        return 0
    if holders and args.force and not confirm(f'delete pool "{args.name}" and release them? [y/N] ',
                                              yes=args.yes, what="pool delete --force"):
        print("nothing deleted", file=sys.stderr)
        return 0
    rep = pools.delete_pool(ipam, args.name, force=args.force)

    def fmt(r):
        parts = [f'pool "{r["pool"]}" deleted']
        if r["releasedHandles"]:
            parts.append(f'released {len(r["releasedHandles"])} handle(s)')
        parts.append(f'{r["blocksDeleted"]} block(s) and {r["affinitiesDeleted"]} stray affinity record(s) '
                     f'removed')
        return "; ".join(parts)
    emit(args, rep, fmt)
    return 0

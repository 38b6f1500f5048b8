"""`release` and `check`."""
from __future__ import annotations

import ipaddress
import sys

from .common import CLIError, add_connection_args, add_output_arg, emit, last_prefix, open_ipam


def register(sub) -> None:
    r = sub.add_parser("release", help="release addresses by IP or by handle (repair)",
                       description="Release single addresses (--ip; a handle holding other addresses keeps "
                                   "them) or everything a handle holds (--handle). A handle whose record is "
                                   "missing is found in the blocks. Shows what it will release (pod, node) and "
                                   "asks; without a terminal it needs --yes; --dry-run only shows.")
    r.add_argument("--ip", action="append", default=[], metavar="ADDR", help="an address (repeatable)")
    r.add_argument("--handle", action="append", default=[], metavar="ID",
                   help="a handle id, <network>.<container id>.<ifname> (repeatable)")
    r.add_argument("--leaked", action="store_true",
                   help="release every address whose Kubernetes pod no longer exists (needs --kubeconfig; "
                        "shows them and asks first)")
    r.add_argument("--kubeconfig", metavar="PATH", help="the cluster's kubeconfig (for --leaked)")
    r.add_argument("-y", "--yes", action="store_true", help="release without asking")
    r.add_argument("--dry-run", action="store_true", help="show what would be released; change nothing")
    add_output_arg(r)
    add_connection_args(r)
    r.set_defaults(func=cmd_release)

    c = sub.add_parser("check", help="consistency report over the whole store (exit 0 clean, 1 problems, "
                                     "3 could not check)",
                       description="Cross-checks blocks, handles, affinities and pools: addresses whose handle "
                                   "record is missing or disagrees, handles pointing at addresses they do not "
                                   "hold, blocks outside every pool or of the wrong size, missing / foreign / "
                                   "duplicate / orphan affinities, undecodable values. One line per finding, "
                                   "each with how to fix it. With --kubeconfig, also addresses whose "
                                   "Kubernetes pod no longer exists (kind 'leaked').",
                       epilog="exit status: 0 clean; 1 problems found (also after --fix when some remain); "
                              "3 could not check (etcd unreachable, bad credentials, no pools under the prefix).")
    c.add_argument("--kubeconfig", metavar="PATH",
                   help="also list addresses whose pod no longer exists in this Kubernetes cluster")
    c.add_argument("--fix", action="store_true",
                   help="repair what `check` can repair itself (missing/stale affinity records, undecodable "
                        "blocks and affinity records); shows the repairs and asks first")
    c.add_argument("-y", "--yes", action="store_true", help="--fix: repair without asking")
    c.add_argument("--dry-run", action="store_true", help="--fix: show the repairs, change nothing")
    add_output_arg(c)
    add_connection_args(c)
    c.set_defaults(func=cmd_check, error_exit=3)


def cmd_release(args) -> int:
    from ..ipam import errors, release
    if args.leaked or args.kubeconfig:
        return cmd_release_leaked(args)
    if not args.ip and not args.handle:
        raise CLIError("give --ip ADDR and/or --handle ID")
    ips = []
    for s in args.ip:
        try:
            ips.append(ipaddress.ip_address(s.strip()))
        except ValueError:
            raise CLIError(f"--ip: {s!r} is not an IP address") from None
    ipam = open_ipam(args)
    from .common import confirm
    preview, missing_pre = release.release_preview(ipam, ips, args.handle)
    if preview and not args.yes:
        print(f"{'would release' if args.dry_run else 'will release'} {len(preview)} address(es):", file=sys.stderr)
        for r in preview:
            pod = f'{r["namespace"]}/{r["pod"]}' if r["pod"] else "no pod recorded"
            print(f'  {r["ip"]:<18} {pod} on {r["node"] or "?"} (handle {r["handle"]})', file=sys.stderr)
    if args.dry_run:
        emit(args, {"dryRun": True, "wouldRelease": preview, "notFound": missing_pre},
             lambda d: "dry run: nothing released")
        if missing_pre:
            raise CLIError("; ".join(missing_pre))
        return 0
    if preview and not confirm("release them? [y/N] ", yes=args.yes, what="release"):
        print("nothing released", file=sys.stderr)
        return 0
    released: list[dict] = []
    missing: list[str] = []
    if ips:
        done, not_allocated = release.release_ips(ipam, ips)
        released += [{"ip": ip, "handle": hid} for ip, hid in done]
        missing += [f"{ip} is not allocated" for ip in not_allocated]
    for hid in args.handle:
        try:
            got = release.release_handle(ipam, hid)
        except errors.NotFound as e:
            missing.append(e.msg)
            continue
        released += [{"ip": ip, "handle": hid} for ip in got]
    emit(args, {"released": released, "notFound": missing},
         lambda d: "\n".join(f'released {r["ip"]} (handle {r["handle"]})' for r in d["released"]))
    if missing:
        raise CLIError("; ".join(missing))
    return 0


def cmd_check(args) -> int:
    from ..ipam import check
    if (args.yes or args.dry_run) and not args.fix:
        raise CLIError("--yes and --dry-run go with --fix")
    ipam = open_ipam(args)
    rep = check.check(ipam)
    s = rep["scanned"]
    if not s["pools"] and not rep["findings"] and not s["blocks"] and not s["handles"]:
        raise CLIError(f"nothing to check: no pools, blocks or handles under etcd prefix {last_prefix()} "
                       f"-- is that the right prefix? (--etcd-prefix, CNI_IPAM_ETCD_PREFIX, etcdPrefix in the "
                       f"CLI config file)")
    if args.fix:
        return _check_fix(args, ipam, rep)
    if getattr(args, "kubeconfig", None):     # pods that no longer exist (ipam/leaks.py)
        from ..ipam import leaks
        found = leaks.findings(ipam, args.kubeconfig, getattr(args, "timeout", None) or 10.0)
        rep["findings"] += found
        if found:
            rep["summary"]["leaked"] = len(found)
        rep["clean"] = rep["clean"] and not found

    def fmt(d):
        if d["clean"]:
            s = d["scanned"]
            return (f'clean: {s["pools"]} pool(s), {s["blocks"]} block(s), {s["affinities"]} affinity record(s), '
                    f'{s["handles"]} handle(s), {s["allocations"]} allocated address(es) checked')
        return "\n".join(f'{f["kind"]}: {f["message"]}' + (f'\n  fix: {f["fix"]}' if f.get("fix") else "")
                         for f in d["findings"])
    emit(args, rep, fmt)
    if not rep["clean"]:
        if (getattr(args, "output", None) or "table") == "table":
            n = len(rep["findings"])
            print(f"cni-ipam: check: {n} problem(s) found", file=sys.stderr)
        return 1
    return 0


def _check_fix(args, ipam, rep) -> int:
    from ..ipam import check
    from .common import confirm
    todo = [f for f in rep["findings"] if f.get("fixable")]
    rest = [f for f in rep["findings"] if not f.get("fixable")]
    res = {"dryRun": bool(args.dry_run), "fixes": [], "remaining": rest, "confirmed": False}
    if not todo:
        print("nothing `check --fix` can repair" + (f"; {len(rest)} finding(s) need the fix shown with "
                                                   f"each (`cni-ipam check`)" if rest else ": clean"),
              file=sys.stderr)
        emit(args, res, lambda d: "")
        return 1 if rest else 0
    print(f"{len(todo)} finding(s) will be repaired:", file=sys.stderr)
    for f in todo:
        print(f'  {f["kind"]}: {f["message"]}\n    -> {f["fix"]}', file=sys.stderr)
    if args.dry_run:
        print("dry run: nothing changed", file=sys.stderr)
        emit(args, res, lambda d: "")
        return 1
    if not confirm("repair them? [y/N] ", yes=args.yes, what="check --fix"):
        print("nothing repaired", file=sys.stderr)
        emit(args, res, lambda d: "")
        return 1
    res["confirmed"] = True
    res["fixes"] = check.fix_findings(ipam, todo)
    after = check.check(ipam)
    res["remaining"] = after["findings"]
    emit(args, res, lambda d: "\n".join(
        [(f'fixed: {x["action"]}' if x["done"] else f'not fixed: {x["kind"]} {x["key"]}: {x.get("why", "")}')
         for x in d["fixes"]] + [f'remaining: {f["kind"]}: {f["message"]}' for f in d["remaining"]]))
    return 1 if after["findings"] else 0


def cmd_release_leaked(args) -> int:
    """`release --leaked --kubeconfig PATH [--yes]` (logic in ipam/leaks.py)."""
    from ..ipam import leaks
    if not (args.leaked and args.kubeconfig):
        raise CLIError("--leaked and --kubeconfig go together")
    if args.ip or args.handle:
        raise CLIError("--leaked does not combine with --ip/--handle")
    if args.dry_run:
        raise CLIError("--leaked --dry-run: use `cni-ipam check --kubeconfig PATH` to list leaked addresses")
    res = leaks.release_command(open_ipam(args), args.kubeconfig, yes=args.yes,
                                timeout=getattr(args, "timeout", None) or 10.0)
    emit(args, res, lambda d: "\n".join(
        [f'released {", ".join(r["addresses"]) or "-"} (handle {r["handle"]}, pod {r["namespace"]}/{r["pod"]})'
         for r in d["released"]] +
        [f'skipped handle {r["handle"]}: {r["why"]}' for r in d["skipped"]]))
    return 0

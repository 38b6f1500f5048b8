"""``cni-ipam reservation list|get|delete`` (alias ``ipreservation``): IPReservations
(created and changed with ``apply``)."""
from __future__ import annotations

from .common import CLIError, add_connection_args, add_output_arg, emit, open_ipam


def register(sub) -> None:
    top = sub.add_parser("reservation", aliases=["ipreservation"],
                         help="list, show, delete IPReservations (addresses never handed out; create with apply)")
    rs = top.add_subparsers(dest="reservation_cmd", metavar="SUBCOMMAND")
    ls = rs.add_parser("list", aliases=["ls"], help="list reservations")
    add_output_arg(ls)
    add_connection_args(ls)
    ls.set_defaults(func=cmd_list)
    g = rs.add_parser("get", help="show one reservation (-o yaml gives a manifest `apply` accepts)")
    g.add_argument("name")
    add_output_arg(g)
    add_connection_args(g)
    g.set_defaults(func=cmd_get)
    d = rs.add_parser("delete", aliases=["rm"], help="delete a reservation (its addresses can be handed out again)")
    d.add_argument("name")
    add_connection_args(d)
    d.set_defaults(func=cmd_delete)


def _read(args):
    from ..ipam import reservation_admin as ra
    ipam = open_ipam(args)
    return ipam, ra.read(ipam)[1]


def cmd_list(args) -> int:
    from ..ipam import reservation_admin as ra
    _, cur = _read(args)
    data = {"apiVersion": ra.API_VERSION, "kind": "IPReservationList", "items": [ra.manifest(r) for r in cur]}

    def text(_):
        if not cur:
            return "No IPReservation."
        w = max(4, *(len(r.name) for r in cur))
        return "\n".join([f"{'NAME':<{w}}  RESERVED CIDRS"] +
                         [f"{r.name:<{w}}  {', '.join(str(c) for c in r.cidrs)}" for r in cur])
    emit(args, data, text)
    return 0


def cmd_get(args) -> int:
    from ..ipam import reservation_admin as ra
    _, cur = _read(args)
    r = next((r for r in cur if r.name == args.name), None)
    if r is None:
        raise CLIError(f'IPReservation "{args.name}" does not exist')

    def text(_):
        from .common import kv_table
        return kv_table([("name", r.name), ("reservedCIDRs", ", ".join(str(c) for c in r.cidrs)),
                         ("addresses", str(sum(c.num_addresses for c in r.cidrs)))])
    emit(args, ra.manifest(r), text)
    return 0


def cmd_delete(args) -> int:
    from ..ipam import reservation_admin as ra
    try:
        ra.delete(open_ipam(args), args.name)
    except ra.ReservationNotFound as e:
        raise CLIError(e.msg) from None
    print(f'IPReservation "{args.name}" deleted')
    return 0

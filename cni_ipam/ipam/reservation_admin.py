"""IPReservation administration (CLI only): read, plan an apply, delete, and find allocations
inside reservations.  The record format and the interval arithmetic are ipam/reservation.py."""
from __future__ import annotations

from .store import Conflict, Txn, commit
from .block import Block, BlockError
from .errors import IPAMError
from .reservation import KIND, Reservation, Reserved, decode, encode

API_VERSION = "projectcalico.org/v3"


class ReservationNotFound(IPAMError):
    code = 1


def read(ipam) -> tuple:
    """(the record's KV or None, [Reservation])."""
    kv = ipam.ds.get(ipam.keys.reservations)
    try:
        return kv, decode(kv.value if kv else None)
    except ValueError as e:
        raise IPAMError(f"corrupt value at etcd key {ipam.keys.reservations}: {e}") from None


def manifest(r: Reservation) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": r.name}, "spec": r.to_spec()}


def plan(current: list[Reservation], incoming: list[Reservation]) -> tuple[list[Reservation], list[dict]]:
    """The reservations after applying ``incoming`` (created or replaced by name), and the
    changes ``[{kind, name, action}]`` (action: created, configured, unchanged)."""
    by_name = {r.name: r for r in current}
    changes = []
    for r in incoming:
        old = by_name.get(r.name)
        action = "created" if old is None else ("unchanged" if old.cidrs == r.cidrs else "configured")
        changes.append({"kind": KIND, "name": r.name, "action": action})
        by_name[r.name] = r
    return sorted(by_name.values(), key=lambda r: r.name), changes


def plan_write(keys, kv, new: list[Reservation], txn: Txn, write: bool = True) -> None:
    """Into ``txn``: the guard on the record as read (``kv``) and (``write``) writing ``new``."""
    txn.read(keys.reservations, kv.mod_revision if kv else 0)
    if not write:
        return
    if new:
        txn.put(keys.reservations, encode(new))
    else:
        txn.delete(keys.reservations)


def delete(ipam, name: str, retries: int = 20) -> None:
    for _ in range(retries):
        kv, cur = read(ipam)
        if not any(r.name == name for r in cur):
            raise ReservationNotFound(f'IPReservation "{name}" does not exist')
        txn = Txn()
        plan_write(ipam.keys, kv, [r for r in cur if r.name != name], txn)
        try:
            commit(ipam.ds, txn)
            return
        except Conflict:
            continue
    raise IPAMError(f'IPReservation "{name}" kept changing; gave up after {retries} attempts')


def allocations_inside(reserved: Reserved, block: Block) -> list[tuple]:
    """[(ip, handle, reservation name)] for addresses of ``block`` allocated inside a reservation."""
    out: list[tuple] = []
    iv = reserved.intervals(block.cidr)
    if not iv:
        return out
    for o, hid in sorted(block.allocations.items()):
        if any(a <= o < b for a, b in iv):
            ip = block.ip(o)
            r = reserved.which(ip)
            out.append((ip, hid, r.name if r else "?"))
    return out


def unallocated_reserved(reserved: Reserved, block: Block) -> int:
    """How many of the block's free addresses are reserved (not counted as free by show)."""
    iv = reserved.intervals(block.cidr)
    if not iv:
        return 0
    return sum(1 for o in block.free if any(a <= o < b for a, b in iv))


def unclaimed_reserved_capacity(reserved: Reserved, pool, mode: str, claimed: set) -> int:
    """Addresses inside reservations that the pool's UNCLAIMED blocks would hand out in ``mode``
    (``claimed``: the claimed block indexes).  Interval arithmetic: blocks wholly reserved count
    a block's capacity each; only the (at most two per reserved range) partly reserved blocks
    are looked at one by one."""
    from .block import reserved_ordinals, usable_in_mode
    if not usable_in_mode(pool.block_size, pool.version, mode):
        return 0
    first = pool.block_at(0)
    per_block = first.num_addresses - len(reserved_ordinals(first, mode))
    total = 0
    full = reserved.full_block_ranges(pool)
    for lo, hi in full:
        total += (hi - lo - sum(1 for i in claimed if lo <= i < hi)) * per_block
    size = pool.block_addresses
    partial = set()
    for a, b in reserved.intervals(pool.cidr):
        for o in (a, b - 1):
            idx = o // size
            if not any(lo <= idx < hi for lo, hi in full):
                partial.add(idx)
    for idx in partial - claimed:
        net = pool.block_at(idx)
        iv = reserved.intervals(net)
        skip = reserved_ordinals(net, mode)
        total += sum(b - a for a, b in iv) - sum(1 for o in skip if any(a <= o < b for a, b in iv))
    return total


def findings(ipam, reserved: Reserved | None = None) -> list[dict]:
    """Every allocation inside a reservation: [{ip, handle, reservation, block, key}]."""
    if reserved is None:
        reserved = Reserved(read(ipam)[1])
    out: list[dict] = []
    if not reserved:
        return out
    for kv in ipam.ds.get_prefix(ipam.keys.blocks):
        try:
            b = Block.from_json(kv.value)
        except BlockError:
            continue   # (check reports undecodable blocks itself)
        for ip, hid, name in allocations_inside(reserved, b):
            out.append({"ip": str(ip), "handle": hid, "reservation": name, "block": str(b.cidr), "key": kv.key})
    return out

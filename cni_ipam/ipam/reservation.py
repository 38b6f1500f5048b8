"""IP reservations (``kind: IPReservation``, Calico's ``spec.reservedCIDRs``) as pure values.

Every reservation of the store lives in ONE record, ``<prefix>/v1/reservations``
(``{"reservations": {name: {"reservedCIDRs": [...]}}}``), so an ADD reads it in its
first batched read (and a snapshot ADD guards it with one compare): with no
reservation it is an absent key, which costs nothing measurable.

A reservation is never expanded into addresses: the engine asks, per block, for
the reserved ordinal *intervals* (``Reserved.intervals``), and per pool for the
indexes of the blocks a reservation covers completely (``full_block_ranges``), so
a /16 reserved in a /8 pool costs a handful of integer comparisons.

Nothing here talks to etcd.
"""
from __future__ import annotations

import ipaddress
from bisect import bisect_right
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from cni_ipam._records import dataclass, field

KIND = "IPReservation"


class ReservationError(ValueError):
    pass


@dataclass
class Reservation:
    name: str
    cidrs: list = field(default_factory=list)   # ip_network values, as given (order kept)

    def to_spec(self) -> dict:
        return {"reservedCIDRs": [str(c) for c in self.cidrs]}


def parse_cidrs(name: str, items) -> list:
    """``spec.reservedCIDRs``: a non-empty list of CIDRs or plain addresses (a /32 or /128)."""
    if not isinstance(items, list) or not items:
        raise ReservationError(f"IPReservation {name!r}: must be a non-empty list of CIDRs (spec.reservedCIDRs)")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ReservationError(f"IPReservation {name!r}: item {item!r} is not a string")
        try:
            net = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError as e:
            raise ReservationError(f"IPReservation {name!r}: {item!r} is not a CIDR: {e}") from None
        if net not in out:
            out.append(net)
    return out


def decode(value: bytes | None) -> list[Reservation]:
    """The stored record (None: no reservation), in name order; ValueError if undecodable."""
    if not value:
        return []
    try:
        d = json.loads(value)
        res = d["reservations"]
        if not isinstance(res, dict):
            raise ValueError("reservations is not a map")
        return [Reservation(str(n), parse_cidrs(str(n), (spec or {}).get("reservedCIDRs")))
                for n, spec in sorted(res.items())]
    except (KeyError, TypeError, AttributeError, ReservationError) as e:
        raise ValueError(f"undecodable reservations record: {e}") from None


def encode(reservations) -> bytes:
    return json.dumps({"reservations": {r.name: r.to_spec() for r in sorted(reservations, key=lambda r: r.name)}},
                      separators=(",", ":")).encode()


class Reserved:
    """All reservations as merged, sorted integer intervals per family, for fast lookups.
    ``Reserved.EMPTY`` (no reservation) answers every question at once."""

    __slots__ = ("reservations", "_iv")
    EMPTY: "Reserved"

    def __init__(self, reservations=()):
        self.reservations = list(reservations)
        iv: dict[int, list[list[int]]] = {4: [], 6: []}
        for r in self.reservations:
            for c in r.cidrs:
                iv[c.version].append([int(c.network_address), int(c.broadcast_address) + 1])
        for fam, lst in iv.items():
            lst.sort()
            merged: list[list[int]] = []
            for lo, hi in lst:
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            iv[fam] = merged
        self._iv = {f: ([a for a, _ in v], [b for _, b in v]) for f, v in iv.items()}

    def __bool__(self) -> bool:
        return bool(self.reservations)

    def _overlap(self, version: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Merged reserved intervals clipped to [lo, hi) (absolute integers)."""
        starts, ends = self._iv[version]
        if not starts:
            return []
        out = []
        i = max(0, bisect_right(starts, lo) - 1)
        while i < len(starts) and starts[i] < hi:
            a, b = max(starts[i], lo), min(ends[i], hi)
            if a < b:
                out.append((a, b))
            i += 1
        return out

    def intervals(self, net) -> list[tuple[int, int]]:
        """Reserved ordinals of block/network ``net`` as [lo, hi) intervals (ordinals: offsets
        from the network address)."""
        base = int(net.network_address)
        return [(a - base, b - base) for a, b in self._overlap(net.version, base, base + net.num_addresses)]

    def count(self, net) -> int:
        """How many addresses of ``net`` are reserved."""
        base = int(net.network_address)
        return sum(b - a for a, b in self._overlap(net.version, base, base + net.num_addresses))

    def covers(self, net) -> bool:
        """Is every address of ``net`` reserved?"""
        return self.count(net) == net.num_addresses

    def which(self, ip) -> Reservation | None:
        """The (first, by name) reservation holding ``ip``, or None."""
        if not self._iv[ip.version][0]:
            return None
        for r in self.reservations:
            for c in r.cidrs:
                if c.version == ip.version and ip in c:
                    return r
        return None

    def full_block_ranges(self, pool) -> list[tuple[int, int]]:
        """Block indexes [lo, hi) of ``pool`` whose every address is reserved."""
        base, size = int(pool.cidr.network_address), pool.block_addresses
        out = []
        for a, b in self._overlap(pool.version, base, base + pool.cidr.num_addresses):
            lo = -(-(a - base) // size)   # first whole block at or after a
            hi = (b - base) // size       # blocks ending at or before b
            if lo < hi:
                out.append((lo, hi))
        return out


Reserved.EMPTY = Reserved()


def in_intervals(o: int, intervals) -> bool:
    for a, b in intervals:
        if a <= o < b:
            return True
    return False


def count_in(ranges: list[tuple[int, int]], lo: int, hi: int) -> int:
    """How many integers of [lo, hi) lie in the (disjoint) ``ranges``."""
    return sum(max(0, min(b, hi) - max(a, lo)) for a, b in ranges)


def with_taken(taken: list[tuple[int, int]], list_from, counts_in, count_ranges):
    """Wrap the free-block search's two callables (pool.find_free_block) so that the block
    indexes in ``taken`` (disjoint [lo, hi) intervals: blocks wholly reserved) count as claimed.
    ``count_ranges(ranges)`` counts claimed blocks per range (one request), used for the
    overlap so that a reserved block that was claimed anyway is not counted twice."""

    def list_taken(lo, hi, limit):
        claimed = list_from(lo, hi, limit)
        top = claimed[-1] if len(claimed) >= limit else hi - 1   # beyond: not listed, unknown
        extra = []
        for a, b in taken:
            for i in range(max(a, lo), min(b, hi, top + 1)):
                extra.append(i)
                if len(extra) > limit:
                    break
        return sorted(set(claimed) | set(extra))[:limit]

    def counts_taken(ranges):
        base = counts_in(ranges)
        overlaps = [[(max(a, lo), min(b, hi)) for a, b in taken if max(a, lo) < min(b, hi)] for lo, hi in ranges]
        flat = [r for rs in overlaps for r in rs]
        both = iter(count_ranges(flat)) if flat else iter(())
        out = []
        for (lo, hi), c, rs in zip(ranges, base, overlaps):
            out.append(c + count_in(taken, lo, hi) - sum(next(both) for _ in rs))
        return out

    return list_taken, counts_taken

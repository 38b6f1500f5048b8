"""A block: a small CIDR of a pool, claimed by one node, as a pure value.

Allocation state is one slot per address ordinal:

* ``allocations``: ordinal -> handle id for addresses in use;
* ``free``: the free ordinals as a FIFO -- ``allocate`` takes the head, ``release``
  appends to the tail -- so the address that has been free longest is reused
  first, and a just-released address is handed out last;
* reserved ordinals (in neither) are never handed out: in ``bridge`` mode the
  network address, the block's first host address (the node's gateway on the
  block) and, in IPv4, the broadcast address.

Nothing in this module talks to etcd.
"""
from __future__ import annotations

from cni_ipam import ipnet  # addresses without importing ipaddress (issue 17)
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from cni_ipam._records import dataclass, field

BRIDGE = "bridge"
ROUTED = "routed"
MODES = (BRIDGE, ROUTED)


class BlockError(ValueError):
    pass


def reserved_ordinals(net, mode: str) -> set[int]:
    n = net.num_addresses
    if mode == ROUTED:
        return set()
    # bridge: network (0), gateway (1), and broadcast (last) in IPv4
    res = {0, 1}
    if net.version == 4:
        res.add(n - 1)
    return res


def usable_in_mode(block_prefixlen: int, version: int, mode: str) -> bool:
    """Can a block of this size hand out at least one address in ``mode``?"""
    if mode == ROUTED:
        return True
    bits = 32 if version == 4 else 128
    n = 1 << (bits - block_prefixlen)
    return n - (3 if version == 4 else 2) >= 1


@dataclass
class Block:
    cidr: ipnet.Network
    pool: str
    node: str | None
    mode: str = BRIDGE
    allocations: dict[int, str] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    seq: int = 0
    empty_since: float = 0.0   # when the last address was released (0: in use, or never used)
    #: ordinal -> wall time (the releasing node's clock) it was released, kept only while an
    #: IPAMConfig ipCooldownSeconds is set; stored as "releasedAt" (older binaries ignore it)
    released_at: dict[int, float] = field(default_factory=dict)

    # -- construction -------------------------------------------------------
    @classmethod
    def new(cls, cidr, pool: str, node: str | None, mode: str = BRIDGE) -> "Block":
        if mode not in MODES:
            raise BlockError(f"unknown mode {mode!r}")
        if not usable_in_mode(cidr.prefixlen, cidr.version, mode):
            raise BlockError(f"block {cidr} is too small for {mode} mode")
        reserved = reserved_ordinals(cidr, mode)
        free = [i for i in range(cidr.num_addresses) if i not in reserved]
        return cls(cidr=cidr, pool=pool, node=node, mode=mode, free=free)

    # -- addresses ----------------------------------------------------------
    @property
    def capacity(self) -> int:
        return len(self.free) + len(self.allocations)

    @property
    def in_use(self) -> int:
        return len(self.allocations)

    @property
    def gateway(self):
        """The node's gateway on this block (bridge mode), else None."""
        if self.mode == BRIDGE:
            return self.cidr.network_address + 1
        return None

    def ip(self, ordinal: int):
        return self.cidr.network_address + ordinal

    def ordinal(self, ip) -> int:
        if ip not in self.cidr:
            raise BlockError(f"{ip} is not in block {self.cidr}")
        return int(ip) - int(self.cidr.network_address)

    def pick(self, reserved=(), cooldown: float = 0, now: float = 0.0) -> tuple[int | None, float]:
        """The free ordinal ``allocate`` would take: the head of the FIFO, skipping ordinals in
        ``reserved`` ([lo, hi) ordinal intervals, ipam/reservation.py) and ordinals released less
        than ``cooldown`` seconds before ``now``.  Returns (ordinal or None, the earliest time a
        cooling ordinal frees up, 0.0 if none is cooling)."""
        if not reserved and not (cooldown and self.released_at):
            return (self.free[0] if self.free else None), 0.0
        soonest = 0.0
        rel = self.released_at if cooldown else {}
        for o in self.free:
            if reserved and any(a <= o < b for a, b in reserved):
                continue
            t = rel.get(o)
            if t is not None and t + cooldown > now:
                soonest = t + cooldown if not soonest else min(soonest, t + cooldown)
                continue
            return o, soonest
        return None, soonest

    def allocate(self, handle_id: str, ip=None, *, ordinal: int | None = None):
        """Take the longest-free address (or ``ip``, or the free ``ordinal`` from ``pick``)
        for ``handle_id``; return it."""
        if ordinal is not None:
            self.free.remove(ordinal)
            o = ordinal
        elif ip is None:
            if not self.free:
                raise BlockError(f"block {self.cidr} is full")
            o = self.free.pop(0)
        else:
            o = self.ordinal(ip)
            if o in self.allocations:
                raise BlockError(f"{ip} is already allocated (handle {self.allocations[o]})")
            try:
                self.free.remove(o)
            except ValueError:
                raise BlockError(f"{ip} is reserved in block {self.cidr} ({self.mode} mode: "
                                 f"network, gateway and broadcast addresses are never handed out)") from None
        self.allocations[o] = handle_id
        self.seq += 1
        self.empty_since = 0.0
        if self.released_at:
            self.released_at.pop(o, None)
        return self.ip(o)

    def release(self, ip, handle_id: str | None = None, now: float | None = None,
                cooldown: float = 0) -> bool:
        """Free ``ip``; with ``handle_id``, only if that handle holds it.  True if freed.
        The block remembers when it became empty (``now``, default: the clock), and with a
        ``cooldown`` when each address was released (entries older than ``cooldown`` go)."""
        o = self.ordinal(ip)
        holder = self.allocations.get(o)
        if holder is None or (handle_id is not None and holder != handle_id):
            return False
        del self.allocations[o]
        self.free.append(o)
        self.seq += 1
        if now is None and (cooldown or self.released_at or not self.allocations):
            import time
            now = time.time()
        t_now: float = now or 0.0
        if cooldown or self.released_at:
            self.released_at = {k: t for k, t in self.released_at.items() if t + cooldown > t_now}
            if cooldown:
                self.released_at[o] = t_now
        if not self.allocations:
            self.empty_since = t_now
        return True

    def holder(self, ip) -> str | None:
        return self.allocations.get(self.ordinal(ip))

    # -- serialisation ----------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "cidr": str(self.cidr),
            "pool": self.pool,
            "node": self.node,
            "mode": self.mode,
            "allocations": {str(k): v for k, v in sorted(self.allocations.items())},
            "free": self.free,
            "seq": self.seq,
            **({"emptySince": self.empty_since} if self.empty_since else {}),
            **({"releasedAt": {str(k): v for k, v in sorted(self.released_at.items())}}
               if self.released_at else {}),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Block":
        """Decode and check a stored block; raises BlockError on anything inconsistent."""
        try:
            d = json.loads(data)
            cidr = ipnet.ip_network(d["cidr"])
            allocations = {int(k): str(v) for k, v in d["allocations"].items()}
            free = [int(x) for x in d["free"]]
            b = cls(cidr=cidr, pool=str(d["pool"]), node=d.get("node"), mode=d.get("mode", BRIDGE),
                    allocations=allocations, free=free, seq=int(d.get("seq", 0)),
                    empty_since=float(d.get("emptySince", 0.0)),
                    released_at={int(k): float(v) for k, v in (d.get("releasedAt") or {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BlockError(f"undecodable block: {e}") from None
        n = cidr.num_addresses
        if b.mode not in MODES:
            raise BlockError(f"unknown mode {b.mode!r}")
        seen = set(allocations)
        for o in free:
            if not 0 <= o < n or o in seen:
                raise BlockError(f"ordinal {o} is out of range or listed twice")
            seen.add(o)
        if any(not 0 <= o < n for o in allocations):
            raise BlockError("allocation ordinal out of range")
        # a release time of an address that is not free is stale (an older binary allocated it
        # and kept the field's old value away): drop it, never fail on it
        if b.released_at:
            free_set = set(free)
            b.released_at = {o: t for o, t in b.released_at.items() if o in free_set}
        # a reserved address (bridge mode: the node's gateway...) listed as free or held would be
        # handed out (again): the block cannot be trusted
        reserved = reserved_ordinals(cidr, b.mode) & seen
        if reserved:
            raise BlockError(f"reserved ordinal(s) {sorted(reserved)} ({b.mode} mode: network, gateway, "
                             f"broadcast) are listed as free or allocated")
        return b

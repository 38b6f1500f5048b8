"""Read-only reports: pool usage, blocks per node, borrowed addresses, one address, who holds a pool."""
from __future__ import annotations

import ipaddress
import json
from cni_ipam._records import dataclass, field
from typing import Sequence

from .block import BRIDGE, ROUTED, Block, BlockError, reserved_ordinals
from .errors import AdminError, IPAMError
from .model import Handle
from .pool import Pool
from .pools import get_pool, read_pools
from .paged import cidr_block_range, iter_prefix, iter_range


@dataclass
class PoolUsage:
    """What a pool can really hand out.

    ``capacity``: claimed blocks count what they can hand out (their free + allocated
    addresses: a bridge-mode block's network, gateway and broadcast are not capacity);
    unclaimed blocks count as blocks of ``unclaimed_mode`` would -- the mode most of
    the pool's claimed blocks use, or bridge (the plugin's default mode) while none is
    claimed (routed when bridge cannot use blocks this small).  With a node filter only
    that node's blocks count."""
    pool: Pool
    addresses: int = 0        # the pool's size (with a node filter: that node's blocks' size)
    in_use: int = 0
    claimed_capacity: int = 0  # free + allocated addresses of the claimed blocks
    blocks_claimed: int = 0
    undecodable: int = 0
    modes: dict = field(default_factory=dict)   # mode -> claimed blocks in it
    node: str | None = None
    #: unallocated addresses inside IPReservations that would otherwise be capacity: in the
    #: claimed blocks, and (``unclaimed_ip_reserved``) in the unclaimed ones
    claimed_ip_reserved: int = 0
    unclaimed_ip_reserved: int = 0

    @property
    def unclaimed_blocks(self) -> int:
        return 0 if self.node is not None else max(self.pool.n_blocks - self.blocks_claimed - self.undecodable, 0)

    @property
    def unclaimed_mode(self) -> str:
        if self.modes:
            return max(sorted(self.modes), key=lambda m: self.modes[m])
        return BRIDGE if self.pool.usable_in(BRIDGE) else ROUTED

    @property
    def unclaimed_block_capacity(self) -> int:
        """What one unclaimed block would hand out once claimed in ``unclaimed_mode``."""
        p = self.pool
        if not p.usable_in(self.unclaimed_mode):
            return 0
        return p.block_addresses - len(reserved_ordinals(p.block_at(0), self.unclaimed_mode))

    @property
    def ip_reserved(self) -> int:
        return self.claimed_ip_reserved + self.unclaimed_ip_reserved

    @property
    def capacity(self) -> int:
        return (self.claimed_capacity + self.unclaimed_blocks * self.unclaimed_block_capacity
                - self.ip_reserved)

    @property
    def reserved(self) -> int:
        """Addresses of the pool never handed out because of the block layout (network, gateway,
        broadcast in bridge mode); IPReservations are counted apart (``ip_reserved``)."""
        return max(self.addresses - self.capacity - self.ip_reserved, 0)

    @property
    def free(self) -> int:
        return max(self.capacity - self.in_use, 0)

    def to_dict(self, node: str | None = None) -> dict:
        p = self.pool
        cap = self.capacity
        d = {"name": p.name, "cidr": str(p.cidr), "blockSize": p.block_size, "disabled": p.disabled,
             "addresses": self.addresses, "inUse": self.in_use, "reserved": self.reserved,
             "ipReserved": self.ip_reserved, "free": self.free,
             "blocksClaimed": self.blocks_claimed, "blocksTotal": p.n_blocks,
             "utilization": round(100.0 * self.in_use / cap, 2) if cap else (100.0 if self.addresses else 0.0),
             "capacity": cap, "blockAddresses": p.block_addresses,
             "unclaimedBlocks": self.unclaimed_blocks,
             "unclaimedBlocksCountedAs": {"mode": self.unclaimed_mode,
                                          "capacityPerBlock": self.unclaimed_block_capacity}}
        if node is not None:
            d["node"] = node
        return d


def block_row(b: Block) -> dict:
    return {"cidr": str(b.cidr), "pool": b.pool, "node": b.node, "mode": b.mode, "inUse": b.in_use,
            "capacity": b.capacity, "free": len(b.free)}


def usage(ipam, *, node: str | None = None, blocks: bool = False,
          pools: Sequence[Pool] | None = None) -> tuple[list[PoolUsage], list[dict], list[str]]:
    """Per-pool totals (and per-block rows), streaming each pool's block range.

    Returns (pool usages, block rows, keys of undecodable records)."""
    bad: list[str] = []
    if pools is None:
        pools, bad = read_pools(ipam)
    from . import reservation_admin as ra
    from .reservation import Reserved
    reserved = Reserved(ra.read(ipam)[1])
    out, rows = [], []
    for p in pools:
        u = PoolUsage(p, addresses=0 if node is not None else p.cidr.num_addresses, node=node)
        claimed_idx = set()
        start, end = cidr_block_range(ipam.keys, p.cidr)
        for kv in iter_range(ipam.ds, start, end):
            try:
                b = Block.from_json(kv.value)
            except BlockError:
                u.undecodable += 1
                bad.append(kv.key)
                continue
            if node is not None and b.node != node:
                continue
            u.blocks_claimed += 1
            u.in_use += b.in_use
            u.claimed_capacity += b.capacity
            if reserved:
                u.claimed_ip_reserved += ra.unallocated_reserved(reserved, b)
                claimed_idx.add(p.block_index(b.cidr))
            u.modes[b.mode] = u.modes.get(b.mode, 0) + 1
            if node is not None:
                u.addresses += b.cidr.num_addresses
            if blocks:
                rows.append(block_row(b))
        if reserved and node is None:
            u.unclaimed_ip_reserved = ra.unclaimed_reserved_capacity(reserved, p, u.unclaimed_mode, claimed_idx)
        out.append(u)
    return out, rows, bad


def block_nodes(ipam) -> list[str]:
    """The nodes that hold an affinity for some block (sorted; read from the affinity keys only)."""
    nodes = set()
    for kv in iter_prefix(ipam.ds, ipam.keys.affinity, keys_only=True):
        try:
            nodes.add(ipam.keys.affinity_of_key(kv.key)[0])
        except (ValueError, UnicodeDecodeError):
            continue
    return sorted(nodes)


def claimed_blocks(ipam, pool: Pool) -> int:
    """How many blocks of ``pool`` are claimed (one count request)."""
    start, end = cidr_block_range(ipam.keys, pool.cidr)
    return ipam.ds.count(start, end)


def borrowed(ipam, node: str | None = None) -> list[dict]:
    """Addresses held by a handle of one node in a block owned by another node."""
    owners: dict[str, tuple[str | None, str]] = {}
    for kv in iter_prefix(ipam.ds, ipam.keys.blocks):
        try:
            d = json.loads(kv.value)
            owners[str(ipaddress.ip_network(d["cidr"]))] = (d.get("node"), d.get("pool", ""))
        except (ValueError, KeyError, TypeError):
            continue
    out = []
    for kv in iter_prefix(ipam.ds, ipam.keys.handles):
        try:
            h = Handle.from_json(kv.value)
        except ValueError:
            continue
        for a in h.addresses:
            owner, pool = owners.get(str(a.block), (None, a.pool))
            if owner is None or owner == h.node:
                continue
            if node is not None and node not in (owner, h.node):
                continue
            out.append({"ip": str(a.ip), "block": str(a.block), "pool": pool, "blockNode": owner,
                        "node": h.node, "handle": h.id, "namespace": h.namespace, "pod": h.pod})
    return out


def ip_info(ipam, ip) -> dict:
    """Everything known about one address."""
    ip = ipaddress.ip_address(ip)
    pools, _ = read_pools(ipam)
    d: dict = {"ip": str(ip), "allocated": False, "pool": None, "block": None, "blockNode": None,
               "handle": None, "node": None, "namespace": None, "pod": None, "network": None,
               "containerID": None, "interface": None, "created": None, "reason": None, "keptFor": None}
    p = next((p for p in pools if p.version == ip.version and ip in p.cidr), None)
    if p is None:
        d["reason"] = "not in any pool"
        return d
    d["pool"] = p.name
    net = p.block_of(ip)
    d["block"] = str(net)
    bkv = ipam.ds.get(ipam.keys.block(net))
    if bkv is None:
        d["reason"] = "its block is not claimed by any node"
        return d
    try:
        b = Block.from_json(bkv.value)
    except BlockError as e:
        raise AdminError(f"block {net}: the value at etcd key {bkv.key} is undecodable: {e}") from None
    d["blockNode"] = b.node
    hid = b.holder(ip)
    if hid is None:
        o = b.ordinal(ip)
        d["reason"] = ("reserved (network, gateway or broadcast address of a bridge-mode block)"
                       if o not in b.free else "free")
        return d
    d.update(allocated=True, handle=hid)
    h = ipam.get_handle(hid)
    if h is None:
        d["reason"] = "the block records a handle whose record is missing (run `cni-ipam check`)"
        return d
    d.update(node=h.node, namespace=h.namespace or None, pod=h.pod or None, network=h.network or None,
             containerID=h.container_id or None, interface=h.ifname or None, created=h.created or None)
    if h.kept_for is not None:   # an address kept for a StatefulSet pod (ipam/sticky.py)
        d["keptFor"] = h.kept_for
    return d


def describe_handle(ipam, hid: str, cache: dict) -> dict:
    if hid not in cache:
        try:
            h = ipam.get_handle(hid)
        except IPAMError:
            h = None
        cache[hid] = ({"handle": hid, "node": h.node, "namespace": h.namespace or None, "pod": h.pod or None,
                       "addresses": [str(a.ip) for a in h.addresses]} if h is not None else
                      {"handle": hid, "node": None, "namespace": None, "pod": None, "addresses": []})
    return cache[hid]


def pool_holders(ipam, name: str) -> list[dict]:
    """Who holds addresses in a pool (what ``pool delete --force`` would release): one entry per
    handle with its pod and the addresses it holds in the pool."""
    _, pool = get_pool(ipam, name)
    start, end = cidr_block_range(ipam.keys, pool.cidr)
    held: dict[str, list[str]] = {}
    for kv in iter_range(ipam.ds, start, end):
        try:
            b = Block.from_json(kv.value)
        except BlockError:
            continue
        for o, hid in sorted(b.allocations.items()):
            held.setdefault(hid, []).append(str(b.ip(o)))
    cache: dict = {}
    out = []
    for hid, ips in held.items():
        d = dict(describe_handle(ipam, hid, cache))
        d["inPool"] = ips
        out.append(d)
    return out

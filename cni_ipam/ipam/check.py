"""``cni-ipam check``: the whole-store consistency report, and ``check --fix``.

``Checker`` is pure (fed records, returns findings); ``check`` streams the store through it
and re-verifies each suspect; ``fix_findings`` repairs the fixable ones, one CAS each."""
from __future__ import annotations

import ipaddress
import json
import socket
from cni_ipam._records import dataclass, field

from ..datastore import KV
from .block import BRIDGE, ROUTED, Block, BlockError
from .store import Affinity, Conflict as TxnConflict, Keys, Txn, block_from_id, block_id, commit, decode_or_none
from .model import Handle, IPAMConfig
from .pool import Pool, PoolError
from .pools import read_pools
from .paged import iter_prefix

TYPE_CHECKING = False  # typing is not imported at run time; annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from .reservation import Reserved


@dataclass
class Finding:
    kind: str
    key: str                    # the etcd key at fault
    message: str
    keys: tuple = ()            # every key the finding depends on (for re-verification)
    subject: str = ""           # what inside the key (an address, a node)
    info: dict = field(default_factory=dict)

    @property
    def ident(self):
        return (self.kind, self.key, self.subject)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "key": self.key, "message": self.message}
        d.update(self.info)
        return d


FINDING_KINDS = (
    "undecodable",                # a value (or a key name) that cannot be decoded
    "allocation-without-handle",  # a block allocates an address to a handle whose record is missing
    "allocation-handle-mismatch",  # ... to a handle whose record does not list that address
    "handle-not-held",            # a handle lists an address its block does not record for it
    "handle-key-mismatch",        # a handle record's id differs from its key
    "block-key-mismatch",         # a block's value describes another CIDR than its key
    "block-outside-pools",        # a block inside no pool
    "block-pool-mismatch",        # a block inside pool P that records another pool
    "block-wrong-size",           # a block whose size is not its pool's blockSize
    "block-without-affinity",     # the owner node has no affinity record for the block
    "affinity-other-node",        # the block's affinity is held by another node than its owner
    "duplicate-affinity",         # more than one node holds an affinity for the block
    "affinity-without-block",     # an affinity record whose block does not exist
)


def _ipkey(ip) -> tuple[int, int]:
    return (ip.version, int(ip))


class Checker:
    """Pure consistency check over the store's records, fed in this order: pools, config,
    affinities, handles, blocks (blocks are the big part and are only streamed through).

    ``partial``: the checker sees only some keys (re-verification); findings it makes
    about records it was not shown are meaningless and are filtered by the caller."""

    def __init__(self, keys: Keys):
        self.k = keys
        self.findings: list[Finding] = []
        self.pools: list[Pool] = []
        self.bad_pools = 0
        self.aff: dict[str, list[str]] = {}          # block id -> nodes with an affinity for it
        self.handle_ids: set[str] = set()
        self.bad_handles: set[str] = set()
        self.held: dict[tuple, str] = {}              # address -> handle listing it
        self.held_extra: dict[tuple, list[str]] = {}  # address -> further handles listing it
        self.held_block: dict[tuple, str] = {}        # address -> block key the handle names
        self.blocks_seen: set[str] = set()
        self.bad_blocks: list = []                    # networks of undecodable blocks
        self._bkeys: dict[str, str] = {}
        self._gws: set[str] = set()
        self.counts = {"pools": 0, "blocks": 0, "affinities": 0, "handles": 0, "allocations": 0}
        self.reserved: Reserved | None = None   # when the store has IPReservations

    def add(self, kind, key, message, keys=(), subject="", **info):
        self.findings.append(Finding(kind, key, message, tuple(keys) or (key,), subject, info))

    # -- feeding -----------------------------------------------------------
    def feed(self, kv: KV) -> None:
        k = self.k
        if kv.key.startswith(k.pools):
            self.feed_pool(kv)
        elif kv.key == k.config:
            self.feed_config(kv)
        elif kv.key == k.reservations:
            self.feed_reservations(kv)
        elif kv.key.startswith(k.affinity):
            self.feed_affinity(kv)
        elif kv.key.startswith(k.handles):
            self.feed_handle(kv)
        elif kv.key.startswith(k.blocks):
            self.feed_block(kv)

    def feed_pool(self, kv: KV) -> None:
        self.counts["pools"] += 1
        try:
            self.pools.append(Pool.from_json(kv.value))
        except PoolError as e:
            self.bad_pools += 1
            self.add("undecodable", kv.key, f"pool record {kv.key} is undecodable: {e}")

    def feed_config(self, kv: KV) -> None:
        try:
            IPAMConfig.from_json(kv.value)
        except ValueError as e:
            self.add("undecodable", kv.key, f"IPAM config {kv.key} is undecodable: {e}")

    def feed_reservations(self, kv: KV) -> None:
        from .reservation import Reserved, decode
        try:
            self.reserved = Reserved(decode(kv.value)) or None
        except ValueError as e:
            self.add("undecodable", kv.key, f"IPReservations record {kv.key} is undecodable: {e}")

    def feed_affinity(self, kv: KV) -> None:
        self.counts["affinities"] += 1
        got = _affinity_bid(self.k, kv.key)
        if got is None:
            self.add("undecodable", kv.key, f"affinity key {kv.key} does not name a node and a block")
            return
        node, bid = got
        try:
            v = json.loads(kv.value)
            if not isinstance(v, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.add("undecodable", kv.key, f"affinity record {kv.key} is undecodable: {e}")
        self.aff.setdefault(bid, []).append(node)

    def feed_handle(self, kv: KV) -> None:
        self.counts["handles"] += 1
        try:
            hid = self.k.handle_of_key(kv.key)
        except (ValueError, UnicodeDecodeError):
            self.add("undecodable", kv.key, f"handle key {kv.key} is not a valid name")
            return
        self.handle_ids.add(hid)
        try:
            rid, addrs = self._fast_handle(kv.value)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            try:   # the model's decoder has the last word (and the precise message)
                h = Handle.from_json(kv.value)
            except ValueError as e:
                self.bad_handles.add(hid)
                self.add("undecodable", kv.key, f"handle record {kv.key} is undecodable: {e}")
                return
            rid, addrs = h.id, [(_ipkey(a.ip), self._block_key(str(a.block))) for a in h.addresses]
        if rid != hid:
            self.add("handle-key-mismatch", kv.key, f"handle record {kv.key} says its id is {rid!r}",
                     handle=hid)
        for ik, bkey in addrs:
            if ik in self.held:
                self.held_extra.setdefault(ik, []).append(hid)
            else:
                self.held[ik] = hid
                self.held_block[ik] = bkey

    def _block_key(self, block: str) -> str:
        """Block string -> its etcd key (validated like the model does; cached: many handles
        share a block, and the cached string is shared too)."""
        bkey = self._bkeys.get(block)
        if bkey is None:
            bkey = self._bkeys[block] = self.k.block(ipaddress.ip_network(block))
        return bkey

    def _fast_handle(self, value: bytes):
        """The parts of a handle record the check needs, ~5x faster than Handle.from_json
        (addresses via inet_pton; block and gateway parses cached).  Raises on anything odd;
        the caller then falls back to the model's decoder."""
        d = json.loads(value)
        rid = str(d["id"])
        str(d["node"])
        out = []
        for a in d.get("addresses", []):
            ip = a["ip"]
            if ":" in ip:
                ik = (6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big"))
            else:
                ik = (4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big"))
            int(a["prefixlen"])
            gw = a.get("gateway")
            if gw and gw not in self._gws:
                ipaddress.ip_address(gw)
                self._gws.add(gw)
            out.append((ik, self._block_key(a["block"])))
        return rid, out

    def _pool_of(self, net) -> Pool | None:
        for p in self.pools:
            if p.version == net.version and net.subnet_of(p.cidr):
                return p
        return None

    def feed_block(self, kv: KV) -> None:
        k = self.k
        self.counts["blocks"] += 1
        bid = k.block_id_of_key(kv.key)
        try:
            net = block_from_id(bid)
        except (ValueError, IndexError):
            self.add("undecodable", kv.key, f"block key {kv.key} does not name a block")
            return
        self.blocks_seen.add(bid)
        try:
            b = Block.from_json(kv.value)
        except BlockError as e:
            self.bad_blocks.append(net)
            self.add("undecodable", kv.key, f"block {net} ({kv.key}) is undecodable: {e}", block=str(net))
            return
        if b.cidr != net:
            self.add("block-key-mismatch", kv.key, f"block key {kv.key} holds a block for {b.cidr}",
                     block=str(net))
            return
        p = self._pool_of(net)
        if p is None:
            extra = f" ({self.bad_pools} pool record(s) are undecodable)" if self.bad_pools else ""
            self.add("block-outside-pools", kv.key, f"block {net} (node {b.node}) is outside every pool{extra}",
                     [kv.key] + [k.pool(b.pool)], block=str(net), node=b.node)
        elif net.prefixlen != p.block_size:
            self.add("block-wrong-size", kv.key, f"block {net} is a /{net.prefixlen} in pool {p.name!r}, "
                     f"whose blockSize is {p.block_size}", block=str(net), pool=p.name)
        elif b.pool != p.name:
            self.add("block-pool-mismatch", kv.key, f"block {net} lies in pool {p.name!r} but records "
                     f"pool {b.pool!r}", block=str(net), pool=p.name)
        nodes = self.aff.get(bid, [])
        akeys = [k.affinity_key(n, net) for n in nodes]
        if b.node:
            own = k.affinity_key(b.node, net)
            if b.node not in nodes:
                if nodes:
                    self.add("affinity-other-node", kv.key, f"block {net} belongs to node {b.node} but its "
                             f"affinity record is held by {', '.join(nodes)}", [kv.key, own] + akeys,
                             block=str(net), node=b.node, affinityNodes=nodes)
                else:
                    self.add("block-without-affinity", kv.key, f"block {net} belongs to node {b.node}, which "
                             f"has no affinity record for it ({own})", [kv.key, own], block=str(net), node=b.node)
            if len(nodes) > 1:
                self.add("duplicate-affinity", kv.key, f"block {net} has affinity records for several nodes: "
                         f"{', '.join(nodes)}", [kv.key, own] + akeys, block=str(net), affinityNodes=nodes)
        elif nodes:
            self.add("affinity-other-node", kv.key, f"block {net} has no owner but node(s) {', '.join(nodes)} "
                     f"hold an affinity for it", [kv.key] + akeys, block=str(net), affinityNodes=nodes)
        base = int(net.network_address)
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        for o, hid in b.allocations.items():
            self.counts["allocations"] += 1
            ik = (net.version, base + o)
            if self.held.get(ik) == hid:
                del self.held[ik]
                continue
            others = self.held_extra.get(ik)
            if others and hid in others:
                others.remove(hid)
                continue
            if hid in self.bad_handles:
                continue
            ip = cls(base + o)
            hkey = k.handle(hid)
            if hid not in self.handle_ids:
                self.add("allocation-without-handle", kv.key, f"{ip} in block {net} is allocated to handle "
                         f"{hid!r}, whose record is missing (`cni-ipam release --ip {ip}` frees it)",
                         [kv.key, hkey], f"{ip} {hid}", ip=str(ip), block=str(net), handle=hid)
            else:
                self.add("allocation-handle-mismatch", kv.key, f"{ip} in block {net} is allocated to handle "
                         f"{hid!r}, whose record does not list it", [kv.key, hkey], f"{ip} {hid}", ip=str(ip),
                         block=str(net), handle=hid)
        if self.reserved is not None:
            from .reservation_admin import allocations_inside
            for ip, hid, name in allocations_inside(self.reserved, b):
                self.add("allocation-in-reservation", kv.key, f"{ip} in block {net} is allocated to handle "
                         f"{hid!r} but lies in IPReservation {name!r} (allocated before the reservation; "
                         f"`cni-ipam release --ip {ip}` frees it)", [kv.key, k.reservations], f"{ip} {hid}",
                         ip=str(ip), block=str(net), handle=hid, reservation=name)

    def finish(self) -> list[Finding]:
        k = self.k
        cls = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}
        left = [(ik, hid) for ik, hid in self.held.items()]
        left += [(ik, hid) for ik, hids in self.held_extra.items() for hid in hids]
        for ik, hid in sorted(left):
            ip = cls[ik[0]](ik[1])
            if any(ip in net for net in self.bad_blocks):
                continue   # its block is undecodable: reported once, as such
            hkey = k.handle(hid)
            bkey = self.held_block.get(ik, "")
            self.add("handle-not-held", hkey, f"handle {hid!r} lists {ip}, but its block does not record "
                     f"it as held by this handle", [hkey, bkey] if bkey else [hkey], str(ip), ip=str(ip),
                     handle=hid)
        for bid, nodes in self.aff.items():
            if bid not in self.blocks_seen:
                net = block_from_id(bid)
                for n in nodes:
                    akey = k.affinity_key(n, net)
                    self.add("affinity-without-block", akey, f"node {n} has an affinity for block {net}, "
                             f"which does not exist ({akey})", [akey, k.block(net)], n, block=str(net), node=n)
        return self.findings


def check(ipam, *, verify: bool = True) -> dict:
    """The whole-store consistency report.  Streams everything once (pages, no per-block
    requests); then, because pages are read at different revisions while ADDs and DELs go
    on, re-reads just the keys of each suspect in one batched read and keeps only the
    findings that still hold."""
    ds, k = ipam.ds, ipam.keys
    c = Checker(k)
    for kv in ds.get_prefix(k.pools):
        c.feed_pool(kv)
    cfg = ds.get(k.config)
    if cfg is not None:
        c.feed_config(cfg)
    res = ds.get(k.reservations)
    if res is not None:
        c.feed_reservations(res)
    from .gc import Splits   # ranges between split points: O(keys) for etcd, not O(keys^2 / page)
    splits = Splits()
    for prefix, fn in ((k.affinity, c.feed_affinity), (k.handles, c.feed_handle), (k.blocks, c.feed_block)):
        for kv in splits.iter(ds, prefix):
            fn(kv)
    findings = c.finish()
    if findings and verify:
        findings = _reverify(ipam, findings)
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    out = []
    for f in findings:
        d = f.to_dict()
        d["fix"] = fix_hint(k, d)
        d["fixable"] = fixable(k, d)
        out.append(d)
    return {"clean": not findings, "findings": out, "summary": counts, "scanned": dict(c.counts)}


def _reverify(ipam, findings: list[Finding]) -> list[Finding]:
    ds, k = ipam.ds, ipam.keys
    want = list(dict.fromkeys(x for f in findings for x in f.keys if x))
    c = Checker(k)
    for kv in ds.get_prefix(k.pools):
        c.feed_pool(kv)
    got = [kv for kv in ds.get_many(want) if kv is not None]   # one consistent read (per 128 keys)
    order = {k.config: 0, k.reservations: 0, k.affinity: 1, k.handles: 2, k.blocks: 3}

    def rank(kv):
        for p, r in order.items():
            if kv.key.startswith(p):
                return r
        return 9
    for kv in sorted(got, key=rank):
        if not kv.key.startswith(k.pools):
            c.feed(kv)
    still = {f.ident for f in c.finish()}
    return [f for f in findings if f.ident in still]


# ----------------------------------------------------------------------------- fixes for check findings

def _kind_of_key(k: Keys, key: str) -> str:
    for what, prefix in (("block", k.blocks), ("affinity", k.affinity), ("handle", k.handles),
                         ("pool", k.pools)):
        if key.startswith(prefix):
            return what
    return "config" if key == k.config else "reservations" if key == k.reservations else "other"


def _affinity_bid(k: Keys, key: str) -> tuple[str, str] | None:
    """(node, block id) of an affinity key, or None."""
    try:
        node, bid = k.affinity_of_key(key)
        block_from_id(bid)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return node, bid


def fixable(k: Keys, f: dict) -> bool:
    """Findings ``check --fix`` repairs: a missing affinity (written from the block), an
    affinity without a block (deleted), an undecodable block (rebuilt from the handles that
    hold its addresses) or affinity record (rewritten from its block, or deleted)."""
    kind = f["kind"]
    if kind in ("block-without-affinity", "affinity-without-block"):
        return True
    if kind == "undecodable":
        what = _kind_of_key(k, f["key"])
        if what == "block":
            try:
                k.block_of_key(f["key"])
                return True
            except (ValueError, IndexError):
                return False
        return what == "affinity" and _affinity_bid(k, f["key"]) is not None
    return False


def fix_hint(k: Keys, f: dict) -> str:
    """What repairs a finding: ``cni-ipam check --fix``, or the exact command."""
    kind, key = f["kind"], f["key"]
    if fixable(k, f):
        what = {"block-without-affinity": "writes the missing affinity record from the block",
                "affinity-without-block": "deletes the stale affinity record"}.get(kind)
        if what is None:
            what = ("rebuilds the block from the handles that hold its addresses"
                    if _kind_of_key(k, key) == "block" else "rewrites the record from its block (or deletes it "
                                                            "when the block is gone)")
        return f"`cni-ipam check --fix` {what}"
    ip, handle = f.get("ip"), f.get("handle")
    if kind in ("allocation-without-handle", "allocation-handle-mismatch"):
        return f"once no pod uses {ip}: `cni-ipam release --ip {ip}`"
    if kind == "handle-not-held":
        return f"once its pod is gone: `cni-ipam release --handle {handle}`"
    if kind == "allocation-in-reservation":
        return (f"when its pod can move: `cni-ipam release --ip {ip}` (and recreate the pod), or narrow "
                f"IPReservation {f.get('reservation')!r}")
    if kind == "undecodable":
        what = _kind_of_key(k, key)
        if what == "config":
            return "`cni-ipam apply -f` an IPAMConfig manifest replaces it"
        if what == "pool":
            name = k.pool_name_of_key(key)
            return (f"inspect it (`etcdctl get {key}`), then `cni-ipam pool delete {name} --force` and "
                    f"apply its manifest again")
        if what == "reservations":
            return (f"inspect it (`etcdctl get {key}`); `etcdctl del {key}` drops every IPReservation, then "
                    f"apply their manifests again (ADDs fail until then)")
        if what == "handle":
            return (f"inspect it (`etcdctl get {key}`); `etcdctl del {key}` removes it, then `cni-ipam check` "
                    f"lists its addresses, which `cni-ipam release --ip` frees once their pods are gone")
        return f"a key no cni-ipam version writes: inspect it, then `etcdctl del {key}`"
    if kind in ("handle-key-mismatch", "block-key-mismatch"):
        return f"inspect it (`etcdctl get {key}`), then `etcdctl del {key}`"
    if kind == "block-outside-pools":
        return ("apply the pool that held it again, or, once no pod uses its addresses, "
                f"`etcdctl del {key}` (and its affinity record)")
    if kind in ("block-pool-mismatch", "block-wrong-size"):
        return "once no pod uses its addresses: `cni-ipam release --ip` them, then `etcdctl del` the block"
    if kind in ("affinity-other-node", "duplicate-affinity"):
        return (f"`etcdctl del` the affinity record(s) of the node(s) that do not own the block "
                f"({', '.join(f.get('affinityNodes') or [])})")
    return "inspect the key with `etcdctl get`"


def _rebuild_block(ipam, net, pools: list[Pool]) -> Block | str:
    """A block value from the handles that list addresses in ``net`` (the block's own value is
    undecodable): owner from its affinity record, mode from the handles."""
    k = ipam.keys
    pool = next((p for p in pools if p.version == net.version and net.subnet_of(p.cidr)), None)
    if pool is None:
        return f"block {net} lies in no pool; cannot rebuild it"
    holders: list[tuple] = []
    modes = set()
    for kv in iter_prefix(ipam.ds, k.handles):
        try:
            h = Handle.from_json(kv.value)
        except ValueError:
            continue
        for a in h.addresses:
            if a.block == net:
                holders.append((a.ip, h.id))
                modes.add(h.mode)
    nodes = [n for n, bid in (_affinity_bid(k, kv.key) or (None, None)
                              for kv in iter_prefix(ipam.ds, k.affinity, keys_only=True)) if bid == block_id_of(net)]
    if len(modes) > 1:
        return f"block {net}: its handles disagree on the mode ({', '.join(sorted(modes))}); cannot rebuild it"
    mode = modes.pop() if modes else BRIDGE
    node = nodes[0] if len(nodes) == 1 else None
    try:
        b = Block.new(net, pool.name, node, mode if pool.usable_in(mode) else ROUTED)
        for ip, hid in holders:
            b.allocate(hid, ip)
    except BlockError as e:
        return f"block {net}: cannot rebuild it from its handles: {e}"
    return b


def block_id_of(net) -> str:
    return block_id(net)


def fix_findings(ipam, findings: list[dict]) -> list[dict]:
    """Repair the fixable findings, each with one compare-and-swap on the keys it read.
    Returns one entry per finding: {kind, key, action, done, why?}."""
    ds, k = ipam.ds, ipam.keys
    pools, _ = read_pools(ipam)
    out = []
    for f in findings:
        if not fixable(k, f):
            continue
        kind, key = f["kind"], f["key"]
        entry = {"kind": kind, "key": key, "action": "", "done": False}
        out.append(entry)
        kv = ds.get(key)
        txn = Txn()
        txn.read(key, kv.mod_revision if kv else 0)
        if kind == "block-without-affinity" or (kind == "undecodable" and _kind_of_key(k, key) == "affinity"):
            if kind == "block-without-affinity":
                bkv = kv
            else:
                bkv = ds.get(k.block_of_affinity(key))
            b = decode_or_none(bkv.key, bkv.value, Block.from_json) if bkv else None
            if b is None or not b.node:
                if kind == "undecodable":
                    entry["action"] = f"delete {key} (its block is gone or has no owner)"
                    if bkv is not None:
                        txn.read(bkv.key, bkv.mod_revision)
                    else:
                        txn.absent(k.block_of_affinity(key))
                    txn.delete(key)
                else:
                    entry["why"] = "the block changed or has no owner; run check again"
            else:
                akey = k.affinity_key(b.node, b.cidr)
                entry["action"] = f"write {akey} (node {b.node}, block {b.cidr})"
                akv = kv if akey == key else ds.get(akey)
                txn.read(bkv.key, bkv.mod_revision)   # (the key itself is guarded: it is the block or the affinity)
                txn.read(akey, akv.mod_revision if akv else 0)
                if kind == "undecodable" and akey != key:   # an undecodable record under another node's name
                    txn.delete(key)
                txn.put(akey, Affinity.of(b))
        elif kind == "affinity-without-block":
            entry["action"] = f"delete {key}"
            txn.absent(k.block_of_affinity(key))
            txn.delete(key)
        else:   # undecodable block
            net = k.block_of_key(key)
            got = _rebuild_block(ipam, net, pools)
            if isinstance(got, str):
                entry["why"] = got
            else:
                entry["action"] = f"rebuild block {net} from the handles holding its addresses"
                txn.put(k.block(net), got)
        if txn.writes:
            if kv is None and kind != "affinity-without-block" and kind != "block-without-affinity":
                entry["why"] = "the key is gone; run check again"
            else:
                try:
                    commit(ds, txn)
                    entry["done"] = True
                except TxnConflict:
                    entry["why"] = "changed while fixing; run check again"
    return out

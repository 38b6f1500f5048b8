"""The store layer: the ONE place that knows how IPAM data sits in etcd.

Modelled on the idea of Calico's ``ipam_block_reader_writer.go`` (our own code).  It owns

* the key layout (``Keys``; the table below) and the inverse of every key (``Keys.*_of_key``);
* every record's encode / strict decode (``decode``: raises CorruptData naming the key) /
  tolerant decode (``decode_or_none``, and the light ``BlockInfo``/``HandleInfo`` summaries a
  full scan reads), with an ``Affinity`` model for the affinity record;
* paged streaming of a range or prefix (``iter_range`` / ``iter_prefix``);
* transaction building: a ``Txn`` records every key a plan read (with its mod revision, or
  its value for a content compare) and what it writes; ``Txn.ops()`` is pure; ``commit``
  sends it and raises ``Conflict`` when a guard did not hold.  Nothing outside this module
  and ``cni_ipam/datastore/`` builds a ``Compare``, ``Put`` or ``Delete``.

Key layout (all keys ASCII; outside names are percent-encoded)::

    <prefix>/v1/config                         global IPAM settings (IPAMConfig)
    <prefix>/v1/pools/<name>                   one IP pool
    <prefix>/v1/poolset                        bumped by every apply that creates a pool
    <prefix>/v1/blocks/v4/<hex addr>-<plen>    one block (hex so that keys sort numerically)
    <prefix>/v1/affinity/<node>/v4/<hex>-<plen> the node's claim on a block (Affinity)
    <prefix>/v1/handles/<net>/<cid>/<ifname>   what one attachment holds (the release index)
    <prefix>/v1/handles/<net>.<cid>.<ifname>   the same, as layout 1 (before 0.2) wrote it: still read
    <prefix>/v1/schema                         the data layout version (LAYOUT) and the oldest one that may use it
    <prefix>/v1/namespaces/<ns>                namespace annotations (without Kubernetes)
    <prefix>/v1/nodes/<node>                   node labels (without Kubernetes)
    <prefix>/v1/reservations                   every IPReservation, in one record (ipam/reservation.py)
    <prefix>/v1/controller/<name>              the controller's leadership key (lease-backed)

On the plugin's exec path: standard library and the record modules only.
"""
from __future__ import annotations

from cni_ipam import ipnet  # addresses without importing ipaddress (issue 17)

from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)

from ..constants import DEFAULT_PREFIX
from ..datastore.base import Compare, Delete, Put, Read, prefix_end
from .block import Block
from .errors import CorruptData
from .model import Handle, IPAMConfig, Schema

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterator, Sequence
    from ..datastore.base import KV, Datastore
    from .pool import Pool

# ============================================================================ keys

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def escape(name: str) -> str:
    """Percent-encode everything but [A-Za-z0-9_.-], so that no outside name can
    contain '/' (escape its place in the key space) or non-ASCII."""
    return "".join(chr(b) if b in _SAFE else "%%%02X" % b for b in name.encode("utf-8", "surrogatepass"))


def unescape(s: str) -> str:
    if "%" not in s:
        return s
    out = bytearray()
    i = 0
    while i < len(s):
        if s[i] == "%":
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(s[i]))
            i += 1
    return out.decode("utf-8", "surrogatepass")


def block_id(net) -> str:
    """``v4/0a000040-26``: family, zero-padded hex network address, prefix length."""
    width = 8 if net.version == 4 else 32
    return "v%d/%0*x-%d" % (net.version, width, int(net.network_address), net.prefixlen)


def block_from_id(bid: str) -> ipnet.Network:
    fam, rest = bid.split("/", 1)
    hexaddr, plen = rest.split("-", 1)
    if fam == "v4":
        return ipnet.Network(4, int(hexaddr, 16), int(plen))
    if fam == "v6":
        return ipnet.Network(6, int(hexaddr, 16), int(plen))
    raise ValueError(f"bad block id {bid!r}")


#: the data layout this code writes.  1: handles at ``handles/<esc(net.cid.ifname)>``;
#: 2: handles at ``handles/<esc(net)>/<esc(cid)>/<esc(ifname)>`` (layout-1 handles are still
#: read, released and reported), plus the ``schema`` record itself.
LAYOUT = 2


def handle_id(network: str, container_id: str, ifname: str) -> str:
    """The id of the attachment (network, container ID, interface): ``<net>/<cid>/<ifname>``.
    None of the three may contain ``/`` (network names and container IDs are
    ``[A-Za-z0-9][A-Za-z0-9_.-]*``, interface names exclude ``/``), so the id is unambiguous."""
    return f"{network}/{container_id}/{ifname}"


def legacy_handle_id(network: str, container_id: str, ifname: str) -> str:
    """The id layout 1 gave the same attachment: ``<net>.<cid>.<ifname>``.  Ambiguous (each part
    may contain dots), so a record found under it belongs to this attachment only when its own
    ``network``/``containerID``/``ifname`` fields say so (``Handle.is_attachment``)."""
    return f"{network}.{container_id}.{ifname}"


class Keys:
    """Every key of one store (``prefix``), and the inverse of each."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.root = prefix + "/v1/"
        self.config = self.root + "config"
        self.pools = self.root + "pools/"
        self.poolset = self.root + "poolset"
        self.blocks = self.root + "blocks/"
        self.affinity = self.root + "affinity/"
        self.handles = self.root + "handles/"
        self.namespaces = self.root + "namespaces/"
        self.nodes = self.root + "nodes/"
        self.schema = self.root + "schema"
        self.reservations = self.root + "reservations"   # every IPReservation, in one record (ipam/reservation.py)
        self.controller = self.root + "controller/"

    # -- pools
    def pool(self, name: str) -> str:
        return self.pools + escape(name)

    def pool_name_of_key(self, key: str) -> str:
        return unescape(key[len(self.pools):])

    # -- blocks
    def block(self, net) -> str:
        return self.blocks + block_id(net)

    def block_id_of_key(self, key: str) -> str:
        """The block id part of a block key (not checked)."""
        return key[len(self.blocks):]

    def block_of_key(self, key: str):
        """The CIDR a block key stands for (ValueError when it is not a block id)."""
        return block_from_id(self.block_id_of_key(key))

    def blocks_of_family(self, version: int) -> str:
        return self.blocks + "v%d/" % version

    def block_range(self, net) -> tuple[str, str]:
        """The block-key range holding every block inside ``net``, whatever the blocks' size
        (keys are ``v4/<zero-padded hex network>-<plen>``; '.' sorts right after '-')."""
        width = 8 if net.version == 4 else 32
        base = self.blocks_of_family(net.version)
        return (base + "%0*x" % (width, int(net.network_address)),
                base + "%0*x" % (width, int(net.broadcast_address)) + ".")

    def pool_block_range(self, p: Pool, lo: int, hi: int) -> tuple[str, str]:
        """The key range of pool ``p``'s blocks with indexes ``[lo, hi)``."""
        start = self.block(p.block_at(lo))
        end = self.block(p.block_at(hi)) if hi < p.n_blocks else self.block(p.block_at(hi - 1)) + "\0"
        return start, end

    # -- affinities
    def node_affinity(self, node: str) -> str:
        return self.affinity + escape(node) + "/"

    def affinity_key(self, node: str, net) -> str:
        return self.node_affinity(node) + block_id(net)

    def affinity_of_key(self, key: str) -> tuple[str, str]:
        """``(node, block id)`` of an affinity key (the node unescaped; ValueError /
        UnicodeDecodeError when the node part is not a valid escape)."""
        enode, _, bid = key[len(self.affinity):].partition("/")
        return unescape(enode), bid

    def affinity_block_id(self, key: str) -> str:
        """The block id part of an affinity key (not checked)."""
        return key[len(self.affinity):].partition("/")[2]

    def affinity_block(self, key: str):
        """The CIDR of an affinity key's block (CorruptData when it is not a block id)."""
        try:
            return block_from_id(self.affinity_block_id(key))
        except (ValueError, IndexError) as e:
            raise CorruptData(f"corrupt affinity record at etcd key {key}: not a block id ({e})") from None

    def block_of_affinity(self, key: str) -> str:
        """The block key an affinity key claims."""
        return self.blocks + self.affinity_block_id(key)

    # -- handles
    def handle(self, handle_id: str) -> str:
        """The key of a handle id: ``<net>/<cid>/<ifname>`` (layout 2) -> each part escaped,
        joined by ``/``; any other id (layout 1, or a name without two ``/``) -> escaped whole,
        so it holds no ``/`` and the two forms never meet."""
        parts = handle_id.split("/")
        if len(parts) == 3:
            return self.handles + "/".join(escape(p) for p in parts)
        return self.handles + escape(handle_id)

    def handle_of_key(self, key: str) -> str:
        """The handle id a key under ``handles/`` stands for (the inverse of ``handle``)."""
        rest = key[len(self.handles):]
        if "/" in rest:
            return "/".join(unescape(p) for p in rest.split("/"))
        return unescape(rest)

    def network_handles(self, network: str) -> str:
        """A prefix holding every handle of ``network`` in both layouts (and those of networks
        whose name starts with it: filter on the record's ``network``)."""
        return self.handles + escape(network)

    # -- labels / annotations records, controller
    def namespace(self, ns: str) -> str:
        return self.namespaces + escape(ns)

    def node(self, node: str) -> str:
        return self.nodes + escape(node)

    def namespace_name_of_key(self, key: str) -> str:
        return unescape(key[len(self.namespaces):])

    def node_name_of_key(self, key: str) -> str:
        return unescape(key[len(self.nodes):])

    def leader(self, name: str = "leader") -> str:
        return self.controller + escape(name)


# ============================================================================ records

class Affinity:
    """``<prefix>/v1/affinity/<node>/<block id>``: the node's claim on a block, with the pool
    and mode it was claimed for (``{"pool":..,"mode":..}``; nothing reads more than the key)."""

    __slots__ = ("pool", "mode")

    def __init__(self, pool: str, mode: str):
        self.pool, self.mode = pool, mode

    def __eq__(self, other):
        return isinstance(other, Affinity) and (self.pool, self.mode) == (other.pool, other.mode)

    def __repr__(self) -> str:
        return f"Affinity(pool={self.pool!r}, mode={self.mode!r})"

    @classmethod
    def of(cls, block: Block) -> Affinity:
        return cls(block.pool, block.mode)

    def to_json(self) -> bytes:
        return json.dumps({"pool": self.pool, "mode": self.mode}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Affinity:
        try:
            d = json.loads(data)
            return cls(str(d.get("pool", "")), str(d.get("mode", "")))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"undecodable affinity: {e}") from None


def encode_record(name: str, field_name: str, values: dict, old: bytes | None = None) -> bytes:
    """``<prefix>/v1/namespaces/<ns>`` = {"name", "annotations", "labels"?};
    ``<prefix>/v1/nodes/<node>`` = {"name", "labels"}.  ``old``: the record as read, whose
    other fields are kept."""
    d: dict = {"name": name}
    if old:
        try:
            prev = json.loads(old)
            if isinstance(prev, dict):
                d.update({k: v for k, v in prev.items() if k not in ("name", field_name)})
        except ValueError:
            pass
    d[field_name] = dict(sorted(values.items()))
    return json.dumps(d, separators=(",", ":")).encode()


def decode_record(etcd_key: str, value: bytes | None, field_name: str) -> dict:
    if not value:
        return {}
    try:
        d = json.loads(value)
        m = d.get(field_name) or {}
        if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
            raise ValueError(f"{field_name} must be a map of strings")
        return m
    except (ValueError, AttributeError) as e:
        raise CorruptData(f"corrupt value at etcd key {etcd_key}: {e}") from None


_DECODE_ERRORS = (ValueError, RecursionError)   # (BlockError and PoolError are ValueErrors)


def decode(key: str, value: bytes | None, decoder):
    """Strict decode of the value at ``key`` with ``decoder`` (``Block.from_json``, ...):
    CorruptData naming the key for anything undecodable, and for a block whose value
    describes another CIDR than its key (that would hand out the other CIDR's addresses)."""
    try:
        out = decoder(value)
    except _DECODE_ERRORS as e:
        raise CorruptData(f"corrupt value at etcd key {key}: {e}") from None
    if isinstance(out, Block) and not key.endswith("/blocks/" + block_id(out.cidr)):
        raise CorruptData(f"corrupt value at etcd key {key}: it describes block {out.cidr}")
    return out


def decode_or_none(key: str, value: bytes | None, decoder, errors: list | None = None):
    """Tolerant decode: the record, or None when it is undecodable (with ``errors``: the
    ``(key, message)`` is appended there)."""
    try:
        return decode(key, value, decoder)
    except CorruptData as e:
        if errors is not None:
            errors.append((key, e.msg))
        return None


def decode_block(key: str, value: bytes) -> Block:
    return decode(key, value, Block.from_json)


def decode_handle(key: str, value: bytes) -> Handle:
    return decode(key, value, Handle.from_json)


def decode_pool(key: str, value: bytes) -> Pool:
    from .pool import Pool   # (imported here: a DEL, which reads no pool, does not load pool.py)
    return decode(key, value, Pool.from_json)


def decode_config(value: bytes | None, key: str = "config") -> IPAMConfig:
    return decode(key, value, IPAMConfig.from_json) if value is not None else IPAMConfig()


def release_cooldown(res, key: str) -> int:
    """ipCooldownSeconds from a read (RangeResult) of the config key, for a release: a release
    never fails on a corrupt config (it needs nothing else from it): then no cooldown, and a
    warning."""
    return release_cooldown_of(res.kvs[0].value if res.kvs else None, key)


def release_cooldown_of(value: bytes | None, key: str) -> int:
    """``release_cooldown`` from the config key's value (None: absent)."""
    try:
        return decode_config(value, key).ip_cooldown_seconds
    except CorruptData as e:
        from ..log import log
        log.warning("release: %s; releasing without a cooldown", e.msg)
        return 0


def decode_schema(key: str, value: bytes | None) -> Schema:
    return decode(key, value, Schema.from_json)


class BlockInfo:
    """What a full scan needs of a block (tolerant and ~5x cheaper than ``Block.from_json``)."""
    __slots__ = ("key", "rev", "cidr", "pool", "node", "allocations", "empty_since")

    def __init__(self, key, rev, cidr, pool, node, allocations, empty_since):
        self.key, self.rev, self.cidr, self.pool, self.node = key, rev, cidr, pool, node
        self.allocations, self.empty_since = allocations, empty_since

    @classmethod
    def from_dict(cls, key: str, rev: int, d) -> BlockInfo:
        """Raises ValueError/KeyError/TypeError/AttributeError for a record it cannot use."""
        allocs = d["allocations"]
        if not isinstance(allocs, dict):
            raise TypeError("allocations")
        return cls(key, rev, str(d["cidr"]), str(d.get("pool", "")), d.get("node"),
                   {int(o): str(h) for o, h in allocs.items()}, float(d.get("emptySince", 0.0) or 0.0))


class HandleInfo:
    """What a full scan needs of a handle record: its id, node, pod and the keys of its blocks."""
    __slots__ = ("id", "rev", "node", "namespace", "pod", "uid", "blocks", "key")

    def __init__(self, id, rev, node, namespace, pod, uid, blocks, key):
        self.id, self.rev, self.node, self.namespace, self.pod, self.uid = id, rev, node, namespace, pod, uid
        self.blocks, self.key = blocks, key

    @classmethod
    def from_dict(cls, keys: Keys, key: str, rev: int, d, block_keys: dict) -> HandleInfo:
        """``block_keys``: a cache {block CIDR text: block key}.  Raises ValueError/KeyError/
        TypeError/AttributeError for a record it cannot use."""
        blocks = []
        for a in d.get("addresses") or ():
            b = a["block"]
            bkey = block_keys.get(b)
            if bkey is None:
                bkey = block_keys[b] = keys.block(ipnet.ip_network(b))
            blocks.append(bkey)
        return cls(str(d["id"]), rev, str(d["node"]), d.get("namespace") or "", d.get("pod") or "",
                   d.get("podUID") or "", blocks, key)


def decoded_dicts(kvs, chunk: int = 2000):
    """(kv, decoded JSON object or None) for each kv; records are parsed ``chunk`` at a time in ONE
    ``json.loads`` (a JSON array of the values: ~3x faster than one call per record); a chunk
    with a bad record is parsed record by record."""
    import json as std_json   # (the C decoder: only long-running code scans whole prefixes)
    buf: list = []

    def flush():
        try:
            ds_ = std_json.loads(b"[" + b",".join(kv.value for kv in buf) + b"]")
            if len(ds_) != len(buf):
                raise ValueError("count")
            for kv, d in zip(buf, ds_):
                yield kv, (d if isinstance(d, dict) else None)
        except (ValueError, UnicodeDecodeError):
            for kv in buf:
                try:
                    d = std_json.loads(kv.value)
                except (ValueError, UnicodeDecodeError):
                    d = None
                yield kv, (d if isinstance(d, dict) else None)
        buf.clear()
    for kv in kvs:
        buf.append(kv)
        if len(buf) >= chunk:
            yield from flush()
    if buf:
        yield from flush()


# ============================================================================ streaming

PAGE = 500  # keys per range request when streaming


def iter_range(ds: Datastore, start: str, end: str, *, keys_only: bool = False,
               page: int = PAGE) -> Iterator[KV]:
    """Every key in [start, end), one page per request, without holding more than a page."""
    while True:
        res = ds.read([Read(start, end, keys_only=keys_only, limit=page)])[0]
        yield from res.kvs
        if not res.more or not res.kvs:
            return
        start = res.kvs[-1].key + "\0"


def iter_prefix(ds: Datastore, prefix: str, **kw) -> Iterator[KV]:
    return iter_range(ds, prefix, prefix_end(prefix), **kw)


# ============================================================================ transactions

class Conflict(Exception):
    """A transaction was not applied: a key it was planned from changed meanwhile (a lost
    compare-and-swap).  Nothing was written; the caller re-reads and plans again."""


_NO_VALUE = object()   # a read recorded by revision only


class Txn:
    """One planned transaction: the keys the plan read (guards) and the writes.

    * ``read(key, rev, value)``: the plan depended on ``key`` at mod revision ``rev`` (0: absent)
      holding ``value``; the first record of a key wins.  With ``by_value`` (the snapshot fast
      path) a key read with its value is guarded by CONTENT (it still holds exactly these bytes;
      None: still absent -- revision numbers cannot prove content: a store restored from a
      backup reuses them), else by its mod revision.
    * ``no_newer(prefix, rev)``: nothing under ``prefix`` was created or modified after ``rev``
      (deletions are not seen: read each known key as well); ``canary``: a prefix for a
      fail-closed guard against an etcd that ignores range compares (< 3.3).
    * ``guard(compare)``: an extra guard of the caller's (the controller's leadership).
    * ``put(key, record or bytes)`` (a record is encoded by ``ops``: a block may still change
      while the plan goes on), ``delete(key)``.

    ``ops()`` is pure: it returns ``(compares, ops, puts)`` (``puts``: key -> bytes written)
    and leaves the Txn as it was."""

    __slots__ = ("by_value", "reads", "values", "ranges", "canary", "extra", "writes", "leases")

    def __init__(self, by_value: bool = False):
        self.by_value = by_value
        self.reads: dict[str, int] = {}
        self.values: dict[str, Any] = {}   # bytes | None | _NO_VALUE
        self.ranges: list[tuple[str, int, str | None]] = []
        self.canary: str | None = None
        self.extra: list = []
        self.writes: dict[str, Any] = {}   # key -> record | bytes | None (delete)
        self.leases: dict[str, int] = {}

    def read(self, key: str, rev: int, value=_NO_VALUE) -> None:
        if key not in self.reads:
            self.reads[key] = rev
            self.values[key] = value

    def absent(self, key: str) -> None:
        """The plan depends on ``key`` not existing."""
        self.read(key, 0, None)

    def no_newer(self, prefix: str, rev: int, end: str | None = None) -> None:
        """Nothing under ``prefix`` (or in [prefix, end)) created or modified after ``rev``."""
        self.ranges.append((prefix, rev, end))

    def guard(self, compare) -> None:
        self.extra.append(compare)

    def put(self, key: str, value, lease: int = 0) -> None:
        self.writes[key] = value
        if lease:
            self.leases[key] = lease

    def delete(self, key: str) -> None:
        self.writes[key] = None

    def update(self, key: str, rev: int, value, record) -> None:
        """Read-modify-write: ``key`` was read at ``rev`` holding ``value``; write ``record``."""
        self.read(key, rev, value)
        self.writes[key] = record

    def written(self, key: str):
        """The record (or bytes) this txn writes at ``key``; None when none (or a delete)."""
        return self.writes.get(key)

    def n_compares(self) -> int:
        return len(self.reads) + len(self.ranges) + (self.canary is not None) + len(self.extra)

    def ops(self) -> tuple[list, list, dict]:
        compares = []
        for key, rev in self.reads.items():
            value = self.values[key]
            if self.by_value and value is not _NO_VALUE:
                compares.append(Compare(key, 0) if value is None else Compare(key, value=value))
            else:
                compares.append(Compare(key, rev))
        for prefix, rev, end in self.ranges:
            compares.append(Compare(prefix, rev + 1, range_end=end or prefix_end(prefix), result="LESS"))
        if self.canary is not None:
            # an etcd that ignored range_end would read this as "the key has mod revision > 0",
            # which is false (no such key): the txn fails rather than trusting unchecked ranges
            compares.append(Compare(self.canary, 0, range_end=prefix_end(self.canary), result="GREATER"))
        compares += self.extra
        ops: list = []
        puts: dict[str, bytes] = {}
        deletes: list = []
        for key, v in self.writes.items():
            if v is None:
                deletes.append(Delete(key))
            else:
                data = v if isinstance(v, bytes) else v.to_json()
                puts[key] = data
                ops.append(Put(key, data, lease=self.leases.get(key, 0)))
        return compares, ops + deletes, puts


def commit(ds: Datastore, txn: Txn) -> dict[str, bytes]:
    """Send ``txn``; returns what it wrote (key -> bytes; ``ds.last_revision``: their revision).
    Raises ``Conflict`` when a guard did not hold (nothing written); DatastoreError /
    DatastoreUnavailable as the transport does."""
    compares, ops, puts = txn.ops()
    if not ds.commit(compares, ops):
        raise Conflict()
    return puts


def revision_guard(key: str, rev: int):
    """A guard that ``key`` still has mod revision ``rev`` (0: does not exist), for ``Txn.guard``."""
    return Compare(key, rev)


def guards_hold(ds: Datastore, guards: Sequence) -> bool:
    """Do ``guards`` (revision guards) hold now?"""
    if not guards:
        return True
    got = ds.read([Read(g.key) for g in guards])
    for g, res in zip(guards, got):
        rev = res.kvs[0].mod_revision if res.kvs else 0
        if rev != g.mod_revision:
            return False
    return True


def commit_batches(ds: Datastore, txns: Sequence[Txn], max_ops: int | None = None) -> int:
    """Commit independent ``txns`` packed into as few transactions as etcd's op limit allows
    (``max_ops``: default ``MAX_TXN_OPS``).  Returns how many of them were committed; a batch
    that fails on a guard is skipped (the caller re-reads and tries again)."""
    from ..datastore.base import MAX_TXN_OPS
    limit = MAX_TXN_OPS if max_ops is None else max_ops
    done = 0
    batch_c: list = []
    batch_o: list = []
    n = 0
    for txn in txns:
        cs, os_, _ = txn.ops()
        if len(batch_c) + len(cs) > limit or len(batch_o) + len(os_) > limit:
            if batch_o and ds.commit(batch_c, batch_o):
                done += n
            batch_c, batch_o, n = [], [], 0
        batch_c.extend(cs)
        batch_o.extend(os_)
        n += 1
    if batch_o and ds.commit(batch_c, batch_o):
        done += n
    return done

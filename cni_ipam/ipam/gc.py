"""Store-side garbage collection: the guarded transactions the controller (and
``cni-ipam node remove``) use to free leaked addresses, empty blocks and the
affinities of nodes that are gone.

Every function here builds ONE compare-and-swap transaction per object (a store.Txn):

* the records it read are compared on their mod revision (nothing changed since they
  were judged: a handle re-created under the same id, an address allocated in a block
  that looked empty, ... make the txn fail and the object is judged again later);
* ``guards``: extra compares the caller adds to every write -- the controller passes the
  compare on its leadership key, so a former leader that was paused (SIGSTOP, a long GC
  pause) and lost its lease can never write: its txn fails on the guard and
  :class:`GuardLost` is raised.

Nothing here decides WHAT is leaked (that needs Kubernetes: cni_ipam/controller/).
"""
from __future__ import annotations

from typing import Sequence

from ..constants import ERR_TRY_AGAIN_LATER
from ..datastore import Datastore, Read
from .block import Block
from .errors import CorruptData, IPAMError
from .store import (BlockInfo, Conflict, HandleInfo, Keys, Txn, block_from_id, commit, decode_block,
                    decode_handle, decode_or_none, decoded_dicts, guards_hold, iter_range, release_cooldown)

__all__ = ["BlockInfo", "HandleInfo", "guards_hold"]   # (re-exported: their home is ipam/store.py)

#: attempts of one object's txn when it loses against a concurrent writer
RETRIES = 10


class GuardLost(IPAMError):
    """A guard compare (the controller's leadership) no longer holds: nothing was written."""
    code = ERR_TRY_AGAIN_LATER


def leader_key(keys: Keys, name: str = "leader") -> str:
    """The controller's leadership key (a lease-backed key; its mod revision is the guard)."""
    return keys.leader(name)


def _commit(ds: Datastore, txn: Txn, guards: Sequence) -> bool:
    """Commit ``txn`` with ``guards``; on failure tell a lost guard (raise) from a lost CAS (False)."""
    for g in guards:
        txn.guard(g)
    try:
        commit(ds, txn)
        return True
    except Conflict:
        pass
    if not guards_hold(ds, guards):
        raise GuardLost("this controller is no longer the leader (its leadership key changed); "
                        "nothing was written")
    return False


def release_handle(ds: Datastore, keys: Keys, handle_id: str, *, expect_revision: int | None = None,
                   guards: Sequence = (), retries: int = RETRIES, key: str | None = None,
                   block_keys: Sequence[str] = ()) -> list[str] | None:
    """Release everything one handle holds, all together (one txn: the handle record is deleted
    and every block it holds an address in is rewritten).

    ``expect_revision``: the handle's mod revision when it was judged leaked; if the record
    changed since (or is gone), nothing is released and None is returned.
    ``key``: the record's key as read (default: the key of ``handle_id``); ``block_keys``: the
    blocks it is expected to hold addresses in (read together with the handle: 2 requests).
    Returns the released addresses; raises GuardLost."""
    hkey = key or keys.handle(handle_id)
    hint = list(dict.fromkeys(block_keys or ()))
    for _ in range(retries):
        got = ds.read([Read(hkey)] + [Read(b) for b in hint] + [Read(keys.config)])   # ONE read
        cooldown = release_cooldown(got.pop(), keys.config)   # (release times are recorded only with a cooldown set)
        hkv = got[0].kvs[0] if got[0].kvs else None
        if hkv is None or (expect_revision is not None and hkv.mod_revision != expect_revision):
            return None
        try:
            h = decode_handle(hkey, hkv.value)
        except CorruptData as e:
            raise CorruptData(f"{e.msg}; not touched") from None
        bkeys = list(dict.fromkeys(keys.block(a.block) for a in h.addresses))
        have = {b: (res.kvs[0] if res.kvs else None) for b, res in zip(hint, got[1:])}
        missing = [b for b in bkeys if b not in have]
        if missing:
            have.update(zip(missing, ds.get_many(missing)))
        txn = Txn()
        txn.read(hkey, hkv.mod_revision)
        txn.delete(hkey)
        released: list[str] = []
        for bkey in bkeys:
            kv = have[bkey]
            if kv is None:
                txn.absent(bkey)
                continue
            try:
                b = decode_block(bkey, kv.value)
            except CorruptData as e:
                raise CorruptData(f"{e.msg}; handle {handle_id} not released") from None
            for a in h.addresses:
                if a.ip in b.cidr and b.release(a.ip, handle_id, cooldown=cooldown):
                    released.append(str(a.ip))
            txn.update(bkey, kv.mod_revision, kv.value, b)
        if _commit(ds, txn, guards):
            return released
        hint = bkeys
    raise IPAMError(f"release of handle {handle_id}: gave up after {retries} conflicting attempts")


def delete_empty_block(ds: Datastore, keys: Keys, block_key: str, *, expect_revision: int | None,
                       affinity_keys: Sequence[str] | None = None, guards: Sequence = ()) -> bool:
    """Delete a block that is empty at ``expect_revision`` together with its affinity records
    (``affinity_keys``; default: its owner's).  False (nothing written) when the block changed since
    (``expect_revision`` None: whatever its revision now, if it is empty now)."""
    kv = ds.get(block_key)
    if kv is None or (expect_revision is not None and kv.mod_revision != expect_revision):
        return False
    b = decode_or_none(block_key, kv.value, Block.from_json)
    if b is None:
        return False   # undecodable: never touched here (`cni-ipam check` reports it)
    if b.allocations:
        return False
    if affinity_keys is None:
        affinity_keys = [keys.affinity_key(b.node, b.cidr)] if b.node else []
    txn = Txn()
    txn.read(block_key, kv.mod_revision)
    txn.delete(block_key)
    for a in affinity_keys:
        txn.delete(a)
    return _commit(ds, txn, guards)


def delete_affinity(ds: Datastore, keys: Keys, affinity_key: str, *, guards: Sequence = ()) -> bool:
    """Delete an affinity record whose block does not exist (compare: the block is still absent)."""
    kv = ds.get(affinity_key)
    if kv is None:
        return False
    txn = Txn()
    txn.read(affinity_key, kv.mod_revision)
    txn.absent(keys.block_of_affinity(affinity_key))
    txn.delete(affinity_key)
    return _commit(ds, txn, guards)


# ----------------------------------------------------------------------------- a node by hand

def node_records(ipam, node: str) -> dict:
    """What the store holds for ``node``: its handles, its blocks (empty or not) and its
    affinity records (for ``node remove`` to show before it acts)."""
    ds, k = ipam.ds, ipam.keys
    handles = [h for h in ipam.handles() if h.node == node]
    affs = [kv.key for kv in ds.get_prefix(k.node_affinity(node), keys_only=True)]
    blocks = []
    for kv in ds.get_prefix(k.blocks):
        b = decode_or_none(kv.key, kv.value, Block.from_json)
        if b is None:
            continue
        if b.node == node:
            blocks.append((kv, b))
    return {"handles": handles, "affinities": affs, "blocks": blocks}


def remove_node(ipam, node: str, *, guards: Sequence = ()) -> dict:
    """The node is gone: release every handle recorded on it, delete its blocks that are then
    empty with their affinities, and affinities whose block does not exist.  Blocks still
    holding addresses of other nodes (borrowed) stay, with their affinity.
    Returns {"released": [{"handle", "addresses"}], "blocksDeleted": [...], "blocksKept": [...],
    "affinitiesDeleted": [...]}."""
    ds, k = ipam.ds, ipam.keys
    rec = node_records(ipam, node)
    out: dict = {"node": node, "released": [], "blocksDeleted": [], "blocksKept": [], "affinitiesDeleted": []}
    for h in rec["handles"]:
        got = release_handle(ds, k, h.id, guards=guards)   # (a record under a key other than its id's: skipped)
        if got is not None:
            out["released"].append({"handle": h.id, "addresses": got})
    for kv, b in rec["blocks"]:
        fresh = ds.get(kv.key)
        if fresh is None:
            continue
        fb = decode_or_none(kv.key, fresh.value, Block.from_json)
        if fb is None:
            continue
        if fb.allocations:
            out["blocksKept"].append({"block": str(fb.cidr), "inUse": fb.in_use})
            continue
        if delete_empty_block(ds, k, kv.key, expect_revision=fresh.mod_revision, guards=guards):
            out["blocksDeleted"].append(str(fb.cidr))
    kept = {b["block"] for b in out["blocksKept"]}
    for akey in rec["affinities"]:
        try:
            net = block_from_id(k.affinity_block_id(akey))
        except (ValueError, IndexError):
            continue
        if str(net) in kept or str(net) in out["blocksDeleted"]:
            continue
        if delete_affinity(ds, k, akey, guards=guards):
            out["affinitiesDeleted"].append(str(net))
    return out


def affinity_node(keys: Keys, affinity_key: str) -> str:
    """The node an affinity key belongs to."""
    return keys.affinity_of_key(affinity_key)[0]


# ----------------------------------------------------------------------------- one read of the store

class StoreView:
    """What one controller pass knows about the store (read page by page, no per-object reads)."""

    def __init__(self):
        self.pools: dict[str, int] = {}              # pool name -> size (addresses)
        self.blocks: list[BlockInfo] = []
        self.handles: list[HandleInfo] = []
        self.affinities: list[tuple[str, str, str]] = []   # (key, node, block id)
        self.undecodable: list[str] = []
        self.requests = 0


class Splits:
    """Range reads of a large prefix that cost O(keys read), pass after pass.

    etcd (3.4) walks its index over EVERY key of a requested range, whatever the ``limit``:
    paging through n keys with pages of p costs O(n^2 / p) (150,000 handles in pages of
    2,000: ~12 s of etcd time).  So the first read of a prefix reads the keys alone in big
    pages (keys-only: ~100 bytes a key) and takes every ``page``-th key as a split point; every
    read then asks for the ranges between split points, several per request, each costing
    only its own keys (a range that grew is paged within itself), and learns the points anew
    for the next pass."""

    def __init__(self, page: int = 2000, first_page: int = 10000, per_request: int = 8, learn_page: int = 50000):
        self.page, self.first_page, self.per_request = page, first_page, per_request
        self.learn_page = learn_page
        self.points: dict[str, list[str]] = {}

    def iter(self, ds: Datastore, prefix: str, *, keys_only: bool = False):
        from ..datastore import prefix_end
        end = prefix_end(prefix)
        pts = self.points.get(prefix)
        new: list[str] = []
        n = 0

        def note(kv):
            nonlocal n
            if n % self.page == 0:
                new.append(kv.key)
            n += 1
        if not pts and not keys_only:
            # first read: learn where to cut from the keys alone (big keys-only pages: ~100 bytes a
            # key, few requests), then read the values range by range like any later pass
            pts = []
            start, i = prefix, 0
            while True:
                res = ds.read([Read(start, end, keys_only=True, limit=self.learn_page)])[0]
                for kv in res.kvs:
                    if i % self.page == 0:
                        pts.append(kv.key)
                    i += 1
                if not res.more or not res.kvs:
                    break
                start = res.kvs[-1].key + "\0"
        if not pts:
            for kv in iter_range(ds, prefix, end, keys_only=keys_only, page=self.first_page):
                note(kv)
                yield kv
        else:
            bounds = [prefix] + pts[1:] + [end]
            ranges = list(zip(bounds[:-1], bounds[1:]))
            groups = [ranges[i:i + self.per_request] for i in range(0, len(ranges), self.per_request)]

            def fetch(group):
                return ds.read([Read(a, b, keys_only=keys_only, limit=4 * self.page) for a, b in group])
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=1) as ex:   # the next read is in flight while this one is used
                nxt = ex.submit(fetch, groups[0])
                for gi, group in enumerate(groups):
                    results = nxt.result()
                    if gi + 1 < len(groups):
                        nxt = ex.submit(fetch, groups[gi + 1])
                    for (a, b), res in zip(group, results):
                        for kv in res.kvs:
                            note(kv)
                            yield kv
                        start = res.kvs[-1].key + "\0" if res.kvs else b
                        while res.more and res.kvs:   # this range grew: page within it
                            res = ds.read([Read(start, b, keys_only=keys_only, limit=4 * self.page)])[0]
                            for kv in res.kvs:
                                note(kv)
                                yield kv
                            if res.kvs:
                                start = res.kvs[-1].key + "\0"
        self.points[prefix] = new


def scan(ipam, page: int = 2000, splits: Splits | None = None) -> StoreView:
    """Pools, affinities (keys only), blocks and handles, streamed in ranges of about ``page``
    keys (``splits``: keep one between passes; see :class:`Splits`).
    Undecodable records are listed in ``undecodable`` and otherwise ignored (never touched)."""
    from .pools import read_pools
    ds, k = ipam.ds, ipam.keys
    before = ds.requests
    sp = splits or Splits(page)

    def iter_prefix(ds, prefix, keys_only=False, page=0):
        return sp.iter(ds, prefix, keys_only=keys_only)
    v = StoreView()
    pools, bad = read_pools(ipam)
    v.undecodable += bad
    v.pools = {p.name: p.cidr.num_addresses for p in pools}
    for kv in iter_prefix(ds, k.affinity, keys_only=True, page=page):
        try:
            node, bid = k.affinity_of_key(kv.key)
            v.affinities.append((kv.key, node, bid))
        except (ValueError, UnicodeDecodeError):
            v.undecodable.append(kv.key)
    for kv, d in decoded_dicts(iter_prefix(ds, k.blocks)):
        try:
            v.blocks.append(BlockInfo.from_dict(kv.key, kv.mod_revision, d))
        except (ValueError, KeyError, TypeError, AttributeError):
            v.undecodable.append(kv.key)
    bk: dict[str, str] = {}
    add = v.handles.append
    for kv, d in decoded_dicts(iter_prefix(ds, k.handles)):
        try:
            add(HandleInfo.from_dict(k, kv.key, kv.mod_revision, d, bk))
        except (ValueError, KeyError, TypeError, AttributeError):
            v.undecodable.append(kv.key)
    v.requests = ds.requests - before
    return v

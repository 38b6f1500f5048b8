"""Pool lifecycle (read, enable/disable, delete) and the global IPAM config."""
from __future__ import annotations

from ..datastore import KV
from .block import Block
from .errors import AdminError, Conflict, NotFound
from .manifest import config_problem
from .model import IPAMConfig
from .pool import Pool, PoolError
from .store import (Conflict as TxnConflict, Txn, block_from_id, commit, commit_batches, decode_or_none,
                    iter_prefix, iter_range)


def _replace(ds, key: str, rev: int, value) -> bool:
    """Write ``value`` at ``key`` iff it still has mod revision ``rev`` (0: does not exist)."""
    txn = Txn()
    txn.read(key, rev)
    if value is None:
        txn.delete(key)
    else:
        txn.put(key, value)
    try:
        commit(ds, txn)
        return True
    except TxnConflict:
        return False


def read_pools(ipam) -> tuple[list[Pool], list[str]]:
    """Decodable pools (by name) and the keys of undecodable ones (not fatal for reads)."""
    pools, bad = [], []
    for kv in ipam.ds.get_prefix(ipam.keys.pools):
        p = decode_or_none(kv.key, kv.value, Pool.from_json)
        if p is None:
            bad.append(kv.key)
        else:
            pools.append(p)
    pools.sort(key=lambda p: p.name)
    return pools, bad


def get_pool(ipam, name: str) -> tuple[KV, Pool]:
    key = ipam.keys.pool(name)
    kv = ipam.ds.get(key)
    if kv is None:
        raise NotFound(f'pool "{name}" does not exist')
    try:
        return kv, Pool.from_json(kv.value)
    except PoolError as e:
        raise AdminError(f'pool "{name}": the value at etcd key {key} is undecodable: {e}') from None


def set_pool_disabled(ipam, name: str, disabled: bool, retries: int = 20) -> bool:
    """Flip ``disabled`` with CAS (re-read on conflict).  True when it changed."""
    for _ in range(retries):
        kv, p = get_pool(ipam, name)
        if p.disabled == disabled:
            return False
        p.disabled = disabled
        if _replace(ipam.ds, kv.key, kv.mod_revision, p):
            return True
    raise Conflict(f'pool "{name}" kept changing; gave up after {retries} attempts')


def delete_pool(ipam, name: str, *, force: bool = False, max_rounds: int = 30) -> dict:
    """Delete a pool and everything of it, never leaving orphan blocks or affinities.

    Without ``force``, refuses while any address is allocated in it.  Steps, each CAS
    (the methods of ``_PoolDeletion``, in this order):
    1. ``disable``: so no ADD can claim or allocate in it any more (ADDs compare the
       pool's revision);
    2. ``empty_blocks``: with ``force`` release every handle holding an address in it,
       then delete each empty block together with its affinity;
    3. ``delete_stale_affinities``: affinities left without a block;
    4. ``delete_record``: the pool record, compared against the revision step 1 wrote."""
    d = _PoolDeletion(ipam, name, force)
    if d.pool is None:
        return d.delete_undecodable_record()
    d.refuse_if_held()
    d.disable()
    released, blocks_deleted = d.empty_blocks(max_rounds)
    aff_deleted = d.delete_stale_affinities()
    d.delete_record()
    return {"pool": name, "releasedHandles": released, "blocksDeleted": blocks_deleted,
            "affinitiesDeleted": aff_deleted, "undecodable": False}


class _PoolDeletion:
    """The state ``delete_pool``'s steps share: the pool record and the revision last written."""

    def __init__(self, ipam, name: str, force: bool):
        self.ipam, self.ds, self.k = ipam, ipam.ds, ipam.keys
        self.name, self.force = name, force
        self.key = self.k.pool(name)
        self.kv = self.ds.get(self.key)
        if self.kv is None:
            raise NotFound(f'pool "{name}" does not exist')
        self.rev = self.kv.mod_revision
        try:
            self.pool: Pool | None = Pool.from_json(self.kv.value)
        except PoolError as e:
            if not force:
                raise AdminError(f'pool "{name}": the value at etcd key {self.key} is undecodable ({e}), so '
                                 f'its blocks cannot be located; `pool delete {name} --force` removes just the '
                                 f'record (then run `cni-ipam check`)') from None
            self.pool = None
            return
        self.was_disabled = self.pool.disabled
        self.start, self.end = self.k.block_range(self.pool.cidr)

    def delete_undecodable_record(self) -> dict:
        """``--force`` on an undecodable record: its blocks cannot be located; just the record goes."""
        if not _replace(self.ds, self.key, self.rev, None):
            raise Conflict(f'pool "{self.name}" changed while deleting it; try again')
        return {"pool": self.name, "releasedHandles": [], "blocksDeleted": 0, "affinitiesDeleted": 0,
                "undecodable": True}

    def scan(self):
        """(decodable blocks as (kv, Block), {handle: an address it holds}, undecodable block kvs)."""
        blocks, holders, bad = [], {}, []
        for bkv in iter_range(self.ds, self.start, self.end):
            b = decode_or_none(bkv.key, bkv.value, Block.from_json)
            if b is None:
                bad.append(bkv)
                continue
            blocks.append((bkv, b))
            for o, hid in b.allocations.items():
                holders.setdefault(hid, b.ip(o))
        return blocks, holders, bad

    def refuse(self, holders, extra=""):
        n = len(holders)
        hid, ip = next(iter(holders.items()))
        raise AdminError(f'pool "{self.name}" has addresses allocated to {n} handle(s) (e.g. {ip} held by '
                         f'{hid}){extra}; release them first, or use --force, which releases them')

    def refuse_if_held(self) -> None:
        """Without ``force``: refuse while any address is allocated or a block is undecodable."""
        _, holders, bad = self.scan()
        if holders and not self.force:
            self.refuse(holders)
        if bad and not self.force:
            raise AdminError(f'pool "{self.name}": block {bad[0].key} is undecodable; use --force to delete '
                             f'it with the pool')

    def disable(self) -> None:
        """Step 1: mark the pool disabled (CAS), and remember the revision written."""
        pool = self.pool
        assert pool is not None   # (steps 1-4 run only on a decoded pool: delete_pool)
        if pool.disabled:
            return
        pool.disabled = True
        if not _replace(self.ds, self.key, self.rev, pool):
            raise Conflict(f'pool "{self.name}" changed while deleting it; nothing was deleted -- try again')
        now = self.ds.get(self.key)
        if now is None or now.value != pool.to_json():
            raise Conflict(f'pool "{self.name}" changed while deleting it; try again')
        self.rev = now.mod_revision

    def restore(self) -> None:
        """Undo step 1 (an ADD won the race against a delete without ``force``)."""
        pool = self.pool
        assert pool is not None
        if not self.was_disabled:
            pool.disabled = False
            _replace(self.ds, self.key, self.rev, pool)

    def empty_blocks(self, max_rounds: int) -> tuple[list[str], int]:
        """Step 2: release the holders (``force``), then delete every block with its affinity,
        re-scanning until none is left.  Returns (released handles, blocks deleted)."""
        k = self.k
        released: list[str] = []
        orphan_holders: set[str] = set()   # allocations whose handle record is gone (corruption)
        blocks_deleted = 0
        for _ in range(max_rounds):
            blocks, holders, bad = self.scan()
            live = {h: ip for h, ip in holders.items() if h not in orphan_holders}
            if live and not self.force:
                self.restore()
                self.refuse(live, " (allocated while the delete was starting)")
            for hid in live:
                if self.ipam.release(hid) is not None:
                    released.append(hid)
                else:
                    orphan_holders.add(hid)
            if live:
                continue   # re-scan: the released blocks have new revisions
            groups = []
            for bkv, b in [*blocks, *((bkv, None) for bkv in bad)]:
                txn = Txn()
                txn.read(bkv.key, bkv.mod_revision)
                txn.delete(bkv.key)
                if b is not None and b.node:
                    txn.delete(k.affinity_key(b.node, b.cidr))
                groups.append(txn)
            if not groups:
                return released, blocks_deleted
            blocks_deleted += commit_batches(self.ds, groups)
        raise AdminError(f'pool "{self.name}": its blocks kept changing; gave up after {max_rounds} rounds '
                         f'(the pool stays disabled; run the delete again)')

    def delete_stale_affinities(self) -> int:
        """Step 3: affinities left without a block (a block deleted by hand, an interrupted delete)."""
        k, pool = self.k, self.pool
        assert pool is not None
        stale = []
        for akv in iter_prefix(self.ds, k.affinity, keys_only=True):
            try:
                net = block_from_id(k.affinity_block_id(akv.key))
            except (ValueError, IndexError):
                continue
            if net.version == pool.version and net.subnet_of(pool.cidr):  # type: ignore[arg-type]  # (same version)
                txn = Txn()
                txn.delete(akv.key)
                stale.append(txn)
        return commit_batches(self.ds, stale)

    def delete_record(self) -> None:
        """Step 4: the pool record, once no block is left, compared against step 1's revision."""
        if self.ds.count(self.start, self.end):
            raise AdminError(f'pool "{self.name}": blocks appeared while deleting it; the pool stays disabled '
                             f'-- run the delete again')
        if not _replace(self.ds, self.key, self.rev, None):
            raise Conflict(f'pool "{self.name}" was changed by someone else while deleting it (its blocks are '
                           f'already released); run the delete again')


# ----------------------------------------------------------------------------- config

def get_config(ipam) -> tuple[KV | None, IPAMConfig]:
    kv = ipam.ds.get(ipam.keys.config)
    if kv is None:
        return None, IPAMConfig()
    try:
        return kv, IPAMConfig.from_json(kv.value)
    except ValueError as e:
        raise AdminError(f"the IPAM config at etcd key {ipam.keys.config} is undecodable: {e} "
                         f"(`cni-ipam apply` an IPAMConfig to replace it)") from None


def configure(ipam, *, strict_affinity: bool | None = None, auto_allocate_blocks: bool | None = None,
              max_blocks_per_host: int | None = None, retries: int = 20) -> tuple[IPAMConfig, IPAMConfig]:
    """Change some settings (CAS read-modify-write).  Returns (before, after)."""
    for _ in range(retries):
        kv, cfg = get_config(ipam)
        before = IPAMConfig(**vars(cfg))
        if strict_affinity is not None:
            cfg.strict_affinity = strict_affinity
        if auto_allocate_blocks is not None:
            cfg.auto_allocate_blocks = auto_allocate_blocks
        if max_blocks_per_host is not None:
            cfg.max_blocks_per_host = max_blocks_per_host
        problem = config_problem(cfg)
        if problem:
            raise AdminError(f"refusing this IPAM config: {problem}")
        if kv is not None and cfg == before:
            return before, cfg
        if _replace(ipam.ds, ipam.keys.config, kv.mod_revision if kv else 0, cfg):
            return before, cfg
    raise Conflict(f"the IPAM config kept changing; gave up after {retries} attempts")

"""Pool lifecycle (read, enable/disable, delete) and the global IPAM config."""
from __future__ import annotations

from ..datastore import KV, Compare, Delete, Put
from ..datastore.base import MAX_TXN_OPS
from .block import Block, BlockError
from .errors import AdminError, Conflict, NotFound
from .keys import block_from_id
from .manifest import config_problem
from .model import IPAMConfig
from .pool import Pool, PoolError
from .paged import cidr_block_range, iter_prefix, iter_range


def read_pools(ipam) -> tuple[list[Pool], list[str]]:
    """Decodable pools (by name) and the keys of undecodable ones (not fatal for reads)."""
    pools, bad = [], []
    for kv in ipam.ds.get_prefix(ipam.keys.pools):
        try:
            pools.append(Pool.from_json(kv.value))
        except PoolError:
            bad.append(kv.key)
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
        if ipam.ds.commit([Compare(kv.key, kv.mod_revision)], [Put(kv.key, p.to_json())]):
            return True
    raise Conflict(f'pool "{name}" kept changing; gave up after {retries} attempts')


def _commit_chunks(ds, items: list[tuple[list, list]], max_ops: int = MAX_TXN_OPS) -> int:
    """Commit (compares, ops) groups, packed into transactions within etcd's op limit.
    Returns how many groups were committed; failed transactions are skipped (caller re-scans)."""
    done = 0
    batch_c: list = []
    batch_o: list = []
    n = 0

    def flush():
        nonlocal batch_c, batch_o, n, done
        if batch_o and ds.commit(batch_c, batch_o):
            done += n
        batch_c, batch_o, n = [], [], 0

    for cs, os_ in items:
        if len(batch_c) + len(cs) > max_ops or len(batch_o) + len(os_) > max_ops:
            flush()
        batch_c.extend(cs)
        batch_o.extend(os_)
        n += 1
    flush()
    return done


def delete_pool(ipam, name: str, *, force: bool = False, max_rounds: int = 30) -> dict:
    """Delete a pool and everything of it, never leaving orphan blocks or affinities.

    Without ``force``, refuses while any address is allocated in it.  Steps, each CAS:
    disable the pool (so no ADD can claim or allocate in it any more: ADDs compare the
    pool's revision); with ``force`` release every handle holding an address in it;
    delete each empty block together with its affinity; delete affinities left
    without a block; finally delete the pool record, compared against the revision
    this function wrote."""
    ds, k = ipam.ds, ipam.keys
    key = k.pool(name)
    kv = ds.get(key)
    if kv is None:
        raise NotFound(f'pool "{name}" does not exist')
    try:
        pool = Pool.from_json(kv.value)
    except PoolError as e:
        if not force:
            raise AdminError(f'pool "{name}": the value at etcd key {key} is undecodable ({e}), so its '
                             f'blocks cannot be located; `pool delete {name} --force` removes just the '
                             f'record (then run `cni-ipam check`)') from None
        if not ds.commit([Compare(key, kv.mod_revision)], [Delete(key)]):
            raise Conflict(f'pool "{name}" changed while deleting it; try again')
        return {"pool": name, "releasedHandles": [], "blocksDeleted": 0, "affinitiesDeleted": 0,
                "undecodable": True}
    start, end = cidr_block_range(k, pool.cidr)

    def scan():
        blocks, holders, bad = [], {}, []
        for bkv in iter_range(ds, start, end):
            try:
                b = Block.from_json(bkv.value)
            except BlockError:
                bad.append(bkv)
                continue
            blocks.append((bkv, b))
            for o, hid in b.allocations.items():
                holders.setdefault(hid, b.ip(o))
        return blocks, holders, bad

    def refuse(holders, extra=""):
        n = len(holders)
        hid, ip = next(iter(holders.items()))
        raise AdminError(f'pool "{name}" has addresses allocated to {n} handle(s) (e.g. {ip} held by '
                         f'{hid}){extra}; release them first, or use --force, which releases them')

    _, holders, bad = scan()
    if holders and not force:
        refuse(holders)
    if bad and not force:
        raise AdminError(f'pool "{name}": block {bad[0].key} is undecodable; use --force to delete it '
                         f'with the pool')
    # 1. disable
    rev = kv.mod_revision
    was_disabled = pool.disabled
    if not pool.disabled:
        pool.disabled = True
        if not ds.commit([Compare(key, rev)], [Put(key, pool.to_json())]):
            raise Conflict(f'pool "{name}" changed while deleting it; nothing was deleted -- try again')
        now = ds.get(key)
        if now is None or now.value != pool.to_json():
            raise Conflict(f'pool "{name}" changed while deleting it; try again')
        rev = now.mod_revision

    def restore():
        if not was_disabled:
            pool.disabled = False
            ds.commit([Compare(key, rev)], [Put(key, pool.to_json())])

    released: list[str] = []
    orphan_holders: set[str] = set()   # allocations whose handle record is gone (corruption)
    blocks_deleted = 0
    for _ in range(max_rounds):
        blocks, holders, bad = scan()
        live = {h: ip for h, ip in holders.items() if h not in orphan_holders}
        if live and not force:
            restore()
            refuse(live, " (allocated while the delete was starting)")
        for hid in live:
            if ipam.release(hid) is not None:
                released.append(hid)
            else:
                orphan_holders.add(hid)
        if live:
            continue   # re-scan: the released blocks have new revisions
        groups = []
        for bkv, b in blocks:
            ops = [Delete(bkv.key)]
            if b.node:
                ops.append(Delete(k.affinity_key(b.node, b.cidr)))
            groups.append(([Compare(bkv.key, bkv.mod_revision)], ops))
        for bkv in bad:
            groups.append(([Compare(bkv.key, bkv.mod_revision)], [Delete(bkv.key)]))
        if not groups:
            break
        blocks_deleted += _commit_chunks(ds, groups)
    else:
        raise AdminError(f'pool "{name}": its blocks kept changing; gave up after {max_rounds} rounds '
                         f'(the pool stays disabled; run the delete again)')
    # affinities left without a block (a block deleted by hand, an interrupted delete)
    stale = []
    for akv in iter_prefix(ds, k.affinity, keys_only=True):
        rest = akv.key[len(k.affinity):]
        _, _, bid = rest.partition("/")
        try:
            net = block_from_id(bid)
        except (ValueError, IndexError):
            continue
        if net.version == pool.version and net.subnet_of(pool.cidr):
            stale.append(([], [Delete(akv.key)]))
    aff_deleted = _commit_chunks(ds, stale)
    if ds.count(start, end):
        raise AdminError(f'pool "{name}": blocks appeared while deleting it; the pool stays disabled -- '
                         f'run the delete again')
    if not ds.commit([Compare(key, rev)], [Delete(key)]):
        raise Conflict(f'pool "{name}" was changed by someone else while deleting it (its blocks are '
                       f'already released); run the delete again')
    return {"pool": name, "releasedHandles": released, "blocksDeleted": blocks_deleted,
            "affinitiesDeleted": aff_deleted, "undecodable": False}


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
        if ipam.ds.commit([Compare(ipam.keys.config, kv.mod_revision if kv else 0)],
                          [Put(ipam.keys.config, cfg.to_json())]):
            return before, cfg
    raise Conflict(f"the IPAM config kept changing; gave up after {retries} attempts")

"""``cni-ipam pool split NAME --into N``: replace a pool by N pools covering the same range,
moving no allocation.  (Calico: ``calicoctl ipam split``.)

Each sub-pool is ``<name>-<i>`` (i = 0..N-1, in address order), with the pool's settings and
cidr ``/(prefix + log2 N)``; N must be a power of two and leave every sub-pool at least one
block.  Every block (and its affinity record) then belongs to the sub-pool that contains it:
its ``pool`` field is rewritten, nothing else of it changes.

When everything fits in one etcd transaction, the split is ONE txn guarded on the pool's
revision, on the absence of the new names and on the revision of every block and affinity
it rewrites.  Otherwise a safe sequence, each step a CAS and each step safe to repeat:

1. disable the pool (an ADD compares the revision of each pool it allocates from, so from
   here on no ADD claims or allocates in it; releases go on);
2. rewrite the blocks and affinities in chunks (each compared on its revision; re-scanned
   until none is left);
3. one txn: delete the pool, create the sub-pools (enabled as the pool was), guarded on the
   pool's revision and on no block of the range still naming the old pool.

An interrupted split leaves the pool disabled: running the same command again finishes it.
"""
from __future__ import annotations

from cni_ipam import _json as json

from ..datastore.base import MAX_TXN_OPS
from .block import Block, BlockError
from .errors import IPAMError, InvalidRequest, TryAgain
from .store import Conflict as TxnConflict, Txn, commit, commit_batches
from .pool import Pool, PoolError


def sub_pools(pool: Pool, n: int) -> list[Pool]:
    """The N pools that replace ``pool`` (pure)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n & (n - 1):
        raise InvalidRequest(f"--into {n}: must be a power of two, at least 2")
    bits = n.bit_length() - 1
    plen = pool.cidr.prefixlen + bits
    if plen > pool.block_size:
        most = 1 << (pool.block_size - pool.cidr.prefixlen)
        raise InvalidRequest(f"pool {pool.name!r} ({pool.cidr}, blockSize {pool.block_size}) cannot be split into "
                             f"{n}: each part would be /{plen}, smaller than one block; at most {most}")
    out = []
    for i, net in enumerate(pool.cidr.subnets(prefixlen_diff=bits)):
        d = pool.to_dict()
        d["name"], d["cidr"] = f"{pool.name}-{i}", str(net)
        out.append(Pool.from_dict(d))
    return out


def _owner(parts: list[Pool], net) -> Pool:
    for p in parts:
        if net.subnet_of(p.cidr):
            return p
    raise AssertionError(f"{net} is in no part")  # pragma: no cover - parts cover the pool


def split_pool(ipam, name: str, n: int, *, dry_run: bool = False, max_rounds: int = 30) -> dict:
    """Split pool ``name`` into ``n``; returns {pool, into: [{name, cidr}], blocks, steps}."""
    from .errors import Conflict, NotFound
    from .paged import cidr_block_range, iter_range
    ds, k = ipam.ds, ipam.keys
    key = k.pool(name)
    kv = ds.get(key)
    if kv is None:
        raise NotFound(f'pool "{name}" does not exist')
    try:
        pool = Pool.from_json(kv.value)
    except PoolError as e:
        raise IPAMError(f'pool "{name}": the value at etcd key {key} is undecodable ({e}); fix it first') from None
    parts = sub_pools(pool, n)
    others = {p.name for p in ipam.pools()}
    taken = [p.name for p in parts if p.name in others]
    if taken:
        raise InvalidRequest(f"cannot split pool {name!r}: pool(s) {', '.join(taken)} already exist")
    start, end = cidr_block_range(k, pool.cidr)
    summary: dict = {"pool": name, "cidr": str(pool.cidr), "into": [{"name": p.name, "cidr": str(p.cidr)} for p in parts]}

    def scan():
        """(block kv, decoded, sub-pool) for blocks still naming another pool; + all affinities to fix."""
        todo = []
        for bkv in iter_range(ds, start, end):
            try:
                b = Block.from_json(bkv.value)
            except BlockError as e:
                raise IPAMError(f"block at etcd key {bkv.key} is undecodable ({e}): run `cni-ipam check` first") \
                    from None
            part = _owner(parts, b.cidr)
            if b.pool != part.name:
                todo.append((bkv, b, part))
        return todo

    def affinity_into(txn: Txn, b: Block, part: Pool) -> None:
        if not b.node:
            return
        akey = k.affinity_key(b.node, b.cidr)
        akv = ds.get(akey)
        if akv is None:
            txn.absent(akey)
            return
        try:
            d = json.loads(akv.value)
            d["pool"] = part.name
        except (ValueError, TypeError):
            txn.read(akey, akv.mod_revision)   # left as it is (check reports it)
            return
        # (other fields of the record are kept as they are)
        txn.update(akey, akv.mod_revision, akv.value, json.dumps(d, separators=(",", ":")).encode())

    def rewrite(items, txn: Txn) -> Txn:
        for bkv, b, part in items:
            b.pool = part.name
            affinity_into(txn, b, part)
            txn.update(bkv.key, bkv.mod_revision, bkv.value, b)
        return txn

    def replace_into(txn: Txn, kv, rev: int) -> Txn:
        """Delete the pool (as read), create its parts (absent so far); with ``rev``: nothing
        under the pool's block range created or changed after it."""
        for p in parts:
            txn.absent(k.pool(p.name))
            txn.put(k.pool(p.name), p)
        if rev:
            txn.no_newer(start, rev, end)
        txn.read(key, kv.mod_revision)
        txn.delete(key)
        return txn

    for _attempt in range(5):
        kv = ds.get(key)
        if kv is None:
            raise Conflict(f'pool "{name}" was deleted during the split')
        rev0 = ds.last_revision        # read before the blocks: a block created or changed after it fails the guard
        pool = Pool.from_json(kv.value)
        todo = scan()
        summary["blocks"] = len(todo)
        if dry_run:
            summary["steps"] = []
            return summary
        for p in parts:
            p.disabled = pool.disabled
        txn = replace_into(rewrite(todo, Txn()), kv, rev0)
        if txn.n_compares() > MAX_TXN_OPS or len(txn.writes) > MAX_TXN_OPS:
            break
        try:
            commit(ds, txn)
        except TxnConflict:
            continue
        summary["steps"] = ["one transaction"]
        return summary
    else:
        raise Conflict(f'pool "{name}" or its blocks kept changing during the split; nothing was changed, try again')
    # the safe sequence
    steps = []
    was_disabled = pool.disabled
    if not pool.disabled:
        pool.disabled = True
        txn = Txn()
        txn.update(key, kv.mod_revision, kv.value, pool)
        try:
            commit(ds, txn)
        except TxnConflict:
            raise Conflict(f'pool "{name}" changed during the split; nothing was changed, try again') from None
        steps.append("disabled the pool")
    for _ in range(max_rounds):
        todo = scan()
        if not todo:
            break
        # one small txn per block, packed into as few etcd txns as fit; a batch that lost a
        # race is re-scanned next round
        commit_batches(ds, [rewrite([item], Txn()) for item in todo])
    else:
        raise TryAgain(f'pool "{name}": blocks kept changing during the split; the pool stays disabled, '
                       f'run the same command again to finish')
    steps.append(f"rewrote {summary['blocks']} block(s) in chunks")
    for p in parts:
        p.disabled = was_disabled
    for _ in range(max_rounds):
        kv = ds.get(key)
        if kv is None:
            raise Conflict(f'pool "{name}" was deleted during the split')
        rev = ds.last_revision
        if scan():
            continue
        try:
            commit(ds, replace_into(Txn(), kv, rev))
        except TxnConflict:
            continue
        steps.append("replaced the pool by its parts")
        summary["steps"] = steps
        return summary
    raise TryAgain(f'pool "{name}": gave up finishing the split; the pool stays disabled, run the same '
                   f'command again to finish')

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

from ..datastore import Compare, Delete, Put
from ..datastore.base import MAX_TXN_OPS
from .block import Block, BlockError
from .errors import IPAMError, InvalidRequest, TryAgain
from .keys import block_from_id
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

    def affinity_ops(b: Block, part: Pool):
        if not b.node:
            return [], []
        akey = k.affinity_key(b.node, b.cidr)
        akv = ds.get(akey)
        if akv is None:
            return [Compare(akey, 0)], []
        try:
            d = json.loads(akv.value)
            d["pool"] = part.name
        except (ValueError, TypeError):
            return [Compare(akey, akv.mod_revision)], []   # left as it is (check reports it)
        return [Compare(akey, akv.mod_revision)], [Put(akey, json.dumps(d, separators=(",", ":")).encode())]

    def rewrite(items):
        cs, ops = [], []
        for bkv, b, part in items:
            b.pool = part.name
            ac, ao = affinity_ops(b, part)
            cs += [Compare(bkv.key, bkv.mod_revision)] + ac
            ops += [Put(bkv.key, b.to_json())] + ao
        return cs, ops

    parts_cmp = [Compare(k.pool(p.name), 0) for p in parts]

    def range_guard(rev):
        # nothing under the pool's block range created or changed after ``rev``
        return [Compare(start, rev + 1, range_end=end, result="LESS")] if rev else []

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
        cs, ops = rewrite(todo)
        if len(cs) + len(parts_cmp) + 2 > MAX_TXN_OPS or len(ops) + len(parts) + 1 > MAX_TXN_OPS:
            break
        for p in parts:
            p.disabled = pool.disabled
        if ds.commit(cs + parts_cmp + range_guard(rev0) + [Compare(key, kv.mod_revision)],
                     ops + [Put(k.pool(p.name), p.to_json()) for p in parts] + [Delete(key)]):
            summary["steps"] = ["one transaction"]
            return summary
    else:
        raise Conflict(f'pool "{name}" or its blocks kept changing during the split; nothing was changed, try again')
    # the safe sequence
    steps = []
    was_disabled = pool.disabled
    if not pool.disabled:
        pool.disabled = True
        if not ds.commit([Compare(key, kv.mod_revision)], [Put(key, pool.to_json())]):
            raise Conflict(f'pool "{name}" changed during the split; nothing was changed, try again')
        steps.append("disabled the pool")
    for _ in range(max_rounds):
        todo = scan()
        if not todo:
            break
        groups = [rewrite([item]) for item in todo]
        batch_c: list = []
        batch_o: list = []
        for c, o in groups + [(None, None)]:
            if (c is None or len(batch_c) + len(c) > MAX_TXN_OPS or len(batch_o) + len(o) > MAX_TXN_OPS) and batch_o:
                ds.commit(batch_c, batch_o)    # a conflict: that chunk is re-scanned next round
                batch_c, batch_o = [], []
            if c is not None:
                batch_c += c
                batch_o += o
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
        if not scan() and ds.commit(parts_cmp + range_guard(rev) + [Compare(key, kv.mod_revision)],
                                    [Put(k.pool(p.name), p.to_json()) for p in parts] + [Delete(key)]):
            steps.append("replaced the pool by its parts")
            summary["steps"] = steps
            return summary
    raise TryAgain(f'pool "{name}": gave up finishing the split; the pool stays disabled, run the same '
                   f'command again to finish')

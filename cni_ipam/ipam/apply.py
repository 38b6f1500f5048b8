"""``cni-ipam apply``: a file of validated resources against the stored state, in ONE transaction.

``plan_apply`` is pure; ``apply`` reads, plans and commits.  ``create_pool`` is the same
path for a single new pool (what the tests and benchmarks use to set up pools)."""
from __future__ import annotations

import json
import time
from cni_ipam._records import dataclass, field
from typing import Callable, Sequence

from ..datastore import KV, Read, read_prefix
from .errors import AdminError, Conflict
from .store import Conflict as TxnConflict, Keys, Txn, commit, decode_or_none
from .manifest import (POOL_KIND, RESERVATION_KIND, Doc, ManifestError, Resource, _Problems, parse_resource,
                       pool_manifest)
from .model import IPAMConfig
from .pool import Pool
from .paged import first


def poolset_key(keys: Keys) -> str:
    """Bumped by every apply that creates a pool, and compared by every apply: two applies
    that race to create DIFFERENT but overlapping pools cannot both commit."""
    return keys.poolset



@dataclass
class Change:
    kind: str
    name: str
    action: str                      # created | configured | unchanged
    fields: dict = field(default_factory=dict)   # configured: field -> [old, new]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "action": self.action,
                "changed": {k: {"from": o, "to": n} for k, (o, n) in self.fields.items()}}


def _diff(old: dict, new: dict) -> dict:
    keys = list(new) + [k for k in old if k not in new]
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def plan_apply(keys: Keys, resources: Sequence[Resource], pool_kvs: Sequence[KV],
               config_kv: KV | None, marker_kv: KV | None, reservations_kv: KV | None = None):
    """Pure: what applying ``resources`` to the read state would change.

    Returns (changes, txn).  The txn's guards cover EVERY resource of the file (so the
    whole file is applied against one consistent state or not at all) and the pool-set
    marker (so a concurrent apply creating an overlapping pool makes this one fail)."""
    current: dict[str, tuple[KV, Pool | None]] = {}
    for pkv in pool_kvs:
        current[keys.pool_name_of_key(pkv.key)] = (pkv, decode_or_none(pkv.key, pkv.value, Pool.from_json))
    # overlaps are checked against the stored pools the file does not touch and the pools
    # earlier in the file, so the error names the document that introduces the overlap
    in_file = {r.name for r in resources if r.kind == POOL_KIND}
    final: dict[str, Pool] = {n: p for n, (_, p) in current.items() if p is not None and n not in in_file}
    changes: list[Change] = []
    txn = Txn()
    created = False
    problems = _Problems()
    for r in resources:
        if r.kind != POOL_KIND:
            continue
        ok = problems.run(_plan_pool_checks, keys, r, current, final, default=False)
        p = r.pool
        key = keys.pool(r.name)
        kv, old = current.get(r.name, (None, None))
        if not ok:
            if old is not None:    # refused: the stored pool stays, and later pools must not overlap it
                final[old.name] = old
            continue
        assert p is not None   # (an IPPool resource carries its pool: parse_resource)
        final[p.name] = p
        txn.read(key, kv.mod_revision if kv else 0)
        if old is None:
            created = True
            txn.put(key, p)
            changes.append(Change(POOL_KIND, r.name, "created"))
        elif old.to_dict() != p.to_dict():
            txn.put(key, p)
            changes.append(Change(POOL_KIND, r.name, "configured", _diff(old.to_dict(), p.to_dict())))
        else:
            changes.append(Change(POOL_KIND, r.name, "unchanged"))
    problems.raise_any()
    _plan_reservations(keys, resources, reservations_kv, changes, txn)
    for r in resources:
        if r.kind in (POOL_KIND, RESERVATION_KIND):
            continue
        cfg = r.config
        assert cfg is not None   # (an IPAMConfig resource carries its config: parse_resource)
        txn.read(keys.config, config_kv.mod_revision if config_kv else 0)
        old_cfg = None
        if config_kv is not None:
            # (None when undecodable: replacing it with a valid one is the repair)
            old_cfg = decode_or_none(keys.config, config_kv.value, IPAMConfig.from_json)
        if old_cfg is not None and old_cfg.to_dict() == cfg.to_dict() and config_kv is not None:
            changes.append(Change("IPAMConfig", r.name, "unchanged"))
        else:
            txn.put(keys.config, cfg)
            before = old_cfg.to_dict() if old_cfg else IPAMConfig().to_dict()
            changes.append(Change("IPAMConfig", r.name, "configured", _diff(before, cfg.to_dict())))
    mk = poolset_key(keys)
    txn.read(mk, marker_kv.mod_revision if marker_kv else 0)
    if created:
        txn.put(mk, json.dumps({"updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
    return changes, txn


def _plan_reservations(keys: Keys, resources: Sequence[Resource], kv: KV | None, changes, txn: Txn) -> None:
    """IPReservations of the file: all in the one reservations record (ipam/reservation.py),
    compared on its revision as read."""
    # (an IPReservation resource always carries its reservation: parse_resource)
    incoming = [r.reservation for r in resources if r.kind == RESERVATION_KIND and r.reservation is not None]
    if not incoming:
        return
    from . import reservation_admin as ra
    from .reservation import decode
    try:
        current = decode(kv.value if kv else None)
    except ValueError as e:
        raise ManifestError(f"the stored reservations at etcd key {keys.reservations} are undecodable ({e}); "
                            f"they are not overwritten blindly -- inspect the key") from None
    new, chs = ra.plan(current, incoming)
    before = {r.name: r.to_spec() for r in current}
    for ch in chs:
        r = next(x for x in new if x.name == ch["name"])
        fields = _diff(before.get(r.name, {}), r.to_spec()) if ch["action"] == "configured" else {}
        changes.append(Change(RESERVATION_KIND, ch["name"], ch["action"], fields))
    ra.plan_write(keys, kv, new, txn, write=any(ch["action"] != "unchanged" for ch in chs))


def _plan_pool_checks(keys: Keys, r: Resource, current: dict, final: dict) -> bool:
    """A pool of the file against the stored state: undecodable stored record, cidr/blockSize
    change, overlaps (raises ManifestError)."""
    p = r.pool
    assert p is not None
    key = keys.pool(r.name)
    kv, old = current.get(r.name, (None, None))
    if kv is not None and old is None:
        raise ManifestError(f"{r.where}: {r.label}: the stored pool at etcd key {key} is undecodable; "
                            f"it is not overwritten blindly -- inspect it, then `cni-ipam pool delete "
                            f"{r.name} --force`")
    if old is not None and (old.cidr != p.cidr or old.block_size != p.block_size):
        fld = "cidr" if old.cidr != p.cidr else "blockSize"
        was, now = (old.cidr, p.cidr) if fld == "cidr" else (old.block_size, p.block_size)
        raise ManifestError(f"{r.where}: {r.label}: spec.{fld}: cannot change on an existing pool "
                            f"({was} -> {now}); create a new pool, move workloads, then delete this one")
    for other in final.values():
        if other.version == p.version and other.cidr.overlaps(p.cidr):
            raise ManifestError(f'{r.where}: {r.label}: spec.cidr: {p.cidr} overlaps pool '
                                f'"{other.name}" ({other.cidr})')
    return True


def apply(ipam, resources: Sequence[Resource], *, dry_run: bool = False,
          before_commit: Callable[[], None] | None = None, create_only: bool = False) -> list[Change]:
    """Validate ``resources`` against the stored state and write them in ONE transaction.
    ``create_only``: refuse (``AdminError``) when a pool of the file already exists."""
    k = ipam.keys
    snap = ipam.ds.read([read_prefix(k.pools), Read(k.config), Read(poolset_key(k)), Read(k.reservations)])
    if create_only:
        stored = {k.pool_name_of_key(kv.key) for kv in snap[0].kvs}
        for r in resources:
            if r.kind == POOL_KIND and r.name in stored:
                raise AdminError(f"{r.label} already exists")
    changes, txn = plan_apply(k, resources, snap[0].kvs, first(snap[1]), first(snap[2]), first(snap[3]))
    if dry_run or not txn.writes:
        return changes
    if before_commit:
        before_commit()
    try:
        commit(ipam.ds, txn)
    except TxnConflict:
        raise Conflict("pools or the IPAM config changed while this apply was running (another apply or "
                       "pool command won the race); nothing was applied -- run apply again") from None
    return changes


def create_pool(ipam, pool: Pool) -> Change:
    """Create one pool the way ``cni-ipam apply`` does: its manifest through THE validator
    (``manifest.parse_resource``), then the pool-set-guarded transaction of ``apply``, so
    two overlapping creates racing each other cannot both commit.  Refuses an existing
    name, an overlap or a pool the manifest rules reject.  (Tests and benchmarks set up
    their pools with it, through ``IPAM.create_pool``.)"""
    r = parse_resource(Doc(f'pool "{pool.name}"', pool_manifest(pool)))
    return apply(ipam, [r], create_only=True)[0]

"""The IPAM engine: allocate and release addresses over the datastore interface.

Every change is ONE etcd transaction guarded by compares on the revisions of
everything it read (CAS).  An ADD writes the blocks it allocated from, any block
it claimed (+ the node's affinity record) and the handle record together, so a
crash or a lost race can never leave half an allocation behind.  On a conflict
the whole attempt is re-read and re-planned, up to ``max_retries`` times.

Fast path (the node already has a block with a free address): 3 requests --
one batched read (handle, pools, config, the node's affinities), one batched
read of the node's blocks, one commit.  With a warm ``Snapshot`` (``use_snapshot``;
ipam/snapshot.py) it is ONE request: the plan is made from what the last attempt
read, and the txn's compares prove all of it is still current (else: re-read).
"""
from __future__ import annotations

import time
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable

from ..datastore import DatastoreError, DatastoreUnavailable, Read, read_prefix
from ..datastore.base import MAX_TXN_OPS
from .block import BRIDGE, ROUTED, Block, BlockError
from .errors import AddressUnavailable, CorruptData, InvalidRequest, IPAMError, PoolExhausted, unavailable
from .model import Assignment, Handle, IPAMConfig
from .pool import Pool, find_free_block, namespace_matcher, node_matcher, pool_of_ip, select_pools, start_index
from .snapshot import Snapshot
from .store import Affinity, Conflict, commit, decode_block, decode_config, decode_handle, decode_pool, decode_record

from ..log import log

from .reclaim import RECLAIM_EMPTY_AFTER, EmptyBlockWatch  # noqa: F401 (re-exported)

from .request import AssignRequest, AssignResult, _Fallback, _Kept, _Plan, _reserved  # noqa: F401 (re-exported)
from .releases import Releases


class IPAM(Releases):
    """``use_snapshot`` (or a ``snapshot`` to start from): keep a warm ``Snapshot`` of the
    last ADD's reads in ``self.snapshot`` and try a fast-path ADD as ONE guarded txn from it
    (see ``_assign_from_snapshot``).  Off by default: callers that hold one instance per
    node (the plugin persists it per node under the host lock) turn it on."""

    # ------------------------------------------------------------------ assign
    def assign(self, req: AssignRequest) -> AssignResult:
        fams = {ip.version for ip in req.requested}
        if len(fams) != len(req.requested):
            raise InvalidRequest("at most one requested address per IP family")
        if not (req.assign_v4 or req.assign_v6 or req.requested):
            raise InvalidRequest("neither assign_ipv4 nor assign_ipv6 is set: nothing to assign")
        res = None
        if self.use_snapshot and self.snapshot is not None:
            try:
                res = self._assign_from_snapshot(req, self.snapshot)
            except DatastoreUnavailable as e:
                raise unavailable(f"assign {req.handle_id}", e) from None
            except DatastoreError as e:  # refused (e.g. an etcd without range compares): the usual way
                log.warning("snapshot txn refused by etcd (%s): not using snapshots", e)
                self.use_snapshot, self.snapshot = False, None
        if res is None:
            try:
                (res, attempts) = self._retry(f"assign {req.handle_id}", lambda: self._assign_once(req))
            except _Kept:
                from . import sticky
                res, attempts = sticky.assign(self, req)
            res.attempts = attempts
        if res.existing:
            self._check_repeat(req, res.handle)
            # a repeated ADD returns what the handle lists: those addresses must really be its own
            # (one that its block does not record could be handed to someone else: a duplicate)
            problems = self.verify_handle(res.handle)
            if problems:
                raise CorruptData(f"handle record at etcd key {self.keys.handle(req.handle_id)} disagrees "
                                  f"with its blocks: {'; '.join(problems)}")
        return res

    @staticmethod
    def _check_repeat(req: AssignRequest, h: Handle) -> None:
        """A repeated ADD returns the handle's addresses only when they fit this request."""
        why = []
        if h.node != req.node:
            why.append(f"they were allocated for node {h.node!r}, this ADD is for node {req.node!r}")
        if h.mode != req.mode:
            why.append(f"they were allocated in {h.mode} mode, this network now uses {req.mode} mode")
        held = {a.ip for a in h.addresses}
        missing = [str(ip) for ip in req.requested if ip not in held]
        if missing:
            why.append(f"this ADD requests {', '.join(missing)}, which the attachment does not hold")
        if why:
            raise InvalidRequest(f"attachment {h.id} already holds {', '.join(str(a.ip) for a in h.addresses)} "
                                 f"but {'; '.join(why)}: DEL it first (or fix the configuration)")

    def _assign_once(self, req: AssignRequest) -> AssignResult:
        """One attempt from fresh reads; Conflict when its txn lost against another writer."""
        k = self.keys
        hkey = k.handle(req.handle_id)
        rec_keys = self._record_keys(req)
        lkey = k.handle(req.legacy_handle_id) if req.legacy_handle_id else None
        reads = [Read(hkey), read_prefix(k.pools), Read(k.config), read_prefix(k.node_affinity(req.node))]
        reads += [Read(key) for key in rec_keys]
        if lkey:
            reads.append(Read(lkey))
        snap = self.ds.read(reads)
        legacy = snap.pop() if lkey else None   # the attachment's layout-1 key, as read
        if snap[0].kvs:
            return AssignResult(decode_handle(hkey, snap[0].kvs[0].value), existing=True)
        if legacy is not None and legacy.kvs:
            assert lkey is not None   # (legacy was read: lkey is set)
            old = decode_handle(lkey, legacy.kvs[0].value)
            if old.is_attachment(req.network, req.container_id, req.ifname):
                return AssignResult(old, existing=True)   # made by an older version: still this attachment's
            # else another attachment's layout-1 record under the same (ambiguous) id: not ours
        cfg = snap[2].kvs[0] if snap[2].kvs else None
        # what was read, kept as a Snapshot (the next ADD may plan from it: _assign_from_snapshot)
        view = Snapshot(req.node, self.ds.last_revision,
                        pools={kv.key: (kv.mod_revision, kv.value) for kv in snap[1].kvs},
                        config=(cfg.mod_revision, cfg.value) if cfg else (0, None),
                        affinities={kv.key: kv.mod_revision for kv in snap[3].kvs},
                        records={key: ((r.kvs[0].mod_revision, r.kvs[0].value) if r.kvs else (0, None))
                                 for key, r in zip(rec_keys, snap[4:])})

        def load(want: list[str]):
            if want:
                for key, kv in zip(want, self.ds.get_many(want)):
                    view.blocks[key] = (kv.mod_revision, kv.value) if kv else (0, None)
            return self._blocks_of(view, want)

        def record(key: str):
            return view.records[key][1]

        txn = _Plan()
        handle = self._plan(req, view, load, record, txn, fast_only=False)
        txn.absent(hkey)
        if legacy is not None and not legacy.kvs:
            assert lkey is not None
            txn.absent(lkey)   # (an older version's ADD of the same attachment meanwhile)
        txn.put(hkey, handle)
        # the pools allocated from must be as read: a pool disabled or being deleted
        # meanwhile (pools.delete_pool disables it first) gets nothing new
        for pkey in dict.fromkeys(k.pool(a.pool) for a in handle.addresses):
            if pkey in view.pools:
                txn.read(pkey, view.pools[pkey][0])
        written = commit(self.ds, txn)
        self.written_handle = (hkey, self.ds.last_revision, written[hkey])
        if self.use_snapshot:
            self._keep_snapshot(view, txn, written, req.node)
        return AssignResult(handle)

    def _blocks_of(self, view: Snapshot, want: list[str], strict: bool = False) -> dict:
        """``{key: (mod_revision, Block | None, value)}`` for ``want`` from ``view.blocks``
        (``strict``: a key the view lacks -> _Fallback)."""
        loaded: dict[str, tuple[int, Block | None, bytes | None]] = {}
        for key in want:
            if strict and key not in view.blocks:
                raise _Fallback(f"block {key} is not in the snapshot")
            rev, value = view.blocks[key]
            loaded[key] = (rev, decode_block(key, value) if value is not None else None, value)
        return loaded

    def _plan(self, req: AssignRequest, view: Snapshot, load, record, txn: _Plan, fast_only: bool) -> Handle:
        """Plan one attempt from ``view`` (pools, config, affinities; ``load(keys)`` gives blocks,
        ``record(key)`` a namespace/node record) into ``txn``.  The same code for a fresh read
        and a snapshot; ``fast_only``: only an allocation from the node's own blocks (else _Fallback)."""
        k = self.keys
        self._schema_guard(record(k.schema), view.records.get(k.schema, (0, None))[0], txn)
        pools = [decode_pool(key, value) for key, (_, value) in view.pools.items()]
        cfg = decode_config(view.config[1], k.config)
        keep = bool(req.keep_as) and cfg.keep_statefulset_ips
        if keep and (fast_only or not req.keep_checked):
            raise _Kept("a StatefulSet pod: its kept address is looked up first")
        affine = [k.affinity_block(key) for key in view.affinities]

        requested = {ip.version: ip for ip in req.requested}
        families = [f for f, on in ((4, req.assign_v4), (6, req.assign_v6)) if on or f in requested]
        wanted, sources, matches, ns_matches = self._pool_choice(req, record)
        txn.reserved = _reserved(k.reservations, record(k.reservations))
        txn.cooldown, txn.now = cfg.ip_cooldown_seconds, time.time()
        eligible: dict[int, list[Pool]] = {}
        for fam in families:
            if fam not in requested:
                eligible[fam] = select_pools(fam, wanted[fam], pools, req.mode, matches, sources[fam], ns_matches)

        # one batched read: the node's blocks in eligible pools + blocks of requested addresses
        want: list[str] = []
        for net in affine:
            for p in eligible.get(net.version, ()):
                if net.subnet_of(p.cidr) and net.prefixlen == p.block_size:
                    want.append(k.block(net))
                    break
        req_pool: dict[int, Pool] = {}
        for fam, ip in requested.items():
            rp = pool_of_ip(ip, pools)
            if rp is None:
                raise InvalidRequest(f"requested address {ip} is not in any pool")
            if rp.disabled:
                raise InvalidRequest(f"requested address {ip} is in pool {rp.name!r}, which is disabled")
            req_pool[fam] = rp
            bkey = k.block(rp.block_of(ip))
            if bkey not in want:
                want.append(bkey)
        loaded = load(want)

        handle = Handle(id=req.handle_id, node=req.node, network=req.network, container_id=req.container_id,
                        ifname=req.ifname, pod=req.pod, namespace=req.namespace, pod_uid=req.pod_uid, mode=req.mode,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if keep:   # DEL keeps its addresses for the pod's next incarnation (no kept record yet: compared)
            handle.keep_as = req.keep_as
            txn.absent(k.handle(req.keep_as))
        n_affine = len(affine)
        for fam in families:
            if fam in requested:
                a = self._assign_requested(req, requested[fam], req_pool[fam], cfg, loaded, txn)
            else:
                a, claimed = self._assign_auto(req, fam, eligible[fam], cfg, n_affine, loaded, txn, fast_only)
                n_affine += claimed
            handle.addresses.append(a)
        return handle

    def _keep_snapshot(self, view: Snapshot, txn: _Plan, written: dict, node: str) -> None:
        """After a successful normal attempt: keep what it read (+ the blocks it wrote, at the
        commit's revision) as the snapshot -- unless it wrote under the pools or the node's
        affinity prefix (a claim: those ranges are guarded as "nothing newer than the read"),
        or the guard would not fit in one txn."""
        rev = self.ds.last_revision
        aff_prefix = self.keys.node_affinity(node)
        if (not rev or not view.revision or len(view.pools) + len(view.affinities) + len(view.blocks)
                + len(view.records) + 8 > MAX_TXN_OPS
                or any(key.startswith(aff_prefix) or key.startswith(self.keys.pools) for key in written)):
            self.snapshot = None
            return
        for key in txn.blocks:
            if key in view.blocks:
                view.blocks[key] = (rev, written[key])
        self.snapshot = view

    def _assign_from_snapshot(self, req: AssignRequest, snap: Snapshot) -> AssignResult | None:
        """A fast-path ADD as ONE txn planned from ``snap``; None when the snapshot cannot
        answer (not the fast path) or is stale (then it is dropped): the caller reads as usual.

        The plan is made by the same code as ``_assign_once`` (``_plan``) from the snapshot, so
        it is exactly the plan a fresh read would give IF everything it depended on is still as
        in the snapshot.  The txn's compares prove that atomically with its writes:
        * the handle does not exist (an existing one: the usual path returns it);
        * every block the plan looked at (all of the node's blocks in the eligible pools, not
          only the one allocated from: the choice depends on the others being full): its mod
          revision (or absence) as in the snapshot;
        * every pool in the snapshot: its mod revision (a deleted or changed pool fails), and
          no key under the pools prefix created/modified after the snapshot's revision R
          (a new pool fails);
        * the same for the node's affinities (prefix and each key): its set of blocks;
        * the config key and every namespace/node record the pool choice read: mod revision
          (or absence) as in the snapshot.
        The snapshot's revision-R reads are one consistent view and its blocks are each compared
        exactly, so a txn that succeeds allocated what a fresh read at the commit would have."""
        if req.requested or snap.node != req.node:
            return None
        k = self.keys
        # CONTENT compares (the values the plan was made from), not revision numbers: a store
        # restored from a backup reuses revisions for other content (issue: duplicates after a
        # restore), so only "this key still holds exactly these bytes" proves the plan
        txn = _Plan(by_value=True)

        def load(want: list[str]):
            loaded = self._blocks_of(snap, want, strict=True)
            for key, (rev, _, value) in loaded.items():
                txn.read(key, rev, value)   # every block looked at, not only the one allocated from
            return loaded

        def record(key: str):
            if key not in snap.records:
                raise _Fallback(f"record {key} is not in the snapshot")
            rev, value = snap.records[key]
            txn.read(key, rev, value)
            return value

        try:
            handle = self._plan(req, snap, load, record, txn, fast_only=True)
        except (_Fallback, IPAMError) as e:
            log.debug("assign %s: snapshot not used (%s)", req.handle_id, getattr(e, "msg", e))
            return None
        hkey = k.handle(req.handle_id)
        txn.absent(hkey)
        if req.legacy_handle_id:   # nor a record of an older layout under the attachment's old id
            txn.absent(k.handle(req.legacy_handle_id))
        aff = k.node_affinity(req.node)
        txn.no_newer(k.pools, snap.revision)
        for key, (rev, value) in snap.pools.items():
            txn.read(key, rev, value)
        txn.no_newer(aff, snap.revision)
        for key, rev in snap.affinities.items():
            txn.read(key, rev)   # (the snapshot keeps no affinity values: by revision)
        txn.canary = k.pools
        txn.read(k.config, *snap.config)
        if txn.n_compares() > MAX_TXN_OPS:
            self.snapshot = None
            return None
        txn.put(hkey, handle)
        self.snapshot = None   # until the answer says the txn was applied
        try:
            written = commit(self.ds, txn)
        except Conflict:
            self.snapshot_misses += 1
            log.debug("assign %s: snapshot is stale (a guarded key changed): re-reading", req.handle_id)
            return None
        rev = self.ds.last_revision
        for key in txn.blocks:
            snap.blocks[key] = (rev, written[key])
        self.snapshot = snap
        self.snapshot_hits += 1
        self.written_handle = (hkey, rev, written[hkey])
        return AssignResult(handle)

    def _pool_choice(self, req: AssignRequest, record) -> tuple[dict, dict, Callable[[Pool], bool],
                                                                Callable[[Pool], bool] | None]:
        """Pools wanted per family, where that came from, the nodeSelector and the
        namespaceSelector tests.
        ``record(key)``: the node or namespace record (value or None) read with the first
        batch (``labels_from_etcd``); see ipam/annotations.py for the precedence."""
        wanted = {4: req.v4_pools, 6: req.v6_pools}
        sources = {f: req.pool_sources.get(f, "config") for f in (4, 6)}
        matches = req.node_matches or (lambda p: True)
        ns_matches = req.ns_matches
        if req.labels_from_etcd:
            k = self.keys
            labels = decode_record(k.node(req.node), record(k.node(req.node)), "labels")
            ns_ann = None
            ns_value = record(k.namespace(req.namespace)) if req.namespace else None
            if ns_value is not None:
                ns_ann = decode_record(k.namespace(req.namespace), ns_value, "annotations")
            if ns_ann:
                from . import annotations as ann   # (only with namespace annotations: not on every ADD)
                choice = ann.choose(req.annotation_prefix, config_pools=wanted, namespace=req.namespace,
                                    pod=req.pod, ns_annotations=ns_ann)
                wanted, sources = choice.pools, choice.sources
            if req.node_matches is None:
                matches = node_matcher(req.node, lambda: labels)
            if ns_matches is None:
                ns_matches = namespace_matcher(req.namespace, lambda: decode_record(
                    k.namespace(req.namespace), ns_value, "labels"))
        return wanted, sources, matches, ns_matches

    def _assignment(self, req: AssignRequest, block: Block, ip) -> Assignment:
        if block.mode == BRIDGE:
            return Assignment(ip, block.cidr, block.pool, block.cidr.prefixlen, block.gateway)
        plen = block.cidr.prefixlen if req.routed_prefix == "block" else (32 if ip.version == 4 else 128)
        return Assignment(ip, block.cidr, block.pool, plen, req.gateways.get(ip.version))

    def _assign_requested(self, req, ip, pool: Pool, cfg: IPAMConfig, loaded, txn: _Plan) -> Assignment:
        k = self.keys
        r = txn.reserved.which(ip) if txn.reserved is not None else None
        if r is not None:
            raise AddressUnavailable(f"requested address {ip} is reserved by IPReservation {r.name!r} "
                                     f"({', '.join(str(c) for c in r.cidrs if ip in c)}): it is never handed out")
        net = pool.block_of(ip)
        key = k.block(net)
        rev, block, value = loaded[key]
        if key in txn.blocks:
            block = txn.blocks[key]
        if block is None:
            if not pool.usable_in(req.mode):
                raise InvalidRequest(f"requested address {ip}: pool {pool.name!r} blocks (/{pool.block_size}) "
                                     f"are too small for {req.mode} mode")
            block = Block.new(net, pool.name, req.node, req.mode)
            self._claim(req.node, block, txn)
            rev, value = 0, None
        elif block.mode != req.mode:
            raise AddressUnavailable(f"requested address {ip} is in block {net}, claimed in {block.mode} mode; "
                                     f"this network uses {req.mode} mode")
        elif block.node != req.node:
            # the same borrowing rules as for automatic addresses
            owner = f"node {block.node!r}" if block.node else "no node (its affinity was released)"
            if req.mode != ROUTED:
                raise AddressUnavailable(f"requested address {ip} is in block {net} of {owner}; bridge mode never "
                                         f"borrows from another node's block (its gateway is on that node)")
            if cfg.strict_affinity:
                raise AddressUnavailable(f"requested address {ip} is in block {net} of {owner}; strict affinity "
                                         f"forbids borrowing from other nodes' blocks")
            log.info("requested address %s borrowed from block %s of %s", ip, net, owner)
        try:
            block.allocate(req.handle_id, ip)
        except BlockError as e:
            raise AddressUnavailable(f"requested address {ip} is not available: {e}") from None
        txn.touch(key, rev, value, block)
        return self._assignment(req, block, ip)

    def _claim(self, node: str, block: Block, txn: _Plan) -> None:
        akey = self.keys.affinity_key(node, block.cidr)
        txn.absent(akey)
        txn.put(akey, Affinity.of(block))

    def _assign_auto(self, req, fam, pools: list[Pool], cfg: IPAMConfig, n_affine: int,
                     loaded, txn: _Plan, fast_only: bool = False) -> tuple[Assignment, int]:
        k = self.keys
        # 1. the node's own blocks, pool by pool, lowest block first
        for p in pools:
            mine = sorted(((key, rev, b, value) for key, (rev, b, value) in loaded.items()
                           if b is not None and b.pool == p.name and b.node == req.node
                           and b.mode == req.mode and b.cidr.subnet_of(p.cidr)),
                          key=lambda t: t[2].cidr)
            for key, rev, b, value in mine:
                b = txn.blocks.get(key, b)
                o = txn.pick(b)
                if o is not None:
                    ip = b.allocate(req.handle_id, ordinal=o)
                    txn.touch(key, rev, value, b)
                    return self._assignment(req, b, ip), 0
        if fast_only:
            raise _Fallback("the node's blocks are full: a claim or a borrow needs fresh reads")
        # 2. claim a new block
        reason = ""
        if not cfg.auto_allocate_blocks:
            reason = "automatic block allocation is off"
        elif cfg.max_blocks_per_host and n_affine >= cfg.max_blocks_per_host:
            reason = f"node {req.node} has reached maxBlocksPerHost ({cfg.max_blocks_per_host})"
        else:
            for p in pools:
                idx = self._find_free_block(p, req.node, txn.reserved)
                if idx is None:
                    continue
                b = Block.new(p.block_at(idx), p.name, req.node, req.mode)
                o = txn.pick(b)
                if o is None:   # (bridge mode: a reservation leaves only the network/gateway/broadcast)
                    continue
                self._claim(req.node, b, txn)
                ip = b.allocate(req.handle_id, ordinal=o)
                txn.touch(k.block(b.cidr), 0, None, b)
                log.info("claimed block %s of pool %s for node %s", b.cidr, p.name, req.node)
                return self._assignment(req, b, ip), 1
            # 2b. take over an empty block of another node (idle for RECLAIM_EMPTY_AFTER)
            for p in pools:
                got = self._reclaim(req, p, txn)
                if got:
                    return got, 1
            reason = "no unclaimed block is left"
        # 3. borrow from another node's block (routed mode, no strict affinity)
        if cfg.strict_affinity:
            reason += "; strict affinity forbids borrowing from other nodes' blocks"
        elif req.mode != ROUTED:
            reason += "; bridge mode never borrows from other nodes' blocks"
        else:
            for p in pools:
                got = self._borrow(req, p, txn)
                if got:
                    return got, 0
            reason += "; no other node's block has a free address"
        if txn.cooling_until:
            wait = max(0, int(txn.cooling_until - txn.now + 0.999))
            reason += (f"; released addresses are cooling down (IPAMConfig ipCooldownSeconds "
                       f"{txn.cooldown}): the next one frees up at "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(txn.cooling_until))} (in {wait}s)")
        names = ", ".join(p.name for p in pools)
        raise PoolExhausted(f"no free IPv{fam} address for node {req.node} in pool(s) {names}: {reason}")

    def _find_free_block(self, p: Pool, node: str, reserved=None) -> int | None:
        # (an attempt claims at most one block per family, so nothing claimed
        # earlier in the same attempt can be in this pool)
        def list_from(lo, hi, limit):
            s, e = self.keys.pool_block_range(p, lo, hi)
            res = self.ds.read([Read(s, e, keys_only=True, limit=limit)])[0]
            return [p.block_index(self.keys.block_of_key(kv.key)) for kv in res.kvs]

        def counts_in(ranges):
            reads = [Read(*self.keys.pool_block_range(p, lo, hi), count_only=True) for lo, hi in ranges]
            return [r.count for r in self.ds.read(reads)]

        full = reserved.full_block_ranges(p) if reserved is not None else []
        if full:   # blocks a reservation covers completely count as taken (ipam/reservation.py)
            from .reservation import with_taken
            list_from, counts_in = with_taken(full, list_from, counts_in, self._count_ranges(p))
        return find_free_block(p.n_blocks, start_index(node, p.n_blocks), list_from, counts_in)

    def _count_ranges(self, p: Pool):
        def count(ranges):
            reads = [Read(*self.keys.pool_block_range(p, lo, hi), count_only=True) for lo, hi in ranges]
            return [r.count for r in self.ds.read(reads)] if reads else []
        return count

    def _reclaim(self, req, p: Pool, txn: _Plan) -> Assignment | None:
        """When a pool has no unclaimed block left: take over a block of another node that has
        been empty for RECLAIM_EMPTY_AFTER seconds (a node that went away, or scaled down),
        so that node churn cannot exhaust a small pool.  "Empty that long" is measured by this
        node's clock alone (``self.empty_watch``: seen empty at the same mod revision twice,
        that far apart), never by comparing the block's ``emptySince`` (another node's clock)
        with ours.  One txn: the block is compared on its mod revision (still empty, still that
        node's), the other node's affinity is deleted and ours written.  Only scanned when the
        pool is out of unclaimed blocks."""
        if not p.usable_in(req.mode):
            return None
        s, e = self.keys.pool_block_range(p, 0, p.n_blocks)
        for kv in self.ds.range(s, e):
            if kv.key in txn.blocks:
                continue
            b = decode_block(kv.key, kv.value)
            if b.node == req.node or b.allocations:
                continue
            if not self.empty_watch.ripe(kv.key, kv.mod_revision):
                continue
            fresh = Block.new(b.cidr, p.name, req.node, req.mode)
            fresh.released_at = {o: t for o, t in b.released_at.items() if o in fresh.free}
            o = txn.pick(fresh)
            if o is None:
                continue
            self._claim(req.node, fresh, txn)
            if b.node:
                txn.delete(self.keys.affinity_key(b.node, b.cidr))
            ip = fresh.allocate(req.handle_id, ordinal=o)
            txn.touch(kv.key, kv.mod_revision, kv.value, fresh)
            log.info("reclaimed block %s of pool %s from node %s (seen empty for %ds) for node %s",
                     b.cidr, p.name, b.node, self.empty_watch.waited(kv.key), req.node)
            return self._assignment(req, fresh, ip)
        return None

    def _borrow(self, req, p: Pool, txn: _Plan) -> Assignment | None:
        s, e = self.keys.pool_block_range(p, 0, p.n_blocks)
        for kv in self.ds.range(s, e):
            b = txn.blocks.get(kv.key) or decode_block(kv.key, kv.value)
            if b.mode == ROUTED and b.free and b.node != req.node and (o := txn.pick(b)) is not None:
                ip = b.allocate(req.handle_id, ordinal=o)
                txn.touch(kv.key, kv.mod_revision, kv.value, b)
                log.info("borrowed %s from block %s of node %s", ip, b.cidr, b.node)
                return self._assignment(req, b, ip)
        return None

    # ------------------------------------------------------------------ status
    def free_pools(self, req: AssignRequest) -> list[str]:
        """Names of the pools this request could allocate from that still have a free
        address for it; raises InvalidRequest when no pool is usable at all."""
        rec_keys = self._record_keys(req)
        reads = [read_prefix(self.keys.pools), Read(self.keys.config)] + [Read(key) for key in rec_keys]
        snap = self.ds.read(reads)
        pools = self._pools_from(snap[0].kvs)
        cfg = self._config_from(snap[1])
        out = []
        record = self._record_reader(rec_keys, snap[2:])
        wanted, sources, matches, ns_matches = self._pool_choice(req, record)
        probe = _Plan()
        probe.reserved = _reserved(self.keys.reservations, record(self.keys.reservations))
        probe.cooldown, probe.now = cfg.ip_cooldown_seconds, time.time()
        for fam, on in ((4, req.assign_v4), (6, req.assign_v6)):
            if not on:
                continue
            for p in select_pools(fam, wanted[fam], pools, req.mode, matches, sources[fam], ns_matches):
                s, e = self.keys.pool_block_range(p, 0, p.n_blocks)
                if cfg.auto_allocate_blocks and self.ds.count(s, e) < p.n_blocks:
                    out.append(p.name)
                    continue
                for kv in self.ds.range(s, e):
                    b = decode_block(kv.key, kv.value)
                    if b.free and b.mode == req.mode and (b.node == req.node or (
                            req.mode == ROUTED and not cfg.strict_affinity)) and probe.pick(b) is not None:
                        out.append(p.name)
                        break
        return out

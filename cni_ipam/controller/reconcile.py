"""One reconcile pass: judge every allocation against Kubernetes, free what is leaked,
clean up after deleted nodes, and compute the metrics.

Rules (each one a test in tests/test_controller.py):

* An allocation whose recorded pod (namespace/name, and uid when recorded) is not in the
  API is a *candidate*.  It is released when it has been a candidate for the grace period
  and seen in at least two passes -- or at once with grace 0 -- and only after the pod
  was looked up in the API once more (not the cache) just before the release.  A
  handle's addresses go together (one txn).  Allocations without a recorded pod are never
  touched.
* A node not in the API (while the API lists nodes at all): its pods' allocations are
  candidates due at once (still: only when the pod is gone -- a pod that still exists
  keeps its address); its empty blocks are deleted with their affinities; its affinities
  without a block are deleted; blocks still holding addresses (borrowed by live nodes)
  stay.
* Live nodes keep one block; their other blocks that have been empty for the grace period
  (and in two passes) are released, so small pools do not stay locked to idle nodes.
* Nothing is judged from a cache that is not in sync, and nothing is released when the
  API cannot confirm (an outage means no release at all).

Every write goes through cni_ipam/ipam/gc.py with the leadership guard.
"""
from __future__ import annotations

import time

from ..ipam import gc
from ..log import log

NO_POOL = "no_ippool"
RELEASE_WORKERS = 8          # re-checks + releases in flight at once
UNKNOWN_NODE = "unknown_node"


class PassResult:
    def __init__(self):
        self.ok = True
        self.judged = False           # Kubernetes was in sync: leaks were judged
        self.released: list[str] = []  # handle ids
        self.addresses = 0
        self.blocks_deleted: list[str] = []
        self.affinities_deleted: list[str] = []
        self.candidates = 0
        self.skipped: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.etcd_requests = 0
        self.api_requests = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0        # CPU time of the process during the pass (all threads)
        self.metrics: dict = {}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "judged": self.judged, "released": self.released, "addresses": self.addresses,
                "blocksDeleted": self.blocks_deleted, "affinitiesDeleted": self.affinities_deleted,
                "candidates": self.candidates, "errors": self.errors, "etcdRequests": self.etcd_requests,
                "apiRequests": self.api_requests, "seconds": round(self.seconds, 3),
                "cpuSeconds": round(self.cpu_seconds, 3)}


class Reconciler:
    def __init__(self, ipam, kube=None, *, grace: float = 900.0, guard=lambda: None, on_reclaimed=None,
                 clock=time.time):
        self.ipam = ipam
        self.kube = kube
        self.grace = float(grace)
        self.guard = guard                  # () -> Compare | None (None: not the leader: no writes)
        self.on_reclaimed = on_reclaimed or (lambda pool, node, n: None)
        self.clock = clock
        self.candidates: dict[str, list] = {}   # handle id -> [first seen, passes seen, handle revision]
        self.empty_seen: dict[str, list] = {}   # block key -> [first seen, passes seen, block revision]
        self.splits = gc.Splits()               # where to cut the big ranges (learned by each pass)

    # ------------------------------------------------------------------------------
    def _due(self, table: dict, key: str, rev: int, now: float, new: dict) -> tuple[bool, list]:
        c = table.get(key)
        if c is None or c[2] != rev:
            c = [now, 0, rev]
        c[1] += 1
        new[key] = c
        return self.grace == 0 or (c[1] >= 2 and now - c[0] >= self.grace), c

    def run(self) -> PassResult:
        # The pass allocates a few objects per record (150,000 handles: ~10^6) and frees them
        # all at the end; Python's cyclic collector would walk every live object (the pod
        # cache too) again and again meanwhile -- seconds per pass at scale.  Nothing here
        # makes reference cycles, so collect once afterwards instead.
        import gc as pygc
        was = pygc.isenabled()
        pygc.disable()
        try:
            return self._run()
        finally:
            if was:
                pygc.enable()

    def _run(self) -> PassResult:
        t0, c0 = time.monotonic(), time.process_time()
        ds = self.ipam.ds
        req0 = ds.requests
        api0 = self.kube.requests if self.kube else 0
        r = PassResult()
        view = gc.scan(self.ipam, splits=self.splits)
        now = self.clock()
        blocks = {b.key: b for b in view.blocks}
        pods, nodes = self.kube.snapshot() if self.kube else ({}, {})
        r.judged = bool(self.kube) and self.kube.synced
        nodes_known = r.judged and bool(nodes)
        if r.judged and not nodes:
            log.warning("controller: the Kubernetes API lists no nodes: not cleaning up after deleted nodes")

        # -- leaks -------------------------------------------------------------------
        cand: dict[str, list] = {}
        due: list = []
        cand_addrs: dict[tuple[str, str], int] = {}
        if r.judged:
            for h in view.handles:
                if not (h.pod and h.namespace):
                    continue
                live = pods.get((h.namespace, h.pod))
                if live is not None and not (h.uid and live[0] and live[0] != h.uid):
                    continue
                node_gone = nodes_known and h.node not in nodes
                ready, _ = self._due(self.candidates, h.id, h.rev, now, cand)
                for bkey in h.blocks:
                    b = blocks.get(bkey)
                    k = (b.pool if b else NO_POOL, h.node or UNKNOWN_NODE)
                    cand_addrs[k] = cand_addrs.get(k, 0) + 1
                if ready or node_gone:
                    due.append((h, node_gone))
        self.candidates = cand
        r.candidates = len(cand)
        guard = self.guard()
        if due and guard is not None:
            self._release(due, blocks, guard, r)

        # -- deleted nodes and empty blocks -----------------------------------------------
        if nodes_known and self.guard() is not None and r.ok:
            self._blocks(view, nodes, now, r)
        else:
            self.empty_seen = {}

        r.metrics = self._metrics(view, blocks, cand_addrs)
        r.etcd_requests = ds.requests - req0
        r.api_requests = (self.kube.requests - api0) if self.kube else 0
        r.seconds = time.monotonic() - t0
        r.cpu_seconds = time.process_time() - c0
        return r

    def _release(self, due, blocks, guard, r: PassResult) -> None:
        """Re-check and release the due candidates, a few at a time (each costs a round trip to
        the API and two to etcd); the handles of one block go in order, by one worker (no CAS
        fights over the block).  An API that cannot answer, or a lost leadership, stops it all."""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        groups: dict[str, list] = {}
        for h, node_gone in due:
            groups.setdefault(h.blocks[0] if h.blocks else h.id, []).append((h, node_gone))
        stop = threading.Event()
        lock = threading.Lock()
        fatal: list[BaseException] = []

        def work(group):
            for h, node_gone in group:
                if stop.is_set():
                    return
                try:
                    self._release_one(h, node_gone, blocks, guard, r, lock)
                except BaseException as e:  # noqa: BLE001 - GuardLost, KubeError, etcd: stop everything
                    with lock:
                        fatal.append(e)
                    stop.set()
                    return
        with ThreadPoolExecutor(max_workers=max(1, min(RELEASE_WORKERS, len(groups)))) as ex:
            list(ex.map(work, groups.values()))
        from .kube import KubeError
        for e in fatal:
            if not isinstance(e, KubeError):
                raise e
        if fatal:
            r.ok = False
            r.errors.append(str(fatal[0]))
            log.warning("controller: %s; releasing nothing until the API answers", fatal[0])

    def _release_one(self, h, node_gone, blocks, guard, r: PassResult, lock) -> None:
        uid = self.kube.get_pod(h.namespace, h.pod)        # KubeError: the API cannot confirm
        if uid is not None and not (h.uid and uid and uid != h.uid):
            with lock:
                self.candidates.pop(h.id, None)
                r.skipped.append((h.id, "pod exists"))
            log.info("controller: kept %s: pod %s/%s exists (re-checked)", h.id, h.namespace, h.pod)
            return
        from ..ipam.errors import CorruptData
        try:
            got = gc.release_handle(self.ipam.ds, self.ipam.keys, h.id, expect_revision=h.rev, guards=[guard],
                                    key=h.key, block_keys=h.blocks)
        except CorruptData as e:     # reported, never overwritten; the other handles go on
            log.warning("controller: %s", e.msg)
            with lock:
                r.skipped.append((h.id, e.msg))
            return
        with lock:
            self.candidates.pop(h.id, None)
            if got is None:
                r.skipped.append((h.id, "changed since it was read"))
                return
            r.released.append(h.id)
            r.addresses += len(got)
        why = (f"node {h.node} is gone" if node_gone else
               f"pod {h.namespace}/{h.pod} was recreated" if uid else f"pod {h.namespace}/{h.pod} is gone")
        log.info("controller: released %s (handle %s, node %s): %s", ", ".join(got) or "no address",
                 h.id, h.node, why)
        for bkey in h.blocks:
            b = blocks.get(bkey)
            self.on_reclaimed(b.pool if b else NO_POOL, h.node or UNKNOWN_NODE, 1)

    def _blocks(self, view, nodes: dict, now: float, r: PassResult) -> None:
        ds, k = self.ipam.ds, self.ipam.keys
        guard = self.guard()
        released = set(r.released)
        by_node: dict[str, list] = {}
        for b in view.blocks:
            if b.node:
                by_node.setdefault(b.node, []).append(b)
        seen: dict[str, list] = {}
        existing = set()
        for node, bs in sorted(by_node.items()):
            gone = node not in nodes
            if gone:
                for b in bs:
                    # empty now, or emptied by this pass's releases: delete (the fresh block is compared)
                    if b.allocations and not all(h in released for h in b.allocations.values()):
                        log.info("controller: kept block %s of deleted node %s: %d address(es) in use",
                                 b.cidr, node, len(b.allocations))
                        continue
                    if gc.delete_empty_block(ds, k, b.key, expect_revision=None, guards=[guard]):
                        log.info("controller: deleted block %s and its affinity: node %s is gone", b.cidr, node)
                        r.blocks_deleted.append(b.cidr)
                continue
            empties = sorted((b for b in bs if not b.allocations), key=lambda b: b.key)
            if len(empties) == len(bs):
                empties = empties[1:]          # a live node keeps one block
            for b in empties:
                ready, _ = self._due(self.empty_seen, b.key, b.rev, now, seen)
                if not ready or not b.empty_since or now - b.empty_since < self.grace:
                    continue
                if gc.delete_empty_block(ds, k, b.key, expect_revision=b.rev, guards=[guard]):
                    log.info("controller: released empty block %s of node %s (empty for %ds)", b.cidr, node,
                             now - b.empty_since)
                    r.blocks_deleted.append(b.cidr)
                    seen.pop(b.key, None)
        self.empty_seen = seen
        existing = {b.key for b in view.blocks}
        for akey, node, bid in view.affinities:
            if node in nodes or (k.blocks + bid) in existing:
                continue
            if gc.delete_affinity(ds, k, akey, guards=[guard]):
                log.info("controller: deleted affinity %s: node %s is gone and the block does not exist", akey, node)
                r.affinities_deleted.append(akey)

    @staticmethod
    def _metrics(view, blocks: dict, cand_addrs: dict) -> dict:
        hnode = {h.id: h.node for h in view.handles}
        in_use: dict = {}
        borrowed: dict = {}
        nblocks: dict = {}
        pools = view.pools
        for b in view.blocks:
            pool = b.pool if b.pool in pools else NO_POOL
            owner = b.node or UNKNOWN_NODE
            nblocks[(pool, owner)] = nblocks.get((pool, owner), 0) + 1
            for hid in b.allocations.values():
                node = hnode.get(hid) or owner
                key = (pool, node)
                in_use[key] = in_use.get(key, 0) + 1
                if b.node and node != b.node:
                    borrowed[key] = borrowed.get(key, 0) + 1
        cands: dict = {}
        for (pool, node), n in cand_addrs.items():
            key = (pool if pool in pools else NO_POOL, node)
            cands[key] = cands.get(key, 0) + n
        return {"in_use": in_use, "borrowed": borrowed, "blocks": nblocks, "candidates": cands,
                "pool_size": dict(pools), "undecodable": len(view.undecodable)}

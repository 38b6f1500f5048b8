"""The engine's reads (pools, config, handles, verify) and status (``free_pools``): a mixin of
``engine.IPAM`` (split out of ipam/engine.py)."""
from __future__ import annotations

import time
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable
    from ..datastore import Datastore
    from .pool import Pool
    from .reclaim import EmptyBlockWatch
    from .request import AssignRequest
    from .snapshot import Snapshot

from ..constants import DEFAULT_PREFIX
from ..datastore import DatastoreUnavailable, Read
from .errors import CorruptData, IncompatibleStore, TryAgain, unavailable
from .model import Handle, IPAMConfig, Schema
from .store import (LAYOUT, Conflict, Keys, Txn, commit, decode_block, decode_config, decode_handle, decode_pool, decode_schema, release_cooldown,
                    handle_id, legacy_handle_id)

from ..log import log

class Queries:
    """The engine's state (datastore, keys, retry budget, snapshot), its helpers and its reads;
    ``releases.Releases`` and ``engine.IPAM`` build on it."""

    def __init__(self, ds: Datastore, prefix: str = DEFAULT_PREFIX, max_retries: int = 100, *,
                 use_snapshot: bool = False, snapshot: Snapshot | None = None,
                 empty_watch: EmptyBlockWatch | None = None):
        self.ds = ds
        self.keys = Keys(prefix)
        self.max_retries = max_retries
        self.conflicts = 0  # CAS conflicts seen by this instance (benchmarks report it)
        self.use_snapshot = use_snapshot or snapshot is not None
        self.snapshot: Snapshot | None = snapshot
        self.snapshot_hits = 0     # ADDs done in one txn from the snapshot
        self.snapshot_misses = 0   # snapshot txns refused (something changed): re-read
        self._empty_watch = empty_watch
        #: ``(key, mod_revision, value)`` of the handle record the last ADD wrote (None: none);
        #: the plugin keeps it for that attachment's DEL (``Releases.release(cached=...)``)
        self.written_handle: tuple[str, int, bytes] | None = None

    @property
    def empty_watch(self) -> EmptyBlockWatch:
        """This node's observations of other nodes' empty blocks (ipam/reclaim.py; only an ADD's
        reclaim uses them: made on first use, so a DEL does not load the module)."""
        if self._empty_watch is None:
            from .reclaim import EmptyBlockWatch
            self._empty_watch = EmptyBlockWatch()
        return self._empty_watch

    @empty_watch.setter
    def empty_watch(self, watch: EmptyBlockWatch) -> None:
        self._empty_watch = watch

    # ------------------------------------------------------------------ helpers
    def _retry(self, what: str, attempt_fn):
        for attempt in range(1, self.max_retries + 1):
            try:
                return attempt_fn(), attempt
            except Conflict:
                pass
            except DatastoreUnavailable as e:
                raise unavailable(what, e) from None
            self.conflicts += 1
            log.debug("%s: CAS conflict on attempt %d, retrying", what, attempt)
            import random  # only on a conflict: not on every exec's import path
            time.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))
        raise TryAgain(f"{what}: gave up after {self.max_retries} conflicting attempts")

    def _note_written(self, written: dict[str, bytes]) -> None:
        """After a commit that is not an ADD (a release, a kept address): the warm snapshot's
        copy of each block written there, as written, at the new revision."""
        snap = self.snapshot
        if snap is None:
            return
        rev = self.ds.last_revision
        for key, value in written.items():
            if key in snap.blocks:
                if rev:
                    snap.blocks[key] = (rev, value)
                else:
                    del snap.blocks[key]

    def _pools_from(self, kvs) -> list[Pool]:
        return [decode_pool(kv.key, kv.value) for kv in kvs]

    def _config_from(self, res) -> IPAMConfig:
        return decode_config(res.kvs[0].value if res.kvs else None, self.keys.config)

    def _cooldown(self, res) -> int:
        return release_cooldown(res, self.keys.config)

    @staticmethod
    def _record_reader(keys: list[str], results) -> Callable[[str], bytes | None]:
        got = {key: (r.kvs[0].value if r.kvs else None) for key, r in zip(keys, results)}
        return got.__getitem__

    def _record_keys(self, req: AssignRequest) -> list[str]:
        """Single records an ADD plans from: the schema record, and the namespace/node records
        the pool choice reads from etcd (without Kubernetes)."""
        out = [self.keys.schema, self.keys.reservations]
        if req.labels_from_etcd:
            out += [self.keys.node(req.node)] + ([self.keys.namespace(req.namespace)] if req.namespace else [])
        return out

    def _schema_guard(self, value: bytes | None, rev: int, txn: Txn | None = None) -> None:
        """Refuse a store whose layout needs a newer binary; with ``txn``: raise the record to
        this binary's LAYOUT with the attempt's writes (guarded by ``rev``, the record as read)."""
        schema = decode_schema(self.keys.schema, value)
        if schema.min_layout > LAYOUT:
            raise IncompatibleStore(
                f"the data under {self.keys.root} needs cni-ipam data layout {schema.min_layout} or newer "
                f"(written by {schema.written_by or 'a newer version'}); this binary knows layout {LAYOUT}: "
                f"upgrade it")
        if txn is not None and schema.layout < LAYOUT:
            from .. import __version__
            txn.update(self.keys.schema, rev, value, Schema(LAYOUT, LAYOUT, f"cni-ipam {__version__}"))

    def check_schema(self) -> Schema:
        """Read the schema record; IncompatibleStore when this binary is too old for the store."""
        kv = self.ds.get(self.keys.schema)
        self._schema_guard(kv.value if kv else None, 0)
        return decode_schema(self.keys.schema, kv.value) if kv else Schema()

    # ------------------------------------------------------------------ reads
    def pools(self) -> list[Pool]:
        return self._pools_from(self.ds.get_prefix(self.keys.pools))

    def get_config(self) -> IPAMConfig:
        return self._config_from(self.ds.read([Read(self.keys.config)])[0])

    def get_handle(self, handle_id: str) -> Handle | None:
        kv = self.ds.get(self.keys.handle(handle_id))
        return decode_handle(kv.key, kv.value) if kv else None

    def handles(self, network: str | None = None, node: str | None = None,
                errors: list | None = None) -> list[Handle]:
        """Handle records (of ``network`` / ``node``).  An undecodable one raises CorruptData,
        or, with ``errors``, is appended there as ``(key, message)`` and skipped."""
        prefix = self.keys.network_handles(network) if network else self.keys.handles
        out = []
        for kv in self.ds.get_prefix(prefix):
            try:
                h = decode_handle(kv.key, kv.value)
            except CorruptData as e:
                if errors is None:
                    raise
                errors.append((kv.key, e.msg))
                continue
            if (network is None or h.network == network) and (node is None or h.node == node):
                out.append(h)
        return out

    def find_attachment(self, network: str, container_id: str, ifname: str) -> Handle | None:
        """The handle record of an attachment, in this layout or (made by an older version)
        under its layout-1 id when the record's own fields name the attachment."""
        hkey, lkey = self.keys.handle(handle_id(network, container_id, ifname)), \
            self.keys.handle(legacy_handle_id(network, container_id, ifname))
        for key, kv in zip((hkey, lkey), self.ds.get_many([hkey, lkey])):
            if kv is not None:
                h = decode_handle(key, kv.value)
                if key == hkey or h.is_attachment(network, container_id, ifname):
                    return h
        return None

    def verify_handle(self, h: Handle) -> list[str]:
        """Problems with a handle: addresses its blocks do not record as held by it."""
        problems = []
        bkeys = list(dict.fromkeys(self.keys.block(a.block) for a in h.addresses))
        blocks = {}
        for key, kv in zip(bkeys, self.ds.get_many(bkeys) if bkeys else []):
            blocks[key] = decode_block(key, kv.value) if kv else None
        for a in h.addresses:
            b = blocks[self.keys.block(a.block)]
            if b is None:
                problems.append(f"{a.ip}: block {a.block} does not exist")
            elif b.holder(a.ip) != h.id:
                problems.append(f"{a.ip}: block {a.block} records holder {b.holder(a.ip)!r}")
        return problems

    # ------------------------------------------------------------------ writes: pools & config
    def create_pool(self, pool: Pool) -> None:
        """Create a pool through ``cni-ipam apply``'s validator and pool-set-guarded transaction
        (``apply.create_pool``): refuses an existing name, an overlap or an invalid pool."""
        from .apply import create_pool   # the admin path: never loaded by the plugin's exec path
        create_pool(self, pool)

    def set_config(self, cfg: IPAMConfig) -> None:
        txn = Txn()
        txn.put(self.keys.config, cfg)   # (settings are written whole: no guard)
        commit(self.ds, txn)

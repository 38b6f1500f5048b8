"""Releasing addresses: by handle (DEL), by address (admin), and the CNI GC verb: a mixin of
``engine.IPAM`` (split out of ipam/engine.py).  Each release is ONE guarded txn, retried on a
conflict like an ADD."""
from __future__ import annotations

from cni_ipam import ipnet
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

from ..datastore import KV, DatastoreUnavailable, Read
from .errors import CorruptData, IPAMError, unavailable
from .model import Handle
from .store import Conflict, Txn, commit, decode_block, decode_handle, release_cooldown_of

from ..log import log
from .queries import Queries


class Releases(Queries):
    """Releases of ``IPAM`` (it provides ``ds``, ``keys``, ``snapshot``, ``_retry``, ``_schema_guard``)."""

    # ------------------------------------------------------------------ release
    def release(self, handle_id: str, *, legacy_id: str = "",
                attachment: tuple[str, str, str] | None = None, keep: bool = False,
                cached: tuple[int, bytes] | None = None) -> Handle | None:
        """Release everything a handle holds.  None when the handle does not exist.
        ``legacy_id``/``attachment``: the id an older layout gave the same attachment
        ``(network, containerID, ifname)``; a record there is released too when its own
        fields name that attachment (a DEL after an upgrade).
        ``keep`` (the plugin's DEL and GC): a StatefulSet pod's attachment (``keepAs``) keeps its
        addresses under its kept handle when keepStatefulSetIPs is on (ipam/sticky.py).
        ``cached``: ``(mod_revision, value)`` of the handle record as this node's ADD wrote it
        (the plugin keeps it in a node-local file): with a warm snapshot that holds the config,
        the schema record and the handle's blocks, the release is ONE txn planned from those
        and guarded by the content of every one of them (``_release_cached``); when it cannot
        be planned so, or a guard fails, it is done the usual way."""
        if cached is not None and self.snapshot is not None:
            try:
                out = self._release_cached(handle_id, legacy_id, cached, keep)
            except Conflict:
                self.conflicts += 1
                log.debug("release %s: the cached handle or the snapshot is stale: reading", handle_id)
                out = None
            except DatastoreUnavailable as e:
                raise unavailable(f"release {handle_id}", e) from None
            if out is not None:
                return out
        out, _ = self._retry(f"release {handle_id}",
                             lambda: self._release_once(handle_id, legacy_id, attachment, keep))
        return out or None

    def _release_once(self, handle_id: str, legacy_id: str = "", attachment=None,
                      keep: bool = False) -> Handle | None:
        """One attempt: the released handle, None when there is nothing to release; Conflict
        when its txn lost against another writer.  ``keep``: see ``release``."""
        k = self.keys
        hkeys = [k.handle(handle_id)] + ([k.handle(legacy_id)] if legacy_id else [])
        got = self.ds.read([Read(key) for key in hkeys] + [Read(k.config), Read(k.schema)])
        schema = got[-1].kvs[0].value if got[-1].kvs else None
        self._schema_guard(schema, 0)
        cooldown = self._cooldown(got[-2])   # (release times are kept only with a cooldown set)
        got = got[:-1]
        mine: list[tuple[str, KV, Handle]] = []
        for i, (hkey, res) in enumerate(zip(hkeys, got)):
            if res.kvs:
                h = decode_handle(hkey, res.kvs[0].value)
                if i == 0 or attachment is None or h.is_attachment(*attachment):
                    mine.append((hkey, res.kvs[0], h))
        if not mine:
            return None  # nothing to do
        if keep and len(mine) == 1 and mine[0][2].keep_as:
            from . import sticky
            out = sticky.keep(self, *mine[0])
            if out is not sticky.NOT_KEPT:
                return out
        txn = Txn(by_value=True)
        for hkey, hkv, _ in mine:
            txn.read(hkey, hkv.mod_revision)
            txn.delete(hkey)
        return self._commit_release(txn, [h for _, _, h in mine], handle_id, cooldown, fetch=True)

    def _release_cached(self, handle_id: str, legacy_id: str, cached: tuple[int, bytes],
                        keep: bool) -> Handle | None:
        """The release as ONE txn from what this node already holds: the handle record as its
        ADD wrote it (``cached``) and the warm snapshot's config, schema record and blocks.
        The txn's compares prove that each of them still holds exactly those bytes (content,
        not revision numbers), that the attachment's layout-1 key is absent, and then it
        deletes the handle and writes the blocks -- the plan ``_release_once`` makes after
        reading the same contents.  None when it cannot be planned so (the usual way);
        Conflict when a guard failed."""
        k, snap = self.keys, self.snapshot
        assert snap is not None   # (release: only with a snapshot)
        schema = snap.records.get(k.schema)
        rev, value = cached
        hkey = k.handle(handle_id)
        if schema is None or not value or not rev:
            return None
        try:
            h = decode_handle(hkey, value)
        except CorruptData:
            return None
        if h.id != handle_id or (keep and h.keep_as):
            return None   # (a kept StatefulSet address: ipam/sticky.py, the usual way)
        self._schema_guard(schema[1], 0)
        txn = Txn(by_value=True)
        txn.read(hkey, rev, value)
        txn.delete(hkey)
        if legacy_id:
            txn.absent(k.handle(legacy_id))
        txn.read(k.config, *snap.config)
        txn.read(k.schema, *schema)
        cooldown = release_cooldown_of(snap.config[1], k.config)
        return self._commit_release(txn, [h], handle_id, cooldown, fetch=False)

    def _commit_release(self, txn: Txn, handles: list[Handle], handle_id: str, cooldown: int,
                        fetch: bool) -> Handle | None:
        """Release ``handles``' addresses in their blocks and commit ``txn`` (which already
        guards and deletes the handle records).  Blocks by CONTENT: one the warm snapshot holds
        is not read again (the compare proves it unchanged); the others are read (``fetch``;
        else None: not planned).  The released handle (with every handle's addresses)."""
        k = self.keys
        addrs = [(a, h.id) for h in handles for a in h.addresses]
        bkeys = list(dict.fromkeys(k.block(a.block) for a, _ in addrs))
        snap = self.snapshot.blocks if self.snapshot is not None else {}
        cached = {key: snap[key] for key in bkeys if snap.get(key, (0, None))[1] is not None}
        rest = [key for key in bkeys if key not in cached]
        if rest and not fetch:
            return None
        fetched = dict(zip(rest, self.ds.get_many(rest))) if rest else {}
        for key in bkeys:
            kv = fetched.get(key)
            if key in cached:
                rev, value = cached[key]
            elif kv is None:
                log.warning("release %s: block %s no longer exists", handle_id, key)
                txn.absent(key)
                continue
            else:
                rev, value = kv.mod_revision, kv.value
            b = decode_block(key, value)
            for a, hid in addrs:
                if a.ip in b.cidr and not b.release(a.ip, hid, cooldown=cooldown):
                    log.warning("release %s: %s in block %s is not held by this handle (holder: %s)",
                                hid, a.ip, b.cidr, b.holder(a.ip))
            txn.update(key, rev, value, b)
        try:
            written = commit(self.ds, txn)
        except Conflict:
            for key in cached:   # (stale, or another writer's change): the next attempt reads them
                snap.pop(key, None)
            raise
        self._note_written(written)
        h = handles[0]
        for other in handles[1:]:
            h.addresses += other.addresses
        return h

    def release_ips(self, ips: Iterable) -> list[tuple[str, str]]:
        """Release single addresses (repair); returns [(ip, handle)] released."""
        from .pool import pool_of_ip
        done = []
        for ip in ips:
            ip = ipnet.ip_address(ip)
            p = pool_of_ip(ip, self.pools())
            if p is None:
                continue
            key = self.keys.block(p.block_of(ip))
            kv = self.ds.get(key)
            if kv is None:
                continue
            b = decode_block(key, kv.value)
            hid = b.holder(ip)
            if hid is None:
                continue
            h = self.get_handle(hid)
            if h and all(a.ip == ip for a in h.addresses):
                self.release(hid)
            else:
                self._retry(f"release {ip}", lambda: self._release_one(key, ip, hid))
            done.append((str(ip), hid))
        return done

    def _release_one(self, key, ip, hid):
        kv = self.ds.get(key)
        b = decode_block(key, kv.value)
        b.release(ip, hid, cooldown=self._cooldown(self.ds.read([Read(self.keys.config)])[0]))
        txn = Txn()
        txn.update(key, kv.mod_revision, kv.value, b)
        hkey = self.keys.handle(hid)
        hkv = self.ds.get(hkey)
        if hkv is not None:
            h = decode_handle(hkey, hkv.value)
            h.addresses = [a for a in h.addresses if a.ip != ip]
            txn.read(hkey, hkv.mod_revision)
            if h.addresses:
                txn.put(hkey, h)
            else:
                txn.delete(hkey)
        commit(self.ds, txn)
        return True

    # ------------------------------------------------------------------ gc
    def gc(self, network: str, node: str, keep: set[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str, int]]]:
        """Release every handle of ``network`` on ``node`` whose attachment ``(containerID, ifname)``
        (as its record says: both layouts) is not in ``keep``.
        Goes on past individual failures; returns (released ids, [(id or key, error, code)])."""
        released, failed = [], []
        corrupt: list[tuple[str, str]] = []   # never decoded, never touched: reported
        for h in self.handles(network=network, node=node, errors=corrupt):
            if (h.container_id, h.ifname) in keep:
                continue
            try:
                self.release(h.id, keep=True)   # (a StatefulSet pod's: kept, as on DEL)
                released.append(h.id)
            except IPAMError as e:
                failed.append((h.id, e.msg, e.code))
                log.warning("gc: could not release %s: %s", h.id, e.msg)
        for key, msg in corrupt:
            failed.append((key, msg, CorruptData.code))
            log.warning("gc: %s", msg)
        return released, failed

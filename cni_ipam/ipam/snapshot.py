"""A warm snapshot of what one ADD read for a node, so that the next ADD can be ONE request.

``IPAM._assign_once`` reads the pools, the config, the node's affinities (+ the
namespace/node records without Kubernetes) at one revision ``R``, then the node's
blocks.  A ``Snapshot`` keeps exactly that (keys, mod revisions and raw values).
The next fast-path ADD plans from it with the same code and commits ONE txn whose
compares prove that everything the plan depended on is still as in the snapshot
(see ``IPAM._assign_from_snapshot``); if any compare fails the txn writes nothing
and the engine re-reads as usual.  A snapshot is a cache, never a source of truth:
a stale one costs one request, never an address.

The plugin keeps it in a node-local file (``load`` / ``save``), read and written
only under the host lock.  Standard library only (it is on the exec path).
"""
from __future__ import annotations

import binascii
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
import os

#: written into every file; a file of another format is ignored
FORMAT = 1


def _b(v: bytes | None) -> str | None:
    return None if v is None else binascii.b2a_base64(v, newline=False).decode("ascii")


def _unb(s) -> bytes | None:
    if s is None:
        return None
    if not isinstance(s, str):
        raise ValueError("not a base64 string")
    return binascii.a2b_base64(s)


def _rev(v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"bad revision {v!r}")
    return v


class Snapshot:
    """What the reads of one ADD returned (see the module doc).

    ``pools``, ``blocks``, ``records``: ``{key: (mod_revision, value)}`` in key order
    (``(0, None)``: read and absent); ``config``: ``(mod_revision, value)`` or ``(0, None)``;
    ``affinities``: ``{key: mod_revision}``; ``revision``: the header revision of the
    first read (pools, config, affinities and records were read at it)."""

    __slots__ = ("node", "revision", "pools", "config", "affinities", "blocks", "records")

    def __init__(self, node: str, revision: int, pools: dict, config: tuple, affinities: dict,
                 blocks: dict | None = None, records: dict | None = None):
        self.node = node
        self.revision = revision
        self.pools = pools
        self.config = config
        self.affinities = affinities
        self.blocks = {} if blocks is None else blocks
        self.records = {} if records is None else records

    def __repr__(self) -> str:
        return (f"<Snapshot node={self.node!r} revision={self.revision} pools={len(self.pools)} "
                f"affinities={len(self.affinities)} blocks={len(self.blocks)}>")

    # -- (de)serialisation -------------------------------------------------------
    def to_dict(self, ident: str = "") -> dict:
        return {"format": FORMAT, "ident": ident, "node": self.node, "revision": self.revision,
                "pools": [[k, r, _b(v)] for k, (r, v) in self.pools.items()],
                "config": [self.config[0], _b(self.config[1])],
                "affinities": [[k, r] for k, r in self.affinities.items()],
                "blocks": [[k, r, _b(v)] for k, (r, v) in self.blocks.items()],
                "records": [[k, r, _b(v)] for k, (r, v) in self.records.items()]}

    @classmethod
    def from_dict(cls, d: dict, ident: str = "") -> Snapshot:
        """Raises ValueError (or KeyError/TypeError) for anything unexpected."""
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("ident") != ident:
            raise ValueError("not a snapshot of this format/identity")
        node, revision = d["node"], _rev(d["revision"])
        if not isinstance(node, str) or revision <= 0:
            raise ValueError("bad node or revision")

        def kvs(rows) -> dict:
            out = {}
            for k, r, v in rows:
                if not isinstance(k, str):
                    raise ValueError("bad key")
                r, v = _rev(r), _unb(v)
                if (r == 0) != (v is None):
                    raise ValueError("revision and value disagree")
                out[k] = (r, v)
            return out
        cr, cv = d["config"]
        cr, cv = _rev(cr), _unb(cv)
        if (cr == 0) != (cv is None):
            raise ValueError("config revision and value disagree")
        aff = {}
        for k, r in d["affinities"]:
            if not isinstance(k, str) or _rev(r) <= 0:
                raise ValueError("bad affinity")
            aff[k] = r
        pools = kvs(d["pools"])
        if any(v is None for _, v in pools.values()):
            raise ValueError("absent pool")
        return cls(node, revision, pools, (cr, cv), aff, kvs(d["blocks"]), kvs(d["records"]))


# -- the plugin's node-local file ----------------------------------------------------
def _digest(text: str) -> str:
    """blake2b(text), 16 bytes, hex."""
    try:  # blake2b without hashlib, which loads OpenSSL's libcrypto (~2 ms on every plugin exec)
        from _blake2 import blake2b
    except ImportError:  # pragma: no cover - an interpreter without the builtin module
        from hashlib import blake2b
    return blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def file_path(lock_file: str, ident: str) -> str:
    """``<dir of the lock file>/snapshot-<blake2b(ident), 16 bytes, hex>.json``."""
    return os.path.join(os.path.dirname(lock_file) or ".", f"snapshot-{_digest(ident)}.json")


def read_private(path: str, limit: int) -> bytes | None:
    """The contents (at most ``limit`` bytes) of a node-local state file, or None when it is
    missing, unreadable, not a regular file, not ours, or readable by others (not trusted)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        import stat
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None   # written by someone else, or readable by others: not trusted
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read(limit)
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def load(path: str, ident: str) -> Snapshot | None:
    """The snapshot in ``path``, or None when there is none or it is unusable in any way
    (missing, not ours, not a regular file, unreadable, malformed): a snapshot is only a cache."""
    data = read_private(path, 64 * 1024 * 1024)
    if data is None:
        return None
    try:
        return Snapshot.from_dict(json.loads(data), ident)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def save(path: str, snap: Snapshot | None, ident: str) -> None:
    """Write ``snap`` to ``path`` atomically (a 0600 temp file renamed over it); None removes
    the file.  Failures are not errors (the next ADD just reads etcd): returns quietly."""
    if snap is None:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    _write_private(path, json.dumps(snap.to_dict(ident), separators=(",", ":")).encode())


def _write_private(path: str, data: bytes) -> None:
    """``data`` to ``path`` atomically (a 0600 temp file renamed over it); on a failure nothing
    is left behind (not even an older file): returns quietly."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        try:  # a stale file is harmless (compares) but useless: do not leave it behind
            os.unlink(path)
        except OSError:
            pass


# -- the handle record an ADD wrote, kept for that attachment's DEL ------------------------
def handle_file_path(lock_file: str, ident: str, handle_key: str) -> str:
    """``<dir of the lock file>/handle-<blake2b(ident, handle key)>.json``."""
    return os.path.join(os.path.dirname(lock_file) or ".", f"handle-{_digest(ident + chr(10) + handle_key)}.json")


def save_handle(path: str, ident: str, key: str, rev: int, value: bytes) -> None:
    """Keep the handle record this node's ADD wrote at ``key`` (revision ``rev``): the DEL of
    the same attachment can then release in ONE request (``Releases.release(cached=...)``,
    which guards it by content).  Failures are not errors: returns quietly."""
    _write_private(path, json.dumps({"format": FORMAT, "ident": ident, "key": key, "rev": rev, "value": _b(value)},
                                    separators=(",", ":")).encode())


def load_handle(path: str, ident: str, key: str) -> tuple[int, bytes] | None:
    """``(mod_revision, value)`` kept by ``save_handle`` for ``key``, or None (missing, not
    ours, malformed, another key or identity: only a cache)."""
    data = read_private(path, 1024 * 1024)
    if data is None:
        return None
    try:
        d = json.loads(data)
        if (not isinstance(d, dict) or d.get("format") != FORMAT or d.get("ident") != ident
                or d.get("key") != key):
            return None
        rev, value = _rev(d["rev"]), _unb(d["value"])
        return (rev, value) if rev > 0 and value else None
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def drop_handle(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

"""The plugin bundle's module blob: the code of the modules a CNI exec imports, in ONE file that
packaging/pyi_boot.py serves imports from (docs/performance.md, "Round 3: one file of modules").

An import through Python's path finder costs ~0.30 M instructions before the module's own code
runs (directory caches, a stat, open/read/close of the ``.pyc``, its header checks); one served
from an in-memory table costs ~0.11 M.  A CNI exec imports ~35 modules of the bundle.

The blob is written by packaging/cni-ipam.spec after COLLECT, from the very ``.pyc`` files
PyInstaller put in ``_internal/`` (the same code, compiled once), so it can never disagree with
them; the loose files stay (anything not in the blob, or a bundle without a blob, imports them
as before).  Format, all of it read with ``marshal`` and ``int.from_bytes`` (nothing to import)::

    b"CNIB" | importlib's MAGIC_NUMBER (4 bytes) | n: index length (4 bytes, little-endian)
    | marshal({module name: (is_package, offset, length, position, file)}) (n bytes)
    | marshal((code, ...)) of each group...

``file`` is the module's ``.pyc`` path relative to ``_internal/`` (its ``__file__``); ``offset``
and ``length`` locate, after the index, the marshalled tuple of code objects of the module's
GROUP, and ``position`` is the module's place in it.  A group is loaded whole, on the first
import of one of its modules: one ``marshal.loads`` for modules that are always imported together
(``GROUPS``: what a VERSION, a DEL and an ADD import) shares their strings, names and constants --
a third fewer instructions than unmarshalling them one by one (a string that 20 modules use is
made and interned once, not 20 times).  Every other module is a group of its own.  A blob whose
magic is not this interpreter's is ignored (the path finder imports everything, as before).
"""
from __future__ import annotations

import marshal
import os
from importlib.util import MAGIC_NUMBER

HEAD = b"CNIB"
#: the groups of the plugin's blob: what a VERSION imports (packaging/entry.py, then main's
#: ``_version``), what a DEL (also GC and CHECK) imports on top of it, what an ADD adds.
#: tests/test_exec_path.py checks them against what those verbs really load.
VERSION_GROUP = ("cni_exec", "__future__", "cni_ipam", "cni_ipam.main", "cni_ipam.constants", "cni_ipam.cni",
                 "cni_ipam.cni.errors", "cni_ipam._json", "cni_ipam.cni.version")
DEL_GROUP = ("cni_ipam._records", "cni_ipam.cni.env", "cni_ipam.cni.netconf", "cni_ipam.cni.skel", "cni_ipam.ipnet",
             "cni_ipam.log", "cni_ipam.config", "cni_ipam.hostenv", "cni_ipam.plugin",
             "cni_ipam.datastore", "cni_ipam.datastore.base", "cni_ipam.datastore._netio", "cni_ipam.datastore.gateway",
             "cni_ipam.ipam", "cni_ipam.ipam.errors", "cni_ipam.ipam.block", "cni_ipam.ipam.model",
             "cni_ipam.ipam.store", "cni_ipam.ipam.snapshot", "cni_ipam.ipam.queries", "cni_ipam.ipam.releases")
ADD_GROUP = ("cni_ipam.ipam.pool", "cni_ipam.ipam.reclaim", "cni_ipam.ipam.request", "cni_ipam.ipam.engine",
             "cni_ipam.cni.result")
GROUPS = (VERSION_GROUP, DEL_GROUP, ADD_GROUP)
FILENAME = "modules.blob"
PYC_HEADER = 16   # magic, flags, mtime/hash, size (PEP 552)


def _included(name: str, packages: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    def under(p):
        return name == p or name.startswith(p + ".")
    return any(under(p) for p in packages) and not any(under(p) for p in exclude)


def write(internal: str, packages: tuple[str, ...], exclude: tuple[str, ...] = (),
          modules: tuple[str, ...] = (), groups: tuple[tuple[str, ...], ...] = ()) -> tuple[str, int, int]:
    """Write ``internal/modules.blob`` from the ``.pyc`` files under ``internal`` of ``packages``
    (minus the subpackages ``exclude``) and of the top-level ``modules``; the modules of each of
    ``groups`` are loaded together (each must be in the blob).  Returns (path, modules in it, bytes)."""
    entries: dict[str, tuple[bool, str]] = {}
    for base, dirs, files in os.walk(internal):
        dirs.sort()
        for f in sorted(files):
            if not f.endswith(".pyc"):
                continue
            rel = os.path.relpath(os.path.join(base, f), internal)
            parts = rel[:-4].split(os.sep)
            is_pkg = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_pkg else parts)
            if _included(name, packages, exclude) or name in modules:
                entries[name] = (is_pkg, rel)
    missing = [m for m in modules if m not in entries]
    if missing or not entries:
        raise SystemExit(f"modblob: nothing to write for {missing or packages} under {internal}")
    grouped = [m for g in groups for m in g]
    stale = [m for m in grouped if m not in entries]
    if stale or len(set(grouped)) != len(grouped):
        raise SystemExit(f"modblob: the groups name modules that are not in the blob, or twice: {stale or grouped}")
    all_groups = list(groups) + [(m,) for m in sorted(entries) if m not in grouped]
    index, chunks, offset = {}, [], 0
    for group in all_groups:
        codes = []
        for name in group:
            with open(os.path.join(internal, entries[name][1]), "rb") as f:
                pyc = f.read()
            if pyc[:4] != MAGIC_NUMBER:
                raise SystemExit(f"modblob: {entries[name][1]} is not a .pyc of this Python")
            codes.append(marshal.loads(pyc[PYC_HEADER:]))   # (a broken file fails the build, not an exec)
        chunk = marshal.dumps(tuple(codes))
        for pos, name in enumerate(group):
            index[name] = (entries[name][0], offset, len(chunk), pos, entries[name][1])
        chunks.append(chunk)
        offset += len(chunk)
    table = marshal.dumps(index)
    path = os.path.join(internal, FILENAME)
    with open(path, "wb") as f:
        f.write(HEAD + MAGIC_NUMBER + len(table).to_bytes(4, "little") + table + b"".join(chunks))
    return path, len(index), os.path.getsize(path)


def read_index(path: str) -> dict:
    """The blob's index (for tests and diagnostics): {name: (is_package, offset, length, position, file)}."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != HEAD or data[4:8] != MAGIC_NUMBER:
        raise ValueError(f"{path}: not a module blob of this Python")
    n = int.from_bytes(data[8:12], "little")
    return marshal.loads(data[12:12 + n])

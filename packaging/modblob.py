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
    | marshal({module name: (is_package, offset, length, file)}) (n bytes) | code...

``file`` is the module's ``.pyc`` path relative to ``_internal/`` (its ``__file__``); ``offset``
and ``length`` locate the module's marshalled code object after the index.  A blob whose magic
is not this interpreter's is ignored (the path finder imports everything, as before).
"""
from __future__ import annotations

import marshal
import os
from importlib.util import MAGIC_NUMBER

HEAD = b"CNIB"
FILENAME = "modules.blob"
PYC_HEADER = 16   # magic, flags, mtime/hash, size (PEP 552)


def _included(name: str, packages: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    def under(p):
        return name == p or name.startswith(p + ".")
    return any(under(p) for p in packages) and not any(under(p) for p in exclude)


def write(internal: str, packages: tuple[str, ...], exclude: tuple[str, ...] = (),
          modules: tuple[str, ...] = ()) -> tuple[str, int, int]:
    """Write ``internal/modules.blob`` from the ``.pyc`` files under ``internal`` of ``packages``
    (minus the subpackages ``exclude``) and of the top-level ``modules``.
    Returns (path, modules in it, bytes)."""
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
    index, chunks, offset = {}, [], 0
    for name, (is_pkg, rel) in sorted(entries.items()):
        with open(os.path.join(internal, rel), "rb") as f:
            pyc = f.read()
        if pyc[:4] != MAGIC_NUMBER:
            raise SystemExit(f"modblob: {rel} is not a .pyc of this Python")
        code = pyc[PYC_HEADER:]
        marshal.loads(code)   # (a truncated or foreign file fails the build, not an exec)
        index[name] = (is_pkg, offset, len(code), rel)
        chunks.append(code)
        offset += len(code)
    table = marshal.dumps(index)
    path = os.path.join(internal, FILENAME)
    with open(path, "wb") as f:
        f.write(HEAD + MAGIC_NUMBER + len(table).to_bytes(4, "little") + table + b"".join(chunks))
    return path, len(index), os.path.getsize(path)


def read_index(path: str) -> dict:
    """The blob's index (for tests and diagnostics): {name: (is_package, offset, length, file)}."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != HEAD or data[4:8] != MAGIC_NUMBER:
        raise ValueError(f"{path}: not a module blob of this Python")
    n = int.from_bytes(data[8:12], "little")
    return marshal.loads(data[12:12 + n])

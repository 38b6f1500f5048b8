"""``cni-ipam install``: put the binary and an example conflist in place.

    cni-ipam install [--bin-dir /opt/cni/bin] [--conf-dir /etc/cni/net.d] [--lib-dir /opt/cni/lib]
                     [--conflist FILE | --no-conflist] [--force] [--from PATH]

Run from the built binary (``dist/cni-ipam/cni-ipam install ...``; ``make install`` does that).

* A onedir bundle (what ``make binary`` builds and ships) goes to ``<lib-dir>/cni-ipam/<build>/``
  (``<build>`` = version + digest of the sources, from the bundle's ``build-info.json``) and
  ``<bin-dir>/cni-ipam`` becomes a symlink to its executable, switched with one atomic rename.
  The previous build's directory is kept (older ones are pruned): a plugin process started
  just before the switch still finds every module and library of ITS build, which it loads
  lazily by path.  A onefile binary is copied to ``<bin-dir>/cni-ipam`` (temp file + rename).
* The conflist (default: the bundled ``conf/10-cni-ipam-bridge.conflist``) is validated with the
  plugin's own parsers, then written to ``<conf-dir>/<its file name>``.  An existing file with
  other content is NEVER overwritten silently: without ``--force`` the command stops before
  changing anything and says so; with ``--force`` the old file is kept as ``<name>.bak``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

DEFAULT_CONFLIST = "10-cni-ipam-bridge.conflist"
SRC_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InstallError(Exception):
    pass


# ----------------------------------------------------------------------------- what to install
def examples_dir() -> str:
    """The bundled copy of conf/ (frozen), or the source tree's conf/."""
    meipass = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and meipass and os.path.isdir(os.path.join(meipass, "conf")):
        return os.path.join(meipass, "conf")
    return os.path.join(SRC_ROOT, "conf")


def running_binary() -> tuple[str, str] | None:
    """``("onedir", bundle dir)`` / ``("onefile", exe)`` for the running frozen program, else None."""
    if not getattr(sys, "frozen", False):
        return None
    exe = os.path.realpath(sys.executable)
    bundle = os.path.dirname(exe)
    if os.path.isdir(os.path.join(bundle, "_internal")):
        return "onedir", bundle
    return "onefile", exe


def binary_from(path: str) -> tuple[str, str]:
    """Interpret ``--from``: a onedir bundle dir, its executable, or a onefile executable."""
    p = os.path.realpath(path)
    if os.path.isdir(p):
        if os.access(os.path.join(p, "cni-ipam"), os.X_OK) and os.path.isdir(os.path.join(p, "_internal")):
            return "onedir", p
        raise InstallError(f"--from {path}: not a onedir bundle (no cni-ipam + _internal/ in it)")
    if not os.access(p, os.X_OK):
        raise InstallError(f"--from {path}: not an executable")
    if os.path.isdir(os.path.join(os.path.dirname(p), "_internal")):
        return "onedir", os.path.dirname(p)
    return "onefile", p


# ----------------------------------------------------------------------------- conflist
def validate_conflist(data: bytes, source: str = "conflist") -> dict:
    """Parse a .conflist (or a single .conf) and check every plugin with the plugin's own parsers:
    the CNI config parser for each plugin entry, the ipam parser for cni-ipam's section.
    Returns the decoded document; raises InstallError naming the problem."""
    from ..cni.errors import CNIError
    from ..cni.netconf import parse_netconf
    from ..config import ConfigError, parse_ipam_config
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise InstallError(f"{source}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InstallError(f"{source}: must be a JSON object")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise InstallError(f"{source}: 'plugins' must be a non-empty list")
        confs = []
        for i, p in enumerate(plugins):
            if not isinstance(p, dict):
                raise InstallError(f"{source}: plugins[{i}] must be an object")
            confs.append((f"plugins[{i}]", {"cniVersion": doc.get("cniVersion"), "name": doc.get("name"), **p}))
    else:
        confs = [("config", doc)]
    uses_us = False
    for where, conf in confs:
        try:
            parse_netconf(json.dumps(conf).encode(), "ADD")
        except CNIError as e:
            raise InstallError(f"{source}: {where}: {e.msg}{': ' + e.details if e.details else ''}") from None
        ipam = conf.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == "cni-ipam":
            uses_us = True
            try:
                parse_ipam_config(ipam)
            except ConfigError as e:
                raise InstallError(f"{source}: {where}: {e}") from None
    if not uses_us:
        raise InstallError(f"{source}: no plugin uses ipam type cni-ipam")
    return doc


# ----------------------------------------------------------------------------- file operations
def build_id(bundle: str) -> str:
    """``<version>-<source digest[:12]>`` from the bundle's build-info.json (written by
    packaging/build.py); without one, a digest of the executable."""
    try:
        with open(os.path.join(bundle, "build-info.json")) as f:
            info = json.load(f)
        return f"{info['version']}-{info['source_digest'][:12]}"
    except (OSError, ValueError, KeyError, TypeError):
        import hashlib
        h = hashlib.sha256()
        with open(os.path.join(bundle, "cni-ipam"), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"unknown-{h.hexdigest()[:12]}"


def _copy_tree(src: str, dest: str) -> None:
    """Copy the directory ``src`` to a new ``dest`` (via a temp name + rename)."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    new = os.path.join(parent, f".{os.path.basename(dest)}.new-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    try:
        shutil.copytree(src, new, symlinks=True)
        os.rename(new, dest)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _prune(root: str, keep: set[str]) -> list[str]:
    """Remove build dirs under ``root`` other than ``keep`` (names); temp dirs are left alone."""
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name in keep or name.startswith(".") or not os.path.isdir(path) or os.path.islink(path):
            continue
        if os.path.exists(os.path.join(path, "cni-ipam")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _replace_symlink(target: str, link: str) -> None:
    tmp = os.path.join(os.path.dirname(link), f".{os.path.basename(link)}.new-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _replace_file(data: bytes | None, dest: str, mode: int, copy_from: str | None = None) -> None:
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.new-{os.getpid()}")
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ----------------------------------------------------------------------------- the command
def install(args, out=sys.stdout) -> int:
    bin_dir = os.path.abspath(args.bin_dir)
    conf_dir = os.path.abspath(args.conf_dir)
    lib_dir = os.path.abspath(args.lib_dir or os.path.join(os.path.dirname(bin_dir), "lib"))

    if args.from_path:
        kind, src = binary_from(args.from_path)
    else:
        found = running_binary()
        if found is None:
            raise InstallError("install puts the built binary in place, so run it from the binary: "
                               "`make binary && dist/cni-ipam/cni-ipam install ...` (or `make install`), "
                               "or name a built binary with --from dist/cni-ipam")
        kind, src = found

    # 1. everything that could refuse, before anything is changed
    conflist_dest = conflist_data = None
    conflist_state = "skipped (--no-conflist)"
    if not args.no_conflist:
        conflist_src = args.conflist or os.path.join(examples_dir(), DEFAULT_CONFLIST)
        try:
            with open(conflist_src, "rb") as f:
                conflist_data = f.read()
        except OSError as e:
            raise InstallError(f"cannot read the conflist {conflist_src}: {e.strerror}") from None
        validate_conflist(conflist_data, conflist_src)
        conflist_dest = os.path.join(conf_dir, os.path.basename(conflist_src))
        if os.path.lexists(conflist_dest):
            try:
                with open(conflist_dest, "rb") as f:
                    current = f.read()
            except OSError as e:
                raise InstallError(f"cannot read the existing {conflist_dest}: {e.strerror}") from None
            if current == conflist_data:
                conflist_state = "unchanged (already in place)"
                conflist_data = None
            elif not args.force:
                raise InstallError(f"{conflist_dest} exists and differs from {conflist_src}; not overwritten "
                                   "(nothing was installed). Use --force to replace it (the old one is kept as "
                                   f"{os.path.basename(conflist_dest)}.bak), or --no-conflist to install only "
                                   "the binary")
            else:
                conflist_state = f"replaced (old one kept as {conflist_dest}.bak)"
        else:
            conflist_state = "written"

    # 2. the binary
    os.makedirs(bin_dir, exist_ok=True)
    link = os.path.join(bin_dir, "cni-ipam")
    if kind == "onedir":
        root = os.path.join(lib_dir, "cni-ipam")
        bid = build_id(src)
        dest = os.path.join(root, bid)
        previous = None
        if os.path.islink(link):
            target = os.path.realpath(link)
            if os.path.dirname(os.path.dirname(target)) == os.path.realpath(root):
                previous = os.path.basename(os.path.dirname(target))
        if _same_path(src, dest):
            print(f"bundle:   {dest} (running from it; left as is)", file=out)
        elif os.path.isdir(dest):
            print(f"bundle:   {dest} (this build is already installed)", file=out)
        else:
            _copy_tree(src, dest)
            print(f"bundle:   {src} -> {dest}", file=out)
        _replace_symlink(os.path.join(dest, "cni-ipam"), link)
        print(f"binary:   {link} -> {os.path.join(dest, 'cni-ipam')}", file=out)
        keep = {bid} | ({previous} if previous else set())
        if previous and previous != bid:
            print(f"kept:     {os.path.join(root, previous)} (the previous build, for plugin runs in flight)",
                  file=out)
        for path in _prune(root, keep):
            print(f"removed:  {path} (an older build)", file=out)
    else:
        if _same_path(src, link):
            print(f"binary:   {link} (running from it; left as is)", file=out)
        else:
            _replace_file(None, link, 0o755, copy_from=src)
            print(f"binary:   {src} -> {link}", file=out)

    # 3. the conflist
    if conflist_data is not None:
        os.makedirs(conf_dir, exist_ok=True)
        if args.force and os.path.lexists(conflist_dest):
            shutil.copy2(conflist_dest, conflist_dest + ".bak")
        _replace_file(conflist_data, conflist_dest, 0o644)
    if conflist_dest:
        print(f"conflist: {conflist_dest}: {conflist_state}", file=out)
        others = sorted(n for n in os.listdir(conf_dir) if n.endswith((".conflist", ".conf", ".json"))
                        and n != os.path.basename(conflist_dest))
        if others:
            print(f"note:     {conf_dir} also holds {', '.join(others)}; runtimes that use only one network "
                  "(containerd with max_conf_num = 1) take the first by name", file=out)
    else:
        print(f"conflist: {conflist_state}", file=out)
    return 0


def _run(args) -> int:
    try:
        return install(args)
    except InstallError as e:
        print(f"cni-ipam: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cni-ipam: error: install: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "install", help="put the binary and an example conflist in place (run from the built binary)",
        description="Install the running cni-ipam binary into the CNI bin dir and an example conflist into "
                    "the CNI conf dir. A onedir bundle goes to LIB_DIR/cni-ipam/<build>/ with BIN_DIR/cni-ipam "
                    "a symlink to its executable (the previous build is kept). An existing conflist with other "
                    "content is never overwritten without --force.")
    p.add_argument("--bin-dir", default="/opt/cni/bin", help="CNI plugin dir (default /opt/cni/bin)")
    p.add_argument("--conf-dir", default="/etc/cni/net.d", help="CNI config dir (default /etc/cni/net.d)")
    p.add_argument("--lib-dir", default=None,
                   help="a onedir bundle goes to LIB_DIR/cni-ipam/<build>/ (default: BIN_DIR/../lib, "
                        "i.e. /opt/cni/lib)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--conflist", metavar="FILE", help=f"the conflist to install (default: the bundled "
                                                      f"{DEFAULT_CONFLIST})")
    g.add_argument("--no-conflist", action="store_true", help="install only the binary")
    p.add_argument("--force", action="store_true",
                   help="replace an existing conflist that differs (keeping it as .bak)")
    p.add_argument("--from", dest="from_path", metavar="PATH",
                   help="install this built binary (onedir bundle dir or executable) instead of the running one")
    p.set_defaults(func=_run)

"""``cni-ipam install`` / ``cni-ipam uninstall``: put the plugin (and, when asked, a conflist and
the plugin's credentials) in place on a node, and take exactly that away again.

    cni-ipam install [--bin-dir /opt/cni/bin] [--conf-dir /etc/cni/net.d] [--lib-dir /opt/cni/lib]
                     [--conflist FILE|DIR] [--force] [--from PATH]
                     [--kubeconfig FILE] [--etcd-tls DIR] [--host-conf-dir DIR] [--watch]
    cni-ipam uninstall [--bin-dir ...] [--lib-dir ...]

Run from the built binary (``dist/cni-ipam/cni-ipam install ...``; ``make install`` does that),
or as the DaemonSet's container (deploy/), where the host's dirs are mounted at ``/host/...``.

* A onedir bundle goes to ``<lib-dir>/cni-ipam/<build>/`` (``<build>`` = version + digest of the
  sources) and ``<bin-dir>/cni-ipam`` becomes a RELATIVE symlink to its executable
  (``../lib/cni-ipam/<build>/cni-ipam``), switched with one atomic rename: the link resolves the
  same on the host as in an install container that mounts the host dirs at the same relative
  places.  The previous build's directory is kept (older ones are pruned): a plugin process
  started just before the switch still finds every module of ITS build.  A onefile binary is
  copied to ``<bin-dir>/cni-ipam`` (temp file + rename).
* A conflist is written only when ``--conflist`` names one (a file, or a dir holding at most one
  ``*.conflist``/``*.conf`` -- an empty dir means none: a ConfigMap mounted with
  ``optional: true``).  Placeholders ``__KUBECONFIG_FILEPATH__``, ``__CNI_NET_DIR__``,
  ``__ETCD_TLS_DIR__``, ``__ETCD_ENDPOINTS__``, ``__ETCD_PREFIX__``, ``__KUBERNETES_NODE_NAME__`` are
  filled in (host paths, from ``--host-conf-dir`` / env).  It is validated with the plugin's own
  parsers.  An existing file with other content is NEVER overwritten silently: without
  ``--force`` the command stops before changing anything; with ``--force`` the old file is kept
  as ``<name>.bak`` (and put back by uninstall).
* ``--kubeconfig FILE``: a kubeconfig for the plugin (0600) from the pod's service account
  (cli/credentials.py: a TokenRequest token, else the mounted token).  ``--etcd-tls DIR``: the etcd
  client certificate files of DIR (a Secret) are copied to ``<conf-dir>/cni-ipam/etcd-tls/`` (0600).
* ``--watch``: keep running; rewrite the kubeconfig before its token expires and when the
  projected token rotates, re-copy the etcd TLS files and the conflist (only one install wrote)
  when their source changes.  SIGTERM ends it and leaves everything in place.
* Everything written is listed in ``<lib-dir>/cni-ipam/install-manifest.json`` (paths relative to
  it, with digests, plus the directories install created); ``uninstall`` removes exactly those --
  a file changed since is left alone and named -- and puts back a ``.bak`` it had made.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from cni_ipam.constants import DEFAULT_PREFIX

DEFAULT_CONFLIST = "10-cni-ipam-bridge.conflist"   # the example shipped in conf/ (used with --conflist)
MANIFEST = "install-manifest.json"
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
                f.write(data)  # type: ignore[arg-type]  # (None only with copy_from)
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


# ----------------------------------------------------------------------------- what install wrote
def _sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return _sha256(f.read())
    except OSError:
        return None


class Manifest:
    """``<lib-dir>/cni-ipam/install-manifest.json``: every file, link, build dir and directory that
    install wrote or created, as paths relative to the manifest's own directory (the same on the
    host and in an install container that mounts the host dirs at the same relative places)."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, MANIFEST)
        self.data: dict = {"version": 1, "files": {}, "builds": [], "dirs": [], "backups": {}}
        try:
            with open(self.path) as f:
                loaded = json.load(f)
            if isinstance(loaded, dict):
                for k in self.data:
                    if isinstance(loaded.get(k), type(self.data[k])):
                        self.data[k] = loaded[k]
        except (OSError, ValueError):
            pass

    def rel(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def abs(self, rel: str) -> str:
        return os.path.normpath(os.path.join(self.root, rel))

    def file(self, path: str, **entry) -> None:
        self.data["files"][self.rel(path)] = entry

    def forget(self, path: str) -> None:
        self.data["files"].pop(self.rel(path), None)

    def entry(self, path: str) -> dict | None:
        return self.data["files"].get(self.rel(path))

    def makedirs(self, path: str) -> None:
        """``os.makedirs`` that records each directory it creates (uninstall removes them if empty)."""
        path = os.path.abspath(path)
        missing = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            os.makedirs(d, exist_ok=True)
            self._created.append(d)

    _created: list[str]

    def save(self) -> None:
        for d in getattr(self, "_created", []):
            rel = self.rel(d)
            if rel not in self.data["dirs"]:
                self.data["dirs"].append(rel)
        self._created = []
        os.makedirs(self.root, exist_ok=True)
        _replace_file((json.dumps(self.data, indent=2, sort_keys=True) + "\n").encode(), self.path, 0o644)


def _new_manifest(root: str) -> Manifest:
    m = Manifest(root)
    m._created = []
    return m


# ----------------------------------------------------------------------------- the conflist
class Conflist:
    """The conflist to install: source, destination, content after the placeholders."""

    def __init__(self, src: str, dest: str, data: bytes):
        self.src, self.dest, self.data = src, dest, data


def find_conflist(path: str) -> str | None:
    """``--conflist``: a file, or a dir holding at most one *.conflist / *.conf (none -> None)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith(".") and n.endswith((".conflist", ".conf"))
                       and os.path.isfile(os.path.join(path, n)))
        if len(names) > 1:
            raise InstallError(f"--conflist {path}: holds {len(names)} conflists ({', '.join(names)}); "
                               "keep one (runtimes use only the first by name)")
        return os.path.join(path, names[0]) if names else None
    if not os.path.exists(path):
        raise InstallError(f"--conflist {path}: no such file or directory")
    return path


def substitute(data: bytes, values: dict[str, str]) -> bytes:
    text = data.decode("utf-8", "replace")
    for k, v in values.items():
        if k in text:
            text = text.replace(k, json.dumps(v)[1:-1])   # JSON-escaped: the value sits inside a string
    return text.encode()


def plan_conflist(src: str, conf_dir: str, values: dict[str, str], manifest: Manifest, force: bool
                  ) -> tuple[Conflist | None, str]:
    """(what to write or None, state text).  Raises InstallError when it must not be written."""
    try:
        with open(src, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InstallError(f"cannot read the conflist {src}: {e.strerror}") from None
    data = substitute(raw, values)
    validate_conflist(data, src)
    dest = os.path.join(conf_dir, os.path.basename(src))
    if not os.path.lexists(dest):
        return Conflist(src, dest, data), "written"
    current = _file_sha(dest)
    if current == _sha256(data):
        return None, "unchanged (already in place)"
    ours = (manifest.entry(dest) or {}).get("sha256")
    if ours and ours == current:
        return Conflist(src, dest, data), "updated (install wrote the old one)"
    if not force:
        raise InstallError(f"{dest} exists and differs from {src}; not overwritten (nothing was installed). "
                           f"Use --force to replace it (the old one is kept as {os.path.basename(dest)}.bak), "
                           "or leave out --conflist to install only the binary")
    return Conflist(src, dest, data), f"replaced (old one kept as {dest}.bak)"


def write_conflist(c: Conflist, manifest: Manifest, force: bool) -> None:
    manifest.makedirs(os.path.dirname(c.dest))
    if force and os.path.lexists(c.dest) and _file_sha(c.dest) != (manifest.entry(c.dest) or {}).get("sha256"):
        shutil.copy2(c.dest, c.dest + ".bak")
        manifest.data["backups"][manifest.rel(c.dest)] = manifest.rel(c.dest + ".bak")
    _replace_file(c.data, c.dest, 0o644)
    manifest.file(c.dest, kind="file", sha256=_sha256(c.data))


# ----------------------------------------------------------------------------- etcd TLS files
def read_tls_dir(src: str | None) -> dict[str, bytes]:
    """The files of a mounted Secret (``ca.crt``, ``tls.crt``, ``tls.key``, ...); {} when absent."""
    if not src or not os.path.isdir(src):
        return {}
    out = {}
    for n in sorted(os.listdir(src)):
        p = os.path.join(src, n)
        if not n.startswith(".") and os.path.isfile(p):
            with open(p, "rb") as f:
                out[n] = f.read()
    return out


def sync_tls(files: dict[str, bytes], dest_dir: str, manifest: Manifest) -> list[str]:
    """Make ``dest_dir`` hold exactly ``files`` (0600); returns what changed."""
    changed = []
    if files:
        manifest.makedirs(dest_dir)
    for n, data in files.items():
        dest = os.path.join(dest_dir, n)
        if _file_sha(dest) != _sha256(data):
            _replace_file(data, dest, 0o600)
            changed.append(dest)
        manifest.file(dest, kind="file", sha256=_sha256(data))
    prefix = manifest.rel(dest_dir) + os.sep
    for rel in [r for r in manifest.data["files"] if r.startswith(prefix)]:
        p = manifest.abs(rel)
        if os.path.basename(p) not in files:
            if _file_sha(p) == manifest.data["files"][rel].get("sha256"):
                os.unlink(p)
            del manifest.data["files"][rel]
            changed.append(f"{p} (removed)")
    return changed


# ----------------------------------------------------------------------------- the command
def _say(out, msg: str, stamp: bool = False) -> None:
    if stamp:
        import time
        msg = time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + msg
    print(msg, file=out, flush=True)


def _dirs(args) -> tuple[str, str, str]:
    bin_dir = os.path.abspath(args.bin_dir)
    lib_dir = os.path.abspath(args.lib_dir or os.path.join(os.path.dirname(bin_dir), "lib"))
    conf_dir = os.path.abspath(getattr(args, "conf_dir", None) or "/etc/cni/net.d")
    return bin_dir, conf_dir, lib_dir


def install(args, out=sys.stdout) -> int:
    bin_dir, conf_dir, lib_dir = _dirs(args)
    root = os.path.join(lib_dir, "cni-ipam")
    host_conf_dir = args.host_conf_dir or os.environ.get("CNI_NET_DIR") or conf_dir

    def on_host(path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), conf_dir)
        return path if rel.startswith("..") else os.path.normpath(os.path.join(host_conf_dir, rel))

    if args.from_path:
        kind, src = binary_from(args.from_path)
    else:
        found = running_binary()
        if found is None:
            raise InstallError("install puts the built binary in place, so run it from the binary: "
                               "`make binary && dist/cni-ipam/cni-ipam install ...` (or `make install`), "
                               "or name a built binary with --from dist/cni-ipam")
        kind, src = found
    manifest = _new_manifest(root)
    kubeconfig = os.path.abspath(args.kubeconfig) if args.kubeconfig else None
    tls_dest = os.path.join(conf_dir, "cni-ipam", "etcd-tls")
    values = {"__CNI_NET_DIR__": host_conf_dir, "__ETCD_TLS_DIR__": on_host(tls_dest),
              "__KUBECONFIG_FILEPATH__": on_host(kubeconfig) if kubeconfig else "",
              "__ETCD_ENDPOINTS__": os.environ.get("ETCD_ENDPOINTS", ""),
              "__ETCD_PREFIX__": os.environ.get("CNI_IPAM_ETCD_PREFIX", "") or DEFAULT_PREFIX,
              "__KUBERNETES_NODE_NAME__": os.environ.get("KUBERNETES_NODE_NAME", "")}

    # 1. everything that could refuse, before anything is changed
    if args.no_conflist:        # the old spelling of the default
        args.conflist = None
    conflist, conflist_state = None, "none (install writes one only with --conflist)"
    conflist_src = find_conflist(args.conflist) if args.conflist else None
    if args.conflist and conflist_src is None:
        conflist_state = f"none ({args.conflist} holds no conflist)"
    seen_conflist = None     # the source as read now: the watch compares with this (a change meanwhile is seen)
    if conflist_src:
        seen_conflist = _file_sha(conflist_src)
        conflist, conflist_state = plan_conflist(conflist_src, conf_dir, values, manifest, args.force)
    keeper = None
    if kubeconfig:
        from .credentials import CredentialsError, TokenKeeper
        keeper = TokenKeeper(kubeconfig, sa_dir=args.sa_dir, token_ttl=args.token_ttl,
                             log=lambda m: _say(out, m, stamp=args.watch))
        try:
            keeper.server()
            keeper._read(keeper.token_file, "token")
            keeper._read(keeper.ca_file, "CA")
        except CredentialsError as e:
            raise InstallError(str(e)) from None
    tls_files = read_tls_dir(args.etcd_tls)

    # 2. the binary
    manifest.makedirs(bin_dir)
    link = os.path.join(bin_dir, "cni-ipam")
    if kind == "onedir":
        manifest.makedirs(root)
        bid = build_id(src)
        dest = os.path.join(root, bid)
        previous = None
        if os.path.islink(link):
            target = os.path.realpath(link)
            if os.path.dirname(os.path.dirname(target)) == os.path.realpath(root):
                previous = os.path.basename(os.path.dirname(target))
        if _same_path(src, dest):
            _say(out, f"bundle:   {dest} (running from it; left as is)")
        elif os.path.isdir(dest):
            _say(out, f"bundle:   {dest} (this build is already installed)")
        else:
            _copy_tree(src, dest)
            _say(out, f"bundle:   {src} -> {dest}")
        target = os.path.relpath(os.path.join(dest, "cni-ipam"), bin_dir)
        if not (os.path.islink(link) and os.readlink(link) == target):
            _replace_symlink(target, link)
        manifest.file(link, kind="symlink", target=target)
        _say(out, f"binary:   {link} -> {target}")
        keep = {bid} | ({previous} if previous else set())
        if previous and previous != bid:
            _say(out, f"kept:     {os.path.join(root, previous)} (the previous build, for plugin runs in flight)")
        for path in _prune(root, keep):
            _say(out, f"removed:  {path} (an older build)")
        manifest.data["builds"] = sorted(keep)
    else:
        if _same_path(src, link):
            _say(out, f"binary:   {link} (running from it; left as is)")
        else:
            _replace_file(None, link, 0o755, copy_from=src)
            _say(out, f"binary:   {src} -> {link}")
        manifest.file(link, kind="file", sha256=_file_sha(link))

    # 3. the conflist, the etcd TLS files, the kubeconfig
    if conflist is not None:
        write_conflist(conflist, manifest, args.force)
    shown = conflist.dest if conflist else (os.path.join(conf_dir, os.path.basename(conflist_src))
                                            if conflist_src else None)
    _say(out, f"conflist: {shown}: {conflist_state}" if shown else f"conflist: {conflist_state}")
    if shown and os.path.isdir(conf_dir):
        others = sorted(n for n in os.listdir(conf_dir) if n.endswith((".conflist", ".conf", ".json"))
                        and n != os.path.basename(shown))
        if others:
            _say(out, f"note:     {conf_dir} also holds {', '.join(others)}; runtimes that use only one network "
                      "(containerd with max_conf_num = 1) take the first by name")
    if args.etcd_tls:
        sync_tls(tls_files, tls_dest, manifest)
        _say(out, f"etcd-tls: {tls_dest}: {', '.join(sorted(tls_files)) or 'none in ' + args.etcd_tls}")
    if keeper is not None:
        manifest.makedirs(os.path.dirname(kubeconfig))  # type: ignore[arg-type]  # (set with keeper)
        manifest.file(kubeconfig, kind="kubeconfig")  # type: ignore[arg-type]     # rewritten while it runs: removed whatever it holds
        manifest.save()
        try:
            keeper.write()
        except CredentialsError as e:
            raise InstallError(f"{e} (the plugin is installed; its kubeconfig is not)") from None
    manifest.save()
    if not args.watch:
        return 0
    return _watch(args, out, manifest, keeper, seen_conflist, tls_files, conf_dir, values, tls_dest)


def _watch(args, out, manifest, keeper, last_conflist, last_tls, conf_dir, values, tls_dest) -> int:
    """The DaemonSet's long-running part: keep the kubeconfig, etcd TLS files and conflist current."""
    import signal
    import threading
    import time
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _say(out, f"watching: every {args.poll_interval:g}s (SIGTERM ends this; nothing is removed)", stamp=True)
    while not stop.is_set():
        wait = args.poll_interval
        if keeper is not None:
            wait = max(0.05, min(wait, keeper.next_refresh - time.time()))
        if stop.wait(wait):
            break
        try:
            dirty = False
            if keeper is not None:
                why = keeper.due()
                if why:
                    keeper.write(why)
            if args.etcd_tls:
                files = read_tls_dir(args.etcd_tls)
                if files != last_tls:
                    changed = sync_tls(files, tls_dest, manifest)
                    last_tls = files
                    dirty = True
                    _say(out, f"etcd-tls: {', '.join(changed) or 'unchanged'}", stamp=True)
            if args.conflist:
                src = find_conflist(args.conflist)
                sha = _file_sha(src) if src else None
                if src and sha != last_conflist:
                    last_conflist = sha
                    try:
                        c, state = plan_conflist(src, conf_dir, values, manifest, False)
                        if c is not None:
                            write_conflist(c, manifest, False)
                            dirty = True
                        _say(out, f"conflist: {os.path.join(conf_dir, os.path.basename(src))}: {state}", stamp=True)
                    except InstallError as e:
                        _say(out, f"conflist: not changed: {e}", stamp=True)
            if dirty:
                manifest.save()
        except Exception as e:  # noqa: BLE001 -- keep the node's credentials loop alive; say why
            _say(out, f"error (retrying in {args.poll_interval:g}s): {type(e).__name__}: {e}", stamp=True)
    _say(out, "stopped: the plugin, its kubeconfig and conflist stay in place", stamp=True)
    return 0


def uninstall(args, out=sys.stdout) -> int:
    bin_dir, _conf_dir, lib_dir = _dirs(args)
    root = os.path.join(lib_dir, "cni-ipam")
    m = Manifest(root)
    if not os.path.exists(m.path):
        raise InstallError(f"nothing to uninstall: {m.path} does not exist (install records what it writes "
                           "there; check --bin-dir/--lib-dir)")
    left = []
    for rel, e in sorted(m.data["files"].items()):
        p = m.abs(rel)
        if not os.path.lexists(p):
            continue
        if e.get("kind") == "symlink":
            ok = os.path.islink(p) and os.readlink(p) == e.get("target")
        elif e.get("kind") == "kubeconfig":
            ok = not os.path.islink(p) and os.path.isfile(p)
        else:
            ok = not os.path.islink(p) and _file_sha(p) == e.get("sha256")
        if ok:
            os.unlink(p)
            _say(out, f"removed:  {p}")
        else:
            left.append(p)
            _say(out, f"left:     {p} (changed since install wrote it)")
    for rel, bak in sorted(m.data["backups"].items()):
        p, b = m.abs(rel), m.abs(bak)
        if os.path.exists(b) and not os.path.lexists(p):
            os.rename(b, p)
            _say(out, f"restored: {p} (from {os.path.basename(b)})")
    for name in m.data["builds"]:
        d = os.path.join(root, name)
        if name and "/" not in name and os.path.isdir(d) and not os.path.islink(d):
            shutil.rmtree(d)
            _say(out, f"removed:  {d}/")
    os.unlink(m.path)
    for rel in sorted(m.data["dirs"], key=lambda r: -len(m.abs(r))):
        d = m.abs(rel)
        try:
            os.rmdir(d)
            _say(out, f"removed:  {d}/ (install created it)")
        except FileNotFoundError:
            pass
        except OSError:
            _say(out, f"left:     {d}/ (not empty)")
    if left:
        _say(out, f"note:     {len(left)} file(s) changed since install were left in place")
    return 0


def _wrap(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except InstallError as e:
            print(f"cni-ipam: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"cni-ipam: error: {fn.__name__}: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
            return 1
    return run


def _dir_args(p) -> None:
    p.add_argument("--bin-dir", default="/opt/cni/bin", help="CNI plugin dir (default /opt/cni/bin)")
    p.add_argument("--lib-dir", default=None,
                   help="a onedir bundle goes to LIB_DIR/cni-ipam/<build>/ (default: BIN_DIR/../lib, "
                        "i.e. /opt/cni/lib)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "install", help="put the plugin in place on a node (run from the built binary or the DaemonSet)",
        description="Install the running cni-ipam binary into the CNI bin dir: a onedir bundle goes to "
                    "LIB_DIR/cni-ipam/<build>/ with BIN_DIR/cni-ipam a relative symlink to its executable (the "
                    "previous build is kept). A conflist is written only with --conflist, and an existing one "
                    "with other content is never overwritten without --force. Everything written is recorded "
                    "for `cni-ipam uninstall`.")
    _dir_args(p)
    p.add_argument("--conf-dir", default="/etc/cni/net.d", help="CNI config dir (default /etc/cni/net.d)")
    p.add_argument("--conflist", metavar="FILE|DIR",
                   help=f"install this conflist (a file, or a dir holding at most one; an empty dir: none). "
                        f"Without it no conflist is written. Example: conf/{DEFAULT_CONFLIST}")
    p.add_argument("--no-conflist", action="store_true", help=argparse_suppress())
    p.add_argument("--force", action="store_true",
                   help="replace an existing conflist that differs (keeping it as .bak)")
    p.add_argument("--from", dest="from_path", metavar="PATH",
                   help="install this built binary (onedir bundle dir or executable) instead of the running one")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="write a kubeconfig for the plugin here (0600) from the pod's service account "
                        "(a TokenRequest token, else the mounted token)")
    p.add_argument("--sa-dir", default="/var/run/secrets/kubernetes.io/serviceaccount",
                   help="the service account's token/ca.crt/namespace (default: the in-cluster mount)")
    p.add_argument("--token-ttl", type=int, default=86400, metavar="SECONDS",
                   help="lifetime asked for in the TokenRequest (default 86400; API servers require >= 600)")
    p.add_argument("--etcd-tls", metavar="DIR",
                   help="copy the etcd client certificate files of DIR (a mounted Secret: ca.crt, tls.crt, "
                        "tls.key) to CONF_DIR/cni-ipam/etcd-tls/ (0600); a missing or empty DIR copies none")
    p.add_argument("--host-conf-dir", metavar="DIR",
                   help="CONF_DIR as the host sees it, for the paths put into the conflist "
                        "(env CNI_NET_DIR; default CONF_DIR)")
    p.add_argument("--watch", action="store_true",
                   help="keep running: refresh the kubeconfig before its token expires and when the mounted "
                        "token rotates, re-copy etcd TLS files and the conflist when they change")
    p.add_argument("--poll-interval", type=float, default=5.0, metavar="SECONDS",
                   help="--watch: how often to look at the source files (default 5)")
    p.set_defaults(func=_wrap(install))

    u = subparsers.add_parser(
        "uninstall", help="remove exactly what `cni-ipam install` wrote",
        description="Remove what `cni-ipam install` wrote (recorded in LIB_DIR/cni-ipam/install-manifest.json): "
                    "the bin dir link, the bundles, the conflist, kubeconfig and etcd TLS files, and the "
                    "directories it created. A file changed since is left in place and named; a conflist that "
                    "install replaced with --force is put back.")
    _dir_args(u)
    u.set_defaults(func=_wrap(uninstall))


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS

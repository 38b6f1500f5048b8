"""Real container runtimes for the end-to-end tests and ``make demo``.

* ``build_busybox_image(dir)``  -- an OCI image (tar) and a rootfs tar from Debian's static
  ``/bin/busybox``; no registry, no network.
* ``Containerd``                 -- Debian's containerd 1.6 with its CRI plugin, started by hand
  with a temp config and its own root/state/socket dirs, CNI from one ``bin_dir`` and one
  ``conf_dir``; ``stop()`` removes every pod, kills what is left (shims, their children), unmounts
  and deletes its dirs.
* ``CRIClient``                  -- RunPodSandbox / PodSandboxStatus / StopPodSandbox /
  RemovePodSandbox (+ containers) over the CRI v1 gRPC stubs of ``container-runtime-interface-api``.
* ``Podman``                     -- podman 4.3 with the CNI backend and runc, configured only
  through ``CONTAINERS_CONF`` / ``CONTAINERS_STORAGE_CONF`` / ``TMPDIR`` (nothing in /etc).
* ``bridge_conflist(...)``       -- a conflist for Debian's ``bridge`` plugin + cni-ipam.
* ``missing_tools(...)``         -- why a runtime test cannot run here (root, binaries, modules).

Every process started here is tracked and killed on ``stop()`` (and at exit).
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from typing import Iterable

BUSYBOX = "/bin/busybox"
CNI_PLUGIN_DIR = "/usr/lib/cni"
IMAGE_REF = "localhost/bbx:latest"
PAUSE_CMD = ["/bin/sleep", "2147483647"]

__all__ = ["BUSYBOX", "IMAGE_REF", "CRIClient", "Containerd", "Podman", "RuntimeError_", "etcd_allocations",
           "free_test_subnet", "read_calls", "recording_plugin", "run_cli", "wait_released",
           "bridge_conflist", "build_busybox_image", "delete_link", "make_cni_bin_dir",
           "missing_tools", "unique_name"]


class RuntimeError_(RuntimeError):
    """A runtime could not be started or did not do what was asked."""


# ----------------------------------------------------------------------------- tracking / cleanup
_live_lock = threading.Lock()
_live: dict[int, object] = {}


def _register(obj) -> None:
    with _live_lock:
        _live[id(obj)] = obj


def _unregister(obj) -> None:
    with _live_lock:
        _live.pop(id(obj), None)


def _cleanup_all() -> None:
    with _live_lock:
        objs = list(_live.values())
    for o in objs:
        try:
            o.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_cleanup_all)


def unique_name(prefix: str, n: int = 6) -> str:
    """``prefix`` + random hex (interface names must stay <= 15 characters)."""
    return f"{prefix}{secrets.token_hex(n // 2 + 1)[:n]}"


def missing_tools(*tools: str, modules: Iterable[str] = ()) -> str | None:
    """A reason to skip (not root, a binary or Python module missing), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, containers)"
    for t in tools:
        if not (shutil.which(t) or os.path.exists(t)):
            return f"{t} is not installed (scripts/install-deps.sh installs it)"
    for m in modules:
        try:
            __import__(m)
        except ImportError:
            return f"Python module {m} is not installed (scripts/install-deps.sh installs it)"
    return None


def _pids_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _kill_tree(pids: Iterable[int]) -> None:
    """SIGKILL these processes and all their descendants (by pid; never by name)."""
    kids = _pids_children()
    todo, seen = list(pids), set()
    while todo:
        p = todo.pop()
        if p in seen or p <= 1:
            continue
        seen.add(p)
        todo.extend(kids.get(p, []))
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _mounts_under(path: str) -> list[str]:
    path = os.path.realpath(path).rstrip("/") + "/"
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if (mp + "/").startswith(path):
                    out.append(mp)
    except OSError:
        pass
    return out


def unmount_all_under(path: str) -> None:
    """Lazily unmount every mount point below ``path``, deepest first."""
    for _ in range(3):
        mps = _mounts_under(path)
        if not mps:
            return
        for mp in sorted(mps, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _remove_cgroups(parent: str) -> None:
    """rmdir the (empty) cgroup ``parent`` and its children in every hierarchy."""
    parent = parent.strip("/")
    if not parent:
        return
    roots = [os.path.join("/sys/fs/cgroup", d) for d in os.listdir("/sys/fs/cgroup")] + ["/sys/fs/cgroup"]
    for root in roots:
        top = os.path.join(root, parent)
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def _remove_dead_sockets(directory: str) -> None:
    """Unlink the unix sockets in ``directory`` that nobody listens on (killed shims' sockets)."""
    import socket
    import stat
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except OSError:
            pass


def delete_link(name: str) -> None:
    """``ip link del NAME`` if it exists (bridges the plugins created)."""
    subprocess.run(["ip", "link", "del", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def make_cni_bin_dir(directory: str, plugin: str) -> str:
    """A dir of symlinks: every plugin of /usr/lib/cni plus ``cni-ipam`` -> ``plugin``."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(CNI_PLUGIN_DIR):
        dst = os.path.join(directory, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.join(CNI_PLUGIN_DIR, name), dst)
    dst = os.path.join(directory, "cni-ipam")
    if os.path.lexists(dst):
        os.unlink(dst)
    os.symlink(os.path.abspath(plugin), dst)
    return directory


# ----------------------------------------------------------------------------- the image
_FIXED_MTIME = 1_700_000_000


def _tarinfo(name: str, *, type_=tarfile.REGTYPE, mode=0o644, size=0, linkname="") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = type_, mode, size, linkname
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = _FIXED_MTIME, 0, 0, "root", "root"
    return ti


def busybox_rootfs_tar(busybox: str = BUSYBOX) -> bytes:
    """A minimal rootfs (uncompressed tar, reproducible): busybox + its applet symlinks."""
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    with open(busybox, "rb") as f:
        bb = f.read()
    etc = {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
           "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
           "etc/hosts": b"127.0.0.1 localhost\n",
           "etc/resolv.conf": b""}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var", "usr", "usr/bin", "sbin"):
            t.addfile(_tarinfo(d, type_=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755))
        t.addfile(_tarinfo("bin/busybox", mode=0o755, size=len(bb)), io.BytesIO(bb))
        for a in sorted(set(applets)):
            if a != "busybox" and "/" not in a:
                t.addfile(_tarinfo(f"bin/{a}", type_=tarfile.SYMTYPE, mode=0o777, linkname="busybox"))
        for name, data in etc.items():
            t.addfile(_tarinfo(name, size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def build_busybox_image(directory: str, ref: str = IMAGE_REF, *, entrypoint: list[str] | None = None,
                        cmd: list[str] | None = None) -> tuple[str, str]:
    """Write ``image.tar`` (an OCI image layout, for ``ctr images import``) and ``rootfs.tar``
    (for ``podman import``) into ``directory``; return their paths.

    The image's default command is ``sleep 2147483647`` so that it also serves as the pause
    (sandbox) image."""
    os.makedirs(directory, exist_ok=True)
    layer = busybox_rootfs_tar()
    rootfs_path = os.path.join(directory, "rootfs.tar")
    with open(rootfs_path, "wb") as f:
        f.write(layer)
    config = {
        "created": "2023-11-14T22:13:20Z", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin:/sbin:/usr/bin"], "WorkingDir": "/",
                   "Entrypoint": entrypoint, "Cmd": cmd if cmd is not None else PAUSE_CMD},
        "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "cni-ipam tests: Debian busybox-static"}],
    }
    if entrypoint is None:
        del config["config"]["Entrypoint"]
    config_b = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(config_b),
                   "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": _sha(layer),
                    "size": len(layer)}],
    }
    manifest_b = json.dumps(manifest, sort_keys=True).encode()
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(manifest_b),
        "size": len(manifest_b), "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag}}]}
    image_path = os.path.join(directory, "image.tar")
    with tarfile.open(image_path, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name: str, data: bytes) -> None:
            t.addfile(_tarinfo(name, size=len(data)), io.BytesIO(data))
        for d in ("blobs", "blobs/sha256"):
            t.addfile(_tarinfo(d, type_=tarfile.DIRTYPE, mode=0o755))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for blob in (layer, config_b, manifest_b):
            add("blobs/sha256/" + _sha(blob).split(":", 1)[1], blob)
    return image_path, rootfs_path


# ----------------------------------------------------------------------------- CNI config
def _ipam_conf(endpoint: str, prefix: str, node: str, work_dir: str, log_level: str, ipam: dict) -> dict:
    conf = {"type": "cni-ipam", "etcd_endpoints": endpoint, "etcd_prefix": prefix, "nodename": node,
            "lock_file": os.path.join(work_dir, "cni-ipam.lock"),
            "log_file": os.path.join(work_dir, "cni-ipam.log"), "log_level": log_level,
            "timeout_seconds": 10}
    conf.update(ipam)
    return conf


def bridge_conflist(*, name: str, bridge: str, endpoint: str, prefix: str, node: str, work_dir: str,
                    cni_version: str = "1.0.0", log_level: str = "debug", is_gateway: bool = True,
                    **ipam) -> dict:
    """Debian's ``bridge`` (no masquerade) with cni-ipam (mode bridge) as IPAM.

    Debian's bridge plugin (1.1.1) keeps ONE IPv4 address on a bridge: with ``isGateway`` the
    ADD into a second block (another pool, or a node's second block) fails with "already has an
    IP address different from ...".  Use ``is_gateway=False`` when pods of one node get
    addresses from several blocks (they then reach only their own block's neighbours).
    (Debian's ``ptp`` 1.1.1 cannot take routed mode's /32 addresses: on ADD it deletes the
    container address's subnet route, which a /32 does not have -> "no such process".)"""
    return {"cniVersion": cni_version, "name": name, "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": is_gateway, "ipMasq": False,
        "hairpinMode": False, "ipam": _ipam_conf(endpoint, prefix, node, work_dir, log_level,
                                                 {"mode": "bridge", **ipam})}]}


# ----------------------------------------------------------------------------- containerd
class Containerd:
    """Debian's containerd (1.6) + CRI plugin in a temp dir.

    ``start()`` writes ``config.toml`` (native snapshotter, runc v2 with cgroupfs,
    ``restrict_oom_score_adj``, ``disable_apparmor``, netns mounted under the state dir, one CNI
    ``bin_dir`` and ``conf_dir`` with ``max_conf_num = 1``) and waits for the socket.
    ``import_image(tar)`` runs ``ctr -n k8s.io images import --snapshotter native``.
    ``stop()`` removes every pod sandbox over CRI, stops containerd, kills leftover shims and
    their children, unmounts and removes the dirs.  Logs: ``self.log_path``.
    """

    def __init__(self, *, cni_bin_dir: str, cni_conf_dir: str, sandbox_image: str = IMAGE_REF,
                 base_dir: str | None = None, log_level: str = "info", keep_logs_in: str | None = None):
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="cni-ipam-containerd-")
        os.makedirs(self.base_dir, exist_ok=True)
        self.root = os.path.join(self.base_dir, "root")
        self.state = os.path.join(self.base_dir, "state")
        self.socket = os.path.join(self.base_dir, "containerd.sock")
        self._sock_dir = None
        if len(self.socket + ".ttrpc") > 100:   # unix socket paths end at 104 bytes (deep pytest tmp dirs)
            self._sock_dir = tempfile.mkdtemp(prefix="ctd-", dir="/tmp")
            self.socket = os.path.join(self._sock_dir, "containerd.sock")
        self.config_path = os.path.join(self.base_dir, "config.toml")
        self.log_dir = keep_logs_in or self.base_dir
        self.log_path = os.path.join(self.log_dir, "containerd.log")
        self.cni_bin_dir, self.cni_conf_dir = cni_bin_dir, cni_conf_dir
        self.sandbox_image, self.log_level = sandbox_image, log_level
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._stopped = False
        self._cri: CRIClient | None = None
        # pods go into cgroups below this parent (removed on stop); default would be /k8s.io/<id>
        self.cgroup_parent = f"/cni-ipam-e2e-{secrets.token_hex(4)}"
        # the shim's socket dir is fixed (/run/containerd/s): remove what we created there
        self._run_dirs_created = [d for d in ("/run/containerd", "/run/containerd/s") if not os.path.exists(d)]
        _register(self)

    def config_toml(self) -> str:
        q = json.dumps  # TOML basic strings are JSON strings for our paths
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = {q(self.root)}
state = {q(self.state)}
oom_score = 0
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = {q(self.socket)}
[ttrpc]
  address = {q(self.socket + ".ttrpc")}
[debug]
  level = {q(self.log_level)}
[metrics]
  address = ""

[{cri}]
  sandbox_image = {q(self.sandbox_image)}
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {q(os.path.join(self.state, "runc"))}
  [{cri}.cni]
    bin_dir = {q(self.cni_bin_dir)}
    conf_dir = {q(self.cni_conf_dir)}
    max_conf_num = 1
"""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> "Containerd":
        if self._stopped:
            raise RuntimeError_("containerd: already stopped")
        for d in (self.root, self.state, self.log_dir):
            os.makedirs(d, mode=0o711, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(self.config_toml())
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["containerd", "--config", self.config_path], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, close_fds=True,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError_(f"containerd exited (rc={self.proc.returncode}); log tail:\n{self.log_tail()}")
            if os.path.exists(self.socket):
                try:
                    self.cri().version()
                    return self
                except Exception:  # grpc not ready yet
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError_(f"containerd not ready after {timeout}s; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def cri(self) -> "CRIClient":
        if self._cri is None:
            self._cri = CRIClient(self.socket, cgroup_parent=self.cgroup_parent)
        return self._cri

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run(["ctr", "--address", self.socket, *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError_(f"ctr {' '.join(args)} failed (rc={p.returncode}): {p.stderr.strip()}")
        return p

    def import_image(self, image_tar: str, ref: str = IMAGE_REF, timeout: float = 60.0) -> None:
        """Import into the k8s.io namespace, unpacked for the native snapshotter, and wait
        until the CRI plugin sees it."""
        self.ctr("-n", "k8s.io", "images", "import", "--snapshotter", "native", image_tar)
        deadline = time.monotonic() + timeout
        while not self.cri().image_present(ref):
            if time.monotonic() > deadline:
                raise RuntimeError_(f"CRI does not see image {ref} after import")
            time.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _shim_pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                args = _cmdline(int(d))
                if args and "containerd-shim" in os.path.basename(args[0]) and self.socket in args:
                    out.append(int(d))
        return out

    def remove_all_pods(self, timeout: float = 30.0) -> list[str]:
        """Stop + remove every pod sandbox (ready or not); returns problems."""
        problems = []
        if not self.running:
            return problems
        try:
            cri = self.cri()
            for sb in cri.list_pod_sandboxes():
                for fn in (cri.stop_pod_sandbox, cri.remove_pod_sandbox):
                    try:
                        fn(sb.id, timeout=timeout)
                    except Exception as e:  # noqa: BLE001 - reported, cleanup goes on
                        problems.append(f"{fn.__name__} {sb.id[:12]}: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"list pod sandboxes: {e}")
        return problems

    def stop(self) -> list[str]:
        """Remove all pods, stop containerd, kill leftovers, unmount, delete dirs.  Idempotent."""
        if self._stopped:
            return []
        problems = self.remove_all_pods()
        if self._cri is not None:
            self._cri.close()
            self._cri = None
        shims = self._shim_pids()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        shims = sorted(set(shims) | set(self._shim_pids()))
        if shims:
            problems.append(f"killed {len(shims)} leftover shim(s) and their processes")
            _kill_tree(shims)
            time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None
        unmount_all_under(self.base_dir)
        _remove_cgroups(self.cgroup_parent)
        if "/run/containerd/s" in self._run_dirs_created:
            _remove_dead_sockets("/run/containerd/s")
        for d in reversed(self._run_dirs_created):
            try:
                os.rmdir(d)
            except OSError:
                pass
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        keep = os.path.realpath(self.log_dir) if self.log_dir != self.base_dir else None
        if keep is None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            for d in (self.root, self.state):
                shutil.rmtree(d, ignore_errors=True)
        self._stopped = True
        _unregister(self)
        return problems

    def __enter__(self) -> "Containerd":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- CRI client
class CRIClient:
    """The few CRI v1 calls kubelet makes for pod networking (raw gRPC stubs)."""

    def __init__(self, socket_path: str, timeout: float = 60.0, cgroup_parent: str = ""):
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc
        self.pb = api_pb2
        self.timeout = timeout
        self.cgroup_parent = cgroup_parent
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def version(self):
        return self.rt.Version(self.pb.VersionRequest(version="v1"), timeout=5)

    def image_present(self, ref: str) -> bool:
        r = self.img.ImageStatus(self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=ref)), timeout=10)
        return bool(r.image.id)

    def pod_config(self, name: str, namespace: str, uid: str | None = None, *, log_dir: str | None = None,
                   labels: dict | None = None):
        pb = self.pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid or str(uuid.uuid4()),
                                           attempt=0),
            hostname=name[:63], log_directory=log_dir or "",
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace, **(labels or {})},
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=self.cgroup_parent, security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))))

    def run_pod_sandbox(self, config, timeout: float | None = None) -> str:
        r = self.rt.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config), timeout=timeout or self.timeout)
        return r.pod_sandbox_id

    def pod_sandbox_status(self, pod_id: str, timeout: float | None = None):
        return self.rt.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                        timeout=timeout or self.timeout).status

    def pod_ips(self, pod_id: str) -> list[str]:
        st = self.pod_sandbox_status(pod_id)
        ips = [st.network.ip] if st.network.ip else []
        ips += [a.ip for a in st.network.additional_ips if a.ip]
        return ips

    def stop_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=timeout or self.timeout)

    def remove_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self.rt.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                 timeout=timeout or self.timeout)

    def list_pod_sandboxes(self):
        return list(self.rt.ListPodSandbox(self.pb.ListPodSandboxRequest(), timeout=self.timeout).items)

    def find_pod(self, name: str, namespace: str):
        """The sandbox(es) with this metadata (a failed RunPodSandbox leaves a NotReady one)."""
        return [s for s in self.list_pod_sandboxes()
                if s.metadata.name == name and s.metadata.namespace == namespace]

    def run_container(self, pod_id: str, pod_config, name: str, command: list[str],
                      image: str = IMAGE_REF, timeout: float | None = None) -> str:
        pb = self.pb
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name, attempt=0),
                                 image=pb.ImageSpec(image=image), command=command,
                                 log_path=f"{name}.log" if pod_config.log_directory else "",
                                 linux=pb.LinuxContainerConfig())
        cid = self.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg,
                                                                sandbox_config=pod_config),
                                      timeout=timeout or self.timeout).container_id
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=timeout or self.timeout)
        return cid

    def container_state(self, cid: str) -> str:
        st = self.rt.ContainerStatus(self.pb.ContainerStatusRequest(container_id=cid), timeout=self.timeout).status
        return self.pb.ContainerState.Name(st.state)

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 10) -> tuple[int, str, str]:
        r = self.rt.ExecSync(self.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                             timeout=timeout + 10)
        return r.exit_code, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


# ----------------------------------------------------------------------------- podman
class Podman:
    """podman 4.3 with the CNI backend and runc, configured only through environment variables
    (``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``, ``TMPDIR``): storage, run state, network
    configs, events and tmp files all live in a temp dir.  ``stop()`` removes every container,
    kills leftover conmon processes, unmounts and deletes the dir."""

    def __init__(self, *, cni_plugin_dirs: list[str], network_config_dir: str, base_dir: str | None = None):
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="cni-ipam-podman-")
        if len(self.base_dir) > 44:
            # seen here: under a long run root (e.g. pytest's tmp_path) conmon never reports the
            # container's exit and every `podman run --rm` hangs for podman's 20 s conmon timeout
            raise RuntimeError_(f"podman base dir {self.base_dir!r} is too long; keep it short (default: /tmp/...)")
        self.graphroot = os.path.join(self.base_dir, "storage")
        self.runroot = os.path.join(self.base_dir, "run")
        self.tmpdir = os.path.join(self.base_dir, "tmp")
        self.network_config_dir = network_config_dir
        self.cni_plugin_dirs = cni_plugin_dirs
        self.conf_path = os.path.join(self.base_dir, "containers.conf")
        self.storage_conf_path = os.path.join(self.base_dir, "storage.conf")
        self._stopped = False
        # cgroups of containers (and conmon) go below this parent; removed on stop
        self.cgroup_parent = f"/cni-ipam-e2e-{secrets.token_hex(4)}"
        # podman writes its blob-info cache to /var/lib/containers/cache whatever the storage
        # config says: remove it on stop if it was us who created it
        self._created = [d for d in ("/var/lib/containers", "/var/lib/containers/cache")
                         if not os.path.exists(d)]
        self._cgroup_default_parent_existed = os.path.exists("/sys/fs/cgroup/memory/libpod_parent")
        for d in (self.graphroot, self.runroot, self.tmpdir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        q = json.dumps
        with open(self.conf_path, "w") as f:
            f.write(f"""[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"
netns = "bridge"

[network]
network_backend = "cni"
cni_plugin_dirs = {q(list(cni_plugin_dirs))}
network_config_dir = {q(network_config_dir)}
default_network = "podman"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {q(os.path.join(self.base_dir, "events.log"))}
tmp_dir = {q(os.path.join(self.runroot, "libpod-tmp"))}
volume_path = {q(os.path.join(self.graphroot, "volumes"))}
static_dir = {q(os.path.join(self.graphroot, "libpod"))}
num_locks = 128
""")
        with open(self.storage_conf_path, "w") as f:
            f.write(f"""[storage]
driver = "vfs"
graphroot = {q(self.graphroot)}
runroot = {q(self.runroot)}
""")
        _register(self)

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items()
             if k not in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF",
                          "XDG_RUNTIME_DIR", "TMPDIR", "CONTAINER_HOST", "CNI_COMMAND")}
        e.update(CONTAINERS_CONF=self.conf_path, CONTAINERS_STORAGE_CONF=self.storage_conf_path,
                 TMPDIR=self.tmpdir, PATH=os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin")
        return e

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """``podman ARGS`` with our configuration; the whole process group is killed on timeout."""
        proc = subprocess.Popen(["podman", *args], env=self.env(),
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise RuntimeError_(f"podman {' '.join(args)}: no answer after {timeout}s") from None
        p = subprocess.CompletedProcess(["podman", *args], proc.returncode, out, err)
        if check and p.returncode != 0:
            raise RuntimeError_(f"podman {' '.join(args)} failed (rc={p.returncode}): "
                                f"{p.stderr.decode(errors='replace').strip()}")
        return p

    def run_container(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """``podman run --cgroup-parent <ours> ARGS``."""
        return self.run("run", *args, timeout=timeout, check=check)

    def import_rootfs(self, rootfs_tar: str, ref: str = IMAGE_REF) -> None:
        self.run("import", "--change", 'CMD ["/bin/sh"]', rootfs_tar, ref)

    def _conmon_pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                args = _cmdline(int(d))
                if args and os.path.basename(args[0]) == "conmon" and any(self.base_dir in a for a in args):
                    out.append(int(d))
        return out

    def stop(self) -> list[str]:
        if self._stopped:
            return []
        problems = []
        try:
            p = self.run("rm", "--all", "--force", "--time", "0", timeout=60, check=False)
            if p.returncode != 0:
                problems.append(f"podman rm -af: {p.stderr.decode(errors='replace').strip()}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"podman rm -af: {e}")
        left = self._conmon_pids()
        if left:
            problems.append(f"killed {len(left)} leftover conmon process(es) and their children")
            _kill_tree(left)
            time.sleep(0.1)
        unmount_all_under(self.base_dir)
        _remove_cgroups(self.cgroup_parent)
        if not self._cgroup_default_parent_existed:
            _remove_cgroups("/libpod_parent")
        if self._created:
            shutil.rmtree(self._created[0], ignore_errors=True)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self._stopped = True
        _unregister(self)
        return problems

    def __enter__(self) -> "Podman":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- test helpers
def free_test_subnet(base: str = "10.244", lo: int = 100, hi: int = 250, tries: int = 200) -> str:
    """A random ``<base>.N.0/24`` that no route on this host touches (parallel tests, real nets)."""
    import ipaddress
    import random
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True).stdout.split("\n")
    nets = []
    for line in routes:
        word = (line.split() or [""])[0]
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit", "throw"):
            word = line.split()[1]
        if word and word != "default":
            try:
                nets.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    for _ in range(tries):
        cand = ipaddress.ip_network(f"{base}.{random.randint(lo, hi)}.0/24")
        if not any(cand.overlaps(n) for n in nets):
            return str(cand)
    raise RuntimeError_(f"no free {base}.N.0/24 (every candidate is routed on this host)")


def etcd_allocations(ipam) -> tuple[list, dict[str, dict[str, str]]]:
    """(handles, {block cidr: {ip: handle}}) as stored in etcd right now."""
    from cni_ipam.ipam.block import Block
    handles = ipam.handles()
    blocks: dict[str, dict[str, str]] = {}
    for kv in ipam.ds.get_prefix(ipam.keys.blocks):
        b = Block.from_json(kv.value)
        blocks[str(b.cidr)] = {str(b.ip(o)): h for o, h in sorted(b.allocations.items())}
    return handles, blocks


def wait_released(ipam, timeout: float = 15.0) -> tuple[list, dict]:
    """Poll etcd until no handle and no block allocation is left (or the timeout); return the last state."""
    deadline = time.monotonic() + timeout
    while True:
        handles, blocks = etcd_allocations(ipam)
        if not handles and not any(blocks.values()):
            return handles, blocks
        if time.monotonic() > deadline:
            return handles, blocks
        time.sleep(0.1)


def run_cli(binary: str, args: list[str], *, endpoint: str, prefix: str, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
    """The admin CLI (CNI_COMMAND unset) against one etcd + prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(ETCD_ENDPOINTS=endpoint, CNI_IPAM_ETCD_PREFIX=prefix)
    if not os.access(binary, os.X_OK):
        raise RuntimeError_(f"not an executable: {binary}")
    p = subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError_(f"cni-ipam {' '.join(args)} failed (rc={p.returncode}): {p.stderr.strip()}")
    return p


def recording_plugin(directory: str, binary: str, calls_log: str) -> str:
    """A wrapper that appends ``COMMAND|CONTAINERID|NETNS|IFNAME|ARGS`` to ``calls_log``, then
    execs the real ``binary`` (same stdin/stdout/env): proves what the runtime passed."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "cni-ipam-recording")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"printf '%s|%s|%s|%s|%s\\n' \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_NETNS\" "
                f"\"$CNI_IFNAME\" \"$CNI_ARGS\" >> {json.dumps(calls_log)}\n"
                f"exec {json.dumps(os.path.abspath(binary))} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def read_calls(calls_log: str) -> list[dict]:
    out = []
    try:
        with open(calls_log) as f:
            for line in f:
                cmd, cid, netns, ifname, args = line.rstrip("\n").split("|", 4)
                kv = dict(a.split("=", 1) for a in args.split(";") if "=" in a)
                out.append({"command": cmd, "container_id": cid, "netns": netns, "ifname": ifname,
                            "args": kv})
    except FileNotFoundError:
        pass
    return out

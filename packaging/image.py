#!/usr/bin/env python3
"""Build the cni-ipam container image (``make image``): nothing is pulled from a registry.

    python packaging/image.py [--bundle dist/cni-ipam] [--controller-bundle dist/cni-ipam-controller]
                              [--tag localhost/cni-ipam:0.1.0] [--output dist/cni-ipam-image.tar]

The image is ``FROM scratch`` with

* the PyInstaller onedir bundle (``make binary``) at ``/opt/cni-ipam/`` -- the entrypoint is
  ``/opt/cni-ipam/cni-ipam`` (``install`` for the node DaemonSet, any CLI command); it is the
  plugin's bundle, without grpc/kubernetes/prometheus_client;
* the controller's bundle (``make binary-controller``, ``build.py --flavor controller``: the same
  CLI plus grpc, etcd3, kubernetes, prometheus_client) at ``/opt/cni-ipam-controller/`` -- the
  Deployment runs ``/opt/cni-ipam-controller/cni-ipam controller``;
* the shared libraries that ``ldd`` lists for the executable and every ``.so`` of the bundle and
  that are not in the bundle itself (libc, ld-linux, libz, ...), copied from this machine at
  the same paths;
* ``/etc/passwd``, ``/etc/group``, ``/tmp``.

It is built with podman as root under a private configuration (``CONTAINERS_CONF`` with
``num_locks = 128``, runc, cgroupfs; ``CONTAINERS_STORAGE_CONF`` with the vfs driver and temp
``graphroot``/``runroot``): nothing in /etc/containers or /var/lib/containers is used or left
behind.  ``podman save`` writes a docker-archive (``--output``) that both ``podman load`` and
``ctr images import`` accept, with the tag as its name.  Prints the image id and sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TAG_REPO = "localhost/cni-ipam"
IN_IMAGE = "/opt/cni-ipam"
CONTROLLER_IN_IMAGE = "/opt/cni-ipam-controller"   # deploy/controller.yaml's command


def default_tag() -> str:
    sys.path.insert(0, ROOT)
    from cni_ipam import __version__
    return f"{DEFAULT_TAG_REPO}:{__version__}"


def needed_libs(bundle: str) -> list[str]:
    """Absolute paths of the shared libraries (outside the bundle) the bundle's ELF files need."""
    elves = [os.path.join(bundle, n) for n in ("cni-ipam", "cni-ipam-python")   # the launcher is static
             if os.path.exists(os.path.join(bundle, n))]
    for base, _dirs, names in os.walk(bundle):
        elves += [os.path.join(base, n) for n in names if ".so" in n]
    bundle_real = os.path.realpath(bundle) + "/"
    libs: set[str] = set()
    for f in elves:
        p = subprocess.run(["ldd", f], capture_output=True, text=True)
        if p.returncode != 0:
            continue   # "not a dynamic executable" (e.g. a static .so): nothing to add
        for line in p.stdout.splitlines():
            m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m and not os.path.realpath(m.group(1)).startswith(bundle_real):
                libs.add(m.group(1))
            elif "not found" in line:
                raise SystemExit(f"image: {f} needs {line.split()[0]}, which ldd cannot find")
    return sorted(libs)


def make_rootfs(bundle: str, rootfs: str, controller_bundle: str | None = None) -> list[str]:
    shutil.copytree(bundle, rootfs + IN_IMAGE, symlinks=True)
    libs = needed_libs(bundle)
    if controller_bundle:
        shutil.copytree(controller_bundle, rootfs + CONTROLLER_IN_IMAGE, symlinks=True)
        libs = sorted(set(libs) | set(needed_libs(controller_bundle)))
    for lib in libs:
        dest = rootfs + lib
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)   # the file itself, under the name the loader asks for
    os.makedirs(os.path.join(rootfs, "etc"), exist_ok=True)
    with open(os.path.join(rootfs, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n")
    with open(os.path.join(rootfs, "etc", "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    os.makedirs(os.path.join(rootfs, "tmp"), mode=0o1777, exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    return libs


class PrivatePodman:
    """podman with its own config and storage in a short temp dir (removed afterwards)."""

    def __init__(self):
        self.base = tempfile.mkdtemp(prefix="cni-ipam-img-", dir="/tmp")
        self.created_cache = not os.path.exists("/var/lib/containers")
        q = json.dumps
        conf, storage = os.path.join(self.base, "containers.conf"), os.path.join(self.base, "storage.conf")
        with open(conf, "w") as f:
            f.write(f"""[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {q(os.path.join(self.base, "events.log"))}
tmp_dir = {q(os.path.join(self.base, "run", "libpod-tmp"))}
static_dir = {q(os.path.join(self.base, "storage", "libpod"))}
volume_path = {q(os.path.join(self.base, "storage", "volumes"))}
num_locks = 128
""")
        with open(storage, "w") as f:
            f.write(f"""[storage]
driver = "vfs"
graphroot = {q(os.path.join(self.base, "storage"))}
runroot = {q(os.path.join(self.base, "run"))}
""")
        os.makedirs(os.path.join(self.base, "tmp"))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CONTAINERS_")},
                    "CONTAINERS_CONF": conf, "CONTAINERS_STORAGE_CONF": storage,
                    "TMPDIR": os.path.join(self.base, "tmp")}

    def run(self, *args: str) -> str:
        p = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise SystemExit(f"image: podman {' '.join(args[:2])} failed (rc {p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def close(self) -> None:
        try:
            self.run("rmi", "--all", "--force")
        except SystemExit:
            pass
        subprocess.run(["umount", "-R", "-l", os.path.join(self.base, "storage")], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if self.created_cache:   # podman writes a blob-info cache there whatever the storage config says
            shutil.rmtree("/var/lib/containers", ignore_errors=True)


def build(bundle: str, tag: str, output: str, controller_bundle: str | None = None) -> dict:
    """The image; ``controller_bundle`` None: without the controller's bundle (plugin only)."""
    if not os.access(os.path.join(bundle, "cni-ipam"), os.X_OK):
        raise SystemExit(f"image: {bundle}/cni-ipam is missing: run `make binary` first")
    if controller_bundle and not os.access(os.path.join(controller_bundle, "cni-ipam"), os.X_OK):
        raise SystemExit(f"image: {controller_bundle}/cni-ipam is missing: run `make binary-controller` first")
    if not shutil.which("podman"):
        raise SystemExit("image: podman is not installed (scripts/install-deps.sh installs it)")
    with open(os.path.join(bundle, "build-info.json")) as f:
        info = json.load(f)
    t0 = time.monotonic()
    pm = PrivatePodman()
    try:
        ctx = os.path.join(pm.base, "ctx")
        libs = make_rootfs(bundle, os.path.join(ctx, "rootfs"), controller_bundle)
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write(f"""FROM scratch
COPY rootfs/ /
ENV PATH={IN_IMAGE}:/usr/bin:/bin LANG=C.UTF-8
LABEL org.opencontainers.image.title="cni-ipam" \\
      org.opencontainers.image.version="{info.get('version', '')}" \\
      org.opencontainers.image.revision="{info.get('commit', '')}" \\
      io.cni-ipam.source-digest="{info.get('source_digest', '')}"
ENTRYPOINT ["{IN_IMAGE}/cni-ipam"]
CMD ["version"]
""")
        pm.run("build", "--quiet", "--pull=never", "--network=none", "-t", tag, "-f",
               os.path.join(ctx, "Containerfile"), ctx)
        image_id = pm.run("image", "inspect", "--format", "{{.Id}}", tag).strip()
        size = int(pm.run("image", "inspect", "--format", "{{.Size}}", tag).strip())
        os.makedirs(os.path.dirname(output), exist_ok=True)
        tmp = f"{output}.tmp-{os.getpid()}"
        if os.path.exists(tmp):
            os.unlink(tmp)
        pm.run("save", "--format", "docker-archive", "-o", tmp, tag)
        os.replace(tmp, output)
    finally:
        pm.close()
    res = {"tag": tag, "id": image_id, "size": size, "archive": output,
           "archive_size": os.path.getsize(output), "libs": libs, "seconds": round(time.monotonic() - t0, 1),
           "source_digest": info.get("source_digest"), "commit": info.get("commit"),
           "controller_bundle": CONTROLLER_IN_IMAGE if controller_bundle else None}
    with open(output + ".json", "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=os.path.join(ROOT, "dist", "cni-ipam"), help="the onedir bundle")
    ap.add_argument("--controller-bundle", default=os.path.join(ROOT, "dist", "cni-ipam-controller"),
                    help="the controller's onedir bundle (build.py --flavor controller); '' for none")
    ap.add_argument("--tag", default=None, help=f"image name (default {DEFAULT_TAG_REPO}:<version>)")
    ap.add_argument("--output", default=os.path.join(ROOT, "dist", "cni-ipam-image.tar"))
    args = ap.parse_args(argv)
    r = build(os.path.abspath(args.bundle), args.tag or default_tag(), os.path.abspath(args.output),
              os.path.abspath(args.controller_bundle) if args.controller_bundle else None)
    print(f"image: {r['tag']} ({r['id'][:12]}): {r['size'] / 1e6:.1f} MB, {len(r['libs'])} shared libraries "
          f"from the host; archive {r['archive']} ({r['archive_size'] / 1e6:.1f} MB) in {r['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

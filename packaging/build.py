#!/usr/bin/env python3
"""Build the cni-ipam binary with PyInstaller (packaging/cni-ipam.spec).

    python packaging/build.py                    # onedir  -> dist/cni-ipam/cni-ipam  (what ships)
    python packaging/build.py --mode onefile     # onefile -> dist/cni-ipam-onefile
    python packaging/build.py --flavor controller  # -> dist/cni-ipam-controller/cni-ipam: the same CLI
                                                 # plus grpc/etcd3/kubernetes/prometheus_client, for
                                                 # `cni-ipam controller` (the image's second bundle)
    python packaging/build.py --if-stale         # rebuild only if the sources changed
    python packaging/build.py --check            # exit 0 if the build is up to date, 1 if not

Steps: write ``build/gen/_cni_ipam_build_info.py`` (version, git commit, build date; never in
the source tree), run PyInstaller into a staging dir under ``build/``, move the result into
``dist/`` (the old one is renamed away first, so running copies are not disturbed), write a
stamp ``<output>.build-info.json`` / ``dist/cni-ipam/build-info.json`` with the digest of the
sources, and smoke-test the result with a minimal environment (PATH=/usr/bin:/bin, no
PYTHONPATH, cwd /).  Builds are serialised with a lock file, so two test sessions asking for
the binary at once build it once.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "packaging", "cni-ipam.spec")


FLAVOR_DIRS = {"plugin": "cni-ipam", "controller": "cni-ipam-controller"}
LAUNCHER_C = os.path.join(ROOT, "packaging", "launcher.c")
BUILD_ID_FILE = "cni-ipam-build-id"   # cni_ipam/execserver.py reads it from _internal/


def outputs(mode: str, dist: str, flavor: str = "plugin") -> tuple[str, str, str]:
    """(what to move into dist, the executable, the stamp file) for a mode."""
    if mode == "onefile":
        exe = os.path.join(dist, "cni-ipam-onefile")
        return exe, exe, exe + ".build-info.json"
    d = os.path.join(dist, FLAVOR_DIRS[flavor])
    return d, os.path.join(d, "cni-ipam"), os.path.join(d, "build-info.json")


def source_files() -> list[str]:
    files = []
    for base, dirs, names in os.walk(os.path.join(ROOT, "cni_ipam")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += [os.path.join(base, n) for n in sorted(names) if n.endswith(".py")]
    conf = os.path.join(ROOT, "conf")  # bundled as the examples `cni-ipam install` uses
    files += sorted(os.path.join(conf, n) for n in os.listdir(conf) if os.path.isfile(os.path.join(conf, n)))
    files += [SPEC, os.path.join(ROOT, "packaging", "entry.py"), os.path.join(ROOT, "packaging", "hello.py"),
              os.path.join(ROOT, "packaging", "cni_exec.py"),
              os.path.join(ROOT, "packaging", "pyi_boot.py"), os.path.join(ROOT, "packaging", "modblob.py"),
              LAUNCHER_C, os.path.abspath(__file__)]
    return files


def source_digest() -> str:
    h = hashlib.sha256()
    for path in source_files():
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def git_commit() -> str:
    try:
        c = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, timeout=10, stdin=subprocess.DEVNULL)
        if c.returncode != 0:
            return "unknown"
        d = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        return c.stdout.strip() + ("-dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stale_reason(mode: str = "onedir", dist: str | None = None, with_grpc: bool = False,
                 spec_args=(), flavor: str = "plugin") -> str | None:
    """Why the build in ``dist`` must be redone (None: it is up to date)."""
    _, exe, stamp = outputs(mode, dist or os.path.join(ROOT, "dist"), flavor)
    if not os.access(exe, os.X_OK):
        return f"{exe} does not exist"
    try:
        with open(stamp) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return f"{stamp} is missing or unreadable"
    if info.get("source_digest") != source_digest():
        return "the sources changed since the last build"
    if bool(info.get("with_grpc")) != with_grpc or list(info.get("spec_args") or []) != list(spec_args):
        return "it was built with other options"
    if info.get("commit") != git_commit():
        return f"the git commit changed (built from {info.get('commit')})"
    return None


def write_build_info(gen_dir: str, mode: str, commit: str) -> dict:
    os.makedirs(gen_dir, exist_ok=True)
    sys.path.insert(0, ROOT)
    from cni_ipam import __version__  # the package version, from the source tree being built
    info = {"version": __version__, "commit": commit, "mode": f"pyinstaller-{mode}",
            "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    with open(os.path.join(gen_dir, "_cni_ipam_build_info.py"), "w") as f:
        f.write('"""Generated by packaging/build.py at build time; do not edit."""\n'
                f"VERSION = {info['version']!r}\nGIT_COMMIT = {commit!r}\n"
                f"BUILD_DATE = {info['built']!r}\nBUILD_MODE = {info['mode']!r}\n")
    return info


def smoke_test(exe: str) -> str:
    """Run ``exe version`` the way a runtime would find it: no virtualenv, no PYTHONPATH."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    p = subprocess.run([exe, "version"], env=env, cwd="/", capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0 or "cni-ipam" not in p.stdout:
        raise SystemExit(f"build: smoke test of {exe} failed (rc {p.returncode}):\n{p.stdout}{p.stderr}")
    p = subprocess.run([exe], env={**env, "CNI_COMMAND": "VERSION"}, cwd="/", capture_output=True,
                       text=True, timeout=60, input="")
    if p.returncode != 0 or "supportedVersions" not in p.stdout:
        raise SystemExit(f"build: CNI VERSION through {exe} failed (rc {p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout.strip()


def add_launcher(bundle: str, build_id: str) -> None:
    """The plugin bundle's ``cni-ipam``: packaging/launcher.c, compiled static (an exec of it is
    as cheap as one of /bin/true), with the build id that the bundle's exec server
    (``_internal/cni-ipam-build-id``) must match to take an exec over."""
    if not all(c.isalnum() or c in ".-_+" for c in build_id):
        raise SystemExit(f"build: unexpected build id {build_id!r}")
    with open(os.path.join(bundle, "_internal", BUILD_ID_FILE), "w") as f:
        f.write(build_id + "\n")
    cc = os.environ.get("CC", "gcc")
    cmd = [cc, "-O2", "-static", "-s", "-Wall", "-Wextra", "-Werror", f'-DBUILD_ID="{build_id}"',
           "-o", os.path.join(bundle, "cni-ipam"), LAUNCHER_C]
    try:
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"build: compiling the launcher failed ({e}); it needs gcc and the static "
                         "C library (Debian: gcc, libc6-dev)") from None


def build(mode: str, dist: str, work: str, with_grpc: bool, quiet: bool, spec_args=(),
          flavor: str = "plugin") -> str:
    commit = git_commit()
    digest = source_digest()
    gen_dir = os.path.join(work, "gen")
    info = write_build_info(gen_dir, mode, commit)
    kind = mode if flavor == "plugin" else f"{mode}-{flavor}"
    stage = os.path.join(work, f"stage-{kind}")
    shutil.rmtree(stage, ignore_errors=True)
    cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--distpath", stage,
           "--workpath", os.path.join(work, f"pyinstaller-{kind}"),
           "--log-level", "WARN" if quiet else "INFO", SPEC, "--", "--mode", mode, "--gen-dir", gen_dir]
    if with_grpc:
        cmd.append("--with-grpc")
    if flavor != "plugin":
        cmd += ["--flavor", flavor]
    cmd += list(spec_args)
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    staged, _, _ = outputs(mode, stage, flavor)
    if mode == "onedir" and flavor == "plugin":
        add_launcher(staged, f"{info['version']}-{digest[:12]}")
    final, exe, stamp = outputs(mode, dist, flavor)
    os.makedirs(dist, exist_ok=True)
    old = None
    if os.path.lexists(final):  # move the old build aside first: running copies keep their files
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(staged, final)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)
    shutil.rmtree(stage, ignore_errors=True)
    if flavor != "plugin":
        info["flavor"] = flavor
    info.update(source_digest=digest, with_grpc=with_grpc, spec_args=list(spec_args),
                build_seconds=round(time.monotonic() - t0, 1))
    with open(stamp, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    smoke_test(exe)
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("onedir", "onefile"), default="onedir")
    ap.add_argument("--onefile", dest="mode", action="store_const", const="onefile",
                    help="same as --mode onefile")
    ap.add_argument("--dist", default=os.path.join(ROOT, "dist"), help="output dir (default dist/)")
    ap.add_argument("--work", default=os.path.join(ROOT, "build"), help="work dir (default build/)")
    ap.add_argument("--with-grpc", action="store_true",
                    help="also bundle python3-etcd3/grpc/protobuf (measurements only)")
    ap.add_argument("--flavor", choices=sorted(FLAVOR_DIRS), default="plugin",
                    help="plugin (default): dist/cni-ipam/; controller: dist/cni-ipam-controller/ with the "
                         "controller's dependencies (grpc, etcd3, kubernetes, prometheus_client)")
    ap.add_argument("--spec-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to the spec (e.g. --spec-arg=--archive, --spec-arg=--importtime)")
    ap.add_argument("--if-stale", action="store_true", help="do nothing if the build is up to date")
    ap.add_argument("--check", action="store_true", help="only say whether the build is up to date")
    ap.add_argument("-q", "--quiet", action="store_true", help="PyInstaller log level WARN")
    args = ap.parse_args(argv)
    dist, work = os.path.abspath(args.dist), os.path.abspath(args.work)
    if args.flavor != "plugin" and args.mode != "onedir":
        ap.error("--flavor controller builds a onedir bundle only")
    if args.check:
        why = stale_reason(args.mode, dist, args.with_grpc, args.spec_arg, args.flavor)
        print(f"build: {why}" if why else f"build: {outputs(args.mode, dist, args.flavor)[1]} is up to date")
        return 1 if why else 0
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (two test sessions may ask at once)
        if args.if_stale:
            why = stale_reason(args.mode, dist, args.with_grpc, args.spec_arg, args.flavor)
            if why is None:
                print(f"build: {outputs(args.mode, dist, args.flavor)[1]} is up to date")
                return 0
            print(f"build: rebuilding: {why}")
        exe = build(args.mode, dist, work, args.with_grpc, args.quiet, args.spec_arg, args.flavor)
    size = sum(os.path.getsize(os.path.join(b, n)) for b, _, ns in os.walk(outputs(args.mode, dist, args.flavor)[0])
               for n in ns) if args.mode == "onedir" else os.path.getsize(exe)
    print(f"build: {exe} ({size / 1e6:.1f} MB on disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

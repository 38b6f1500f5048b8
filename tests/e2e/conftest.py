"""Fixtures for the end-to-end tests (real binaries, real network namespaces, real etcd).

* ``plugin_binary`` (session): the onedir PyInstaller binary ``dist/cni-ipam/cni-ipam``, built with
  ``make binary`` when it is missing or older than the sources (``packaging/build.py`` keeps a
  digest of them); ``$CNI_IPAM_TEST_BINARY`` names another executable instead.
* ``cni_bin_dir`` (session): a temp dir of symlinks to ``/usr/lib/cni/*`` plus ``cni-ipam`` -> the
  binary (containerd 1.6 takes ONE bin dir).
* ``cnitool_exe`` (session): the cnitool-equivalent in tests/e2e/cnitool, built against Debian's
  libcni in GOPATH mode into ``build/cnitool/``.
* ``cnitool`` (per test): a ``helpers.CniTool`` with its own conf dir and libcni cache dir
  (never /var/lib/cni), plugins from ``cni_bin_dir``.
* ``e2e_pool`` (per test): a fresh pool in the test's etcd prefix, on a random 10.244.N.0/24 that
  overlaps nothing on the host (block size 28).
* ``netns_factory`` (per test): ``make()`` -> a new ``helpers.Netns``; all deleted afterwards.
* ``host_cleanup`` (per test): register bridges / links / networks to delete afterwards; also puts
  ``net.ipv4.ip_forward`` back (the bridge and ptp plugins turn it on).
* ``need_root``: skip unless root; ``need_tools(*names)``: skip naming what is missing.

Pools: ``helpers.create_pools(endpoint, prefix, (name, cidr, block_size), ...)`` (the engine).
Skips happen only when the machine truly lacks something (not root, a tool not installed);
a build that fails is a test failure, not a skip.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.e2e import helpers
from tests.e2e.helpers import ROOT, Netns

BUILD_DIR = ROOT / "build"


def _skip_unless_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, links)")


def _skip_if_missing(*names):
    missing = helpers.missing_tools(*names)
    if missing:
        pytest.skip(f"not installed here: {', '.join(missing)} (scripts/install-deps.sh installs them)")


@pytest.fixture
def need_root():
    _skip_unless_root()


@pytest.fixture
def need_tools():
    return _skip_if_missing


def _build_module():
    spec = importlib.util.spec_from_file_location("cni_ipam_packaging_build", ROOT / "packaging" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def plugin_binary() -> str:
    """Path of the cni-ipam executable under test (built or reused)."""
    override = os.environ.get("CNI_IPAM_TEST_BINARY", "").strip()
    if override:
        if not os.access(override, os.X_OK):
            pytest.fail(f"CNI_IPAM_TEST_BINARY={override} is not an executable")
        return os.path.abspath(override)
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.skip("PyInstaller is not installed (pip install -e .[dev])")
    build = _build_module()
    why = build.stale_reason("onedir")
    if why is not None:
        p = subprocess.run(["make", "-s", "binary", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=900, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            pytest.fail(f"`make binary` failed ({why}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    exe = ROOT / "dist" / "cni-ipam" / "cni-ipam"
    assert os.access(exe, os.X_OK), f"{exe} missing after make binary"
    return str(exe)


@pytest.fixture(scope="session")
def cni_bin_dir(tmp_path_factory, plugin_binary) -> str:
    """A CNI bin dir: symlinks to Debian's plugins (/usr/lib/cni/*) plus cni-ipam -> the binary."""
    _skip_if_missing(str(helpers.DEBIAN_CNI_DIR / "bridge"))
    d = tmp_path_factory.mktemp("cni-bin")
    for p in sorted(helpers.DEBIAN_CNI_DIR.iterdir()):
        os.symlink(p, d / p.name)
    os.symlink(plugin_binary, d / "cni-ipam")
    return str(d)


@pytest.fixture(scope="session")
def cnitool_exe() -> str:
    """Build tests/e2e/cnitool against Debian's libcni (GOPATH mode, offline) into build/cnitool/."""
    _skip_if_missing("go", str(helpers.GO_LIBCNI))
    src = ROOT / "tests" / "e2e" / "cnitool"
    out_dir = BUILD_DIR / "cnitool"
    exe = out_dir / "cnitool"
    gopath = out_dir / "gopath"
    gopath.mkdir(parents=True, exist_ok=True)
    if exe.exists() and exe.stat().st_mtime >= max(p.stat().st_mtime for p in src.glob("*.go")):
        return str(exe)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"/usr/share/gocode:{gopath}",
           "GOCACHE": str(out_dir / "go-cache"), "GOFLAGS": "", "CGO_ENABLED": "0"}
    tmp = out_dir / f".cnitool.{os.getpid()}"
    p = subprocess.run(["go", "build", "-o", str(tmp), "."], cwd=src, env=env, capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        pytest.fail(f"building cnitool failed:\n{p.stdout}\n{p.stderr}")
    os.replace(tmp, exe)
    return str(exe)


@pytest.fixture
def cnitool(cnitool_exe, cni_bin_dir, tmp_path) -> helpers.CniTool:
    return helpers.CniTool(cnitool_exe, tmp_path / "net.d", cni_bin_dir, tmp_path / "cni-cache")


@pytest.fixture
def e2e_pool(etcd_server, etcd_prefix):
    """A pool ``e2e-<hex>`` on a free 10.244.N.0/24, block size 28, in this test's prefix."""
    subnet = helpers.free_test_subnet()
    name = f"e2e-{helpers.rand_suffix(6)}"
    (pool,) = helpers.create_pools(etcd_server.endpoint, etcd_prefix, (name, str(subnet), 28))
    return pool


@pytest.fixture
def netns_factory():
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns()
        made.append(ns)
        return ns.__enter__()
    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.delete()


class HostCleanup:
    def __init__(self):
        self.links: list[str] = []
        self.networks: list[str] = []

    def link(self, name: str) -> str:
        self.links.append(name)
        return name

    def network(self, name: str) -> str:
        self.networks.append(name)
        return name

    def run(self):
        for name in self.links:
            helpers.delete_link(name)
        for net in self.networks:
            helpers.remove_cni_iptables(net)


@pytest.fixture
def host_cleanup():
    """Links (bridges) and networks (their iptables rules) to remove after the test, whatever happens.
    Also restores ip_forward, which the bridge (isGateway) and ptp plugins switch on."""
    c = HostCleanup()
    with helpers.sysctl_restored("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        try:
            yield c
        finally:
            c.run()

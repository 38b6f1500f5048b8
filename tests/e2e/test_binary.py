"""The shipped binary itself: runs without the project's Python, bundles no test tools and no gRPC,
`cni-ipam install` / `make install` put it in place and never overwrite a conflist silently.
No root needed (only the PyInstaller build)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import sys
from pathlib import Path

from tests.e2e.helpers import ROOT
from tests.plugin_helpers import assert_error, exec_plugin, netconf, seed_store

MINIMAL_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
EXAMPLE = ROOT / "conf" / "10-cni-ipam-bridge.conflist"


def run(argv, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env or MINIMAL_ENV, cwd="/", capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, **kw)


def test_version_without_the_virtualenv(plugin_binary):
    info = json.loads((Path(plugin_binary).parent / "build-info.json").read_text())
    for argv in ([plugin_binary, "version"], [plugin_binary, "--version"]):
        r = run(argv)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert re.fullmatch(r"cni-ipam \d+\.\d+\.\d+\S*", lines[0]), lines
        assert lines[1].startswith(f"git commit: {info['commit']} (pyinstaller-onedir, built "), lines
        assert lines[2] == "CNI spec versions: 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"
        assert r.stderr == ""
    r = run([plugin_binary], env={**MINIMAL_ENV, "CNI_COMMAND": "VERSION"})
    assert r.returncode == 0 and json.loads(r.stdout)["supportedVersions"][-1] == "1.1.0"


def test_test_only_packages_are_not_bundled(plugin_binary):
    internal = Path(plugin_binary).parent / "_internal"
    names = {p.name.split(".")[0] for p in internal.iterdir()}
    for pkg in ("pytest", "_pytest", "hypothesis", "pyroute2", "cri_api", "PyInstaller", "setuptools",
                "grpc", "etcd3", "google"):   # no gRPC client: the binary talks to etcd's JSON gateway
        assert pkg not in names, f"{pkg} is bundled"
    assert (internal / "conf" / EXAMPLE.name).read_bytes() == EXAMPLE.read_bytes()


def test_binary_plugin_and_cli_against_etcd(plugin_binary, etcd_server, etcd_prefix, tmp_path):
    """Every CNI verb and the CLI through the binary, with a minimal environment (no virtualenv,
    no PYTHONPATH).  Neither needs grpc: the bundle has none."""
    cli_env = {**MINIMAL_ENV, "ETCD_ENDPOINTS": etcd_server.endpoint, "CNI_IPAM_ETCD_PREFIX": etcd_prefix}
    r = run([plugin_binary, "apply", "-f", str(ROOT / "conf" / "pools.yaml")], env=cli_env)
    assert r.returncode == 0, r.stderr
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, version="1.1.0", ipv4_pools=["external-pool"])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": None}
    add = exec_plugin("ADD", conf, argv=[plugin_binary], env=env)
    assert add.rc == 0, add.stdout + add.stderr
    assert add.out["ips"][0]["address"].startswith("172.16.0.") and add.out["ips"][0]["address"].endswith("/29")
    check = exec_plugin("CHECK", {**conf, "prevResult": add.out}, argv=[plugin_binary], env=env)
    assert check.rc == 0, check.stdout + check.stderr
    status = exec_plugin("STATUS", conf, argv=[plugin_binary], env=env, container=None, ifname=None, netns=None)
    assert status.rc == 0, status.stdout + status.stderr
    r = run([plugin_binary, "show", "-o", "json"], env=cli_env)
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)["pools"]}
    assert rows["external-pool"]["addresses"] == 64 and rows["external-pool"]["inUse"] == 1
    dele = exec_plugin("DEL", conf, argv=[plugin_binary], env=env)
    assert dele.rc == 0, dele.stdout + dele.stderr
    r = run([plugin_binary, "check"], env=cli_env)
    assert r.returncode == 0, r.stdout + r.stderr
    # a CLI error is one line on stderr, not a traceback
    r = run([plugin_binary, "pool", "get", "no-such-pool"], env=cli_env)
    assert r.returncode == 1 and r.stderr.startswith("cni-ipam: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_cni_exec_ends_with_everything_written(plugin_binary, etcd_server, etcd_prefix, tmp_path):
    """packaging/entry.py ends a CNI exec with os._exit (no interpreter finalization, no cyclic GC)
    and the bundle starts through packaging/pyi_boot.py, not PyInstaller's bootstrap modules
    (docs/performance.md, "The bundle's floor"): the result, an error's JSON and exit code, stderr
    and the log file's lines must all be out when the process is gone."""
    from PyInstaller.archive.readers import CArchiveReader
    toc = CArchiveReader(str(Path(plugin_binary).parent / "cni-ipam-python")).toc   # (cni-ipam: the launcher)
    assert "pyiboot01_bootstrap" in toc and not {"pyimod01_archive", "pyimod02_importers", "struct"} & set(toc)
    # ... and imports the exec path's modules from its module blob (packaging/modblob.py)
    sys.path.insert(0, str(ROOT / "packaging"))
    import modblob
    index = modblob.read_index(str(Path(plugin_binary).parent / "_internal" / modblob.FILENAME))
    assert {"__future__", "cni_exec", "cni_ipam.plugin", "cni_ipam.ipam.engine", "cni_ipam.datastore.gateway"} <= set(index)
    assert not [m for m in index if m.startswith(("cni_ipam.cli", "cni_ipam.controller"))]

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": None}
    with seed_store(etcd_server.endpoint, etcd_prefix):
        pass
    conf = netconf(etcd_server.endpoint, etcd_prefix, tmp_path, ipv4_pools=["external-pool"])
    log = tmp_path / "cni-ipam.log"
    add = exec_plugin("ADD", conf, argv=[plugin_binary], env=env, container="c-exit")
    assert add.rc == 0 and add.stdout.endswith("}\n"), add.stdout + add.stderr
    assert add.out["ips"][0]["address"].startswith("172.16.0.")
    lines = log.read_text().splitlines()
    assert any(" DEBUG " in ln and " ADD c-exit " in ln and "etcd requests=" in ln for ln in lines), lines
    assert exec_plugin("DEL", conf, argv=[plugin_binary], env=env, container="c-exit").rc == 0

    # an error: the spec's JSON on stdout, the exit code, the warning on stderr and in the log
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    bad = netconf(closed, etcd_prefix, tmp_path, node="node-b", timeout_seconds=1)
    r = exec_plugin("ADD", bad, argv=[plugin_binary], env=env, container="c-down")
    assert_error(r, 11, names=closed)
    assert "code 11" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert any(" ADD c-down " in ln and "code 11" in ln for ln in log.read_text().splitlines())
    r = exec_plugin("ADD", conf, argv=[plugin_binary], env=env, raw_stdin=b"{nope")
    assert_error(r, 6)


def _install(exe, tmp_path, *extra) -> subprocess.CompletedProcess:
    return run([exe, "install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d"),
                "--lib-dir", str(tmp_path / "lib"), *extra])


def build_dir_of(plugin_binary) -> str:
    info = json.loads((Path(plugin_binary).parent / "build-info.json").read_text())
    return f"{info['version']}-{info['source_digest'][:12]}"


def test_install_puts_the_bundle_in_place_and_a_conflist_only_when_asked(plugin_binary, tmp_path):
    r = _install(plugin_binary, tmp_path)
    assert r.returncode == 0, r.stderr
    link = tmp_path / "bin" / "cni-ipam"
    build = tmp_path / "lib" / "cni-ipam" / build_dir_of(plugin_binary)
    # a relative link: it resolves the same on the host as in an install container
    assert link.is_symlink() and os.readlink(link) == f"../lib/cni-ipam/{build.name}/cni-ipam"
    assert link.resolve() == build / "cni-ipam"
    assert not (tmp_path / "net.d").exists(), "install wrote a conflist although none was asked for"
    assert "conflist: none" in r.stdout
    v = run([str(link), "version"])                     # runs through the symlink, outside the tree
    assert v.returncode == 0 and v.stdout.startswith("cni-ipam "), v.stderr

    conflist = tmp_path / "net.d" / EXAMPLE.name
    asked = _install(plugin_binary, tmp_path, "--conflist", str(EXAMPLE))
    assert asked.returncode == 0, asked.stderr
    assert conflist.read_bytes() == EXAMPLE.read_bytes() and (conflist.stat().st_mode & 0o777) == 0o644
    again = _install(str(link), tmp_path, "--conflist", str(EXAMPLE))   # from the installed copy
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr

    # an edited conflist is never overwritten silently -- and then nothing is installed at all
    conflist.write_text('{"edited": true}\n')
    os.unlink(link)
    refused = _install(plugin_binary, tmp_path, "--conflist", str(EXAMPLE))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("cni-ipam: error: "), refused.stderr
    assert "exists and differs" in refused.stderr and "--force" in refused.stderr
    assert conflist.read_text() == '{"edited": true}\n'
    assert not os.path.lexists(link), "the binary was installed although the command refused"

    only_bin = _install(plugin_binary, tmp_path)
    assert only_bin.returncode == 0 and conflist.read_text() == '{"edited": true}\n', only_bin.stderr
    assert link.resolve() == build / "cni-ipam"

    forced = _install(plugin_binary, tmp_path, "--conflist", str(EXAMPLE), "--force")
    assert forced.returncode == 0, forced.stderr
    assert conflist.read_bytes() == EXAMPLE.read_bytes()
    assert (tmp_path / "net.d" / (EXAMPLE.name + ".bak")).read_text() == '{"edited": true}\n'

    ptp = ROOT / "conf" / "20-cni-ipam-ptp.conflist"
    other = _install(plugin_binary, tmp_path, "--conflist", str(ptp))
    assert other.returncode == 0 and (tmp_path / "net.d" / ptp.name).read_bytes() == ptp.read_bytes()
    assert "also holds" in other.stdout    # says that a runtime taking one network takes the first by name

    bad = tmp_path / "bad.conflist"
    bad.write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge", "ipam": {
        "type": "cni-ipam", "mode": "sideways"}}]}))
    r = _install(plugin_binary, tmp_path, "--conflist", str(bad))
    assert r.returncode == 1 and "mode" in r.stderr and not (tmp_path / "net.d" / "bad.conflist").exists()

    # uninstall: exactly what install wrote goes, the operator's file comes back from .bak
    (tmp_path / "net.d" / "99-mine.conflist").write_text("{}\n")
    u = run([plugin_binary, "uninstall", "--bin-dir", str(tmp_path / "bin"), "--lib-dir", str(tmp_path / "lib")])
    assert u.returncode == 0, u.stderr
    assert not os.path.lexists(link) and not (tmp_path / "lib").exists() and not (tmp_path / "bin").exists()
    assert sorted(p.name for p in (tmp_path / "net.d").iterdir()) == [EXAMPLE.name, "99-mine.conflist"]
    assert conflist.read_text() == '{"edited": true}\n'
    u = run([plugin_binary, "uninstall", "--bin-dir", str(tmp_path / "bin"), "--lib-dir", str(tmp_path / "lib")])
    assert u.returncode == 1 and "nothing to uninstall" in u.stderr


def test_install_conflist_from_a_configmap_dir_with_placeholders(plugin_binary, tmp_path):
    """--conflist DIR: an empty dir (a ConfigMap mounted with optional: true) means none; one file
    is installed with the placeholders filled in with host paths; two are refused."""
    cm = tmp_path / "cm"
    cm.mkdir()
    r = _install(plugin_binary, tmp_path, "--conflist", str(cm))
    assert r.returncode == 0 and "holds no conflist" in r.stdout and not (tmp_path / "net.d").exists(), r.stdout
    doc = json.loads(EXAMPLE.read_text())
    doc["plugins"][0]["ipam"].update(etcd_endpoints="__ETCD_ENDPOINTS__",
                                     kubernetes={"kubeconfig": "__KUBECONFIG_FILEPATH__"},
                                     etcd_ca_cert_file="__ETCD_TLS_DIR__/ca.crt")
    (cm / "10-pods.conflist").write_text(json.dumps(doc))
    r = _install(plugin_binary, tmp_path, "--conflist", str(cm))   # no --kubeconfig to point at
    assert r.returncode == 1 and "plugins[0]: ipam." in r.stderr, r.stderr   # unfilled placeholders
    del doc["plugins"][0]["ipam"]["kubernetes"]
    (cm / "10-pods.conflist").write_text(json.dumps(doc))
    r = run([plugin_binary, "install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d"),
             "--conflist", str(cm), "--host-conf-dir", "/etc/cni/net.d"],
            env={**MINIMAL_ENV, "ETCD_ENDPOINTS": "https://127.0.0.1:2379"})
    assert r.returncode == 0, r.stderr
    ipam = json.loads((tmp_path / "net.d" / "10-pods.conflist").read_text())["plugins"][0]["ipam"]
    assert ipam["etcd_endpoints"] == "https://127.0.0.1:2379"
    assert ipam["etcd_ca_cert_file"] == "/etc/cni/net.d/cni-ipam/etcd-tls/ca.crt"
    (cm / "20-other.conflist").write_text(json.dumps(doc))
    r = _install(plugin_binary, tmp_path, "--conflist", str(cm))
    assert r.returncode == 1 and "keep one" in r.stderr


def test_install_upgrade_keeps_the_previous_build(plugin_binary, tmp_path):
    """Each build gets its own dir; the symlink switches atomically; the previous build stays for
    plugin runs in flight (they load modules lazily by path); older ones are pruned."""
    builds = []
    for n in range(3):
        b = tmp_path / f"dist{n}" / "cni-ipam"
        shutil.copytree(Path(plugin_binary).parent, b, symlinks=True)
        info = json.loads((b / "build-info.json").read_text())
        info["source_digest"] = f"{n:02d}" + info["source_digest"][2:]   # pretend: three different builds
        (b / "build-info.json").write_text(json.dumps(info))
        builds.append((b, f"{info['version']}-{info['source_digest'][:12]}"))
    root = tmp_path / "lib" / "cni-ipam"
    link = tmp_path / "bin" / "cni-ipam"
    for n, (b, bid) in enumerate(builds):
        r = _install(str(b / "cni-ipam"), tmp_path)
        assert r.returncode == 0, r.stderr
        assert os.readlink(link) == f"../lib/cni-ipam/{bid}/cni-ipam"
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        assert present == sorted({bid, builds[max(n - 1, 0)][1]}), present
        v = run([str(link), "version"])
        assert v.returncode == 0, v.stderr
    # the installed binary uninstalls itself (its own bundle included) and what install created
    u = run([str(link), "uninstall", "--bin-dir", str(tmp_path / "bin")])
    assert u.returncode == 0, u.stdout + u.stderr
    assert not (tmp_path / "lib").exists() and not (tmp_path / "bin").exists(), u.stdout


def test_install_watch_follows_the_configmap_and_the_secret(plugin_binary, tmp_path):
    """--watch (the DaemonSet's mode): a changed conflist ConfigMap is written again when install
    wrote the file on the node, never over an operator's edit; the etcd TLS Secret's files are
    copied (0600) and removed with it; SIGTERM ends it and leaves everything in place."""
    import signal
    cm, tls, net = tmp_path / "cm", tmp_path / "tls", tmp_path / "net.d"
    cm.mkdir()
    tls.mkdir()
    doc = json.loads(EXAMPLE.read_text())
    (cm / "10-pods.conflist").write_text(json.dumps(doc))
    (tls / "ca.crt").write_text("ca-1\n")
    log = tmp_path / "install.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([plugin_binary, "install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir",
                                 str(net), "--conflist", str(cm), "--etcd-tls", str(tls), "--watch",
                                 "--poll-interval", "0.1"], stdout=logf, stderr=subprocess.STDOUT, env=MINIMAL_ENV)

    def wait(cond, what):
        deadline = time.monotonic() + 60
        while not cond():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
            time.sleep(0.05)
    try:
        dest, ca = net / "10-pods.conflist", net / "cni-ipam" / "etcd-tls" / "ca.crt"
        wait(lambda: dest.exists() and ca.exists(), "the first install")
        assert (ca.stat().st_mode & 0o777) == 0o600 and ca.read_text() == "ca-1\n"
        doc["plugins"][0]["ipam"]["log_level"] = "debug"
        (cm / "10-pods.conflist").write_text(json.dumps(doc))
        wait(lambda: json.loads(dest.read_text())["plugins"][0]["ipam"].get("log_level") == "debug",
             "the changed ConfigMap on the node")
        (tls / "ca.crt").write_text("ca-2\n")
        (tls / "tls.key").write_text("key\n")
        wait(lambda: ca.read_text() == "ca-2\n" and (ca.parent / "tls.key").exists(), "the changed Secret")
        (tls / "tls.key").unlink()
        wait(lambda: not (ca.parent / "tls.key").exists(), "a key removed from the Secret")
        dest.write_text('{"edited": "by the operator"}\n')
        doc["plugins"][0]["ipam"]["log_level"] = "info"
        (cm / "10-pods.conflist").write_text(json.dumps(doc))
        time.sleep(1.0)
        assert dest.read_text() == '{"edited": "by the operator"}\n'
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "not overwritten" in out and "stopped: the plugin" in out, out
    assert (tmp_path / "bin" / "cni-ipam").exists() and ca.exists()


def test_install_from_source_explains_itself(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cni_ipam", "install", "--bin-dir", str(tmp_path / "bin"),
                        "--conf-dir", str(tmp_path / "net.d")], env={**MINIMAL_ENV, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("cni-ipam: error: ") and "make binary" in r.stderr
    assert not (tmp_path / "bin").exists()


def test_make_install(plugin_binary, tmp_path):
    def make_install(*extra):
        return subprocess.run(["make", "-s", "install", f"PYTHON={sys.executable}", f"CNI_BIN_DIR={tmp_path}/bin",
                               f"CNI_CONF_DIR={tmp_path}/net.d", f"CNI_LIB_DIR={tmp_path}/lib", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    r = make_install()
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.realpath(tmp_path / "bin" / "cni-ipam") == str(
        tmp_path / "lib" / "cni-ipam" / build_dir_of(plugin_binary) / "cni-ipam")
    assert not (tmp_path / "net.d").exists()
    r = make_install(f"INSTALL_ARGS=--conflist {EXAMPLE}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "net.d" / EXAMPLE.name).read_bytes() == EXAMPLE.read_bytes()
    (tmp_path / "net.d" / EXAMPLE.name).write_text("{}\n")
    r = make_install(f"INSTALL_ARGS=--conflist {EXAMPLE}")
    assert r.returncode != 0 and "exists and differs" in r.stderr
    assert (tmp_path / "net.d" / EXAMPLE.name).read_text() == "{}\n"
    r = make_install()
    assert r.returncode == 0, r.stdout + r.stderr

"""deploy/: every manifest validates against the Kubernetes API schemas (kubernetes-validate
--strict, offline), the Kustomize base lists them all with the image `make image` tags, RBAC is
least privilege without wildcards, and the containers' arguments and environment are ones the
CLI really takes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cni_ipam import __version__
from cni_ipam.cli.install import substitute, validate_conflist
from cni_ipam.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for p in MANIFESTS:
        for d in docs(p):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def test_every_manifest_validates_strictly_against_the_api_schemas():
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (scripts/install-deps.sh)")
    assert len(MANIFESTS) >= 8, MANIFESTS
    p = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, MANIFESTS)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    passed = [ln for ln in p.stdout.splitlines() if ln.startswith("INFO") and " passed " in ln]
    assert len(passed) == sum(len(docs(m)) for m in MANIFESTS), p.stdout
    assert "ERROR" not in p.stdout + p.stderr and "Couldn't find schema" not in p.stdout + p.stderr


def test_the_validator_rejects_an_unknown_field(tmp_path):
    pytest.importorskip("kubernetes_validate")
    ds = docs(DEPLOY / "daemonset.yaml")[0]
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []     # a typo of volumeMounts
    bad = tmp_path / "ds.yaml"
    bad.write_text(yaml.safe_dump(ds))
    p = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "volumeMount" in p.stdout + p.stderr


def test_kustomization_lists_the_base_and_names_the_image_make_image_builds():
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    base = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(k["resources"]) == base
    assert k["images"] == [{"name": "localhost/cni-ipam", "newTag": __version__}]
    sys.path.insert(0, str(ROOT / "packaging"))
    import image   # packaging/image.py
    assert image.default_tag() == f"localhost/cni-ipam:{__version__}"
    objs = objects()
    for kind, name in (("DaemonSet", "cni-ipam-node"), ("Deployment", "cni-ipam-controller")):
        for c in objs[(kind, name)]["spec"]["template"]["spec"]["containers"]:
            assert c["image"] == image.default_tag() and c["imagePullPolicy"] == "IfNotPresent"
    assert objs[("Deployment", "cni-ipam-controller")]["spec"]["replicas"] == 2
    # everything namespaced lives in the namespace the base creates
    for (kind, name), o in objs.items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "cni-ipam", (kind, name)


def test_rbac_is_least_privilege_without_wildcards():
    objs = objects()
    for (kind, name), o in objs.items():
        if kind in ("ClusterRole", "Role"):
            for r in o["rules"]:
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in json.dumps(r.get(key, [])), (name, r)

    def rules(kind, name):
        return sorted((tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])),
                       tuple(r.get("resourceNames", ()))) for r in objs[(kind, name)]["rules"])
    assert rules("ClusterRole", "cni-ipam-node") == [(("",), ("namespaces", "nodes", "pods"), ("get",), ())]
    assert rules("Role", "cni-ipam-node-token") == [(("",), ("serviceaccounts/token",), ("create",),
                                                     ("cni-ipam-node",))]
    assert rules("ClusterRole", "cni-ipam-controller") == [(("",), ("nodes", "pods"), ("get", "list", "watch"), ()),
                                                           (("apps",), ("statefulsets",), ("get", "list", "watch"), ())]
    # each binding gives its role to the workload that uses it
    ds = objs[("DaemonSet", "cni-ipam-node")]["spec"]["template"]["spec"]
    dep = objs[("Deployment", "cni-ipam-controller")]["spec"]["template"]["spec"]
    for kind, name, sa in (("ClusterRoleBinding", "cni-ipam-node", ds["serviceAccountName"]),
                           ("RoleBinding", "cni-ipam-node-token", ds["serviceAccountName"]),
                           ("ClusterRoleBinding", "cni-ipam-controller", dep["serviceAccountName"])):
        b = objs[(kind, name)]
        assert b["roleRef"]["name"] == name
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "cni-ipam"}]
        assert ("ServiceAccount", sa) in objs


def _env_names(container) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def test_container_arguments_and_environment_are_what_the_cli_takes():
    from cni_ipam.cli.common import _SETTINGS
    objs = objects()
    ds = objs[("DaemonSet", "cni-ipam-node")]["spec"]["template"]["spec"]
    c = ds["containers"][0]
    args = build_parser().parse_args(c["args"])
    assert args.watch and args.kubeconfig.startswith("/host/etc/cni/net.d/")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in ds["volumes"]}
    # each host dir is mounted at /host/<the same path>: relative links resolve the same on the host
    for flag in ("bin_dir", "lib_dir", "conf_dir"):
        path = getattr(args, flag)
        assert vols[mounts[path]]["hostPath"]["path"] == path[len("/host"):], flag
    assert os.path.relpath(args.bin_dir, args.lib_dir) == "../bin"
    assert vols[mounts[args.conflist]]["configMap"] == {"name": "cni-ipam-conflist", "optional": True}
    assert vols[mounts[args.etcd_tls]]["secret"]["optional"] is True
    assert ds["hostNetwork"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["CNI_NET_DIR"]["value"] == vols[mounts[args.conf_dir]]["hostPath"]["path"]
    known = {v[0] for v in _SETTINGS.values()}
    assert {"ETCD_ENDPOINTS", "CNI_IPAM_ETCD_PREFIX"} <= known
    for name in _env_names(c) - {"CNI_NET_DIR", "KUBERNETES_NODE_NAME", "POD_NAMESPACE"}:
        assert name in known, name
    dep = objs[("Deployment", "cni-ipam-controller")]["spec"]["template"]["spec"]["containers"][0]
    config = objs[("ConfigMap", "cni-ipam-config")]["data"]
    for e in dep["env"]:
        assert e["name"] in known, e["name"]
        ref = e["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "cni-ipam-config" and ref["key"] in config, ref
    # the TLS paths the controller is given are where its Secret volume puts the files
    tls_mount = next(m["mountPath"] for m in dep["volumeMounts"] if m["name"] == "etcd-tls")
    for key in ("etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file"):
        assert os.path.dirname(config[key]) == tls_mount
    # it runs the image's controller bundle (packaging/image.py puts it there), not the plugin's
    import importlib.util
    spec = importlib.util.spec_from_file_location("_image", ROOT / "packaging" / "image.py")
    image = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image)
    assert dep["command"] == [f"{image.CONTROLLER_IN_IMAGE}/cni-ipam"]
    assert image.CONTROLLER_IN_IMAGE != image.IN_IMAGE
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    if "controller" in sub.choices:   # the controller command (its own module) takes these flags
        a = parser.parse_args(dep["args"])
        assert a.lease_ttl == 15 and a.leak_grace_period == 900


def test_example_conflist_renders_to_a_valid_config():
    cm = docs(DEPLOY / "examples" / "conflist-configmap.yaml")[0]
    (name, text), = cm["data"].items()
    assert name.endswith(".conflist")
    data = substitute(text.encode(), {"__ETCD_ENDPOINTS__": "https://127.0.0.1:2379", "__ETCD_PREFIX__": "/cni-ipam",
                                      "__ETCD_TLS_DIR__": "/etc/cni/net.d/cni-ipam/etcd-tls",
                                      "__KUBECONFIG_FILEPATH__": "/etc/cni/net.d/cni-ipam/kubeconfig",
                                      "__KUBERNETES_NODE_NAME__": "node-1", "__CNI_NET_DIR__": "/etc/cni/net.d"})
    assert b"__" not in data
    doc = validate_conflist(data, name)
    assert doc["plugins"][0]["ipam"]["kubernetes"]["kubeconfig"] == "/etc/cni/net.d/cni-ipam/kubeconfig"
    secret = docs(DEPLOY / "examples" / "etcd-tls-secret.yaml")[0]
    assert sorted(secret["stringData"]) == ["ca.crt", "tls.crt", "tls.key"]
    assert "create secret generic cni-ipam-etcd-tls" in (DEPLOY / "examples" / "etcd-tls-secret.yaml").read_text()


def test_the_exec_server_container_serves_the_launchers_socket_with_the_hosts_paths():
    """The DaemonSet's exec-server container (cni_ipam/execserver.py): it runs the command the CLI
    takes, on the socket the launcher (packaging/launcher.c) connects to by default, and the paths a
    served exec uses by default -- the socket's dir, the lock file's dir (where the snapshot and
    handle files live too), the log's dir, the dir of the kubeconfig and etcd TLS files install
    writes -- are the host's own, mounted at the same path (a served exec opens the paths of the
    conflist as the host sees them)."""
    import re
    from cni_ipam.config import DEFAULT_LOCK_FILE, DEFAULT_LOG_FILE
    from cni_ipam.execserver import DEFAULT_SOCKET
    ds = objects()[("DaemonSet", "cni-ipam-node")]["spec"]["template"]["spec"]
    c = next(c for c in ds["containers"] if c["name"] == "exec-server")
    install = next(c for c in ds["containers"] if c["name"] == "install")
    assert c["image"] == install["image"]           # the same build as the installed launcher
    args = build_parser().parse_args(c["args"])
    assert args.cmd == "exec-server" and args.socket == DEFAULT_SOCKET
    launcher = (ROOT / "packaging" / "launcher.c").read_text()
    assert re.search(r'#define DEFAULT_SOCKET "([^"]+)"', launcher).group(1) == DEFAULT_SOCKET
    vols = {v["name"]: v for v in ds["volumes"]}
    mounted = {m["mountPath"]: (vols[m["name"]]["hostPath"]["path"], m.get("readOnly", False))
               for m in c["volumeMounts"]}
    kubeconfig = os.path.dirname(build_parser().parse_args(install["args"]).kubeconfig[len("/host"):])
    needs = {os.path.dirname(DEFAULT_SOCKET): True, os.path.dirname(DEFAULT_LOCK_FILE): True,
             os.path.dirname(DEFAULT_LOG_FILE): True, os.path.dirname(kubeconfig): False}
    for path, writable in needs.items():
        # the nearest mounted dir holding it, mounted from the same host path
        where = max((m for m in mounted if path == m or path.startswith(m + "/")), key=len, default=None)
        assert where is not None, f"{path} is not mounted in the exec-server container"
        host, read_only = mounted[where]
        same = host == where or (where.startswith("/var/run/") and host == where[len("/var"):])  # /var/run -> /run
        assert same, f"{where} is mounted from {host}: a served exec would see other files"
        assert not (writable and read_only), f"{where} must be writable"
    # /var/run is /run on the host: both names of the dir are the same volume
    assert mounted["/var/run/cni-ipam"][0] == "/run/cni-ipam"
    assert c["securityContext"]["runAsUser"] == 0 and c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_the_systemd_unit_runs_the_exec_server_the_launcher_finds():
    """deploy/systemd/cni-ipam-exec-server.service: the installed binary's exec-server command, on the
    launcher's default socket, SIGTERM to the server only (it drains the execs it serves)."""
    from cni_ipam.execserver import DEFAULT_SOCKET
    unit = (DEPLOY / "systemd" / "cni-ipam-exec-server.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    exe, *argv = lines["ExecStart"].split()
    assert exe == "/opt/cni/bin/cni-ipam"       # where `cni-ipam install` puts the launcher
    args = build_parser().parse_args(argv)
    assert args.cmd == "exec-server" and args.socket == DEFAULT_SOCKET
    assert lines["KillMode"] == "mixed" and lines["Restart"] == "always"

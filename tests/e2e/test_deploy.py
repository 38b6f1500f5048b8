"""Deploy on Kubernetes, end to end on this machine (``make e2e-deploy`` runs only this).

1. ``make image`` builds ``dist/cni-ipam-image.tar``; ``podman load`` and ``ctr images import``
   both take it under the name deploy/ uses.
2. The DaemonSet's install container runs from that image under podman exactly as a kubelet
   would start it from ``deploy/daemonset.yaml``: its args, its env (fieldRefs and the
   cni-ipam-config ConfigMap resolved), its securityContext (all capabilities dropped, read-only
   root), host network, every hostPath as a bind mount from a temporary host root ``H`` at the
   manifest's mountPath, the conflist ConfigMap and the (absent, optional) etcd TLS Secret as
   directories, the service-account token/CA/namespace.  The Kubernetes API is the HTTPS
   stand-in, which serves TokenRequest.  The only deviation: ``CNI_NET_DIR`` is ``H/etc/cni/net.d``
   (on a node the host root is ``/``).
3. containerd (CRI, as kubelet drives it) with ``bin_dir = H/opt/cni/bin`` and
   ``conf_dir = H/etc/cni/net.d`` creates pods: the plugin runs ON THE HOST through the relative
   link the container wrote and authenticates to the API with the kubeconfig it wrote.
4. The mounted token rotates: the kubeconfig is written again.
5. Upgrade: a second image build; the old install container stops, the new one starts (what a
   DaemonSet rolling update does) while two threads create and delete pods: no ADD fails.
6. ``cni-ipam uninstall`` from the image, with the host root at /host (as ``kubectl debug node``
   runs it), leaves H exactly as it was before the first install.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cni_ipam.datastore import open_datastore
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.pool import make_pool
from tests.e2e.helpers import sysctl_restored
from tests.e2e.runtimes import (CNI_PLUGIN_DIR, Containerd, Podman, build_busybox_image, etcd_allocations,
                                free_test_subnet, missing_tools, unique_name, wait_released)
from tests.support.k8s_standin import K8sStandin

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ARCHIVE = ROOT / "dist" / "cni-ipam-image.tar"
SA = "system:serviceaccount:cni-ipam:cni-ipam-node"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

_why = missing_tools("podman", "runc", "containerd", "ctr", "/bin/busybox", "/usr/lib/cni/ptp",
                     "/usr/lib/cni/portmap", modules=("grpc", "cri_api"))
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


def fake_jwt(claims: dict) -> str:
    def b64(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{b64({'alg': 'RS256', 'kid': 'e2e'})}.{b64(claims)}.c2ln"


@pytest.fixture(scope="session")
def image_archive(plugin_binary) -> dict:
    """dist/cni-ipam-image.tar for the current binary (``make image`` when missing or stale)."""
    info = json.loads((Path(plugin_binary).parent / "build-info.json").read_text())
    meta = ARCHIVE.with_name(ARCHIVE.name + ".json")
    try:
        built = json.loads(meta.read_text())
    except (OSError, ValueError):
        built = {}
    if not ARCHIVE.exists() or built.get("source_digest") != info["source_digest"] \
            or built.get("commit") != info["commit"] or not built.get("controller_bundle"):
        p = subprocess.run(["make", "-s", "image", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=900, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            pytest.fail(f"`make image` failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        built = json.loads(meta.read_text())
    return built


def snapshot(root: Path) -> dict:
    """Every path under root: type, mode, content digest or link target."""
    out = {}
    for base, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(base) / n
            st = p.lstat()
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p.relative_to(root))] = ("dir", oct(st.st_mode & 0o7777))
            else:
                out[str(p.relative_to(root))] = ("file", oct(st.st_mode & 0o7777),
                                                 hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class Kubelet:
    """Starts the DaemonSet's install container from deploy/daemonset.yaml under podman."""

    def __init__(self, podman: Podman, host: Path, work: Path, api: K8sStandin, node: str,
                 config: dict[str, str]):
        self.podman, self.host, self.work, self.api, self.node, self.config = podman, host, work, api, node, config
        self.ds = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
        self.pod = self.ds["spec"]["template"]["spec"]
        self.sa_dir = work / "sa"
        self.volume_dirs = {"cni-ipam-conflist": work / "configmap-conflist",
                            "cni-ipam-etcd-tls": work / "secret-etcd-tls"}
        for d in self.volume_dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.sa_dir.mkdir(parents=True, exist_ok=True)
        (self.sa_dir / "ca.crt").write_bytes(Path(api.pki["ca"]).read_bytes())
        (self.sa_dir / "namespace").write_text("cni-ipam")
        self.rotate_token()

    def rotate_token(self) -> str:
        """What kubelet does with a projected token: a new one, swapped in atomically."""
        tok = fake_jwt({"sub": SA, "exp": int(time.time()) + 3600, "jti": uuid.uuid4().hex})
        self.api.tokens[tok] = SA
        tmp = self.sa_dir / ".token.new"
        tmp.write_text(tok)
        os.replace(tmp, self.sa_dir / "token")
        return tok

    def env(self, container: dict) -> list[str]:
        out = ["KUBERNETES_SERVICE_HOST=127.0.0.1", f"KUBERNETES_SERVICE_PORT={self.api.port}"]
        for e in container.get("env", []):
            if "value" in e:
                v = e["value"]
            else:
                src = e["valueFrom"]
                if "fieldRef" in src:
                    v = {"spec.nodeName": self.node, "metadata.namespace": "cni-ipam"}[src["fieldRef"]["fieldPath"]]
                else:
                    ref = src["configMapKeyRef"]
                    assert ref["name"] == "cni-ipam-config"
                    v = self.config[ref["key"]]
            if e["name"] == "CNI_NET_DIR":
                v = str(self.host) + v      # the one deviation: the host root is H, not /
            out.append(f"{e['name']}={v}")
        return out

    def run_args(self, name: str, image: str) -> list[str]:
        c = self.pod["containers"][0]
        sc = c["securityContext"]
        args = ["run", "-d", "--name", name, "--pull=never", "--cgroup-parent", self.podman.cgroup_parent,
                f"--user={sc['runAsUser']}"]
        if self.pod.get("hostNetwork"):
            args.append("--network=host")
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            args.append("--security-opt=no-new-privileges")
        args += [f"--cap-drop={x.lower()}" for x in sc["capabilities"]["drop"]]
        for kv in self.env(c):
            args += ["-e", kv]
        vols = {v["name"]: v for v in self.pod["volumes"]}
        for m in c["volumeMounts"]:
            v = vols[m["name"]]
            if "hostPath" in v:
                src = self.host / v["hostPath"]["path"].lstrip("/")
                assert v["hostPath"]["type"] == "DirectoryOrCreate"
                src.mkdir(parents=True, exist_ok=True)        # kubelet's DirectoryOrCreate
            elif "configMap" in v:
                src = self.volume_dirs[v["configMap"]["name"]]
            else:
                src = self.volume_dirs[v["secret"]["secretName"]]
            args += ["-v", f"{src}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        args += ["-v", f"{self.sa_dir}:{SA_MOUNT}:ro", image, *c["args"]]
        return args

    def start(self, name: str, image: str):
        return self.podman.run(*self.run_args(name, image))

    def logs(self, name: str) -> str:
        p = self.podman.run("logs", name, check=False)
        return (p.stdout + p.stderr).decode(errors="replace")


def wait_for(cond, timeout: float, what: str, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def plugin_works(host: Path) -> bool:
    link = host / "opt/cni/bin/cni-ipam"
    if not (os.path.islink(link) and os.path.exists(link)):
        return False
    p = subprocess.run([str(link)], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, input="",
                       capture_output=True, text=True, timeout=30)
    return p.returncode == 0 and "supportedVersions" in p.stdout


def kubeconfig_token(host: Path) -> str | None:
    try:
        return json.loads((host / "etc/cni/net.d/cni-ipam/kubeconfig").read_text())["users"][0]["user"]["token"]
    except (OSError, ValueError, KeyError):
        return None


def test_daemonset_install_pods_upgrade_uninstall(image_archive, etcd_server, etcd_prefix, tmp_path, plugin_binary):
    tag = image_archive["tag"]
    host = tmp_path / "host"
    work = tmp_path / "work"
    node = unique_name("node-", 6)
    subnet = ipaddress.ip_network(free_test_subnet())
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("e2e-deploy", str(subnet), 28))

    # the node before the DaemonSet: Debian's plugins in /opt/cni/bin, another network's conflist
    (host / "opt/cni/bin").mkdir(parents=True)
    for p in sorted(Path(CNI_PLUGIN_DIR).iterdir()):
        os.symlink(p, host / "opt/cni/bin" / p.name)
    (host / "etc/cni/net.d").mkdir(parents=True)
    (host / "etc/cni/net.d/99-other.conflist").write_text('{"cniVersion": "1.0.0", "name": "other", "plugins": '
                                                         '[{"type": "bridge", "bridge": "e2e-never-used"}]}\n')
    # the ConfigMap with the example conflist (http etcd here: the TLS lines go, as its comment says)
    cm = yaml.safe_load((DEPLOY / "examples/conflist-configmap.yaml").read_text())
    (cl_name, cl_text), = cm["data"].items()
    conflist = json.loads(cl_text)
    plugin_ipam = conflist["plugins"][0]["ipam"]
    for k in ("etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file"):
        del plugin_ipam[k]
    plugin_ipam.update(log_file=str(work / "plugin" / "cni-ipam.log"), lock_file=str(work / "plugin" / "ipam.lock"),
                       log_level="debug")

    with K8sStandin(tmp_path) as api, Podman(cni_plugin_dirs=[CNI_PLUGIN_DIR],
                                             network_config_dir=str(tmp_path / "podman-net")) as podman, \
            sysctl_restored("net.ipv4.ip_forward"):
        api.add_namespace("e2e-deploy")
        api.add_node(node)
        kubelet = Kubelet(podman, host, work, api, node,
                          {"etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix})
        (kubelet.volume_dirs["cni-ipam-conflist"] / cl_name).write_text(json.dumps(conflist, indent=2))
        for d in ("opt/cni/lib",):       # every hostPath exists before the pod starts (DirectoryOrCreate)
            (host / d).mkdir(parents=True, exist_ok=True)
        before = snapshot(host)

        # 1. the archive loads into podman under the manifests' name
        podman.run("load", "-i", str(ARCHIVE))
        names = podman.run("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode().split()
        assert tag in names, names

        # 2. the install container, as kubelet starts it; time until the plugin works on the host
        t0 = time.monotonic()
        kubelet.start("install-1", tag)
        wait_for(lambda: plugin_works(host) and kubeconfig_token(host) and (host / "etc/cni/net.d" / cl_name).exists(),
                 60, "the plugin, its kubeconfig and the conflist on the host")
        ready_s = time.monotonic() - t0
        link = host / "opt/cni/bin/cni-ipam"
        target = os.readlink(link)
        assert target.startswith("../lib/cni-ipam/"), target      # relative: resolves on the host
        first_build = Path(target).parent.name
        kc = host / "etc/cni/net.d/cni-ipam/kubeconfig"
        assert (kc.stat().st_mode & 0o777) == 0o600
        token1 = kubeconfig_token(host)
        assert token1.startswith("issued-"), "expected a TokenRequest token"
        assert ("POST", "/api/v1/namespaces/cni-ipam/serviceaccounts/cni-ipam-node/token", SA) in api.requests
        written = json.loads((host / "etc/cni/net.d" / cl_name).read_text())["plugins"][0]["ipam"]
        assert written["kubernetes"]["kubeconfig"] == str(kc)           # the host's path, not /host/...
        assert written["etcd_endpoints"] == etcd_server.endpoint and written["nodename"] == node
        assert (host / "etc/cni/net.d/99-other.conflist").read_text().startswith('{"cniVersion"')
        out = {"image": tag, "image_size_bytes": image_archive["size"], "archive_bytes": image_archive["archive_size"],
               "podman_run_to_working_plugin_seconds": round(ready_s, 2)}

        # 3. containerd creates pods through the installed plugin
        image_tar, _ = build_busybox_image(str(work / "bbx"))
        ctrd = Containerd(cni_bin_dir=str(host / "opt/cni/bin"), cni_conf_dir=str(host / "etc/cni/net.d"),
                          base_dir=str(work / "containerd"), keep_logs_in=str(work / "logs"))
        try:
            ctrd.start()
            ctrd.import_image(image_tar)
            ctrd.import_image(str(ARCHIVE), ref=tag)       # ctr images import takes the archive too
            cri = ctrd.cri()

            def pod_cycle(client, name) -> str:
                cfg = client.pod_config(name, "e2e-deploy", str(uuid.uuid4()))
                pid = client.run_pod_sandbox(cfg)
                try:
                    ips = client.pod_ips(pid)
                    assert len(ips) == 1 and ipaddress.ip_address(ips[0]) in subnet, ips
                    return ips[0]
                finally:
                    client.stop_pod_sandbox(pid)
                    client.remove_pod_sandbox(pid)

            cfg = cri.pod_config("web-0", "e2e-deploy", str(uuid.uuid4()))
            pod_id = cri.run_pod_sandbox(cfg)
            ip = ipaddress.ip_address(cri.pod_ips(pod_id)[0])
            assert ip in subnet
            handles, _ = etcd_allocations(ipam)
            assert [(h.container_id, h.namespace, h.pod, h.node) for h in handles] == \
                [(pod_id, "e2e-deploy", "web-0", node)]
            # the plugin on the host used the kubeconfig the container wrote (the issued token)
            gets = [r for r in api.requests if r[0] == "GET" and r[1] == "/api/v1/namespaces/e2e-deploy"]
            assert gets and gets[-1][2] == SA, api.requests[-5:]
            assert api.tokens.get(token1) == SA

            # 4. kubelet rotates the projected token: a fresh kubeconfig within the poll interval
            kubelet.rotate_token()
            wait_for(lambda: kubeconfig_token(host) not in (None, token1), 30, "the kubeconfig after token rotation",
                     step=0.2)
            assert "the service account token or CA changed" in kubelet.logs("install-1")

            # 5. upgrade while ADDs run: a second build, the DaemonSet pod replaced
            bundle2 = work / "bundle2" / "cni-ipam"
            shutil.copytree(Path(plugin_binary).parent, bundle2, symlinks=True)
            info = json.loads((bundle2 / "build-info.json").read_text())
            info["source_digest"] = "ff" + info["source_digest"][2:]          # another build
            (bundle2 / "build-info.json").write_text(json.dumps(info))
            sys.path.insert(0, str(ROOT / "packaging"))
            import image as image_builder
            second = image_builder.build(str(bundle2), tag, str(work / "image2.tar"))
            assert second["id"] != image_archive["id"]
            podman.run("load", "-i", second["archive"])

            errors, done, counts = [], threading.Event(), [0, 0]

            def churn(i):
                client = ctrd.cri()     # one gRPC channel shared by the threads (thread-safe)
                n = 0
                while not done.is_set():
                    try:
                        pod_cycle(client, f"churn-{i}-{n}")
                        counts[i] += 1
                    except Exception as e:  # noqa: BLE001 -- every failure is reported below
                        errors.append(f"churn-{i}-{n}: {e}")
                    n += 1
            threads = [threading.Thread(target=churn, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            try:
                wait_for(lambda: sum(counts) >= 3, 60, "pods before the upgrade", step=0.05)
                before_upgrade = sum(counts)
                stop = podman.run("stop", "-t", "10", "install-1")
                assert stop.returncode == 0
                kubelet.start("install-2", tag)
                new_target = wait_for(lambda: os.readlink(link) != target and os.readlink(link), 60,
                                      "the link switched to the new build")
                wait_for(lambda: sum(counts) >= before_upgrade + 8, 120, "pods after the upgrade", step=0.05)
            finally:
                done.set()
                for t in threads:
                    t.join(120)
            assert errors == [], errors[:5]
            out["adds_during_upgrade"] = sum(counts)
            assert Path(new_target).parent.name.endswith(info["source_digest"][:12])
            assert (host / "opt/cni/lib/cni-ipam" / first_build).is_dir()          # kept for runs in flight
            assert plugin_works(host)
            logs2 = kubelet.logs("install-2")
            assert "kept:" in logs2 and "kubeconfig:" in logs2, logs2
            p = podman.run("inspect", "--format", "{{.State.ExitCode}}", "install-1")
            assert p.stdout.decode().strip() == "0"
            assert "stopped: the plugin" in kubelet.logs("install-1")

            cri.stop_pod_sandbox(pod_id)
            cri.remove_pod_sandbox(pod_id)
            handles, blocks = wait_released(ipam, timeout=10)
            assert handles == [] and not any(blocks.values()), (handles, blocks)
        finally:
            problems = ctrd.stop()
            if problems:
                print("containerd teardown:", *problems, sep="\n  ")
        podman.run("stop", "-t", "10", "install-2")

        # 6. uninstall, as `kubectl debug node/... -- cni-ipam uninstall` runs it (host root at /host)
        p = podman.run("run", "--rm", "--pull=never", "--network=none", "--cgroup-parent", podman.cgroup_parent,
                       "-v", f"{host}:/host", tag, "uninstall", "--bin-dir=/host/opt/cni/bin",
                       "--lib-dir=/host/opt/cni/lib")
        text = p.stdout.decode()
        assert "left:" not in text, text
        assert snapshot(host) == before
        out["uninstall"] = "host as before"
    ipam.ds.close()
    report = ROOT / "build" / "e2e-deploy.json"
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


def test_controller_deployment_runs_from_the_image(image_archive, etcd_server, etcd_prefix, tmp_path):
    """deploy/controller.yaml's container from the image under podman (its command, args, env,
    securityContext; host network; in-cluster credentials of the HTTPS Kubernetes stand-in), with
    ``--once``: the controller bundle's kubernetes/prometheus_client/gRPC-lease code really runs and
    releases the allocation of a pod whose node was deleted."""
    tag = image_archive["tag"]
    dep = yaml.safe_load((DEPLOY / "controller.yaml").read_text())["spec"]["template"]["spec"]
    c = dep["containers"][0]
    assert c["command"] == [f"{image_archive['controller_bundle']}/cni-ipam"]
    ipam = IPAM(open_datastore(etcd_server.endpoint), etcd_prefix)
    ipam.create_pool(make_pool("e2e-ctl", "10.61.0.0/24", 29))
    config = {"etcd_endpoints": etcd_server.endpoint, "etcd_prefix": etcd_prefix,
              "etcd_ca_cert_file": "", "etcd_cert_file": "", "etcd_key_file": ""}   # plain http, as documented
    sa = tmp_path / "sa"
    sa.mkdir()
    with K8sStandin(tmp_path) as api, Podman(cni_plugin_dirs=[CNI_PLUGIN_DIR],
                                             network_config_dir=str(tmp_path / "podman-net")) as podman:
        api.add_namespace("ns")
        for node in ("live-node", "gone-node"):
            api.add_node(node)
        for i, node in enumerate(("live-node", "gone-node")):
            api.add_pod("ns", f"p{i}", node=node)
            ipam.assign(AssignRequest(handle_id=f"net.c{i}.eth0", node=node, network="net", container_id=f"c{i}",
                                      ifname="eth0", namespace="ns", pod=f"p{i}"))
        api.delete_pod("ns", "p1")
        api.delete_node("gone-node")
        (sa / "ca.crt").write_bytes(Path(api.pki["ca"]).read_bytes())
        (sa / "namespace").write_text("cni-ipam")
        token = "controller-" + uuid.uuid4().hex
        (sa / "token").write_text(token)
        api.tokens[token] = "system:serviceaccount:cni-ipam:cni-ipam-controller"

        podman.run("load", "-i", str(ARCHIVE))
        sc = c["securityContext"]
        args = ["run", "--rm", "--pull=never", "--cgroup-parent", podman.cgroup_parent, f"--user={sc['runAsUser']}",
                "--read-only", "--security-opt=no-new-privileges", "--network=host",
                *[f"--cap-drop={x.lower()}" for x in sc["capabilities"]["drop"]],
                "--entrypoint", c["command"][0],
                "-e", "KUBERNETES_SERVICE_HOST=127.0.0.1", "-e", f"KUBERNETES_SERVICE_PORT={api.port}",
                "-v", f"{sa}:{SA_MOUNT}:ro"]
        assert dep["hostNetwork"] is True and sc["readOnlyRootFilesystem"] is True
        for e in c["env"]:
            args += ["-e", f"{e['name']}={config[e['valueFrom']['configMapKeyRef']['key']]}"]
        # the manifest's args, then: one pass, a short lease (later flags win)
        p = podman.run(*args, tag, *c["args"], "--once", "--lease-ttl=2", timeout=120, check=False)
        err = p.stderr.decode(errors="replace")
        assert p.returncode == 0, f"controller --once from the image failed (rc {p.returncode}):\n{err}"
        assert "node gone-node is gone" in err, err
        assert re.search(r"controller: pass: .* released 1 handle\(s\) / 1 address\(es\)", err), err
        assert {h.id for h in ipam.handles()} == {"net.c0.eth0"}   # the live node's pod keeps its address
        assert ("GET", "/api/v1/nodes", "system:serviceaccount:cni-ipam:cni-ipam-controller") in api.requests
        # the plugin bundle of the same image still lacks the controller's modules (it stays small)
        p = podman.run("run", "--rm", "--pull=never", "--network=none", tag, "controller", "--once",
                       "--etcd-endpoints", "http://127.0.0.1:9", check=False)
        assert p.returncode != 0 and b"needs the" in p.stderr, p.stderr
    ipam.ds.close()


def test_the_exec_server_container_serves_the_hosts_execs(image_archive, etcd_server, etcd_prefix, tmp_path,
                                                          plugin_binary):
    """deploy/daemonset.yaml's exec-server container from the image under podman (its args,
    securityContext, host network, its hostPath mounts under a temp host root ``H`` as in the
    DaemonSet test): the plugin ON THE HOST hands its execs to it through the socket in
    ``H/run/cni-ipam`` and they are served IN THE CONTAINER (an fd passed across mount
    namespaces).  The one deviation: the network config's lock and log files are in a dir ``T``
    that the container also mounts at ``T`` (on a node: /run/cni-ipam and /var/log/cni-ipam, which
    the manifest mounts at the same paths).  A config whose lock file is in a host dir the
    container does not mount is not served: that exec runs the plugin itself, and the server's
    log says why."""
    from tests.plugin_helpers import exec_plugin, netconf, seed_store
    tag = image_archive["tag"]
    pod = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())["spec"]["template"]["spec"]
    c = next(x for x in pod["containers"] if x["name"] == "exec-server")
    sc = c["securityContext"]
    host, shared = tmp_path / "host", tmp_path / "shared"
    shared.mkdir()
    with seed_store(etcd_server.endpoint, etcd_prefix):
        pass
    with Podman(cni_plugin_dirs=[CNI_PLUGIN_DIR], network_config_dir=str(tmp_path / "podman-net")) as podman:
        podman.run("load", "-i", str(ARCHIVE))
        args = ["run", "-d", "--name", "exec-server-1", "--pull=never", "--cgroup-parent", podman.cgroup_parent,
                f"--user={sc['runAsUser']}", "--read-only", "--security-opt=no-new-privileges",
                *[f"--cap-drop={x.lower()}" for x in sc["capabilities"]["drop"]]]
        assert pod["hostNetwork"] is True and sc["readOnlyRootFilesystem"] is True
        args.append("--network=host")
        vols = {v["name"]: v for v in pod["volumes"]}
        for m in c["volumeMounts"]:
            src = host / vols[m["name"]]["hostPath"]["path"].lstrip("/")
            src.mkdir(parents=True, exist_ok=True)        # kubelet's DirectoryOrCreate
            args += ["-v", f"{src}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        args += ["-v", f"{shared}:{shared}:rw", tag, *c["args"]]
        podman.run(*args)
        sock = host / "run/cni-ipam/exec.sock"
        assert c["args"][-1] == "--socket=/run/cni-ipam/exec.sock"
        try:
            wait_for(sock.exists, 60, "the exec server's socket on the host")
            env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": None, "CNI_IPAM_EXEC_SOCKET": str(sock)}
            conf = netconf(etcd_server.endpoint, etcd_prefix, shared, ipv4_pools=["external-pool"])
            add = exec_plugin("ADD", conf, argv=[plugin_binary], env=env, container="served-1")
            assert add.rc == 0, add.stdout + add.stderr
            assert add.out["ips"][0]["address"].startswith("172.16.0.")
            dele = exec_plugin("DEL", conf, argv=[plugin_binary], env=env, container="served-1")
            assert dele.rc == 0, dele.stdout + dele.stderr
            # a lock file in a host dir the container does not see: served cold, and said so
            elsewhere = tmp_path / "not-mounted"
            other = {**conf, "ipam": {**conf["ipam"], "lock_file": str(elsewhere / "ipam.lock")}}
            elsewhere.mkdir()
            add2 = exec_plugin("ADD", other, argv=[plugin_binary], env=env, container="cold-1")
            assert add2.rc == 0, add2.stdout + add2.stderr
            assert (elsewhere / "ipam.lock").exists()       # the host's own plugin took that lock
        finally:
            podman.run("stop", "-t", "10", "exec-server-1", check=False)
        logs = (podman.run("logs", "exec-server-1", check=False).stdout
                + podman.run("logs", "exec-server-1", check=False).stderr).decode(errors="replace")
        code = podman.run("inspect", "--format", "{{.State.ExitCode}}", "exec-server-1").stdout.decode().strip()
        assert code == "0", logs
        assert "stopped after 3 execs" in logs, logs
        assert logs.count("left an exec to start the plugin itself") == 1, logs
        assert f"not visible to the exec server: {elsewhere}" in logs, logs
        podman.run("rm", "exec-server-1", check=False)
    # the served execs wrote the log and the lock the host sees (T is the same dir on both sides)
    assert "served-1" in (shared / "cni-ipam.log").read_text()
    assert (shared / "lock-node-a").exists()

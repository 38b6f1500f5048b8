#!/usr/bin/env python3
"""`make demo`: the seed's walkthrough (Calico IPAM: a pool per namespace), replayed for real.

1. a throwaway etcd on loopback;
2. ``cni-ipam apply -f conf/pools.yaml`` (external-pool 172.16.0.0/26, internal-pool 192.168.0.0/16,
   blockSize 29);
3. ``cni-ipam namespace annotate external-ns cni.projectcalico.org/ipv4pools='["external-pool"]'``
   and internal-ns likewise (stored in etcd: no Kubernetes needed); then the node's exec server
   (``cni-ipam exec-server``), which serves the plugin's execs below;
4. containerd (Debian's, with its CRI plugin, a temp config) runs three "nginx" pods in each
   namespace over CRI -- what kubelet does -- so containerd calls Debian's bridge plugin, which
   calls the cni-ipam binary with K8S_POD_NAMESPACE/K8S_POD_NAME; (cnitool + network namespaces if
   containerd is not usable here);
5. a ``kubectl get pods -o wide``-style table; every external-ns IP must be in external-pool and
   every internal-ns IP in internal-pool (exit 1 otherwise);
6. ``cni-ipam show --blocks``: a /29 per pool claimed by this node;
7. teardown (pods removed -> addresses released, checked; the exec server stopped, with how many
   execs it served), and where the logs are.

Run as root: ``make demo`` (installs what is missing, builds/reuses the binary), or
``python3 scripts/demo.py --binary dist/cni-ipam/cni-ipam``.  Leaves nothing running.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import shlex
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.runtimes import (IMAGE_REF, Containerd, RuntimeError_, build_busybox_image,  # noqa: E402
                                delete_link, make_cni_bin_dir, unique_name)
from tests.support.etcd import EtcdServer  # noqa: E402
from tests.support.exec_server import ExecServerProcess  # noqa: E402

POOLS_FILE = ROOT / "conf" / "pools.yaml"
BRIDGE_EXAMPLE = ROOT / "conf" / "10-cni-ipam-bridge.conflist"
ANNOTATION = "cni.projectcalico.org/ipv4pools"
NAMESPACES = {"external-ns": "external-pool", "internal-ns": "internal-pool"}
PODS_PER_NAMESPACE = 3
PREFIX = "/cni-ipam"


class DemoFailed(Exception):
    pass


def banner(text: str) -> None:
    print(f"\n### {text}", flush=True)


def note(text: str) -> None:
    print(f"    # {text}", flush=True)


def show_cmd(argv: list[str]) -> None:
    print("$ " + shlex.join(argv), flush=True)


def indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.rstrip("\n").splitlines())


class Demo:
    def __init__(self, binary: str, keep_logs: str, node: str):
        self.binary = os.path.abspath(binary)
        self.logs = keep_logs
        self.node = node
        self.work = tempfile.mkdtemp(prefix="cni-ipam-demo-")  # short: runtime socket paths
        self.etcd: EtcdServer | None = None
        self.ctrd: Containerd | None = None
        self.bridge = unique_name("cnidemo", 6)
        self.netns: list[str] = []
        self.pods: list[dict] = []
        self.cleanup_notes: list[str] = []
        self.ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()  # put back on exit
        self.exec_server: ExecServerProcess | None = None
        self.exec_server_log = os.path.join(keep_logs, "exec-server.log")

    # -- the admin CLI ---------------------------------------------------------------
    def cli_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(ETCD_ENDPOINTS=self.etcd.endpoint, CNI_IPAM_ETCD_PREFIX=PREFIX)
        return env

    def cli(self, *args: str, echo: bool = True, quiet: bool = False) -> str:
        argv = ["cni-ipam", *args]
        if echo:
            show_cmd(argv)
        p = subprocess.run([self.binary, *args], env=self.cli_env(), capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise DemoFailed(f"`{shlex.join(argv)}` failed (exit {p.returncode}): {p.stderr.strip()}")
        if echo and not quiet:
            print(indent(p.stdout), end="", flush=True)
        return p.stdout

    def pools(self) -> dict[str, ipaddress.IPv4Network]:
        doc = json.loads(self.cli("pool", "list", "-o", "json", echo=False))
        return {item["metadata"]["name"]: ipaddress.ip_network(item["spec"]["cidr"]) for item in doc["items"]}

    # -- steps ---------------------------------------------------------------------------
    def check_host(self) -> None:
        if os.geteuid() != 0:
            raise DemoFailed("the demo needs root (containerd, network namespaces): run `sudo make demo`")
        if not os.access(self.binary, os.X_OK):
            raise DemoFailed(f"{self.binary} is not an executable: run `make binary` first")
        # the seed's pools must not collide with this host's own networks
        routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
        seed = [ipaddress.ip_network("172.16.0.0/26"), ipaddress.ip_network("192.168.0.0/16")]
        for line in routes.splitlines():
            word = line.split()[0] if line.split() else ""
            if word == "default":
                continue
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            for s in seed:
                if s.overlaps(net):
                    raise DemoFailed(f"this host routes {net} ({line.strip()}), which overlaps the seed's pool "
                                     f"{s}: the demo would put pod addresses on top of a real network; not running")

    def start_etcd(self) -> None:
        banner("A throwaway etcd on loopback")
        self.etcd = EtcdServer(name="demo", tmp_parent=self.work)
        self.etcd.start()
        print(f"  etcd {self.etcd.endpoint} (data in {self.etcd.data_dir})")
        show_cmd(["export", f"ETCD_ENDPOINTS={self.etcd.endpoint}"])

    def apply_pools(self) -> None:
        banner("Step 1: create the IP pools (the seed's pools.yaml)")
        show_cmd(["cat", os.path.relpath(POOLS_FILE, ROOT)])
        print(indent(POOLS_FILE.read_text()), end="")
        self.cli("apply", "-f", str(os.path.relpath(POOLS_FILE, ROOT)) if Path.cwd() == ROOT else str(POOLS_FILE))
        self.cli("pool", "list")
        self.cli("show")

    def annotate(self) -> None:
        banner("Step 2: assign each pool to a namespace (annotations stored in etcd)")
        for ns, pool in NAMESPACES.items():
            self.cli("namespace", "annotate", ns, f"{ANNOTATION}={json.dumps([pool])}")
        for ns in NAMESPACES:
            self.cli("namespace", "get", ns)

    def network_config(self) -> dict:
        """The shipped example conflist (conf/10-cni-ipam-bridge.conflist), pointed at this etcd."""
        conf = json.loads(BRIDGE_EXAMPLE.read_text())
        plugin = conf["plugins"][0]
        plugin.update(bridge=self.bridge, isGateway=False, ipMasq=False, hairpinMode=False)
        plugin["ipam"].update(etcd_endpoints=self.etcd.endpoint, etcd_prefix=PREFIX, routes=[],
                              log_file=os.path.join(self.logs, "cni-ipam.log"), log_level="info",
                              lock_file=os.path.join(self.work, "cni-ipam.lock"))
        conf["name"] = "k8s-pod-network"
        return conf

    def write_cni_dirs(self) -> tuple[str, str, dict]:
        bin_dir = make_cni_bin_dir(os.path.join(self.work, "cni-bin"), self.binary)
        conf_dir = os.path.join(self.work, "net.d")
        os.makedirs(conf_dir, exist_ok=True)
        conf = self.network_config()
        path = os.path.join(conf_dir, "10-cni-ipam.conflist")
        with open(path, "w") as f:
            json.dump(conf, f, indent=2)
        return bin_dir, conf_dir, conf

    def start_exec_server(self) -> None:
        """The node's exec server (what the DaemonSet's second container runs), on a socket of its
        own (not /run/cni-ipam/exec.sock: a real one may live there); the plugin's execs find it
        through CNI_IPAM_EXEC_SOCKET, which containerd passes on to the plugins it runs."""
        banner("The node's exec server (the plugin, loaded once; each exec served by a fork of it)")
        sock = os.path.join(self.work, "exec.sock")
        show_cmd(["cni-ipam", "exec-server", "--socket", sock])   # (left running in the background)
        try:
            self.exec_server = ExecServerProcess(self.binary, sock, self.exec_server_log)
        except RuntimeError as e:
            raise DemoFailed(str(e)) from None
        os.environ["CNI_IPAM_EXEC_SOCKET"] = sock
        show_cmd(["export", f"CNI_IPAM_EXEC_SOCKET={sock}"])
        note("(on a node it listens on /run/cni-ipam/exec.sock, where the plugin looks by default)")

    def stop_exec_server(self, report: bool = False) -> None:
        if self.exec_server is None:
            return
        self.exec_server.end()
        self.exec_server = None
        os.environ.pop("CNI_IPAM_EXEC_SOCKET", None)
        if report:
            lines = Path(self.exec_server_log).read_text().splitlines()
            for line in lines:
                print(f"  {line}")
            left = [line for line in lines if "left an exec" in line]
            if left:
                note(f"{len(left)} exec(s) started the plugin themselves (see above)")

    def pod_names(self) -> list[str]:
        rs = "".join(random.choices("0123456789abcdef", k=10))
        alnum = string.ascii_lowercase + string.digits
        return [f"nginx-{rs}-{''.join(random.choices(alnum, k=5))}" for _ in range(PODS_PER_NAMESPACE)]

    def run_pods_containerd(self) -> None:
        banner("Step 3: create three pods in each namespace (containerd CRI -> bridge -> cni-ipam)")
        bin_dir, conf_dir, conf = self.write_cni_dirs()
        note(f"CNI config (from conf/{BRIDGE_EXAMPLE.name}; containerd reads one file), plugins in {bin_dir}:")
        print(indent(json.dumps(conf, indent=2)), end="")
        note("isGateway is off: Debian's bridge plugin keeps one IPv4 address per bridge, and this node")
        note("gets a block (and so a gateway) in each pool")
        image_tar, _ = build_busybox_image(os.path.join(self.work, "image"))
        self.ctrd = Containerd(cni_bin_dir=bin_dir, cni_conf_dir=conf_dir, base_dir=os.path.join(self.work, "containerd"),
                               keep_logs_in=self.logs)
        show_cmd(["containerd", "--config", self.ctrd.config_path])
        self.ctrd.start()
        show_cmd(["ctr", "-n", "k8s.io", "images", "import", "--snapshotter", "native", image_tar])
        self.ctrd.import_image(image_tar)
        note(f"{IMAGE_REF}: Debian's busybox-static, standing in for the nginx image (no registry here)")
        cri = self.ctrd.cri()
        for ns in NAMESPACES:
            print(f"  seed: kubectl run nginx --image nginx --namespace {ns} --replicas {PODS_PER_NAMESPACE}")
            note("here, what kubelet then does for each pod: CRI RunPodSandbox (pod name/namespace/uid) ->")
            note("containerd -> bridge -> cni-ipam (K8S_POD_NAMESPACE in CNI_ARGS); CreateContainer, StartContainer")
            for name in self.pod_names():
                uid = str(uuid.uuid4())
                cfg = cri.pod_config(name, ns, uid)
                t0 = time.monotonic()
                pod_id = cri.run_pod_sandbox(cfg)
                self.pods.append({"namespace": ns, "name": name, "id": pod_id, "started": time.time()})
                cid = cri.run_container(pod_id, cfg, "nginx", ["/bin/sleep", "2147483647"])
                ips = cri.pod_ips(pod_id)
                self.pods[-1].update(container=cid, ip=ips[0] if ips else "<none>",
                                     ready="1/1" if cri.container_state(cid) == "CONTAINER_RUNNING" else "0/1",
                                     status="Running" if cri.container_state(cid) == "CONTAINER_RUNNING" else "NotReady",
                                     seconds=time.monotonic() - t0)
                print(f"  pod/{name} created in {ns}  ({self.pods[-1]['seconds']:.2f}s)", flush=True)

    def run_pods_cnitool(self, why: str) -> None:
        banner("Step 3: create three pods in each namespace (cnitool + network namespaces)")
        note(f"containerd is not usable here ({why}); falling back to the cnitool-equivalent")
        cnitool = build_cnitool(self.work)
        bin_dir, conf_dir, conf = self.write_cni_dirs()
        print(indent(json.dumps(conf, indent=2)), end="")
        cache = os.path.join(self.work, "cni-cache")
        for ns in NAMESPACES:
            for name in self.pod_names():
                netns = unique_name("cnidemo-", 8)
                subprocess.run(["ip", "netns", "add", netns], check=True)
                self.netns.append(netns)
                path = f"/var/run/netns/{netns}"
                args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"
                argv = [cnitool, "add", conf["name"], path]
                show_cmd([f"CNI_ARGS={args}", "cnitool", "add", conf["name"], path])
                env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETCONFPATH": conf_dir, "CNI_PATH": bin_dir,
                       "CNI_CACHE_DIR": cache, "CNI_ARGS": args}
                t0 = time.monotonic()
                p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
                if p.returncode != 0:
                    raise DemoFailed(f"cnitool add failed: {p.stderr.strip()} {p.stdout.strip()}")
                res = json.loads(p.stdout)
                ip = res["ips"][0]["address"].split("/")[0]
                self.pods.append({"namespace": ns, "name": name, "netns": path, "ip": ip, "ready": "-",
                                  "status": "netns-only", "started": time.time(), "env": env, "cnitool": cnitool,
                                  "network": conf["name"], "seconds": time.monotonic() - t0})

    def table(self) -> None:
        banner("Step 4: the pods and their addresses")
        print("  seed: kubectl get pods -o wide -n external-ns; kubectl get pods -o wide -n internal-ns")
        note("here: CRI PodSandboxStatus + ContainerStatus of every pod" if self.ctrd else "here: cnitool's results")
        rows = [("NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE")]
        for p in self.pods:
            age = f"{max(0, int(time.time() - p['started']))}s"
            rows.append((p["namespace"], p["name"], p["ready"], p["status"], "0", age, p["ip"], self.node))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        pools = self.pools()
        print()
        bad = []
        for ns, pool in NAMESPACES.items():
            mine = [p for p in self.pods if p["namespace"] == ns]
            inside = [p for p in mine if p["ip"] != "<none>" and ipaddress.ip_address(p["ip"]) in pools[pool]]
            ok = (len(inside) == len(mine) == PODS_PER_NAMESPACE
                  and all(p["status"] in ("Running", "netns-only") for p in mine))
            print(f"  {'OK  ' if ok else 'FAIL'} {ns}: {len(inside)}/{len(mine)} pod IPs in {pool} ({pools[pool]})")
            if not ok:
                bad.append(ns)
        ips = [p["ip"] for p in self.pods]
        if len(set(ips)) != len(ips):
            bad.append("duplicate addresses")
        if bad:
            raise DemoFailed(f"pods are not where the annotations say: {', '.join(bad)}")

    def blocks(self) -> None:
        banner("Step 5: the blocks this node claimed (a /29 per pool)")
        self.cli("show", "--blocks")
        doc = json.loads(self.cli("show", "--blocks", "-o", "json", echo=False))
        blocks = doc.get("blocks") or [b for p in doc.get("pools", []) for b in p.get("blocks", [])]
        for pool in NAMESPACES.values():
            mine = [b for b in blocks if b.get("pool") == pool and b.get("node") == self.node
                    and str(b.get("cidr", b.get("block", ""))).endswith("/29")]
            if not mine:
                raise DemoFailed(f"`cni-ipam show --blocks` shows no /29 of {pool} claimed by {self.node}: {blocks}")

    def teardown_pods(self) -> None:
        banner("Step 6: tear down")
        if self.ctrd is not None and self.pods:
            cri = self.ctrd.cri()
            print("  seed: kubectl delete namespace external-ns internal-ns")
            note("here: CRI StopPodSandbox + RemovePodSandbox for every pod (containerd calls DEL twice)")
            for p in self.pods:
                cri.stop_pod_sandbox(p["id"])
                cri.remove_pod_sandbox(p["id"])
        elif self.pods:
            for p in self.pods:
                show_cmd(["cnitool", "del", p["network"], p["netns"]])
                subprocess.run([p["cnitool"], "del", p["network"], p["netns"]], env=p["env"], capture_output=True,
                               timeout=60, check=True)
        self.cli("show")
        doc = json.loads(self.cli("show", "-o", "json", echo=False))
        in_use = {p["name"]: p["inUse"] for p in doc["pools"] if p["inUse"]}
        if in_use:
            raise DemoFailed(f"addresses are still allocated after every pod was removed: {in_use}")
        note("every address is released (the blocks stay affine to the node, as in Calico)")
        note("the exec server, stopped: how many of the plugin's execs it served")
        self.stop_exec_server(report=True)

    def stop_everything(self) -> None:
        """Whatever happened: the exec server, pods, containerd, bridge, netns, etcd, temp dirs."""
        self.stop_exec_server()
        if self.ctrd is not None:
            problems = self.ctrd.stop()
            self.cleanup_notes += problems
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delete_link(self.bridge)
        try:
            if Path("/proc/sys/net/ipv4/ip_forward").read_text() != self.ip_forward:
                Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)
        except OSError:
            pass
        if self.etcd is not None:
            try:
                shutil.copy(self.etcd.log_path, os.path.join(self.logs, "etcd.log"))
            except OSError:
                pass
            self.etcd.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def build_cnitool(work: str) -> str:
    """The cnitool-equivalent (tests/e2e/cnitool) against Debian's libcni, GOPATH mode, offline."""
    src = ROOT / "tests" / "e2e" / "cnitool"
    out_dir = ROOT / "build" / "cnitool"
    exe = out_dir / "cnitool"
    if exe.exists() and exe.stat().st_mtime >= max(p.stat().st_mtime for p in src.glob("*.go")):
        return str(exe)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gopath").mkdir(exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"/usr/share/gocode:{out_dir / 'gopath'}",
           "GOCACHE": str(out_dir / "go-cache"), "GOFLAGS": "", "CGO_ENABLED": "0"}
    show_cmd(["go", "build", "-o", str(exe), "."])
    p = subprocess.run(["go", "build", "-o", str(exe), "."], cwd=src, env=env, capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        raise DemoFailed(f"building cnitool failed: {p.stderr.strip()}")
    return str(exe)


def containerd_unusable() -> str | None:
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        import cri_api  # noqa: F401
        import grpc  # noqa: F401
    except ImportError as e:
        return f"Python module missing: {e.name}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=str(ROOT / "dist" / "cni-ipam" / "cni-ipam"),
                    help="the cni-ipam executable (default: dist/cni-ipam/cni-ipam from `make binary`)")
    ap.add_argument("--logs", default=None, help="where to keep the logs (default: a new /tmp/cni-ipam-demo-logs-*)")
    ap.add_argument("--runtime", choices=["auto", "containerd", "cnitool"], default="auto")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    logs = args.logs or tempfile.mkdtemp(prefix="cni-ipam-demo-logs-")
    os.makedirs(logs, exist_ok=True)
    demo = Demo(args.binary, logs, node=socket.gethostname())
    rc = 0
    try:
        demo.check_host()
        print(f"cni-ipam demo: the seed's walkthrough on node {demo.node!r}, binary {demo.binary}")
        show_cmd(["cni-ipam", "version"])
        print(indent(subprocess.run([demo.binary, "version"], capture_output=True, text=True).stdout), end="")
        demo.start_etcd()
        demo.apply_pools()
        demo.annotate()
        demo.start_exec_server()
        why = containerd_unusable() if args.runtime != "cnitool" else "--runtime cnitool"
        if why is None:
            try:
                demo.run_pods_containerd()
            except RuntimeError_ as e:
                if args.runtime == "containerd" or demo.pods:
                    raise
                why = f"containerd failed: {str(e).splitlines()[0]}"
                if demo.ctrd is not None:
                    demo.ctrd.stop()
                    demo.ctrd = None
        if why is not None:
            if args.runtime == "containerd":
                raise DemoFailed(f"containerd is not usable: {why}")
            demo.run_pods_cnitool(why)
        demo.table()
        demo.blocks()
        demo.teardown_pods()
    except DemoFailed as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        rc = 1
    except Exception as e:  # noqa: BLE001 - a clear line, then the details in the log dir
        print(f"\ndemo: FAILED: {type(e).__name__}: {str(e).strip()[:2000]}", file=sys.stderr)
        rc = 1
    finally:
        demo.stop_everything()
    leftovers = []
    if os.path.exists(f"/sys/class/net/{demo.bridge}"):
        leftovers.append(f"bridge {demo.bridge}")
    if demo.ctrd is not None and demo.ctrd.running:
        leftovers.append("containerd")
    if demo.etcd is not None and demo.etcd.running:
        leftovers.append("etcd")
    if demo.exec_server is not None and demo.exec_server.proc.poll() is None:
        leftovers.append("the exec server")
    banner("Done" if rc == 0 and not leftovers else "Done, with problems")
    print(f"  everything started here is gone: {'containerd, ' if demo.ctrd else ''}etcd, the exec server, the pods, "
          f"the bridge {demo.bridge}, the temp dirs"
          if not leftovers else f"  LEFT BEHIND: {', '.join(leftovers)}")
    for n in demo.cleanup_notes:
        print(f"  teardown: {n}")
    print(f"  logs: {logs}/")
    for name in sorted(os.listdir(logs)):
        print(f"    {name}")
    print(f"  took {time.monotonic() - t_start:.1f}s")
    return 1 if (rc or leftovers) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Exec the plugin the way a runtime does: env + stdin, as a subprocess."""
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

PLUGIN = [sys.executable, "-m", "cni_ipam"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Run:
    rc: int
    out: dict | None
    stdout: str
    stderr: str


def exec_plugin(command, conf, *, container="c1", ifname="eth0", netns="/var/run/netns/x",
                args=None, env=None, raw_stdin=None, argv=None, timeout=60) -> Run:
    e = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT}
    e.update({"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"})
    if container is not None:
        e["CNI_CONTAINERID"] = container
    if ifname is not None:
        e["CNI_IFNAME"] = ifname
    if netns is not None:
        e["CNI_NETNS"] = netns
    if args is not None:
        e["CNI_ARGS"] = args
    if env:
        e.update(env)
    e = {k: v for k, v in e.items() if v is not None}
    stdin = raw_stdin if raw_stdin is not None else json.dumps(conf).encode()
    p = subprocess.run(argv or PLUGIN, input=stdin, env=e, capture_output=True, timeout=timeout)
    out = p.stdout.decode(errors="replace")
    try:
        parsed = json.loads(out) if out.strip() else None
    except ValueError:
        parsed = None
    return Run(p.returncode, parsed, out, p.stderr.decode(errors="replace"))


def assert_error(r: Run, code: int, *, names: str | None = None) -> dict:
    """A CNI error as the spec wants it: one JSON line on stdout with ``code``, non-zero exit,
    no traceback; ``names`` must appear in its msg or details.  Returns the error object."""
    assert r.rc != 0, r.stdout
    assert r.stdout.count("\n") == 1, r.stdout
    assert r.out is not None and r.out["code"] == code, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    if names:
        assert names in r.out["msg"] + " " + r.out.get("details", ""), r.out
    return r.out


def netconf(endpoint, prefix, tmp_path, *, version="1.0.0", name="testnet", node="node-a", **ipam):
    conf = {
        "cniVersion": version,
        "name": name,
        "type": "bridge",
        "ipam": {
            "type": "cni-ipam",
            "etcd_endpoints": endpoint,
            "etcd_prefix": prefix,
            "nodename": node,
            "lock_file": str(tmp_path / f"lock-{node}"),
            "log_file": str(tmp_path / "cni-ipam.log"),
            "log_level": "debug",
            "timeout_seconds": 5,
        },
    }
    conf["ipam"].update(ipam)
    return conf


@contextlib.contextmanager
def seed_store(endpoint, prefix):
    """An engine over the test's etcd prefix with the seed's two pools (blockSize 29)."""
    from cni_ipam.datastore import open_datastore
    from cni_ipam.ipam.engine import IPAM
    from cni_ipam.ipam.pool import make_pool
    ds = open_datastore(endpoint)
    ipam = IPAM(ds, prefix)
    ipam.create_pool(make_pool("external-pool", "172.16.0.0/26", 29))
    ipam.create_pool(make_pool("internal-pool", "192.168.0.0/16", 29))
    try:
        yield ipam
    finally:
        ds.close()

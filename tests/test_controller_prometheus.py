"""End to end: Debian's Prometheus scrapes `cni-ipam controller`, and a PromQL query over
its HTTP API returns the same in-use count as `cni-ipam show -o json`."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

from cni_ipam.ipam.engine import AssignRequest
from tests.test_controller import api, cli, controllers, env, free_port, ipam  # noqa: F401 (fixtures)


def query(port: int, promql: str):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        d = json.loads(r.read())
    assert d["status"] == "success", d
    return d["data"]["result"]


def test_prometheus_scrapes_the_controller(api, ipam, cli, controllers, tmp_path):  # noqa: F811
    exe = shutil.which("prometheus")
    assert exe, "Debian's prometheus is not installed (scripts/install-deps.sh installs it)"
    api.add_node("n1")
    api.add_node("n2")
    for i in range(7):
        node = "n1" if i < 4 else "n2"
        api.add_pod("ns", f"p{i}", node=node)
        ipam.assign(AssignRequest(handle_id=f"net.c{i}.eth0", node=node, network="net", namespace="ns", pod=f"p{i}"))
    api.delete_pod("ns", "p6")                      # one candidate (grace 3600: stays)
    c = controllers("--kubeconfig", api.write_kubeconfig(tmp_path / "kc"), "--interval", "1",
                    "--leak-grace-period", "3600", "--lease-ttl", "3")
    c.wait_log("pass: ")
    conf = tmp_path / "prometheus.yml"
    conf.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: cni-ipam-controller\n"
                    f"    static_configs:\n      - targets: ['127.0.0.1:{c.port}']\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen([exe, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        want = sum(p["inUse"] for p in json.loads(cli("show", "-o", "json").stdout)["pools"])
        assert want == 7
        got = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                res = query(port, "sum(ipam_allocations_in_use)")
            except OSError:
                res = []
            if res:
                got = float(res[0]["value"][1])
                break
            time.sleep(0.5)
        assert got == want, (got, (tmp_path / "prometheus.log").read_text()[-2000:])
        by_node = {r["metric"]["node"]: float(r["value"][1])
                   for r in query(port, "sum by (node) (ipam_allocations_in_use)")}
        assert by_node == {"n1": 4.0, "n2": 3.0}
        assert float(query(port, "sum(ipam_allocations_gc_candidates)")[0]["value"][1]) == 1.0
        assert float(query(port, "max(cni_ipam_controller_leader)")[0]["value"][1]) == 1.0
        assert query(port, 'up{job="cni-ipam-controller"}')[0]["value"][1] == "1"
    finally:
        prom.terminate()
        prom.wait(20)
        log.close()
    assert c.stop() == 0

"""Prometheus metrics (``prometheus_client``) and the HTTP endpoints /metrics, /healthz, /readyz.

Calico kube-controllers' IPAM metric names and labels (``ippool``, ``node``; the label
values ``no_ippool`` / ``unknown_node`` when unknown), so its dashboards and alerts work:

    ipam_allocations_in_use{ippool,node}         gauge
    ipam_allocations_borrowed{ippool,node}       gauge
    ipam_blocks{ippool,node}                     gauge
    ipam_allocations_gc_candidates{ippool,node}  gauge
    ipam_allocations_gc_reclamations_total{ippool,node}  counter (Calico's Go client names the
                                                 series without ``_total``; prometheus_client always
                                                 appends it -- see README "Controller")
    ipam_ippool_size{ippool}                     gauge

The ``ipam_*`` families are exported by the leader only (replicas would double every
sum); every replica exports ``cni_ipam_controller_*``.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

FAMILIES = [
    ("ipam_allocations_in_use", "in_use", "IP addresses allocated, by pool and node"),
    ("ipam_allocations_borrowed", "borrowed", "IP addresses a node holds in blocks affine to other nodes"),
    ("ipam_blocks", "blocks", "IPAM blocks, by pool and the node they are affine to"),
    ("ipam_allocations_gc_candidates", "candidates",
     "IP addresses whose pod or node no longer exists (released after the grace period)"),
]


class _IPAMCollector:
    def __init__(self, m: "Metrics"):
        self.m = m

    def collect(self):
        with self.m.lock:
            snap, reclaimed, leader = self.m.snapshot, dict(self.m.reclaimed), self.m.is_leader
        if not leader or snap is None:
            return
        for name, key, doc in FAMILIES:
            g = GaugeMetricFamily(name, doc, labels=["ippool", "node"])
            for (pool, node), v in sorted(snap[key].items()):
                g.add_metric([pool, node], v)
            yield g
        c = CounterMetricFamily("ipam_allocations_gc_reclamations",
                                "IP addresses released by the controller's garbage collection",
                                labels=["ippool", "node"])
        for (pool, node), v in sorted(reclaimed.items()):
            c.add_metric([pool, node], v)
        yield c
        s = GaugeMetricFamily("ipam_ippool_size", "addresses in the pool", labels=["ippool"])
        for pool, v in sorted(snap["pool_size"].items()):
            s.add_metric([pool], v)
        yield s


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.snapshot: dict | None = None
        self.reclaimed: dict[tuple[str, str], float] = {}
        self.is_leader = False
        self.registry = CollectorRegistry(auto_describe=True)
        self.leader = Gauge("cni_ipam_controller_leader", "1 on the elected controller, 0 on the others",
                            registry=self.registry)
        self.duration = Histogram("cni_ipam_controller_reconcile_duration_seconds",
                                  "duration of one full reconcile pass", registry=self.registry,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120))
        self.passes = Counter("cni_ipam_controller_reconcile_passes", "reconcile passes, by result",
                              ["result"], registry=self.registry)
        self.errors = Counter("cni_ipam_controller_errors", "failed etcd or Kubernetes API operations",
                              ["source"], registry=self.registry)
        self.etcd_requests = Gauge("cni_ipam_controller_etcd_requests_per_pass",
                                   "etcd requests the last reconcile pass made", registry=self.registry)
        self.undecodable = Gauge("cni_ipam_controller_undecodable_records",
                                 "store records the last pass could not decode (see `cni-ipam check`)",
                                 registry=self.registry)
        for src in ("etcd", "kubernetes"):
            self.errors.labels(src)
        for res in ("ok", "failed"):
            self.passes.labels(res)
        self.registry.register(_IPAMCollector(self))

    def set_leader(self, leader: bool) -> None:
        with self.lock:
            self.is_leader = leader
        self.leader.set(1 if leader else 0)

    def reclaimed_one(self, pool: str, node: str, n: int = 1) -> None:
        with self.lock:
            self.reclaimed[(pool, node)] = self.reclaimed.get((pool, node), 0) + n

    def set_snapshot(self, snap: dict) -> None:
        with self.lock:
            self.snapshot = snap
        self.undecodable.set(snap.get("undecodable", 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """What /healthz and /readyz answer (set by the main loop)."""

    def __init__(self):
        self.ready = False
        self.why = "starting"
        self.alive = True


def serve(metrics: Metrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                return self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            if path == "/healthz":
                return self._send(200 if health.alive else 500, b"ok\n" if health.alive else b"stopping\n")
            if path == "/readyz":
                if health.ready:
                    return self._send(200, b"ok\n")
                return self._send(503, f"not ready: {health.why}\n".encode())
            return self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        do_HEAD = do_GET

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    if ":" in host and not host.startswith("["):
        import socket
        Server.address_family = socket.AF_INET6
    srv = Server((host.strip("[]"), port), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics", daemon=True).start()
    return srv

"""`cni-ipam controller`: the long-running loop (or one pass with --once).

Threads: leader election (renews / campaigns), two Kubernetes watches (pods, nodes),
the metrics HTTP server; the main thread runs a reconcile pass every --interval while
it is the leader.  SIGTERM/SIGINT: finish the current step, revoke the leader lease
(a follower takes over at once), exit 0.  etcd or API outages never end the process:
it logs, counts the error, reports not-ready on /readyz and tries again with backoff.
"""
from __future__ import annotations

import signal
import threading
import time

from ..datastore import DatastoreError
from ..ipam.errors import IPAMError
from ..ipam.gc import GuardLost, leader_key
from ..log import log


class ControllerError(Exception):
    """Cannot start (bad flags, bad credentials, port in use): one line for the operator."""


def parse_address(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ControllerError(f"--metrics-address {s!r}: expected HOST:PORT (e.g. 0.0.0.0:9094)")
    return host or "0.0.0.0", int(port)


def run(args, ipam) -> int:
    from .kube import KubeCache, KubeError, api_client
    from .leader import LeaderElector
    from .metrics import Health, Metrics, serve
    from .reconcile import Reconciler

    stop = threading.Event()
    wake = threading.Event()

    def on_signal(signum, frame):
        log.info("controller: signal %d: stopping", signum)
        stop.set()
        wake.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    metrics, health = Metrics(), Health()
    try:
        api = api_client(args.kubeconfig)
    except KubeError as e:
        raise ControllerError(str(e)) from None
    kube = KubeCache(api, timeout=max(5.0, float(args.timeout or 10))) if api is not None else None
    if kube is None:
        log.info("controller: no Kubernetes credentials: serving metrics only (runtimes free their own "
                 "leaks with CNI GC; `cni-ipam node remove` cleans up after a node by hand)")

    server = None
    if not args.once or args.metrics_address_given:
        host, port = parse_address(args.metrics_address)
        try:
            server = serve(metrics, health, host, port)
        except OSError as e:
            raise ControllerError(f"cannot serve metrics on {args.metrics_address}: {e.strerror or e}") from None
        log.info("controller: metrics on http://%s:%d/metrics", host, server.server_address[1])

    def on_change(leader: bool) -> None:
        metrics.set_leader(leader)
        wake.set()
    elector = LeaderElector(ipam.ds, leader_key(ipam.keys), ttl=args.lease_ttl, on_change=on_change)
    metrics.set_leader(False)
    rec = Reconciler(ipam, kube, grace=args.leak_grace_period, guard=elector.guard,
                     on_reclaimed=metrics.reclaimed_one)
    if kube is not None:
        kube.start()
    elector.start()
    exit_code = 0
    try:
        if args.once:
            exit_code = _once(args, elector, kube, rec, metrics, stop)
        else:
            _loop(args, elector, kube, rec, metrics, health, stop, wake)
    finally:
        health.alive = False
        if kube is not None:
            kube.stop()
        elector.stop(resign=True)
        if server is not None:
            server.shutdown()
            server.server_close()
    return exit_code


def _count_api_errors(metrics, kube, seen=[0]) -> None:
    if kube is not None and kube.errors > seen[0]:
        metrics.errors.labels("kubernetes").inc(kube.errors - seen[0])
        seen[0] = kube.errors


def _pass(rec, metrics, elector, kube) -> tuple[bool, str]:
    """One pass; (ok, why not)."""
    _count_api_errors(metrics, kube)
    t0 = time.monotonic()
    try:
        r = rec.run()
    except GuardLost as e:
        elector.lost(e.msg)
        metrics.passes.labels("failed").inc()
        return False, "lost the leadership during the pass"
    except DatastoreError as e:
        metrics.errors.labels("etcd").inc()
        metrics.passes.labels("failed").inc()
        log.warning("controller: pass failed: etcd: %s", e)
        return False, f"etcd: {e}"
    except IPAMError as e:
        metrics.errors.labels("etcd").inc()
        metrics.passes.labels("failed").inc()
        log.warning("controller: pass failed: %s", e.msg)
        return False, e.msg
    except Exception as e:  # noqa: BLE001 - never end the daemon on something unexpected: log, retry later
        metrics.passes.labels("failed").inc()
        log.exception("controller: pass failed: internal error: %s: %s", type(e).__name__, e)
        return False, f"internal error: {type(e).__name__}: {e}"
    _count_api_errors(metrics, kube)
    metrics.duration.observe(time.monotonic() - t0)
    metrics.set_snapshot(r.metrics)
    metrics.etcd_requests.set(r.etcd_requests)
    metrics.passes.labels("ok" if r.ok else "failed").inc()
    log.info("controller: pass: %.2fs (cpu %.2fs), %d etcd request(s), %d API request(s), %d candidate(s), released %d "
             "handle(s) / %d address(es), deleted %d block(s)%s", r.seconds, r.cpu_seconds, r.etcd_requests, r.api_requests,
             r.candidates, len(r.released), r.addresses, len(r.blocks_deleted),
             "" if r.judged or kube is None else " (Kubernetes cache not in sync: nothing judged)")
    if not r.ok:
        return False, "; ".join(r.errors)
    if kube is not None and not r.judged:
        return False, kube.last_error or "the Kubernetes cache is not in sync"
    return True, ""


def _once(args, elector, kube, rec, metrics, stop) -> int:
    wait = 2 * elector.ttl + 1
    if not elector.wait_leader(wait):
        why = elector.last_error or f"another controller holds the leadership ({elector.holder})"
        log.error("controller: --once: not the leader after %ds: %s", wait, why)
        raise ControllerError(f"--once: could not become the leader within {wait}s: {why}")
    if kube is not None and not kube.wait_synced(max(30.0, float(args.timeout or 10) * 3)):
        raise ControllerError(f"--once: the Kubernetes API did not answer: {kube.last_error}")
    ok, why = _pass(rec, metrics, elector, kube)
    if not ok:
        raise ControllerError(f"--once: the pass failed: {why}")
    return 0


def _loop(args, elector, kube, rec, metrics, health, stop, wake) -> None:
    backoff = 1.0
    while not stop.is_set():
        wake.clear()
        if not elector.is_leader:
            _count_api_errors(metrics, kube)
            health.ready = elector.healthy
            health.why = "" if elector.healthy else f"etcd: {elector.last_error}"
            wake.wait(1.0)
            continue
        ok, why = _pass(rec, metrics, elector, kube)
        health.ready, health.why = ok, why
        if ok:
            backoff = 1.0
            delay = args.interval
        else:
            delay = min(backoff, args.interval)
            backoff = min(backoff * 2, 60.0)
        end = time.monotonic() + delay
        while not stop.is_set() and time.monotonic() < end:
            if wake.wait(min(1.0, end - time.monotonic())):
                wake.clear()
                if not elector.is_leader:
                    break

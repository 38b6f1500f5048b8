"""CNI mode: the verbs, joining the protocol layer (cni/) to the engine (ipam/).

Imports are kept to what a verb needs: VERSION is answered by the skel before
anything here is imported; no verb imports grpc or pyroute2.
"""
from __future__ import annotations

import os
import sys

from .cni.errors import CNIError
from .cni.netconf import prev_result_ips, requested_ips
from .config import ConfigError, IpamConfig, node_name, parse_ipam_config
from .hostenv import LockTimeout, LockUnusable, host_lock, setup_logging

from .log import log

# CNI error codes used here (spec: 3 unknown container, 7 invalid config, 11 try again, 50 unavailable)
from .constants import (ERR_CHECK_MISMATCH as CHECK_MISMATCH, ERR_INVALID_NETWORK_CONFIG as INVALID_CONFIG,  # noqa: E402
                        ERR_PLUGIN_NOT_AVAILABLE as UNAVAILABLE, ERR_TRY_AGAIN_LATER as TRY_AGAIN, ERR_UNKNOWN_CONTAINER as UNKNOWN_CONTAINER)


def handle_id(network: str, container_id: str, ifname: str) -> str:
    """The attachment's handle id (ipam/store.py: ``<network>/<containerID>/<ifname>``)."""
    from .ipam.store import handle_id as hid
    return hid(network, container_id, ifname)


def legacy_handle_id(network: str, container_id: str, ifname: str) -> str:
    from .ipam.store import legacy_handle_id as lid
    return lid(network, container_id, ifname)


def _cni_error(e: BaseException) -> CNIError | None:
    """The CNI error for an engine, datastore or lock failure (None: not one of those)."""
    from .datastore import DatastoreError, DatastoreUnavailable
    from .ipam.errors import IPAMError
    if isinstance(e, IPAMError):
        return CNIError(e.code, e.msg, e.details)
    if isinstance(e, DatastoreUnavailable):
        return CNIError(TRY_AGAIN, f"etcd unavailable: {e}")
    if isinstance(e, DatastoreError):
        return CNIError(TRY_AGAIN, f"etcd error: {e}")
    if isinstance(e, LockTimeout):
        return CNIError(TRY_AGAIN, str(e))
    if isinstance(e, LockUnusable):
        return CNIError(TRY_AGAIN if e.transient else INVALID_CONFIG, str(e))
    return None


class _Session:
    """``with _Session(ic, node, network) as ipam:`` -- one verb's work on the store: the
    datastore connection (the gateway transport), the host lock (``lock``: one exec at a time
    per host, so a node never fights itself with CAS conflicts) and, with ``network``, the
    node's warm snapshot (ipam/snapshot.py) and empty-block observations (ipam/reclaim.py),
    loaded under the lock from their files next to the lock file and saved back on the way out
    (also after a failure).  Engine, datastore and lock errors leave as CNI errors.  The
    snapshot is only a cache: the engine's compares guard every use, so a stale or missing
    file costs requests, never correctness.  ``assigns=False`` (DEL, GC, CHECK): the engine
    without its ADD code (``releases.Releases``), and no empty-block observations (only an
    ADD's reclaim uses them): an exec loads ~5 M instructions less code (issue 17)."""

    def __init__(self, ic: IpamConfig, node: str = "", network: str | None = None, *, lock: bool = True,
                 map_errors: bool = True, assigns: bool = True, handle_id: str | None = None):
        self.ic, self.node, self.network, self.lock, self.map_errors = ic, node, network, lock, map_errors
        self.assigns, self.handle_id = assigns, handle_id
        self.handle_file = self.handle_key = None
        #: (``handle_id``, with a network) the handle record this node's ADD wrote, for the DEL
        self.cached_handle: tuple[int, bytes] | None = None
        self.ds = self.held = self.ipam = None
        self.snapshot_file = self.watch_file = self.ident = None
        self.before = None
        self.requests0 = self.hits0 = 0

    def __enter__(self):
        try:
            return self._open()
        except Exception as e:
            self._close(ok=False)
            err = _cni_error(e) if self.map_errors else None
            if err is None:
                raise
            raise err from None

    def __exit__(self, et, e, tb) -> None:
        try:
            self._close(ok=e is None)
        except Exception as close_error:
            if e is None:
                e = close_error
        if e is not None and self.map_errors:
            err = _cni_error(e)
            if err is not None:
                raise err from None

    def _open(self):
        from .datastore import open_datastore
        if self.assigns:
            from .ipam.engine import IPAM as engine
        else:
            from .ipam.releases import Releases as engine
        ic = self.ic
        self.ds = open_datastore(ic.etcd_endpoints, transport="gateway", timeout=ic.timeout_seconds,
                                 ca_cert=ic.etcd_ca_cert_file, cert=ic.etcd_cert_file, key=ic.etcd_key_file,
                                 username=ic.etcd_username, password=ic.password())
        if self.lock:
            held = host_lock(ic.lock_file, ic.lock_timeout_seconds)
            held.__enter__()
            self.held = held
        if self.network is None:
            self.ipam = self._engine(engine(self.ds, ic.etcd_prefix))
            return self.ipam
        from .ipam import snapshot as snapshots
        self.ident = "\n".join(["cni-ipam snapshot", ic.etcd_prefix, self.node, self.network]
                                + sorted(ic.etcd_endpoints))
        self.snapshot_file = snapshots.file_path(ic.lock_file, self.ident)
        self.before = snapshots.load(self.snapshot_file, self.ident)
        watch = None
        if self.assigns:
            from .ipam import reclaim
            self.watch_file = reclaim.file_path(ic.lock_file)
            watch = reclaim.load(self.watch_file)
        self.ipam = self._engine(engine(self.ds, ic.etcd_prefix, use_snapshot=True, snapshot=self.before,
                                        empty_watch=watch))
        if self.handle_id is not None:
            self.handle_key = self.ipam.keys.handle(self.handle_id)
            self.handle_file = snapshots.handle_file_path(ic.lock_file, self.ident, self.handle_key)
            if not self.assigns:
                self.cached_handle = snapshots.load_handle(self.handle_file, self.ident, self.handle_key)
        self.requests0 = self.ipam.ds.requests
        return self.ipam

    def forget_handle(self, handle_id: str) -> None:
        """Drop the kept handle record of ``handle_id`` (released by GC)."""
        if self.ident is not None:
            from .ipam import snapshot as snapshots
            snapshots.drop_handle(snapshots.handle_file_path(self.ic.lock_file, self.ident,
                                                             self.ipam.keys.handle(handle_id)))

    @staticmethod
    def _engine(ipam):
        """The engine the verb uses (a seam for tests that interpose on its datastore)."""
        return ipam

    def _close(self, ok: bool = True) -> None:
        ipam, ds, held = self.ipam, self.ds, self.held
        if ipam is not None:
            ds = ipam.ds
        self.ipam = self.ds = self.held = None
        try:
            if ipam is not None and self.snapshot_file is not None:
                from .ipam import snapshot as snapshots
                if ipam.snapshot is not None or self.before is not None:
                    snapshots.save(self.snapshot_file, ipam.snapshot, self.ident)
                if self.watch_file is not None:
                    from .ipam import reclaim
                    reclaim.save(self.watch_file, ipam.empty_watch)
                if ok and self.handle_file is not None:
                    # an ADD keeps the handle record it wrote; a DEL drops it (done, or nothing held)
                    written = ipam.written_handle if self.assigns else None
                    if written is not None and written[0] == self.handle_key:
                        snapshots.save_handle(self.handle_file, self.ident, *written)
                    elif not self.assigns:
                        snapshots.drop_handle(self.handle_file)
                log.debug("etcd requests=%d (snapshot: %s)", ipam.ds.requests - self.requests0,
                          "used" if ipam.snapshot_hits else "warm" if self.before is not None else "none")
        finally:
            try:
                if held is not None:
                    held.__exit__(None, None, None)
            finally:
                if ds is not None:
                    ds.close()


class Plugin:
    """The skel's handlers."""

    def _setup(self, env, conf):
        try:
            ic = parse_ipam_config(conf.ipam)
        except ConfigError as e:
            raise CNIError(INVALID_CONFIG, str(e)) from None
        setup_logging(ic.log_file, ic.log_level, tag=f"{env.command} {(env.container_id or '')[:12]}")
        try:
            node = node_name(ic)
        except ConfigError as e:
            raise CNIError(INVALID_CONFIG, str(e)) from None
        return ic, node

    def _request(self, env, conf, ic: IpamConfig, node: str, requested=()):
        from .ipam.engine import AssignRequest
        args = env.args or {}
        return AssignRequest(
            handle_id=handle_id(conf.name, env.container_id or "", env.ifname or ""), node=node,
            legacy_handle_id=legacy_handle_id(conf.name, env.container_id or "", env.ifname or ""),
            network=conf.name, container_id=env.container_id or "", ifname=env.ifname or "",
            pod=args.get("K8S_POD_NAME", ""), namespace=args.get("K8S_POD_NAMESPACE", ""), pod_uid=args.get("K8S_POD_UID", ""),
            mode=ic.mode, assign_v4=ic.assign_ipv4, assign_v6=ic.assign_ipv6,
            v4_pools=ic.ipv4_pools, v6_pools=ic.ipv6_pools, requested=list(requested), gateways=ic.gateways,
            routed_prefix=ic.routed_prefix, annotation_prefix=ic.annotation_prefix,
            labels_from_etcd=ic.kubernetes is None)

    def _kube(self, ic: IpamConfig):
        """The Kubernetes client (only with a ``kubernetes`` section; imported only then)."""
        from .k8s import K8sError, client_from_config
        assert ic.kubernetes is not None   # (callers: only with a kubernetes section)
        try:
            return client_from_config(ic.kubernetes, timeout=ic.timeout_seconds)
        except K8sError as e:
            raise CNIError(INVALID_CONFIG, f"ipam.kubernetes: {e.msg}") from None

    def _from_kubernetes(self, ic: IpamConfig, req, kube):
        """``req`` with the pool choice of its Pod/Namespace (the Node is read lazily, from
        inside the engine, through the same ``kube``)."""
        from .ipam.annotations import from_kubernetes
        from .ipam.errors import IPAMError
        try:
            return from_kubernetes(req, kube, ic.annotation_prefix)
        except IPAMError as e:
            raise CNIError(e.code, e.msg, e.details) from None

    @staticmethod
    def _close_kube(kube) -> None:
        if kube is not None:
            log.debug("Kubernetes API requests: %s", ", ".join(kube.log) or "none")
            kube.close()

    # -- verbs ---------------------------------------------------------------------
    def add(self, env, conf) -> dict:
        ic, node = self._setup(env, conf)
        req = self._request(env, conf, ic, node, requested_ips(env, conf))
        # (with Kubernetes too: the engine plans from this request's pool choice, fresh from the
        # API, every time; the snapshot only stands in for etcd reads, each guarded by a compare)
        kube = self._kube(ic) if ic.kubernetes is not None else None
        try:
            if kube is not None:
                req = self._from_kubernetes(ic, req, kube)
            with _Session(ic, node, conf.name, handle_id=req.handle_id) as ipam:
                res = ipam.assign(req)
        finally:
            self._close_kube(kube)
        h = res.handle
        log.info("ADD %s -> %s%s (attempts %d)", h.id, ", ".join(str(a.interface) for a in h.addresses),
                 " (existing)" if res.existing else "", res.attempts)
        from .cni.result import IPConfig, render_result   # (the ADD's alone: not loaded by the other verbs)
        ips = [IPConfig(a.interface, a.gateway) for a in h.addresses]
        return render_result(conf.cni_version, ips, ic.routes, ic.dns)

    def delete(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        att = (conf.name, env.container_id or "", env.ifname or "")
        hid = handle_id(*att)
        session = _Session(ic, node, conf.name, assigns=False, handle_id=hid)
        with session as ipam:
            h = ipam.release(hid, legacy_id=legacy_handle_id(*att), attachment=att, keep=True,
                             cached=session.cached_handle)
        log.info("DEL %s -> %s", hid, ", ".join(str(a.ip) for a in h.addresses) if h else "nothing held")

    def check(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        att = (conf.name, env.container_id or "", env.ifname or "")
        hid = handle_id(*att)
        want = prev_result_ips(conf)
        with _Session(ic, lock=False, assigns=False) as ipam:
            h = ipam.find_attachment(*att)
            if h is None:
                raise CNIError(UNKNOWN_CONTAINER, f"no addresses are allocated to {hid}")
            problems = ipam.verify_handle(h)
        have = {str(a.ip) for a in h.addresses}
        if have != want:
            problems.append(f"allocated {sorted(have)} but prevResult has {sorted(want)}")
        if problems:
            raise CNIError(CHECK_MISMATCH, f"check failed for {hid}", "; ".join(problems))

    def gc(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        if conf.valid_attachments is None:
            # never read a missing list as "nothing is valid": that would free the whole network
            raise CNIError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments (or cni.dev/attachments)")
        keep = set(conf.valid_attachments)   # (containerID, ifname): handles are matched by their records
        session = _Session(ic, node, conf.name, assigns=False)
        with session as ipam:
            released, failed = ipam.gc(conf.name, node, keep)
            for hid in released:
                session.forget_handle(hid)
        log.info("GC %s on %s: released %d handle(s), %d failure(s)", conf.name, node, len(released), len(failed))
        if failed:
            # corrupt data everywhere: retrying will not help, say so (113); else try again (11)
            codes = {c for _, _, c in failed}
            code = codes.pop() if len(codes) == 1 and TRY_AGAIN not in codes else TRY_AGAIN
            raise CNIError(code, f"gc: {len(failed)} handle(s) could not be released",
                           "; ".join(f"{h}: {m}" for h, m, _ in failed[:20]))

    def status(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        req = self._request(env, conf, ic, node)
        from .datastore import DatastoreError
        from .ipam.errors import IPAMError
        kube = None
        try:
            if ic.kubernetes is not None:
                kube = self._kube(ic)
                req = self._from_kubernetes(ic, req, kube)
            with _Session(ic, lock=False, map_errors=False) as ipam:
                free = ipam.free_pools(req)
        except DatastoreError as e:
            raise CNIError(UNAVAILABLE, f"etcd is not reachable: {e}") from None
        except IPAMError as e:
            raise CNIError(UNAVAILABLE, f"no usable pool: {e.msg}") from None
        finally:
            self._close_kube(kube)
        if not free:
            raise CNIError(UNAVAILABLE, f"no free addresses: every usable pool for node {node} is full")


def run_plugin(environ=None, stdin=None, stdout=None) -> int:
    from .cni.skel import read_stdin, run
    environ = os.environ if environ is None else environ
    data = read_stdin(sys.stdin.buffer) if stdin is None else stdin
    return run(environ, data, stdout or sys.stdout, Plugin())

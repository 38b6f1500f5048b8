"""CNI mode: the verbs, joining the protocol layer (cni/) to the engine (ipam/).

Imports are kept to what a verb needs: VERSION is answered by the skel before
anything here is imported; no verb imports grpc or pyroute2.
"""
from __future__ import annotations

import os
import sys

from .cni.errors import CNIError
from .cni.netconf import prev_result_ips, requested_ips
from .cni.result import IPConfig, render_result
from .config import ConfigError, IpamConfig, node_name, parse_ipam_config
from .hostenv import LockTimeout, LockUnusable, host_lock, setup_logging

from .log import log

# CNI error codes used here (spec: 3 unknown container, 7 invalid config, 11 try again, 50 unavailable)
from .constants import (ERR_CHECK_MISMATCH as CHECK_MISMATCH, ERR_INVALID_NETWORK_CONFIG as INVALID_CONFIG,  # noqa: E402
                        ERR_PLUGIN_NOT_AVAILABLE as UNAVAILABLE, ERR_TRY_AGAIN_LATER as TRY_AGAIN, ERR_UNKNOWN_CONTAINER as UNKNOWN_CONTAINER)


def handle_id(network: str, container_id: str, ifname: str) -> str:
    """The attachment's handle id (ipam/keys.py: ``<network>/<containerID>/<ifname>``)."""
    from .ipam.keys import handle_id as hid
    return hid(network, container_id, ifname)


def legacy_handle_id(network: str, container_id: str, ifname: str) -> str:
    from .ipam.keys import legacy_handle_id as lid
    return lid(network, container_id, ifname)


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

    def _ipam(self, ic: IpamConfig):
        from .datastore import open_datastore
        from .ipam.engine import IPAM
        ds = open_datastore(ic.etcd_endpoints, transport="gateway", timeout=ic.timeout_seconds,
                            ca_cert=ic.etcd_ca_cert_file, cert=ic.etcd_cert_file, key=ic.etcd_key_file,
                            username=ic.etcd_username, password=ic.password())
        return IPAM(ds, ic.etcd_prefix)

    def _locked(self, ic: IpamConfig):
        return host_lock(ic.lock_file, ic.lock_timeout_seconds)

    def _with_snapshot(self, ic: IpamConfig, node: str, network: str, fn):
        """``fn(ipam)`` with the node's warm snapshot (ipam/snapshot.py) loaded from its file
        next to the lock file, and the new one written back after (also after a failure: then
        usually removed).  Called inside ``_run``'s host lock only: one exec at a time reads
        and writes the file.  The snapshot is only a cache: the engine's compares guard every
        use, so a stale or missing file costs requests, never correctness."""
        from .ipam import snapshot as snapshots
        ident = "\n".join(["cni-ipam snapshot", ic.etcd_prefix, node, network] + sorted(ic.etcd_endpoints))
        path = snapshots.file_path(ic.lock_file, ident)

        def run(ipam):
            from .ipam import reclaim
            ipam.use_snapshot = True
            ipam.snapshot = before = snapshots.load(path, ident)
            watch_path = reclaim.file_path(ic.lock_file)
            ipam.empty_watch = reclaim.load(watch_path)
            n0, hits0 = ipam.ds.requests, ipam.snapshot_hits
            try:
                return fn(ipam)
            finally:
                if ipam.snapshot is not None or before is not None:
                    snapshots.save(path, ipam.snapshot, ident)
                reclaim.save(watch_path, ipam.empty_watch)
                log.debug("etcd requests=%d (snapshot: %s)", ipam.ds.requests - n0,
                          "used" if ipam.snapshot_hits > hits0 else "warm" if before is not None else "none")
        return run

    def _request(self, env, conf, ic: IpamConfig, node: str):
        from .ipam.engine import AssignRequest
        args = env.args or {}
        return AssignRequest(
            handle_id=handle_id(conf.name, env.container_id or "", env.ifname or ""), node=node,
            legacy_handle_id=legacy_handle_id(conf.name, env.container_id or "", env.ifname or ""),
            network=conf.name, container_id=env.container_id or "", ifname=env.ifname or "",
            pod=args.get("K8S_POD_NAME", ""), namespace=args.get("K8S_POD_NAMESPACE", ""), pod_uid=args.get("K8S_POD_UID", ""),
            mode=ic.mode, assign_v4=ic.assign_ipv4, assign_v6=ic.assign_ipv6,
            v4_pools=ic.ipv4_pools, v6_pools=ic.ipv6_pools, gateways=ic.gateways, routed_prefix=ic.routed_prefix,
            annotation_prefix=ic.annotation_prefix, labels_from_etcd=ic.kubernetes is None)

    def _kube(self, ic: IpamConfig):
        """The Kubernetes client (only with a ``kubernetes`` section; imported only then)."""
        from .k8s import K8sError, client_from_config
        try:
            return client_from_config(ic.kubernetes, timeout=ic.timeout_seconds)
        except K8sError as e:
            raise CNIError(INVALID_CONFIG, f"ipam.kubernetes: {e.msg}") from None

    def _with_kubernetes(self, ic: IpamConfig, req, fn):
        """Run ``fn()`` with ``req`` filled from the Pod/Namespace (before) and the
        Node (lazily, from inside the engine), closing the API connection after."""
        from .ipam.annotations import from_kubernetes
        from .ipam.errors import IPAMError
        kube = self._kube(ic)
        try:
            try:
                from_kubernetes(req, kube, ic.annotation_prefix)
            except IPAMError as e:
                raise CNIError(e.code, e.msg, e.details) from None
            return fn()
        finally:
            log.debug("Kubernetes API requests: %s", ", ".join(kube.log) or "none")
            kube.close()

    def _run(self, ic: IpamConfig, fn, *, lock: bool = True):
        """Run ``fn(ipam)`` under the host lock, mapping engine errors to CNI errors."""
        from .datastore import DatastoreError, DatastoreUnavailable
        from .ipam.errors import IPAMError
        ipam = None
        try:
            ipam = self._ipam(ic)
            if lock:
                with self._locked(ic):
                    return fn(ipam)
            return fn(ipam)
        except IPAMError as e:
            raise CNIError(e.code, e.msg, e.details) from None
        except DatastoreUnavailable as e:
            raise CNIError(TRY_AGAIN, f"etcd unavailable: {e}") from None
        except DatastoreError as e:
            raise CNIError(TRY_AGAIN, f"etcd error: {e}") from None
        except LockTimeout as e:
            raise CNIError(TRY_AGAIN, str(e)) from None
        except LockUnusable as e:
            raise CNIError(TRY_AGAIN if e.transient else INVALID_CONFIG, str(e)) from None
        finally:
            if ipam is not None:
                ipam.ds.close()

    # -- verbs ---------------------------------------------------------------------
    def add(self, env, conf) -> dict:
        ic, node = self._setup(env, conf)
        req = self._request(env, conf, ic, node)
        req.requested = requested_ips(env, conf)
        # (with Kubernetes too: the engine plans from this request's pool choice, fresh from the
        # API, every time; the snapshot only stands in for etcd reads, each guarded by a compare)
        assign = self._with_snapshot(ic, node, conf.name, lambda ipam: ipam.assign(req))
        if ic.kubernetes is not None:
            res = self._with_kubernetes(ic, req, lambda: self._run(ic, assign))
        else:
            res = self._run(ic, assign)
        h = res.handle
        log.info("ADD %s -> %s%s (attempts %d)", h.id, ", ".join(str(a.interface) for a in h.addresses),
                 " (existing)" if res.existing else "", res.attempts)
        ips = [IPConfig(a.interface, a.gateway) for a in h.addresses]
        return render_result(conf.cni_version, ips, ic.routes, ic.dns)

    def delete(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        att = (conf.name, env.container_id or "", env.ifname or "")
        hid = handle_id(*att)
        h = self._run(ic, self._with_snapshot(ic, node, conf.name, lambda ipam: ipam.release(
            hid, legacy_id=legacy_handle_id(*att), attachment=att)))
        log.info("DEL %s -> %s", hid, ", ".join(str(a.ip) for a in h.addresses) if h else "nothing held")

    def check(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        att = (conf.name, env.container_id or "", env.ifname or "")
        hid = handle_id(*att)
        want = prev_result_ips(conf)

        def verify(ipam):
            h = ipam.find_attachment(*att)
            if h is None:
                raise CNIError(UNKNOWN_CONTAINER, f"no addresses are allocated to {hid}")
            problems = ipam.verify_handle(h)
            have = {str(a.ip) for a in h.addresses}
            if have != want:
                problems.append(f"allocated {sorted(have)} but prevResult has {sorted(want)}")
            if problems:
                raise CNIError(CHECK_MISMATCH, f"check failed for {hid}", "; ".join(problems))
        self._run(ic, verify, lock=False)

    def gc(self, env, conf) -> None:
        ic, node = self._setup(env, conf)
        if conf.valid_attachments is None:
            # never read a missing list as "nothing is valid": that would free the whole network
            raise CNIError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments (or cni.dev/attachments)")
        keep = set(conf.valid_attachments)   # (containerID, ifname): handles are matched by their records
        released, failed = self._run(ic, self._with_snapshot(ic, node, conf.name,
                                                             lambda ipam: ipam.gc(conf.name, node, keep)))
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
        try:
            ipam = self._ipam(ic)
            try:
                if ic.kubernetes is not None:
                    free = self._with_kubernetes(ic, req, lambda: ipam.free_pools(req))
                else:
                    free = ipam.free_pools(req)
            finally:
                ipam.ds.close()
        except DatastoreError as e:
            raise CNIError(UNAVAILABLE, f"etcd is not reachable: {e}") from None
        except IPAMError as e:
            raise CNIError(UNAVAILABLE, f"no usable pool: {e.msg}") from None
        if not free:
            raise CNIError(UNAVAILABLE, f"no free addresses: every usable pool for node {node} is full")


def run_plugin(environ=None, stdin=None, stdout=None) -> int:
    from .cni.skel import read_stdin, run
    environ = os.environ if environ is None else environ
    data = read_stdin(sys.stdin.buffer) if stdin is None else stdin
    return run(environ, data, stdout or sys.stdout, Plugin())

"""A pods + nodes cache over the Kubernetes API (the official ``kubernetes`` client).

list + watch, as an informer does: one paged list (``limit``/``continue``) gives the
objects and a ``resourceVersion``; a watch from that version streams the changes;
when the watch ends it is resumed from the last version seen; when the API says
that version is too old (410 Gone) the whole list is read again.  Only what the
controller needs is kept: pods as ``(namespace, name) -> (uid, nodeName)``, nodes as
``name -> uid``, StatefulSets (apps/v1) as ``(namespace, name) -> spec.replicas`` (for the
addresses kept for StatefulSet pods: ipam/sticky.py).  The JSON is parsed here
(``_preload_content=False``): the client's
model objects for 150,000 pods would cost minutes and gigabytes.

``synced`` is False until the first list of both kinds succeeded and again while a
watch cannot be re-established (the controller judges no leak from a cache that
may be stale); ``statefulsets_synced`` likewise for StatefulSets (not needed for ``synced``:
a controller without that RBAC rule still frees leaks).  ``get_pod`` / ``get_statefulset``
ask the API directly: the re-check just before a release.

RBAC: get/list/watch on pods and nodes, and on statefulsets (apps).
"""
from __future__ import annotations

import json
import threading
import time

from ..log import log

PAGE = 500
WATCH_SECONDS = 300   # the API server closes a watch after about this long anyway


class KubeError(Exception):
    pass


def api_client(kubeconfig: str | None):
    """An ``ApiClient`` from a kubeconfig file, else from in-cluster credentials.
    None when neither exists (the controller then runs without Kubernetes)."""
    import os

    from kubernetes import client, config
    try:
        if kubeconfig:
            return config.new_client_from_config(config_file=kubeconfig)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
    except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as e:
        raise KubeError(f"cannot load Kubernetes credentials{' from ' + kubeconfig if kubeconfig else ''}: "
                        f"{e}") from None
    return None


def _err(e: Exception) -> str:
    from kubernetes.client.rest import ApiException
    if isinstance(e, ApiException):
        msg = e.reason or ""
        try:
            msg = json.loads(e.body).get("message") or msg  # type: ignore[arg-type]  # (None: TypeError, caught)
        except (TypeError, ValueError, AttributeError):
            pass
        return f"HTTP {e.status}: {msg}"
    return f"{type(e).__name__}: {e}"


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class KubeCache:
    def __init__(self, api, *, timeout: float = 30.0):
        from kubernetes import client
        self.v1 = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.timeout = timeout
        self.pods: dict[tuple[str, str], tuple[str, str]] = {}
        self.nodes: dict[str, str] = {}
        self.statefulsets: dict[tuple[str, str], int] = {}
        self._ok = {"pods": False, "nodes": False, "statefulsets": False}
        self._failed = {"pods": False, "nodes": False, "statefulsets": False}   # an error since the start
        self.errors = 0                 # failed API calls (the errors metric)
        self.last_error = ""
        self.requests = 0               # list pages + watches + gets
        self.relists = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict = {}
        self._lock = threading.Lock()

    @property
    def synced(self) -> bool:
        return self._ok["pods"] and self._ok["nodes"]

    @property
    def statefulsets_synced(self) -> bool:
        return self._ok.get("statefulsets", False)

    # -- list + watch ------------------------------------------------------------------
    def _list_fn(self, kind):
        if kind == "statefulsets":
            return self.apps.list_stateful_set_for_all_namespaces
        return self.v1.list_pod_for_all_namespaces if kind == "pods" else self.v1.list_node

    @staticmethod
    def _entry(kind, obj):
        md = obj.get("metadata") or {}
        if kind == "pods":
            return (md.get("namespace", ""), md.get("name", "")), (md.get("uid") or "",
                                                                  (obj.get("spec") or {}).get("nodeName") or "")
        if kind == "statefulsets":
            replicas = (obj.get("spec") or {}).get("replicas")
            return (md.get("namespace", ""), md.get("name", "")), (replicas if isinstance(replicas, int) else 1)
        return md.get("name", ""), md.get("uid") or ""

    def list_once(self, kind: str) -> str:
        """Read every object of ``kind`` (paged); replace the cache; return the list's resourceVersion."""
        import gc
        was = gc.isenabled()
        gc.disable()            # (see Reconciler.run: no cycles here, and a big list to parse)
        try:
            return self._list_once(kind)
        finally:
            if was:
                gc.enable()

    def _list_once(self, kind: str) -> str:
        fn = self._list_fn(kind)
        out: dict = {}
        cont = None
        rv = ""
        while True:
            kw = {"limit": PAGE, "_preload_content": False, "_request_timeout": self.timeout}
            if cont:
                kw["_continue"] = cont
            self.requests += 1
            resp = fn(**kw)
            data = json.loads(resp.data)
            for obj in data.get("items") or ():
                k, v = self._entry(kind, obj)
                out[k] = v
            md = data.get("metadata") or {}
            cont = md.get("continue")
            rv = md.get("resourceVersion") or rv
            if not cont:
                break
        with self._lock:
            setattr(self, kind, out)
        self.relists += 1
        return rv

    def _watch(self, kind: str, rv: str) -> str:
        """Follow changes from ``rv`` until the watch ends; return the last version seen."""
        fn = self._list_fn(kind)
        self.requests += 1
        resp = fn(watch=True, resource_version=rv, timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True,
                  _preload_content=False, _request_timeout=(self.timeout, WATCH_SECONDS + 30))
        self._watches[kind] = resp
        try:
            buf = b""
            for chunk in resp.stream(64 * 1024, decode_content=False):
                if self._stop.is_set():
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        rv = self._event(kind, json.loads(line), rv)
        finally:
            self._watches.pop(kind, None)
            resp.release_conn()
        return rv

    def _event(self, kind: str, ev: dict, rv: str) -> str:
        typ, obj = ev.get("type"), ev.get("object") or {}
        if typ == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(obj.get("message", "too old resource version"))
            raise KubeError(f"watch {kind}: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        new_rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
        if typ == "BOOKMARK":
            return new_rv
        k, v = self._entry(kind, obj)
        with self._lock:
            cache = getattr(self, kind)
            if typ == "DELETED":
                cache.pop(k, None)
            elif typ in ("ADDED", "MODIFIED"):
                cache[k] = v
        return new_rv

    def _loop(self, kind: str) -> None:
        rv = ""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self.list_once(kind)
                    log.info("controller: listed %d %s (resourceVersion %s)", len(getattr(self, kind)), kind, rv)
                self._ok[kind] = True
                rv = self._watch(kind, rv)
                backoff = 0.2
            except _Gone as e:
                log.info("controller: watch %s: %s; listing again", kind, e)
                rv = ""
            except Exception as e:  # noqa: BLE001 - an API outage: back off, never crash
                if self._stop.is_set():
                    return
                from kubernetes.client.rest import ApiException
                if isinstance(e, ApiException) and e.status == 410:
                    rv = ""
                    continue
                self.errors += 1
                self.last_error = f"Kubernetes API: {kind}: {_err(e)}"
                self._ok[kind] = False
                self._failed[kind] = True
                rv = ""   # the cache may have missed changes: list again once the API answers
                log.warning("controller: %s; retrying in %.1fs", self.last_error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def start(self) -> "KubeCache":
        for kind in ("pods", "nodes", "statefulsets"):
            t = threading.Thread(target=self._loop, args=(kind,), name=f"watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait_synced(self, timeout: float) -> bool:
        """Wait for pods and nodes (and StatefulSets, unless their list failed: no RBAC rule)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set() and not (
                self.synced and (self._ok.get("statefulsets") or self._failed["statefulsets"])):
            time.sleep(0.05)
        return self.synced

    def stop(self) -> None:
        self._stop.set()
        for resp in list(self._watches.values()):
            try:
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
            except Exception:  # noqa: BLE001
                pass
        for t in self._threads:
            t.join(timeout=2)

    # -- reads -----------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            return self.pods, self.nodes

    def statefulset_replicas(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.statefulsets)

    def _get_raw(self, what: str, namespace: str, name: str, read) -> dict | None:
        """One object straight from the API (not the cache) as its JSON; None when it does not
        exist.  Raises KubeError when the API cannot say."""
        from kubernetes.client.rest import ApiException
        self.requests += 1
        try:
            resp = read(name, namespace, _preload_content=False, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            self.errors += 1
            raise KubeError(f"Kubernetes API: get {what} {namespace}/{name}: {_err(e)}") from None
        except Exception as e:  # noqa: BLE001 - unreachable, TLS, timeout
            self.errors += 1
            raise KubeError(f"Kubernetes API: get {what} {namespace}/{name}: {_err(e)}") from None
        return json.loads(resp.data)

    def get_statefulset(self, namespace: str, name: str) -> int | None:
        """The StatefulSet's spec.replicas straight from the API; None when it does not exist.
        Raises KubeError when the API cannot say."""
        obj = self._get_raw("statefulset", namespace, name, self.apps.read_namespaced_stateful_set)
        return None if obj is None else self._entry("statefulsets", obj)[1]

    def get_pod(self, namespace: str, name: str) -> str | None:
        """The pod's uid straight from the API (not the cache); None when it does not exist.
        Raises KubeError when the API cannot say."""
        obj = self._get_raw("pod", namespace, name, self.v1.read_namespaced_pod)
        return None if obj is None else (obj.get("metadata") or {}).get("uid") or ""

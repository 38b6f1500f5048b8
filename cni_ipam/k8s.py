"""A small Kubernetes API client: GET/list Pods, Namespaces, Nodes.

Standard library HTTP + ssl, PyYAML for kubeconfig files (only when the file is
not JSON).  Not the ``kubernetes`` package: its import alone costs about a
second per pod start, and the plugin needs three GETs at most.

Credentials, as kubectl reads them:

* a kubeconfig: the ``current-context`` (or the one named), its cluster
  (``server``, ``certificate-authority`` / ``-data``,
  ``insecure-skip-tls-verify``) and user (``token`` / ``tokenFile``,
  ``client-certificate`` / ``-data`` + ``client-key`` / ``-data``); relative
  paths are relative to the kubeconfig's directory;
* in-cluster: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service account's
  ``token`` and ``ca.crt``.

Every error is a :class:`K8sError` naming the request, the object and (for an
answer) the HTTP status and the API's own message.
"""
from __future__ import annotations

import base64
import builtins  # (list[...] in class KubeClient, which has a list method)
import http.client
import json
import os
import socket
import ssl
import tempfile
import time
from urllib.parse import quote, urlencode, urlsplit

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class K8sError(Exception):
    """A failed Kubernetes API call (or unusable credentials, when ``status`` is None
    and ``config_error`` is set)."""

    def __init__(self, msg: str, *, status: int | None = None, reason: str = "", what: str = "",
                 transient: bool = False, config_error: bool = False):
        super().__init__(msg)
        self.msg = msg
        self.status = status
        self.reason = reason
        self.what = what
        self.transient = transient          # worth retrying later (unreachable, timeout, 5xx, 429)
        self.config_error = config_error    # the kubeconfig / credentials cannot be used


class NotFound(K8sError):
    pass


def annotations(obj: dict | None) -> dict:  # type: ignore[no-redef]  # (the __future__ name)
    md = (obj or {}).get("metadata") or {}
    return md.get("annotations") or {}


def labels(obj: dict | None) -> dict:
    md = (obj or {}).get("metadata") or {}
    return md.get("labels") or {}


def _config_error(msg: str) -> K8sError:
    return K8sError(msg, config_error=True)


class KubeClient:
    """One keep-alive connection to the API server; ``get`` returns decoded JSON."""

    def __init__(self, server: str, *, ca_file: str | None = None, ca_data: bytes | None = None,
                 token: str | None = None, token_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 cert_data: bytes | None = None, key_data: bytes | None = None,
                 insecure: bool = False, timeout: float = 10.0, source: str = ""):
        u = urlsplit(server)
        if u.scheme not in ("https", "http") or not u.hostname:
            raise _config_error(f"Kubernetes server {server!r} is not an https:// URL")
        self.server = server
        self.source = source or server
        self.scheme = u.scheme
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base_path = u.path.rstrip("/")
        self.timeout = float(timeout)
        self.token = token
        self.token_file = token_file
        self.requests = 0               # API requests sent (tests count them)
        self.log: list[str] = []        # paths requested, in order
        self._conn: http.client.HTTPConnection | None = None
        self._ctx = None
        if self.scheme == "https":
            self._ctx = self._ssl_context(ca_file, ca_data, cert_file, key_file, cert_data, key_data, insecure)

    # -- construction ------------------------------------------------------------
    def _ssl_context(self, ca_file, ca_data, cert_file, key_file, cert_data, key_data, insecure):
        try:
            if insecure:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif ca_file or ca_data:
                ctx = ssl.create_default_context(
                    cafile=ca_file, cadata=ca_data.decode("ascii", "replace") if ca_data else None)
            else:
                ctx = ssl.create_default_context()
        except (OSError, ssl.SSLError, ValueError) as e:
            raise _config_error(f"{self.source}: cannot load the cluster CA "
                                f"({ca_file or 'certificate-authority-data'}): {e}") from None
        if cert_file or cert_data or key_file or key_data:
            if not ((cert_file or cert_data) and (key_file or key_data)):
                raise _config_error(f"{self.source}: a client certificate needs both a certificate and a key")
            tmp = []
            try:
                if cert_data:
                    cert_file = _secret_file(cert_data, tmp)
                if key_data:
                    key_file = _secret_file(key_data, tmp)
                ctx.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as e:
                raise _config_error(f"{self.source}: cannot load the client certificate/key: {e}") from None
            finally:
                for p in tmp:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        return ctx

    @classmethod
    def from_kubeconfig(cls, path: str, *, timeout: float = 10.0, context: str | None = None) -> "KubeClient":
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise _config_error(f"kubeconfig {path}: cannot read it: {e.strerror}") from None
        cfg = _load_kubeconfig(raw, path)
        base = os.path.dirname(os.path.abspath(path))

        def named(section: str, name: str) -> dict:
            for item in cfg.get(section) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    body = item.get(section[:-1])
                    if not isinstance(body, dict):
                        raise _config_error(f"kubeconfig {path}: {section[:-1]} {name!r} has no {section[:-1]} map")
                    return body
            raise _config_error(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

        ctx_name = context or cfg.get("current-context")
        if not ctx_name:
            raise _config_error(f"kubeconfig {path}: no current-context")
        ctx = named("contexts", ctx_name)
        if not ctx.get("cluster"):
            raise _config_error(f"kubeconfig {path}: context {ctx_name!r} names no cluster")
        cluster = named("clusters", ctx["cluster"])
        user = named("users", ctx["user"]) if ctx.get("user") else {}
        server = cluster.get("server")
        if not isinstance(server, str) or not server:
            raise _config_error(f"kubeconfig {path}: cluster {ctx['cluster']!r} has no server")

        def p(v):
            if v is None:
                return None
            if not isinstance(v, str):
                raise _config_error(f"kubeconfig {path}: a path must be a string, not {v!r}")
            return v if os.path.isabs(v) else os.path.join(base, v)

        def data(section: dict, key: str) -> bytes | None:
            v = section.get(key)
            if v is None:
                return None
            try:
                return base64.b64decode(v, validate=True)
            except (ValueError, TypeError):
                raise _config_error(f"kubeconfig {path}: {key} is not valid base64") from None

        unsupported = [k for k in ("exec", "auth-provider", "username") if user.get(k)]
        if unsupported and not (user.get("token") or user.get("tokenFile") or user.get("client-certificate")
                                or user.get("client-certificate-data")):
            raise _config_error(f"kubeconfig {path}: user auth by {unsupported[0]!r} is not supported "
                                f"(use a token, tokenFile or a client certificate)")
        insecure = cluster.get("insecure-skip-tls-verify") in (True, "true")
        return cls(server, ca_file=None if insecure else p(cluster.get("certificate-authority")),
                   ca_data=None if insecure else data(cluster, "certificate-authority-data"),
                   token=user.get("token"), token_file=p(user.get("tokenFile")),
                   cert_file=p(user.get("client-certificate")), key_file=p(user.get("client-key")),
                   cert_data=data(user, "client-certificate-data"), key_data=data(user, "client-key-data"),
                   insecure=insecure, timeout=timeout, source=f"kubeconfig {path}")

    @classmethod
    def in_cluster(cls, *, timeout: float = 10.0, sa_dir: str = SERVICE_ACCOUNT_DIR,
                   environ=None) -> "KubeClient":
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = os.path.join(sa_dir, "token")
        if not host or not os.path.exists(token_file):
            raise _config_error("not running in a Kubernetes cluster (KUBERNETES_SERVICE_HOST or the "
                                f"service account token {token_file} is missing) and no kubeconfig is set")
        if ":" in host:
            host = f"[{host}]"
        ca = os.path.join(sa_dir, "ca.crt")
        return cls(f"https://{host}:{port}", ca_file=ca if os.path.exists(ca) else None,
                   token_file=token_file, timeout=timeout, source="in-cluster service account")

    # -- requests ----------------------------------------------------------------
    def _bearer(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            # read on every request: service-account tokens are rotated
            try:
                with open(self.token_file) as f:
                    return f.read().strip()
            except OSError as e:
                raise _config_error(f"{self.source}: cannot read token file {self.token_file}: {e.strerror}") from None
        return None

    def _connect(self, timeout: float):
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path: str, what: str = "", query: dict | None = None) -> dict:
        """GET ``path`` (e.g. ``/api/v1/nodes/n1``); raises NotFound for 404, K8sError otherwise."""
        return self.request("GET", path, what, query)

    def post(self, path: str, obj: dict, what: str = "") -> dict:
        """POST the JSON ``obj`` to ``path`` (e.g. a TokenRequest); 200/201 -> the decoded answer."""
        return self.request("POST", path, what, None, json.dumps(obj).encode())

    def request(self, method: str, path: str, what: str = "", query: dict | None = None,
                body: bytes | None = None) -> dict:
        what = what or path
        url = self.base_path + path + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json", "User-Agent": "cni-ipam"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        tok = self._bearer()
        if tok:
            headers["Authorization"] = "Bearer " + tok
        deadline = time.monotonic() + self.timeout
        self.requests += 1
        self.log.append(path)
        for attempt in (1, 2):   # a kept-alive connection the server closed: reconnect once
            fresh = self._conn is None
            if fresh:
                self._conn = self._connect(max(0.1, deadline - time.monotonic()))
            try:
                self._conn.request(method, url, body=body, headers=headers)  # type: ignore[union-attr]
                resp = self._conn.getresponse()  # type: ignore[union-attr]
                answer = resp.read()
                status = resp.status
                if resp.will_close:
                    self.close()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self.close()
                if fresh or attempt == 2 or time.monotonic() >= deadline:
                    raise K8sError(f"Kubernetes API {self.server}: {method} {what}: connection lost: {e}",
                                   what=what, transient=True) from None
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise K8sError(f"Kubernetes API {self.server}: {method} {what}: TLS verification failed: "
                               f"{e.verify_message or e.reason} (check the cluster CA in the {self.source})",
                               what=what, config_error=True) from None
            except (socket.timeout, TimeoutError):
                self.close()
                raise K8sError(f"Kubernetes API {self.server}: {method} {what}: no answer within "
                               f"{self.timeout:g}s", what=what, transient=True) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise K8sError(f"Kubernetes API {self.server}: {method} {what}: {e}", what=what,
                               transient=True) from None
        if status in (200, 201):
            try:
                return json.loads(answer)
            except ValueError:
                raise K8sError(f"Kubernetes API {self.server}: {method} {what}: the answer is not JSON",
                               status=status, what=what, transient=True) from None
        reason, message = "", ""
        try:
            st = json.loads(answer)
            if isinstance(st, dict):
                reason, message = str(st.get("reason") or ""), str(st.get("message") or "")
        except ValueError:
            message = answer[:200].decode("utf-8", "replace").strip()
        label = f"HTTP {status} {reason or http.client.responses.get(status, '')}".rstrip()
        msg = f"Kubernetes API {self.server}: {method} {what}: {label}" + (f": {message}" if message else "")
        if status == 401:
            msg += f" (check the token or client certificate in the {self.source})"
        cls = NotFound if status == 404 else K8sError
        raise cls(msg, status=status, reason=reason, what=what,
                  transient=status == 429 or status >= 500, config_error=status in (401, 403))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- objects -----------------------------------------------------------------
    def get_namespace(self, ns: str) -> dict:
        return self.get(f"/api/v1/namespaces/{_q(ns)}", f"namespace {ns}")

    def get_pod(self, ns: str, name: str) -> dict | None:
        """The pod, or None when it does not exist (yet)."""
        try:
            return self.get(f"/api/v1/namespaces/{_q(ns)}/pods/{_q(name)}", f"pod {ns}/{name}")
        except NotFound:
            return None

    def get_node(self, name: str) -> dict:
        return self.get(f"/api/v1/nodes/{_q(name)}", f"node {name}")

    def list(self, path: str, what: str, page: int = 500) -> list[dict]:
        """Every item of a list endpoint, following ``continue`` tokens."""
        items: list[dict] = []
        cont = None
        while True:
            q = {"limit": page}
            if cont:
                q["continue"] = cont
            res = self.get(path, what, q)
            items.extend(res.get("items") or [])
            cont = (res.get("metadata") or {}).get("continue")
            if not cont:
                return items

    def list_pods(self, namespace: str | None = None) -> "builtins.list[dict]":
        if namespace:
            return self.list(f"/api/v1/namespaces/{_q(namespace)}/pods", f"pods in namespace {namespace}")
        return self.list("/api/v1/pods", "pods")

    def list_namespaces(self) -> "builtins.list[dict]":
        return self.list("/api/v1/namespaces", "namespaces")

    def list_nodes(self) -> "builtins.list[dict]":
        return self.list("/api/v1/nodes", "nodes")


def _q(name: str) -> str:
    return quote(name, safe="")


def _secret_file(data: bytes, created: list) -> str:
    fd, path = tempfile.mkstemp(prefix="cni-ipam-k8s-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    created.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _load_kubeconfig(raw: bytes, path: str) -> dict:
    text = raw.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            cfg = json.loads(text)
        except ValueError as e:
            raise _config_error(f"kubeconfig {path}: invalid JSON: {e}") from None
    else:
        import yaml
        try:
            cfg = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as e:
            raise _config_error(f"kubeconfig {path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise _config_error(f"kubeconfig {path}: not a kubeconfig (expected a map)")
    return cfg


def client_from_config(section: dict, *, timeout: float = 10.0) -> KubeClient:
    """The client for an ipam ``kubernetes`` section: ``kubeconfig`` when set, else in-cluster."""
    kc = section.get("kubeconfig")
    if kc:
        return KubeClient.from_kubeconfig(kc, timeout=timeout, context=section.get("context") or None)
    return KubeClient.in_cluster(timeout=timeout)

"""The plugin's Kubernetes credentials on a node: a kubeconfig written by ``cni-ipam install``.

The install container (the DaemonSet's) has its service account's files
(``token``, ``ca.crt``, ``namespace`` under ``/var/run/secrets/kubernetes.io/serviceaccount``)
and ``KUBERNETES_SERVICE_HOST``/``_PORT``.  The plugin runs on the host, outside any pod, so
the install container writes a kubeconfig (mode 0600, JSON: the plugin reads it without PyYAML)
holding the API server address, the cluster CA (inline) and a bearer token:

* a **TokenRequest** token (``POST .../serviceaccounts/<sa>/token``) for the pod's own service
  account, ``--token-ttl`` long (default 24 h), not bound to the pod: it stays valid for a while
  when the DaemonSet pod is gone (upgrade, eviction) and the plugin keeps working;
* the **mounted token** when the API does not allow that (no RBAC for ``serviceaccounts/token``,
  an API without the subresource): its expiry comes from the token's own ``exp`` claim.

:class:`TokenKeeper` decides when to write it again: at 1/4 of the remaining lifetime (plus up to
10 % jitter, never sooner than ``min_interval``), and at once when the projected token or the CA
file changes (kubelet rotates projected tokens at 80 % of their life) or the kubeconfig vanished.
This is the model of Calico's install-cni token watch.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import random
import time

from ..k8s import SERVICE_ACCOUNT_DIR, K8sError, KubeClient

REFRESH_FRACTION = 0.25       # refresh when this fraction of the remaining lifetime has passed


class CredentialsError(Exception):
    pass


def jwt_claims(token: str) -> dict:
    """The (unverified) claims of a JWT; {} when it is not one."""
    try:
        part = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, TypeError):
        return {}


def service_account_of(token: str, sa_dir: str, environ=None) -> tuple[str, str]:
    """(namespace, name) of the service account: env ``CNI_IPAM_SERVICE_ACCOUNT`` /
    ``POD_NAMESPACE`` first, else the token's ``sub`` claim (``system:serviceaccount:NS:NAME``)."""
    env = os.environ if environ is None else environ
    ns = env.get("POD_NAMESPACE", "").strip()
    name = env.get("CNI_IPAM_SERVICE_ACCOUNT", "").strip()
    sub = str(jwt_claims(token).get("sub") or "")
    if sub.startswith("system:serviceaccount:") and sub.count(":") == 3:
        _, _, sns, sname = sub.split(":")
        ns, name = ns or sns, name or sname
    if not ns:
        try:
            with open(os.path.join(sa_dir, "namespace")) as f:
                ns = f.read().strip()
        except OSError:
            pass
    return ns, name


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(s: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def file_digest(*paths: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"\0missing")
        h.update(b"\0")
    return h.hexdigest()


def write_private(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` atomically (temp file in the same dir, created with ``mode``, then rename)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.new-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


class TokenKeeper:
    """Writes and refreshes the plugin's kubeconfig from the in-cluster credentials."""

    def __init__(self, kubeconfig: str, *, sa_dir: str = SERVICE_ACCOUNT_DIR, token_ttl: int = 86400,
                 min_interval: float = 5.0, environ=None, log=print, timeout: float = 10.0):
        self.path = kubeconfig
        self.sa_dir = sa_dir
        self.token_ttl = int(token_ttl)
        self.min_interval = float(min_interval)
        self.env = os.environ if environ is None else environ
        self.log = log
        self.timeout = timeout
        self.token_file = os.path.join(sa_dir, "token")
        self.ca_file = os.path.join(sa_dir, "ca.crt")
        self.source = ""                 # "TokenRequest" | "mounted token"
        self.expires: float | None = None
        self.next_refresh: float = 0.0
        self.writes = 0
        self._seen = ""                  # digest of the token + CA files at the last write

    # -- inputs ------------------------------------------------------------------
    def server(self) -> str:
        host = self.env.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = self.env.get("KUBERNETES_SERVICE_PORT", "443").strip() or "443"
        if not host:
            raise CredentialsError("KUBERNETES_SERVICE_HOST is not set: the kubeconfig is written from the pod's "
                                   "in-cluster credentials (run install as the DaemonSet does, or leave out "
                                   "--kubeconfig)")
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{port}"

    def _read(self, path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise CredentialsError(f"cannot read the service account's {what} {path}: {e.strerror}") from None

    # -- the work ----------------------------------------------------------------
    def request_token(self, server: str, mounted: str) -> tuple[str, float | None, str]:
        """(token, expiry, source): TokenRequest when the API allows it, else the mounted token."""
        ns, name = service_account_of(mounted, self.sa_dir, self.env)
        why = ""
        if ns and name:
            try:
                with KubeClient(server, ca_file=self.ca_file, token=mounted, timeout=self.timeout,
                                source="service account") as c:
                    ans = c.post(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}/token",
                                 {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                  "spec": {"expirationSeconds": self.token_ttl}},
                                 what=f"TokenRequest for serviceaccount {ns}/{name}")
                st = ans.get("status") or {}
                tok = st.get("token")
                if isinstance(tok, str) and tok:
                    exp = _parse_time(str(st.get("expirationTimestamp") or ""))
                    return tok, exp, "TokenRequest"
                why = "the TokenRequest answer holds no token"
            except K8sError as e:
                why = e.msg
        else:
            why = "the service account is unknown (no sub claim in the token, no CNI_IPAM_SERVICE_ACCOUNT)"
        exp = jwt_claims(mounted).get("exp")
        return mounted, float(exp) if isinstance(exp, (int, float)) else None, f"mounted token ({why})"

    def write(self, reason: str = "") -> None:
        server = self.server()
        mounted = self._read(self.token_file, "token").decode().strip()
        ca = self._read(self.ca_file, "CA")
        seen = file_digest(self.token_file, self.ca_file)
        token, exp, source = self.request_token(server, mounted)
        cfg = {"apiVersion": "v1", "kind": "Config",
               "clusters": [{"name": "local", "cluster": {
                   "server": server, "certificate-authority-data": base64.b64encode(ca).decode()}}],
               "users": [{"name": "cni-ipam", "user": {"token": token}}],
               "contexts": [{"name": "cni-ipam", "context": {"cluster": "local", "user": "cni-ipam"}}],
               "current-context": "cni-ipam"}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_private(self.path, (json.dumps(cfg, indent=2) + "\n").encode())
        now = time.time()
        self.source, self.expires, self._seen = source, exp, seen
        self.writes += 1
        if exp is None:
            self.next_refresh = now + 3600.0
        else:
            wait = max(0.0, exp - now) * REFRESH_FRACTION * (1 + random.uniform(0, 0.1))
            self.next_refresh = now + max(self.min_interval, wait)
        until = f"valid until {_iso(exp)}" if exp else "expiry unknown"
        self.log(f"kubeconfig: {self.path} written ({source}; {until}; next refresh "
                 f"{_iso(self.next_refresh)}){' -- ' + reason if reason else ''}")

    def due(self, now: float | None = None) -> str | None:
        """Why the kubeconfig must be written again now, or None."""
        now = time.time() if now is None else now
        if not os.path.exists(self.path):
            return "it was missing"
        if file_digest(self.token_file, self.ca_file) != self._seen:
            return "the service account token or CA changed"
        if now >= self.next_refresh:
            return "refresh before expiry"
        return None

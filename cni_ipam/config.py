"""The ``ipam`` section of a network config, typed and validated.

Wrong types raise ``ConfigError`` (the plugin reports CNI code 7); unknown keys
are ignored -- a config written for a newer version still works -- with a warning
naming the closest known key (stderr, and the log file once it is open: a typo such
as ``etcd_endpoint`` must not go unnoticed).  stdout is never written (CNI protocol).
"""
from __future__ import annotations

from cni_ipam import ipnet  # addresses without importing ipaddress (issue 17)
import os
from cni_ipam._records import dataclass, field

from .constants import DEFAULT_ANNOTATION_PREFIX, DEFAULT_ENDPOINTS, DEFAULT_PREFIX, is_dns_subdomain
from .datastore.base import EndpointError, parse_endpoint
from .log import log

DEFAULT_LOCK_FILE = "/var/run/cni-ipam/ipam.lock"
DEFAULT_LOG_FILE = "/var/log/cni-ipam/cni-ipam.log"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    pass


@dataclass
class IpamConfig:
    type: str = "cni-ipam"
    etcd_endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINTS])
    etcd_prefix: str = DEFAULT_PREFIX
    etcd_ca_cert_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_password_file: str | None = None
    nodename: str = ""
    nodename_file: str | None = None
    assign_ipv4: bool = True
    assign_ipv6: bool = False
    ipv4_pools: list[str] | None = None
    ipv6_pools: list[str] | None = None
    routes: list[dict] = field(default_factory=list)
    dns: dict | None = None
    mode: str = "bridge"
    routed_prefix: str = "host"   # routed mode: "host" (/32, /128) or "block" (Debian's ptp <= 1.1 needs it)
    gateway: list = field(default_factory=list)   # routed mode gateways, one per family
    lock_file: str = DEFAULT_LOCK_FILE
    log_file: str | None = DEFAULT_LOG_FILE
    log_level: str = "info"
    timeout_seconds: float = 10.0
    lock_timeout_seconds: float = 120.0   # a node-reboot burst queues many ADDs behind the host lock
    annotation_prefix: str = DEFAULT_ANNOTATION_PREFIX
    kubernetes: dict | None = None

    @property
    def gateways(self) -> dict:
        return {g.version: g for g in self.gateway}

    def password(self) -> str | None:
        if self.etcd_password is not None:
            return self.etcd_password
        if self.etcd_password_file:
            try:
                with open(self.etcd_password_file) as f:
                    return f.read().strip()
            except OSError as e:
                raise ConfigError(f"etcd_password_file: cannot read {self.etcd_password_file}: {e.strerror}") from None
        return None


#: every key of the ipam section (IpamConfig's fields)
_KNOWN_KEYS = ("type", "etcd_endpoints", "etcd_prefix", "etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file",
               "etcd_username", "etcd_password", "etcd_password_file", "nodename", "nodename_file", "assign_ipv4",
               "assign_ipv6", "ipv4_pools", "ipv6_pools", "routes", "dns", "mode", "routed_prefix", "gateway",
               "lock_file", "log_file", "log_level", "timeout_seconds", "lock_timeout_seconds",
               "annotation_prefix", "kubernetes")


def _unknown_key(where: str, k, known) -> None:
    """Warn about an ignored key, with the known key it probably meant (difflib only here)."""
    import difflib
    key = str(k)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or [
        n for n in known if n.lower() == key.lower()]
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    log.warning("%s: unknown key %r is ignored (%s)", where, key[:80], hint)


def _str(k, v):
    if not isinstance(v, str):
        raise ConfigError(f"ipam.{k} must be a string, not {type(v).__name__}")
    return v


def _bool(k, v):
    # Calico's configs carry "true"/"false" strings; accept both forms.
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ConfigError(f"ipam.{k} must be a boolean, not {v!r}")


def _str_list(k, v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"ipam.{k} must be a list of strings")
    return v


def _routes(k, v):
    if not isinstance(v, list):
        raise ConfigError(f"ipam.{k} must be a list")
    out = []
    for r in v:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise ConfigError(f"ipam.{k}: each route must be an object with a string 'dst'")
        try:
            ipnet.ip_network(r["dst"], strict=False)
            if r.get("gw") is not None:
                ipnet.ip_address(_str(k + ".gw", r["gw"]))
        except ValueError as e:
            raise ConfigError(f"ipam.{k}: {e}") from None
        out.append(dict(r))
    return out


def _annotation_prefix(k, v):
    # an annotation key's prefix is a DNS subdomain (Kubernetes' rule), e.g. cni.projectcalico.org
    v = _str(k, v)
    if not is_dns_subdomain(v):
        raise ConfigError(f"ipam.{k} must be a DNS subdomain like 'cni.projectcalico.org', not {v!r}")
    return v


def _kubernetes(k, v):
    """``{kubeconfig?: PATH, context?: NAME}``; without kubeconfig: in-cluster credentials."""
    if not isinstance(v, dict):
        raise ConfigError(f"ipam.{k} must be an object")
    out = {}
    for kk, vv in v.items():
        if vv is None:
            continue
        if kk in ("kubeconfig", "context"):
            if not isinstance(vv, str) or not vv:
                raise ConfigError(f"ipam.{k}.{kk} must be a non-empty string")
            out[kk] = vv
        else:
            _unknown_key(f"ipam.{k}", kk, ("kubeconfig", "context"))
    return out


def _check_endpoint(e: str) -> None:
    """``http(s)://host[:port][/path]`` with a host and a valid port; no credentials in it
    (datastore.base.parse_endpoint: the rule the transports use)."""
    try:
        parse_endpoint(e)
    except EndpointError as err:
        if err.credentials:  # never echo this one: it holds credentials
            raise ConfigError("ipam.etcd_endpoints: credentials in an endpoint URL are not allowed; "
                              "use etcd_username and etcd_password (or etcd_password_file)") from None
        raise ConfigError(f"ipam.etcd_endpoints: {err}") from None


def parse_ipam_config(ipam: dict) -> IpamConfig:
    if not isinstance(ipam, dict):
        raise ConfigError("ipam must be an object")
    c = IpamConfig()
    for k, v in ipam.items():
        if v is None:
            continue
        if k == "type":
            c.type = _str(k, v)
        elif k == "etcd_endpoints":
            if isinstance(v, list):
                eps = _str_list(k, v)
            else:
                eps = [e.strip() for e in _str(k, v).split(",") if e.strip()]
            if not eps:
                raise ConfigError("ipam.etcd_endpoints is empty")
            for e in eps:
                _check_endpoint(e)
            c.etcd_endpoints = eps
        elif k in ("etcd_prefix", "etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file", "etcd_username",
                   "etcd_password", "etcd_password_file", "nodename", "nodename_file", "lock_file",
                   "log_file"):
            setattr(c, k, _str(k, v))
            if k == "lock_file" and (not c.lock_file.strip() or c.lock_file.endswith("/")):
                raise ConfigError(f"ipam.lock_file must be a file path, not {c.lock_file!r}")
        elif k in ("assign_ipv4", "assign_ipv6"):
            setattr(c, k, _bool(k, v))
        elif k in ("ipv4_pools", "ipv6_pools"):
            setattr(c, k, _str_list(k, v) or None)
        elif k == "routes":
            c.routes = _routes(k, v)
        elif k == "dns":
            if not isinstance(v, dict):
                raise ConfigError("ipam.dns must be an object")
            c.dns = v
        elif k == "mode":
            if v not in ("bridge", "routed"):
                raise ConfigError(f"ipam.mode must be 'bridge' or 'routed', not {v!r}")
            c.mode = v
        elif k == "routed_prefix":
            if v not in ("host", "block"):
                raise ConfigError(f"ipam.routed_prefix must be 'host' or 'block', not {v!r}")
            c.routed_prefix = v
        elif k == "gateway":
            gws = [v] if isinstance(v, str) else _str_list(k, v)
            try:
                c.gateway = [ipnet.ip_address(g) for g in gws]
            except ValueError as e:
                raise ConfigError(f"ipam.gateway: {e}") from None
            if len({g.version for g in c.gateway}) != len(c.gateway):
                raise ConfigError("ipam.gateway: at most one gateway per IP family")
        elif k == "log_level":
            if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
                raise ConfigError(f"ipam.log_level must be one of {', '.join(LOG_LEVELS)}")
            c.log_level = v.lower()
        elif k in ("timeout_seconds", "lock_timeout_seconds"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
                raise ConfigError(f"ipam.{k} must be a number between 0 and 3600")
            setattr(c, k, float(v))
        elif k == "annotation_prefix":
            c.annotation_prefix = _annotation_prefix(k, v)
        elif k == "kubernetes":
            c.kubernetes = _kubernetes(k, v)
        else:
            _unknown_key("ipam", k, _KNOWN_KEYS)
    if (c.etcd_cert_file is None) != (c.etcd_key_file is None):
        raise ConfigError("ipam.etcd_cert_file and ipam.etcd_key_file must be given together")
    if (c.etcd_username is None) != (c.etcd_password is None and c.etcd_password_file is None):
        raise ConfigError("ipam.etcd_username and ipam.etcd_password (or etcd_password_file) "
                          "must be given together")
    if not c.etcd_prefix.startswith("/"):
        raise ConfigError("ipam.etcd_prefix must start with '/'")
    return c


def node_name(c: IpamConfig) -> str:
    """``nodename`` > contents of ``nodename_file`` > the host name."""
    if c.nodename:
        return c.nodename
    if c.nodename_file:
        try:
            with open(c.nodename_file, "rb") as f:
                name = f.read(4096).decode("utf-8").strip()
        except OSError as e:
            raise ConfigError(f"ipam.nodename_file: cannot read {c.nodename_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"ipam.nodename_file: {c.nodename_file} does not hold a UTF-8 node name") from None
        if name:
            return name
    from _socket import gethostname  # = socket.gethostname, without socket's import cost
    return os.environ.get("NODENAME") or gethostname()

"""Shared pieces of the admin CLI: connecting to etcd, output formats, errors.

Connection settings, strongest first: explicit flags > ``--cni-conf FILE`` (the
``ipam`` section of a network config / conflist, so the CLI sees exactly the
store the plugin uses) > environment variables > defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from cni_ipam._records import dataclass, field

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
DEFAULT_PREFIX = "/cni-ipam"
DEFAULT_TIMEOUT = 10.0
OUTPUT_FORMATS = ("table", "json", "yaml")
#: table output that fits 80 columns by default; ``-o wide`` (some commands) shows every column
WIDE = "wide"

# flag dest -> (env var, key in the CNI config's ipam section)
_SETTINGS = {
    "etcd_endpoints": ("ETCD_ENDPOINTS", "etcd_endpoints"),
    "etcd_prefix": ("CNI_IPAM_ETCD_PREFIX", "etcd_prefix"),
    "etcd_ca_cert_file": ("ETCD_CA_CERT_FILE", "etcd_ca_cert_file"),
    "etcd_cert_file": ("ETCD_CERT_FILE", "etcd_cert_file"),
    "etcd_key_file": ("ETCD_KEY_FILE", "etcd_key_file"),
    "etcd_username": ("ETCD_USERNAME", "etcd_username"),
    "etcd_password_file": ("ETCD_PASSWORD_FILE", "etcd_password_file"),
}


class CLIError(Exception):
    """A failure to report as one line ``cni-ipam: error: <msg>`` (exit 1)."""


# ----------------------------------------------------------------------------- arguments

def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return v


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("etcd connection (flags > --cni-conf > environment > defaults)")
    g.add_argument("--etcd-endpoints", metavar="URLS",
                   help=f"comma-separated etcd URLs (env ETCD_ENDPOINTS; default {DEFAULT_ENDPOINTS})")
    g.add_argument("--etcd-prefix", metavar="PREFIX",
                   help=f"key prefix of all state (env CNI_IPAM_ETCD_PREFIX; default {DEFAULT_PREFIX})")
    g.add_argument("--etcd-ca-cert-file", metavar="FILE", help="CA to verify etcd (env ETCD_CA_CERT_FILE)")
    g.add_argument("--etcd-cert-file", metavar="FILE", help="client certificate (env ETCD_CERT_FILE)")
    g.add_argument("--etcd-key-file", metavar="FILE", help="client key (env ETCD_KEY_FILE)")
    g.add_argument("--etcd-username", metavar="USER", help="etcd user (env ETCD_USERNAME)")
    g.add_argument("--etcd-password-file", metavar="FILE",
                   help="file holding the etcd password (env ETCD_PASSWORD_FILE)")
    g.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help=f"deadline for each etcd call (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--cni-conf", metavar="FILE",
                   help="take the etcd settings from this CNI network config or .conflist "
                        "(its cni-ipam ipam section)")


def add_output_arg(parser: argparse.ArgumentParser, *, wide: bool = False) -> None:
    choices = OUTPUT_FORMATS + ((WIDE,) if wide else ())
    parser.add_argument("-o", "--output", choices=choices, default="table",
                        help="output format (default: table" + (", which fits 80 columns; wide: every column"
                                                                if wide else "") + "; json/yaml: see "
                             "`cni-ipam help output`)")


def is_wide(args) -> bool:
    return getattr(args, "output", None) == WIDE


# ----------------------------------------------------------------------------- settings

@dataclass
class Connection:
    endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINTS])
    prefix: str = DEFAULT_PREFIX
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = DEFAULT_TIMEOUT


def _ipam_section(path: str) -> dict:
    """The cni-ipam ``ipam`` section of a network config or conflist."""
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * 1024 * 1024 + 1)
    except OSError as e:
        raise CLIError(f"--cni-conf: cannot read {path}: {e.strerror}") from None
    try:
        conf = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"--cni-conf: {path} is not valid JSON: {e}") from None
    if not isinstance(conf, dict):
        raise CLIError(f"--cni-conf: {path} is not a CNI network config (not a JSON object)")
    candidates = conf.get("plugins") if isinstance(conf.get("plugins"), list) else [conf]
    sections = [p.get("ipam") for p in candidates if isinstance(p, dict) and isinstance(p.get("ipam"), dict)]
    ours = [s for s in sections if s.get("type") == "cni-ipam"]
    if not ours:
        raise CLIError(f"--cni-conf: {path} has no ipam section of type cni-ipam")
    return ours[0]


def connection_settings(args) -> Connection:
    """Resolve the etcd connection: flags > --cni-conf > env > defaults."""
    from ..config import ConfigError, parse_ipam_config

    conf_vals: dict = {}
    conf_password = None
    conf_timeout = None
    if getattr(args, "cni_conf", None):
        section = _ipam_section(args.cni_conf)
        try:
            ic = parse_ipam_config(section)
        except ConfigError as e:
            raise CLIError(f"--cni-conf {args.cni_conf}: {e}") from None
        for dest, (_, key) in _SETTINGS.items():
            if section.get(key) is not None:
                conf_vals[dest] = getattr(ic, key)
        if section.get("etcd_password") is not None or section.get("etcd_password_file") is not None:
            try:
                conf_password = ic.password()
            except ConfigError as e:
                raise CLIError(f"--cni-conf {args.cni_conf}: {e}") from None
            conf_vals.pop("etcd_password_file", None)
        if section.get("timeout_seconds") is not None:
            conf_timeout = ic.timeout_seconds

    def pick(dest):
        v = getattr(args, dest, None)
        if v is not None:
            return v, "flag"
        if dest in conf_vals:
            return conf_vals[dest], "conf"
        env = os.environ.get(_SETTINGS[dest][0])
        if env:
            return env, "env"
        return None, None

    c = Connection()
    eps, _ = pick("etcd_endpoints")
    if eps is not None:
        if isinstance(eps, str):
            eps = [e.strip() for e in eps.split(",") if e.strip()]
        if not eps:
            raise CLIError("no etcd endpoints given")
        for e in eps:
            if not (e.startswith("http://") or e.startswith("https://")):
                raise CLIError(f"etcd endpoint {e!r} is not an http:// or https:// URL")
        c.endpoints = list(eps)
    prefix, _ = pick("etcd_prefix")
    if prefix is not None:
        if not prefix.startswith("/"):
            raise CLIError(f"etcd prefix {prefix!r} must start with '/'")
        c.prefix = prefix
    c.ca_cert, _ = pick("etcd_ca_cert_file")
    c.cert, _ = pick("etcd_cert_file")
    c.key, _ = pick("etcd_key_file")
    if (c.cert is None) != (c.key is None):
        raise CLIError("the etcd client certificate and key go together (--etcd-cert-file and --etcd-key-file)")
    for what, path in (("CA certificate", c.ca_cert), ("client certificate", c.cert), ("client key", c.key)):
        if path is not None and not os.access(path, os.R_OK):
            raise CLIError(f"etcd {what} file {path} is not readable")
    c.username, _ = pick("etcd_username")
    pw_file, src = pick("etcd_password_file")
    if getattr(args, "etcd_password_file", None) is None and conf_password is not None:
        c.password = conf_password
    elif pw_file is not None:
        try:
            with open(pw_file) as f:
                c.password = f.read().strip()
        except OSError as e:
            raise CLIError(f"cannot read the etcd password file {pw_file}: {e.strerror}") from None
    if (c.username is None) != (c.password is None):
        raise CLIError("etcd user/password auth needs both a user name (--etcd-username) and a password "
                       "(--etcd-password-file)")
    if getattr(args, "timeout", None) is not None:
        c.timeout = args.timeout
    elif conf_timeout is not None:
        c.timeout = conf_timeout
    return c


# ----------------------------------------------------------------------------- opening

_opened: list = []


def _transport() -> str:
    """grpc (python3-etcd3) unless it is not installed (a slim build): then etcd's JSON gateway.
    ``CNI_IPAM_CLI_TRANSPORT=gateway|grpc`` forces one."""
    forced = os.environ.get("CNI_IPAM_CLI_TRANSPORT", "").strip()
    if forced:
        if forced not in ("grpc", "gateway"):
            raise CLIError(f"CNI_IPAM_CLI_TRANSPORT must be grpc or gateway, not {forced!r}")
        return forced
    try:
        import etcd3  # noqa: F401
        import grpc  # noqa: F401
    except ImportError:
        return "gateway"
    return "grpc"


def open_ipam(args):
    """An ``IPAM`` engine over the configured etcd (closed by ``close_all`` when main exits)."""
    from ..datastore import open_datastore
    from ..ipam.engine import IPAM

    c = connection_settings(args)
    try:
        ds = open_datastore(c.endpoints, transport=_transport(), timeout=c.timeout, ca_cert=c.ca_cert,
                            cert=c.cert, key=c.key, username=c.username, password=c.password)
    except (ValueError, OSError) as e:
        raise CLIError(f"cannot set up the etcd client: {e}") from None
    _opened.append(ds)
    return IPAM(ds, c.prefix)


def close_all() -> None:
    while _opened:
        ds = _opened.pop()
        try:
            ds.close()
        except Exception:  # pragma: no cover - closing must never mask the real outcome
            pass


# ----------------------------------------------------------------------------- output

def emit(args, data, table_fn) -> None:
    """Print ``data`` as JSON / YAML (stable field names), or ``table_fn(data)`` for tables."""
    fmt = getattr(args, "output", None) or "table"
    if fmt == "json":
        out = json.dumps(data, indent=2, ensure_ascii=False)
    elif fmt == "yaml":
        import yaml
        out = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    else:
        out = table_fn(data)
    if out:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    sys.stdout.flush()


def table(headers: list[str], rows: list[list]) -> str:
    """A plain left-aligned text table."""
    cells = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for r in cells:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return "\n".join(lines)


def kv_table(pairs: list[tuple[str, object]]) -> str:
    w = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(w)}  {'-' if v is None else v}" for k, v in pairs)


def bar(fraction: float, width: int = 10) -> str:
    """``[###.......]``: one ``#`` per full 1/width (rounded down, so a full bar means full)."""
    fraction = min(max(fraction, 0.0), 1.0)
    n = int(fraction * width + 1e-9)
    return "[" + "#" * n + "." * (width - n) + "]"


def pct(frac: float) -> str:
    """A percentage for a table: ``<0.1%`` for a little, ``>99.9%`` for almost full, ``100.0%`` only when full."""
    if 0 < frac < 0.0005:
        return "<0.1%"
    if 0.9995 <= frac < 1:
        return ">99.9%"
    return f"{100 * frac:.1f}%"


def yes_no(v) -> str | None:
    """Booleans in tables: always ``true``/``false`` (as in manifests), ``-`` when unset."""
    if v is None:
        return None
    return "true" if v else "false"


def parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "yes", "on", "1"):
        return True
    if v in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {s!r}")


def warn(msg: str) -> None:
    print(f"cni-ipam: warning: {msg}", file=sys.stderr)

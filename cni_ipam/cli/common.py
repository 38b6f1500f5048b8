"""Shared pieces of the admin CLI: connecting to etcd, output formats, errors.

Connection settings, strongest first: explicit flags > ``--cni-conf FILE`` (the
``ipam`` section of a network config / conflist, so the CLI sees exactly the
store the plugin uses) > environment variables > the CLI config file
(``$CNI_IPAM_CONFIG``, default ``/etc/cni-ipam/cli.yaml``) > defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from cni_ipam._records import dataclass, field

from cni_ipam.constants import DEFAULT_ENDPOINTS, DEFAULT_PREFIX  # noqa: F401 (re-exported)
from cni_ipam.datastore.base import EndpointError, parse_endpoint
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


DEFAULT_CLI_CONFIG = "/etc/cni-ipam/cli.yaml"
CLI_CONFIG_ENV = "CNI_IPAM_CONFIG"
# key in the CLI config file -> flag dest (the file's keys follow calicoctl.cfg's spelling)
_FILE_KEYS = {
    "etcdEndpoints": "etcd_endpoints",
    "etcdPrefix": "etcd_prefix",
    "etcdCACertFile": "etcd_ca_cert_file",
    "etcdCertFile": "etcd_cert_file",
    "etcdKeyFile": "etcd_key_file",
    "etcdUsername": "etcd_username",
    "etcdPasswordFile": "etcd_password_file",
    "timeoutSeconds": "timeout",
}

SETTINGS_HINT = ("set the etcd endpoints with --etcd-endpoints, the ETCD_ENDPOINTS environment variable, "
                 f"--cni-conf FILE (the plugin's network config) or etcdEndpoints in the CLI config file "
                 f"(${CLI_CONFIG_ENV}, default {DEFAULT_CLI_CONFIG}); see `cni-ipam help connection`")


class CLIError(Exception):
    """A failure to report as one line ``cni-ipam: error: <msg>`` (exit 1)."""
    exit_code = 1


class CannotCheck(CLIError):
    """The command could not do its job at all (etcd unreachable, bad credentials): exit 3 for
    commands whose exit code carries a verdict (``check``)."""


# ----------------------------------------------------------------------------- arguments

def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return v


CONNECTION_HELP = f"""\
etcd connection

Every command that reads or writes the store takes these flags.  Each setting is taken
from the first of: a flag, --cni-conf FILE, the environment, the CLI config file, the default.

  flag                     environment            CLI config file    default
  --etcd-endpoints URLS    ETCD_ENDPOINTS         etcdEndpoints      {DEFAULT_ENDPOINTS}
  --etcd-prefix PREFIX     CNI_IPAM_ETCD_PREFIX   etcdPrefix         {DEFAULT_PREFIX}
  --etcd-ca-cert-file FILE ETCD_CA_CERT_FILE      etcdCACertFile     system CAs (https)
  --etcd-cert-file FILE    ETCD_CERT_FILE         etcdCertFile       -
  --etcd-key-file FILE     ETCD_KEY_FILE          etcdKeyFile        -
  --etcd-username USER     ETCD_USERNAME          etcdUsername       -
  --etcd-password-file F   ETCD_PASSWORD_FILE     etcdPasswordFile   -
  --timeout SECONDS        -                      timeoutSeconds     {DEFAULT_TIMEOUT:g}
  --cni-conf FILE          take all of the above from the cni-ipam "ipam" section of a
                           CNI network config or .conflist (the store the plugin uses)

URLS is comma-separated (http:// or https://; the client port, 2379 by default -- not the
peer port 2380).  The CLI config file is ${CLI_CONFIG_ENV} if set, else {DEFAULT_CLI_CONFIG}
when it exists; YAML, like calicoctl.cfg (a bare mapping, or the same keys under spec:):

  # /etc/cni-ipam/cli.yaml
  etcdEndpoints: https://10.0.0.11:2379,https://10.0.0.12:2379
  etcdPrefix: /cni-ipam
  etcdCACertFile: /etc/cni-ipam/etcd-ca.pem
  etcdCertFile: /etc/cni-ipam/etcd-client.pem
  etcdKeyFile: /etc/cni-ipam/etcd-client-key.pem

Other environment variables: CNI_IPAM_CLI_TRANSPORT=grpc|gateway (how the CLI talks to
etcd; default grpc when python3-etcd3 is installed), CNI_IPAM_DEBUG=1 (a traceback for
internal errors).
"""


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("etcd connection (all flags, the environment and the CLI config file: "
                                  "`cni-ipam help connection`)")
    g.add_argument("--etcd-endpoints", metavar="URLS",
                   help=f"comma-separated etcd client URLs (env ETCD_ENDPOINTS; default {DEFAULT_ENDPOINTS})")
    g.add_argument("--etcd-prefix", metavar="PREFIX",
                   help=f"key prefix of all state (env CNI_IPAM_ETCD_PREFIX; default {DEFAULT_PREFIX})")
    g.add_argument("--cni-conf", metavar="FILE",
                   help="take the etcd settings from this CNI network config or .conflist")
    hidden = argparse.SUPPRESS
    g.add_argument("--etcd-ca-cert-file", metavar="FILE", help=hidden)
    g.add_argument("--etcd-cert-file", metavar="FILE", help=hidden)
    g.add_argument("--etcd-key-file", metavar="FILE", help=hidden)
    g.add_argument("--etcd-username", metavar="USER", help=hidden)
    g.add_argument("--etcd-password-file", metavar="FILE", help=hidden)
    g.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help=hidden)


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
    endpoints_from: str = "the default"        # where the endpoints came from (for error messages)
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
    candidates: list = conf["plugins"] if isinstance(conf.get("plugins"), list) else [conf]
    sections: list[dict] = [p["ipam"] for p in candidates if isinstance(p, dict) and isinstance(p.get("ipam"), dict)]
    ours = [s for s in sections if s.get("type") == "cni-ipam"]
    if not ours:
        raise CLIError(f"--cni-conf: {path} has no ipam section of type cni-ipam")
    return ours[0]


def cli_config_file() -> tuple[str | None, dict]:
    """(path, settings by flag dest) of the CLI config file; ``(None, {})`` without one."""
    path = os.environ.get(CLI_CONFIG_ENV, "").strip()
    explicit = bool(path)
    path = path or DEFAULT_CLI_CONFIG
    try:
        with open(path, "rb") as f:
            raw = f.read(1024 * 1024 + 1)
    except FileNotFoundError:
        if explicit:
            raise CLIError(f"{CLI_CONFIG_ENV}={path}: no such file") from None
        return None, {}
    except OSError as e:
        raise CLIError(f"cannot read the CLI config file {path}: {e.strerror}") from None
    import yaml
    try:
        doc = yaml.safe_load(raw) if raw.strip() else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise CLIError(f"the CLI config file {path} is not valid YAML{at}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise CLIError(f"the CLI config file {path} must be a YAML mapping of settings")
    if isinstance(doc.get("spec"), dict):      # calicoctl.cfg's shape: apiVersion, kind, metadata, spec
        doc = doc["spec"]
    out = {}
    for k, v in doc.items():
        if k in ("apiVersion", "kind", "metadata", "datastoreType"):
            continue
        if k not in _FILE_KEYS:
            import difflib
            close = difflib.get_close_matches(str(k), list(_FILE_KEYS), n=1, cutoff=0.6)
            did = f"did you mean {close[0]}?" if close else f"known: {', '.join(_FILE_KEYS)}"
            raise CLIError(f"the CLI config file {path}: unknown setting {k!r} ({did})")
        if v is None:
            continue
        dest = _FILE_KEYS[k]
        if dest == "timeout":
            try:
                v = _positive_float(str(v))
            except argparse.ArgumentTypeError as e:
                raise CLIError(f"the CLI config file {path}: {k}: {e}") from None
        elif dest == "etcd_endpoints" and isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = ",".join(v)
        elif not isinstance(v, str):
            raise CLIError(f"the CLI config file {path}: {k} must be a string")
        out[dest] = v
    return path, out


_last: list = []   # the Connection of the last open_ipam (for error hints)


def connection_settings(args) -> Connection:
    """Resolve the etcd connection: flags > --cni-conf > env > CLI config file > defaults."""
    from ..config import ConfigError, parse_ipam_config

    file_path, file_vals = cli_config_file()

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
        if dest in file_vals:
            return file_vals[dest], "file"
        return None, None

    c = Connection()
    eps, src = pick("etcd_endpoints")
    c.endpoints_from = {"flag": "--etcd-endpoints", "conf": f"--cni-conf {getattr(args, 'cni_conf', '')}",
                        "env": "ETCD_ENDPOINTS", "file": f"the CLI config file {file_path}"}.get(src, "the default")
    if eps is not None:
        if isinstance(eps, str):
            eps = [e.strip() for e in eps.split(",") if e.strip()]
        if not eps:
            raise CLIError("no etcd endpoints given")
        for url in eps:
            try:
                parse_endpoint(url)
            except EndpointError as err:
                raise CLIError("etcd endpoint URLs must not hold credentials: use --etcd-username and "
                               "--etcd-password-file" if err.credentials else f"etcd endpoint {err}") from None
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
    elif "timeout" in file_vals:
        c.timeout = file_vals["timeout"]
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
    _last[:] = [c]
    try:
        ds = open_datastore(c.endpoints, transport=_transport(), timeout=c.timeout, ca_cert=c.ca_cert,
                            cert=c.cert, key=c.key, username=c.username, password=c.password)
    except (ValueError, OSError) as e:
        raise CLIError(f"cannot set up the etcd client: {e}") from None
    _opened.append(ds)
    ipam = IPAM(ds, c.prefix)
    ipam.check_schema()   # a store written in a layout this binary is too old for: refuse, say so
    return ipam


def last_prefix() -> str:
    """The etcd prefix of the last ``open_ipam``."""
    return _last[0].prefix if _last else DEFAULT_PREFIX


def unreachable_hint() -> str:
    """What to add to an 'etcd unreachable' error: where the endpoints came from, how to set them."""
    src = f" (endpoints from {_last[0].endpoints_from})" if _last else ""
    return f"{src}; {SETTINGS_HINT}"


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


def confirm(prompt: str, *, yes: bool, what: str) -> bool:
    """Ask on stderr, answer from stdin (like `release --leaked`).  ``yes`` skips the question;
    no answer at all (stdin at end: not a terminal, e.g. cron or a pipe from /dev/null) is an
    error telling to add --yes -- a destructive command never proceeds unasked."""
    if yes:
        return True
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline() if sys.stdin else ""
    if not line:
        sys.stderr.write("\n")
        raise CLIError(f"{what}: no answer on stdin (not a terminal?): add --yes to go ahead without asking, "
                       f"or --dry-run to only show what it would do")
    return line.strip().lower() in ("y", "yes")


def warn(msg: str) -> None:
    print(f"cni-ipam: warning: {msg}", file=sys.stderr)

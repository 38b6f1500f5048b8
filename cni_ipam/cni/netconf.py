"""The network configuration on stdin: decoding, validation, requested IPs.

Validation order follows Go's ``pkg/skel``: decode (6) -> ``name`` (7) ->
``cniVersion`` and the verb gate (1) -> the other fields we read (7).

* Code 6: stdin is not UTF-8, not JSON (``NaN``/``Infinity``, a BOM, or
  nesting too deep to decode count as not JSON), or not a JSON object.
* Code 7: ``name`` missing/empty/not a string/not matching
  ``^[A-Za-z0-9][A-Za-z0-9_.\\-]*$``; any field we read having the wrong
  JSON type (including a non-string ``cniVersion`` -- Go would say 6 there,
  we class it with the other type errors); invalid requested IPs; a
  malformed ``prevResult`` or GC attachment list.
* Code 1: unsupported/unparseable ``cniVersion`` or a verb the version does
  not allow (see :mod:`.version`).

A JSON ``null`` is treated as the field being absent (as Go's decoder does).
Every error raised after decoding carries the config's version in
``CNIError.cni_version`` when that version is one we support (a missing one
counts as ``0.1.0``), so the error JSON echoes it; otherwise it is ``None``.
"""
from __future__ import annotations

from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from cni_ipam._records import dataclass, field
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    import ipaddress
    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
    from typing import Any

from .env import CNIEnv, cni_args_ips, parse_ip
from .errors import CNIError, ERR_DECODING_FAILURE, ERR_INVALID_NETWORK_CONFIG
from .version import DEFAULT_CONFIG_VERSION, check_version, is_supported

__all__ = [
    "NetConf",
    "parse_netconf",
    "requested_ips",
    "prev_result_ips",
    "VALID_ATTACHMENTS_KEYS",
]

#: GC's list of attachments to keep; the first key present wins.
VALID_ATTACHMENTS_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_NAME_CHARS = _ALNUM + "_.-"


def _valid_name(s: str) -> bool:
    r"""``[A-Za-z0-9][A-Za-z0-9_.\-]*`` (Go's pattern), without `re` at import."""
    return bool(s) and s[0] in _ALNUM and not s.strip(_NAME_CHARS)



@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    type: str = ""
    ipam: dict = field(default_factory=dict)
    runtime_config: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    prev_result: dict | None = None
    #: ``(containerID, ifname)`` pairs from ``cni.dev/valid-attachments``
    #: (or the older ``cni.dev/attachments``).  Only parsed for GC; ``None``
    #: when absent -- GC must then treat *nothing* as garbage.
    valid_attachments: list[tuple[str, str]] | None = None
    raw: dict = field(default_factory=dict)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _decode(stdin: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(stdin, str):
        text = stdin
    else:
        try:
            text = bytes(stdin).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CNIError(ERR_DECODING_FAILURE, "error decoding network config",
                           f"stdin is not valid UTF-8: {e}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise CNIError(ERR_DECODING_FAILURE, "error decoding network config",
                       "JSON nested too deeply") from None
    except ValueError as e:
        raise CNIError(ERR_DECODING_FAILURE, "error decoding network config", str(e)) from None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_netconf(stdin: bytes, command: str) -> NetConf:
    """Decode and validate the config for ``command`` (``ADD``, ``DEL``, ...).

    Raises :class:`CNIError` with code 6, 7 or 1 (see module docstring) and
    nothing else, whatever the bytes.
    """
    doc = _decode(stdin)
    if not isinstance(doc, dict):
        raise CNIError(ERR_DECODING_FAILURE, "error decoding network config",
                       f"network config must be a JSON object, not {_type_name(doc)}")

    # The version to echo in errors: the config's, as soon as we can tell it
    # is one we speak (even before it has been formally checked).
    raw_version = doc.get("cniVersion")
    tag = DEFAULT_CONFIG_VERSION if raw_version in (None, "") else raw_version
    tag = tag if is_supported(tag) else None

    def invalid(msg: str, details: str = "", version: str | None = None) -> CNIError:
        return CNIError(ERR_INVALID_NETWORK_CONFIG, msg, details, cni_version=version or tag)

    # -- name (Go's validateConfig) ------------------------------------------
    name = doc.get("name")
    if name is None or name == "":
        raise invalid("missing network name")
    if not isinstance(name, str):
        raise invalid("invalid network name", f"name must be a string, not {_type_name(name)}")
    if not _valid_name(name):
        raise invalid("invalid characters found in network name", name)

    # -- cniVersion and the verb gate ----------------------------------------
    version = raw_version
    if version is None or version == "":
        version = DEFAULT_CONFIG_VERSION
    if not isinstance(version, str):
        raise invalid("invalid cniVersion",
                      f"cniVersion must be a string, not {_type_name(version)}")
    try:
        check_version(version, command)
    except CNIError as e:
        if is_supported(version):
            e.cni_version = version
        raise

    # -- everything else we read -----------------------------------------------
    def get_obj(key: str) -> dict:
        value = doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise invalid(f"invalid {key}", f"{key} must be an object, not {_type_name(value)}",
                          version)
        return value

    ptype = doc.get("type")
    if ptype is None:
        ptype = ""
    if not isinstance(ptype, str):
        raise invalid("invalid type", f"type must be a string, not {_type_name(ptype)}", version)

    ipam = get_obj("ipam")
    runtime_config = get_obj("runtimeConfig")
    args = get_obj("args")
    prev_result: dict | None = None
    if doc.get("prevResult") is not None:
        prev_result = get_obj("prevResult")

    valid_attachments = None
    if command == "GC":
        valid_attachments = _parse_attachments(doc, version)

    return NetConf(
        cni_version=version,
        name=name,
        type=ptype,
        ipam=ipam,
        runtime_config=runtime_config,
        args=args,
        prev_result=prev_result,
        valid_attachments=valid_attachments,
        raw=doc,
    )


def _parse_attachments(doc: dict, version: str) -> list[tuple[str, str]] | None:
    for key in VALID_ATTACHMENTS_KEYS:
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise CNIError(ERR_INVALID_NETWORK_CONFIG, f"invalid {key}",
                           f"{key} must be an array, not {_type_name(value)}",
                           cni_version=version)
        out: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            cid = item.get("containerID") if isinstance(item, dict) else None
            ifname = item.get("ifname") if isinstance(item, dict) else None
            if not isinstance(cid, str) or not isinstance(ifname, str):
                raise CNIError(ERR_INVALID_NETWORK_CONFIG, f"invalid {key}",
                               f"{key}[{i}] must be an object with string "
                               f"'containerID' and 'ifname'",
                               cni_version=version)
            out.append((cid, ifname))
        return out
    return None


def _ip_list(value: Any, where: str, version: str) -> list[IPAddress]:
    if not isinstance(value, list):
        raise CNIError(ERR_INVALID_NETWORK_CONFIG, f"invalid {where}",
                       f"{where} must be an array of strings, not {_type_name(value)}",
                       cni_version=version)
    out = []
    for item in value:
        try:
            out.append(parse_ip(item))
        except ValueError as e:
            raise CNIError(ERR_INVALID_NETWORK_CONFIG, f"invalid IP address in {where}",
                           str(e), cni_version=version) from None
    return out


def requested_ips(env: CNIEnv, conf: NetConf) -> list[IPAddress]:
    """The specific addresses the runtime asks for, or ``[]``.

    Sources, highest precedence first; the first *non-empty* one is used
    whole (sources are never merged):

    1. ``runtimeConfig.ips`` (the ``ips`` capability),
    2. ``args.cni.ips`` (CONVENTIONS.md),
    3. legacy ``CNI_ARGS`` ``IP=a,b``.

    Each item is a bare IP or CIDR form (``10.1.2.3/24`` -> ``10.1.2.3``).
    Every source that is present is validated, used or not, so a typo never
    goes unnoticed.  Duplicates are dropped, order kept.  Raises
    ``CNIError(7)`` for wrong types or bad addresses.
    """
    v = conf.cni_version
    sources: list[list[IPAddress]] = []

    rc_ips = conf.runtime_config.get("ips") if isinstance(conf.runtime_config, dict) else None
    sources.append(_ip_list(rc_ips, "runtimeConfig.ips", v) if rc_ips is not None else [])

    cni_args = conf.args.get("cni") if isinstance(conf.args, dict) else None
    args_ips = None
    if cni_args is not None:
        if not isinstance(cni_args, dict):
            raise CNIError(ERR_INVALID_NETWORK_CONFIG, "invalid args.cni",
                           f"args.cni must be an object, not {_type_name(cni_args)}",
                           cni_version=v)
        args_ips = cni_args.get("ips")
    sources.append(_ip_list(args_ips, "args.cni.ips", v) if args_ips is not None else [])

    try:
        sources.append(cni_args_ips(env.args.get("IP", "")))
    except ValueError as e:
        raise CNIError(ERR_INVALID_NETWORK_CONFIG, "invalid IP address in CNI_ARGS",
                       str(e), cni_version=v) from None

    for ips in sources:
        if ips:
            return list(dict.fromkeys(ips))
    return []


def prev_result_ips(conf: NetConf) -> set[str]:
    """The addresses (bare, normalised strings) in ``prevResult``.

    Reads both result shapes regardless of version: ``ips[].address``
    (0.3.0+) and ``ip4.ip`` / ``ip6.ip`` (0.1.0/0.2.0).  Addresses may be in
    CIDR form (as results are) or bare.  Raises ``CNIError(7)`` if
    ``prevResult`` is missing (CHECK requires it) or malformed.
    """
    v = conf.cni_version
    pr = conf.prev_result

    def bad(details: str) -> CNIError:
        return CNIError(ERR_INVALID_NETWORK_CONFIG, "invalid prevResult", details, cni_version=v)

    if pr is None:
        raise CNIError(ERR_INVALID_NETWORK_CONFIG, "required prevResult missing", cni_version=v)
    if not isinstance(pr, dict):
        raise bad(f"prevResult must be an object, not {_type_name(pr)}")

    out: set[str] = set()

    def add(text: Any, where: str) -> None:
        try:
            out.add(str(parse_ip(text)))
        except ValueError as e:
            raise bad(f"{where}: {e}") from None

    ips = pr.get("ips")
    if ips is not None:
        if not isinstance(ips, list):
            raise bad(f"ips must be an array, not {_type_name(ips)}")
        for i, entry in enumerate(ips):
            if not isinstance(entry, dict):
                raise bad(f"ips[{i}] must be an object, not {_type_name(entry)}")
            add(entry.get("address"), f"ips[{i}].address")
    for fam in ("ip4", "ip6"):
        cfg = pr.get(fam)
        if cfg is None:
            continue
        if not isinstance(cfg, dict):
            raise bad(f"{fam} must be an object, not {_type_name(cfg)}")
        add(cfg.get("ip"), f"{fam}.ip")
    return out

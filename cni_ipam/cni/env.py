"""The CNI_* environment: which variables each verb needs, and CNI_ARGS.

Required variables follow the Go library's ``pkg/skel`` (CNI v1.2+):

=================  ===============  ==========================================
variable           required for     validated (when required and non-empty)
=================  ===============  ==========================================
CNI_COMMAND        every verb       one of ADD DEL CHECK GC STATUS VERSION
CNI_CONTAINERID    ADD CHECK DEL    ``^[A-Za-z0-9][A-Za-z0-9_.\\-]*$``
CNI_NETNS          ADD CHECK        -- (DEL may send it empty: containerd's
                                    second DEL after the netns is gone)
CNI_IFNAME         ADD CHECK DEL    non-empty, <= 15 bytes, not ``.``/``..``,
                                    no ``/``, ``:`` or whitespace
CNI_PATH           ADD CHECK DEL    --
                   GC STATUS
CNI_ARGS           never            parsed for ADD CHECK DEL only
=================  ===============  ==========================================

As in Go, a variable set to the empty string counts as missing, and
``CNI_PATH`` is *required* (no leniency): Go's skel rejects its absence for
every verb except VERSION, so runtimes always send it.  Every problem here is
error code 4 (invalid environment variables); the missing ones are all listed
in one message, like Go's ``required env variables [A,B] missing``.

Deliberate differences from Go's skel:

* An unknown ``CNI_COMMAND`` is rejected here, before stdin is looked at
  (Go parses the config first; both end in code 4).
* A malformed ``CNI_ARGS`` is code 4.  In Go the plugin calls
  ``types.LoadArgs`` itself and returns a plain error, which the skel wraps
  as 999 (internal); "invalid environment variable" is the honest code.
* We do not compare ``CNI_NETNS`` with our own netns (Go's ``CheckNetNS``):
  an IPAM plugin never enters a namespace.
"""
from __future__ import annotations

import os
from cni_ipam._records import dataclass, field
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    import ipaddress
    from typing import Mapping

from .errors import CNIError, ERR_INVALID_ENVIRONMENT_VARIABLES

__all__ = [
    "CNIEnv",
    "COMMANDS",
    "KNOWN_CNI_ARGS",
    "parse_env",
    "parse_cni_args",
    "parse_ip",
    "cni_args_ips",
    "validate_container_id",
    "validate_ifname",
]

COMMANDS = frozenset({"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"})

#: CNI_ARGS keys we understand (case-sensitive, as Go matches struct fields).
KNOWN_CNI_ARGS = frozenset({
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IP",
})

# (variable, verbs that require it)  -- order matters: it is the order of
# validation and of the "missing" list, as in Go.
_REQUIRED: tuple[tuple[str, frozenset[str]], ...] = (
    ("CNI_COMMAND", COMMANDS),
    ("CNI_CONTAINERID", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_NETNS", frozenset({"ADD", "CHECK"})),
    ("CNI_IFNAME", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_PATH", frozenset({"ADD", "CHECK", "DEL", "GC", "STATUS"})),
)
_ARGS_COMMANDS = frozenset({"ADD", "CHECK", "DEL"})

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_NAME_CHARS = _ALNUM + "_.-"


def _valid_name(s: str) -> bool:
    r"""``[A-Za-z0-9][A-Za-z0-9_.\-]*`` (Go's pattern), without `re` at import."""
    return bool(s) and s[0] in _ALNUM and not s.strip(_NAME_CHARS)
_MAX_IFNAME_BYTES = 15
# Go's unicode.IsSpace (Unicode White_Space); Python's str.isspace() differs
# (it also treats \x1c-\x1f as space).
_GO_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


@dataclass(frozen=True)
class CNIEnv:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str] = field(default_factory=dict)
    #: The raw ``CNI_PATH`` (``os.pathsep``-separated directories).
    path: str = ""

    @property
    def path_dirs(self) -> list[str]:
        return [p for p in self.path.split(os.pathsep) if p]


def _env_error(msg: str, details: str = "") -> CNIError:
    return CNIError(ERR_INVALID_ENVIRONMENT_VARIABLES, msg, details)


def validate_container_id(container_id: str) -> None:
    """Go's ``utils.ValidateContainerID`` (empty is reported as missing by the caller)."""
    if not _valid_name(container_id):
        raise _env_error("invalid characters in containerID", container_id)


def validate_ifname(ifname: str) -> None:
    """Go's ``utils.ValidateInterfaceName`` (length is in UTF-8 bytes, as in Go)."""
    if not ifname:
        raise _env_error("interface name is empty")
    try:
        # os.environ holds undecodable bytes as surrogate escapes: count bytes.
        nbytes = len(ifname.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise _env_error("interface name is not valid UTF-8") from None
    if nbytes > _MAX_IFNAME_BYTES:
        raise _env_error("interface name is too long",
                         f"interface name should be less than {_MAX_IFNAME_BYTES + 1} characters")
    if ifname in (".", ".."):
        raise _env_error("interface name is . or ..")
    for ch in ifname:
        if ch in "/:" or ch in _GO_SPACE:
            raise _env_error("interface name contains / or : or whitespace characters")


def parse_env(environ: Mapping[str, str]) -> CNIEnv:
    """Read and validate the CNI_* variables for the verb in ``CNI_COMMAND``.

    Raises ``CNIError(4)`` for a missing/unknown command, missing required
    variables, an invalid container ID or interface name, or bad CNI_ARGS.
    """
    command = environ.get("CNI_COMMAND", "") or ""
    if command and command not in COMMANDS:
        raise _env_error(f"unknown CNI_COMMAND: {command}")

    values: dict[str, str] = {}
    missing: list[str] = []
    for name, needed_by in _REQUIRED:
        value = environ.get(name, "") or ""
        values[name] = value
        required = command in needed_by or name == "CNI_COMMAND"
        if value == "":
            if required:
                missing.append(name)
        elif required:
            if name == "CNI_CONTAINERID":
                validate_container_id(value)
            elif name == "CNI_IFNAME":
                validate_ifname(value)
    if missing:
        raise _env_error(f"required env variables [{','.join(missing)}] missing")

    args: dict[str, str] = {}
    if command in _ARGS_COMMANDS:
        args = parse_cni_args(environ.get("CNI_ARGS", "") or "")

    return CNIEnv(
        command=command,
        container_id=values["CNI_CONTAINERID"],
        netns=values["CNI_NETNS"],
        ifname=values["CNI_IFNAME"],
        args=args,
        path=values["CNI_PATH"],
    )


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A bare IP (``10.1.2.3``) or an address in CIDR form (``10.1.2.3/24``,
    host bits allowed; the prefix is dropped).  IPv6 zones (``fe80::1%eth0``)
    are rejected.  Raises :class:`ValueError`."""
    if not isinstance(text, str):
        raise ValueError(f"IP address must be a string, not {type(text).__name__}")
    import ipaddress   # only when addresses are requested (issue 17: not on every exec)
    if "/" in text:
        addr = ipaddress.ip_interface(text).ip
    else:
        addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ValueError(f"scoped IPv6 address not allowed: {text!r}")
    return addr


def _parse_bool(value: str) -> bool:
    low = value.lower()
    if low in ("1", "true"):
        return True
    if low in ("0", "false"):
        return False
    raise ValueError(f"boolean unmarshal error: invalid input {low}")


def parse_cni_args(s: str) -> dict[str, str]:
    """Parse ``CNI_ARGS`` (``K=V;K2=V2``) like Go's ``types.LoadArgs``.

    * ``""`` -> ``{}``.
    * Every ``;``-separated pair must split on ``=`` into exactly two parts
      (so ``K=a=b``, a bare ``K`` and an empty pair from ``a=b;`` are errors);
      values may be empty.  A repeated key: the last one wins.
    * Keys outside :data:`KNOWN_CNI_ARGS` are an error unless
      ``IgnoreUnknown`` is ``1``/``true`` (case-insensitive); its value must
      be ``1``, ``true``, ``0`` or ``false``.  Unknown keys that are
      tolerated are kept in the returned dict.
    * ``IP`` is a comma-separated list of addresses (bare or CIDR; spaces
      around items are ignored; ``IP=`` means none) and must parse.

    Returns the raw string values.  Raises ``CNIError(4)``.
    """
    if not s:
        return {}
    out: dict[str, str] = {}
    unknown: list[str] = []
    for pair in s.split(";"):
        kv = pair.split("=")
        if len(kv) != 2:
            raise _env_error("invalid CNI_ARGS", f"ARGS: invalid pair {pair!r}")
        key, value = kv
        if key not in KNOWN_CNI_ARGS:
            unknown.append(pair)
        elif key == "IgnoreUnknown":
            try:
                _parse_bool(value)
            except ValueError as e:
                raise _env_error("invalid CNI_ARGS",
                                 f"ARGS: error parsing value of pair {pair!r}: {e}") from None
        elif key == "IP":
            try:
                cni_args_ips(value)
            except ValueError as e:
                raise _env_error("invalid CNI_ARGS",
                                 f"ARGS: error parsing value of pair {pair!r}: {e}") from None
        out[key] = value
    if unknown and not _parse_bool(out.get("IgnoreUnknown", "false")):
        raise _env_error("invalid CNI_ARGS", f"ARGS: unknown args {unknown!r}")
    return out


def cni_args_ips(value: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of a CNI_ARGS ``IP`` value (``""`` -> ``[]``).
    Raises :class:`ValueError` on an empty item or a bad address."""
    if value.strip() == "":
        return []
    ips = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            raise ValueError("empty item in IP list")
        ips.append(parse_ip(item))
    return ips

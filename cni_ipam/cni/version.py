"""CNI spec versions: what we support, comparison, per-verb gating, VERSION.

Rules (following containernetworking/cni ``pkg/version`` and ``pkg/skel``):

* A config without ``cniVersion`` (or with ``""``/``null``) is ``0.1.0``.
* A config version is supported only if it is *exactly* one of
  :data:`SUPPORTED_VERSIONS` (Go's ``Reconciler.CheckRaw`` compares strings),
  so ``"1.0"`` or ``"v1.0.0"`` are rejected with code 1.
* CHECK needs a config version >= 0.4.0; GC and STATUS need >= 1.1.0
  (code 1 otherwise).  Go's skel reports an *unparseable* version on these
  verbs as a decoding failure (6); we report every version problem as 1.
"""
from __future__ import annotations

from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)

from .errors import CNIError, ERR_INCOMPATIBLE_CNI_VERSION

__all__ = [
    "SUPPORTED_VERSIONS",
    "LATEST_VERSION",
    "DEFAULT_CONFIG_VERSION",
    "MIN_VERSION_FOR_COMMAND",
    "parse_version",
    "compare_versions",
    "version_at_least",
    "is_supported",
    "check_version",
    "version_response",
]

SUPPORTED_VERSIONS: tuple[str, ...] = (
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
)
LATEST_VERSION = "1.1.0"
#: The version of a network config that does not declare one.
DEFAULT_CONFIG_VERSION = "0.1.0"

#: Verbs that only exist from some spec version on.
MIN_VERSION_FOR_COMMAND: dict[str, str] = {
    "CHECK": "0.4.0",
    "GC": "1.1.0",
    "STATUS": "1.1.0",
}

_DIGITS = "0123456789"  # parse_version: 1-3 dot-separated runs of ASCII digits (no `re` at import)


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``.

    Like Go's ``version.ParseVersion``: 1 to 3 dot-separated decimal numbers
    (missing parts are 0), ``""`` means ``0.1.0``.  ASCII digits only.
    Raises :class:`ValueError` otherwise.
    """
    if not isinstance(version, str):
        raise ValueError(f"CNI version must be a string, not {type(version).__name__}")
    if version == "":
        return (0, 1, 0)
    parts = version.split(".")
    if len(parts) > 3 or any(not p or p.strip(_DIGITS) for p in parts):
        raise ValueError(f"invalid CNI version {version!r}")
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))  # type: ignore[return-value]


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, equal to or newer than ``b``.

    Raises :class:`ValueError` if either does not parse."""
    pa, pb = parse_version(a), parse_version(b)
    return (pa > pb) - (pa < pb)


def version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum``; raises :class:`ValueError` if unparseable."""
    return compare_versions(version, minimum) >= 0


def is_supported(version: object) -> bool:
    """Exact membership in :data:`SUPPORTED_VERSIONS`."""
    return isinstance(version, str) and version in SUPPORTED_VERSIONS


def check_version(version: str, command: str) -> None:
    """Raise ``CNIError(1)`` unless ``version`` is supported and allows ``command``.

    The verb gate is checked first (as Go's skel does), so CHECK with
    ``0.3.1`` reports "config version does not allow CHECK".
    """
    minimum = MIN_VERSION_FOR_COMMAND.get(command)
    if minimum is not None:
        try:
            allowed = version_at_least(version, minimum)
        except ValueError:
            raise CNIError(ERR_INCOMPATIBLE_CNI_VERSION,
                           "incompatible CNI versions",
                           f"unparseable cniVersion {version!r}") from None
        if not allowed:
            raise CNIError(ERR_INCOMPATIBLE_CNI_VERSION,
                           f"config version does not allow {command}",
                           f"{command} needs cniVersion >= {minimum}, config is {version!r}")
    if not is_supported(version):
        raise CNIError(ERR_INCOMPATIBLE_CNI_VERSION,
                       "incompatible CNI versions",
                       f"config is {version!r}, plugin supports "
                       f"[{', '.join(SUPPORTED_VERSIONS)}]")


def version_response(stdin_bytes: bytes | str | None) -> dict:
    """The answer to ``CNI_COMMAND=VERSION``.

    stdin may carry ``{"cniVersion": "x"}``; if ``x`` is a supported version
    it is echoed as the response's ``cniVersion``, otherwise (empty stdin,
    garbage, unsupported or missing version) the response uses
    :data:`LATEST_VERSION` -- which is what Go's skel always reports (it
    never reads stdin for VERSION).  VERSION never fails.
    """
    asked = LATEST_VERSION
    if stdin_bytes:
        try:
            text = stdin_bytes if isinstance(stdin_bytes, str) else bytes(stdin_bytes).decode("utf-8")
            doc = json.loads(text)
        except (ValueError, TypeError, RecursionError):
            doc = None
        if isinstance(doc, dict) and is_supported(doc.get("cniVersion")):
            asked = doc["cniVersion"]
    return {"cniVersion": asked, "supportedVersions": list(SUPPORTED_VERSIONS)}

"""CNI error type and the well-known error codes (CNI spec 1.1, "Error").

An error is reported by printing ``{"cniVersion", "code", "msg", "details"}``
on stdout and exiting non-zero; :func:`error_dict` builds that object.
Codes 0-99 are reserved by the spec, 100+ are free for plugins.
"""
from __future__ import annotations

__all__ = [
    "CNIError",
    "error_dict",
    "ERR_INCOMPATIBLE_CNI_VERSION",
    "ERR_UNSUPPORTED_FIELD",
    "ERR_UNKNOWN_CONTAINER",
    "ERR_INVALID_ENVIRONMENT_VARIABLES",
    "ERR_IO_FAILURE",
    "ERR_DECODING_FAILURE",
    "ERR_INVALID_NETWORK_CONFIG",
    "ERR_TRY_AGAIN_LATER",
    "ERR_PLUGIN_NOT_AVAILABLE",
    "ERR_LIMITED_CONNECTIVITY",
    "ERR_INTERNAL",
]

# (the codes live in cni_ipam/constants.py with this plugin's own 100+ codes)
from ..constants import (ERR_DECODING_FAILURE, ERR_INCOMPATIBLE_CNI_VERSION, ERR_INTERNAL,  # noqa: F401
                         ERR_INVALID_ENVIRONMENT_VARIABLES, ERR_INVALID_NETWORK_CONFIG, ERR_IO_FAILURE,
                         ERR_LIMITED_CONNECTIVITY, ERR_PLUGIN_NOT_AVAILABLE, ERR_TRY_AGAIN_LATER,
                         ERR_UNKNOWN_CONTAINER, ERR_UNSUPPORTED_FIELD)


class CNIError(Exception):
    """An error meant for the runtime: becomes the CNI error JSON.

    ``cni_version`` is optional; when set (e.g. by the config parser once the
    config's version is known and supported) it is used for the error
    object's ``cniVersion`` in preference to any other.
    """

    def __init__(self, code: int, msg: str, details: str = "", *,
                 cni_version: str | None = None) -> None:
        super().__init__(code, msg, details)
        self.code = int(code)
        self.msg = str(msg)
        self.details = "" if details is None else str(details)
        self.cni_version = cni_version

    def __str__(self) -> str:
        if self.details:
            return f"[{self.code}] {self.msg}: {self.details}"
        return f"[{self.code}] {self.msg}"

    def __repr__(self) -> str:
        return (f"CNIError(code={self.code!r}, msg={self.msg!r}, "
                f"details={self.details!r})")


def error_dict(cni_version: str, err: BaseException) -> dict:
    """The spec's error object for ``err``.

    A non-:class:`CNIError` becomes code 999 ``"internal error: <type>: <msg>"``.
    ``details`` is always present (possibly ``""``): the spec marks it
    optional, and consumers (libcni) accept an empty string.
    """
    if isinstance(err, CNIError):
        code, msg, details = err.code, err.msg, err.details
    else:
        code = ERR_INTERNAL
        msg = f"internal error: {type(err).__name__}: {err}"
        details = ""
    return {"cniVersion": cni_version, "code": code, "msg": msg, "details": details}

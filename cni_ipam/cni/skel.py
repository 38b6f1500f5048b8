"""The plugin's main loop: env + stdin in, one JSON document (or nothing) out.

:func:`run` is a Python counterpart of Go's ``skel.PluginMainFuncs``:

* ``VERSION`` is answered here (no handler, no config validation, never
  fails; see :func:`.version.version_response`).
* Other verbs: :func:`.env.parse_env` (code 4), then
  :func:`.netconf.parse_netconf` (6/7/1, including the verb gate), then the
  handler method: ``add`` -> its (already rendered) result is printed;
  ``delete``/``check``/``gc``/``status`` -> nothing is printed on success,
  as the spec defines no output for them.
* A :class:`CNIError` (from anywhere) -> its error JSON, exit 1.  The error's
  ``cniVersion`` is the one attached to the error, else the config's (once
  parsed), else -- for errors before the config was parsed, such as a
  missing env variable -- the config's if stdin holds a JSON object with a
  supported ``cniVersion`` (none = ``0.1.0``), else ``1.1.0``.
* Any other exception -> code 999 ``"internal error: <type>: <msg>"``, the
  traceback goes to the package's logger (``cni_ipam.log``) only (never stdout),
  exit 1.

At most one JSON document is written, always newline-terminated and
flushed; the document is fully serialised before anything is written, so a
serialisation failure cannot leave half a document behind.
"""
from __future__ import annotations

from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping, TextIO

from .env import CNIEnv, parse_env
from .errors import CNIError, error_dict
from .netconf import NetConf, parse_netconf
from .version import DEFAULT_CONFIG_VERSION, LATEST_VERSION, is_supported, version_response

__all__ = ["run", "Handlers"]

from ..log import log

_METHODS = {
    "ADD": "add",
    "DEL": "delete",
    "CHECK": "check",
    "GC": "gc",
    "STATUS": "status",
}


class Handlers:
    """What ``run`` calls (documentation of the interface; any object with these methods)."""

    def add(self, env: CNIEnv, conf: NetConf) -> dict: ...
    def delete(self, env: CNIEnv, conf: NetConf) -> None: ...
    def check(self, env: CNIEnv, conf: NetConf) -> None: ...
    def gc(self, env: CNIEnv, conf: NetConf) -> None: ...
    def status(self, env: CNIEnv, conf: NetConf) -> None: ...


def _write(stdout: TextIO, text: str) -> None:
    stdout.write(text)
    stdout.flush()


def _serialise(doc: dict) -> str:
    return json.dumps(doc) + "\n"


#: the most stdin a plugin reads: a network configuration is a few KiB; a bigger one is refused
#: at once (code 7) instead of being parsed (a 46 MB ``routes`` list took 18 s and 1.4 GB)
MAX_STDIN = 4 * 1024 * 1024


def read_stdin(stream) -> bytes:
    """At most MAX_STDIN + 1 bytes of ``stream`` (run() refuses more than MAX_STDIN)."""
    return stream.read(MAX_STDIN + 1)


def run(environ: Mapping[str, str], stdin: bytes | None, stdout: TextIO,
        handlers: Any) -> int:
    """Handle one CNI invocation; return the process exit code (0 or 1)."""
    command = (environ.get("CNI_COMMAND", "") or "") if environ is not None else ""
    conf_version: str | None = None
    out: str | None = None
    try:
        if command == "VERSION":
            out = _serialise(version_response(stdin))
        else:
            if stdin is not None and len(stdin) > MAX_STDIN:
                stdin = None   # never parsed (not even for its cniVersion)
                raise CNIError(7, f"the network configuration on stdin is larger than "
                                  f"{MAX_STDIN // (1024 * 1024)} MiB",
                               "refused without parsing it; a network configuration is normally a few KiB")
            env = parse_env(environ)
            conf = parse_netconf(stdin if stdin is not None else b"", env.command)
            conf_version = conf.cni_version
            method = getattr(handlers, _METHODS[env.command])
            result = method(env, conf)
            if env.command == "ADD":
                if not isinstance(result, dict):
                    raise TypeError(f"ADD handler returned {type(result).__name__}, not a dict")
                if result.get("cniVersion") != conf.cni_version:
                    raise ValueError(f"ADD result cniVersion {result.get('cniVersion')!r} "
                                     f"!= config cniVersion {conf.cni_version!r}")
                out = _serialise(result)  # fails here (-> 999), never mid-write
    except CNIError as e:
        version = e.cni_version or conf_version or _peek_version(stdin) or LATEST_VERSION
        log.warning("CNI %s failed: code %d: %s%s", command or "<none>", e.code, e.msg,
                    f" ({e.details})" if e.details else "")
        return _emit_error(stdout, error_dict(version, e))
    except Exception as e:  # noqa: BLE001 -- the boundary: everything becomes JSON
        log.exception("internal error handling CNI %s", command or "<none>")
        return _emit_error(stdout, error_dict(conf_version or _peek_version(stdin) or LATEST_VERSION, e))

    if out is not None:
        try:
            _write(stdout, out)
        except Exception:  # noqa: BLE001 -- e.g. EPIPE: nowhere left to report to
            log.exception("could not write the CNI %s result to stdout", command)
            return 1
    return 0


def _peek_version(stdin: Any) -> str | None:
    """Best effort, for errors raised before the config was parsed (e.g. a
    missing env variable): the config's cniVersion if it is one we support."""
    try:
        doc = json.loads(stdin if isinstance(stdin, str) else bytes(stdin).decode("utf-8"))
        version = doc.get("cniVersion") or DEFAULT_CONFIG_VERSION
    except Exception:  # noqa: BLE001 -- anything unreadable: no version
        return None
    return version if is_supported(version) else None


def _emit_error(stdout: TextIO, doc: dict) -> int:
    try:
        _write(stdout, _serialise(doc))
    except Exception:  # noqa: BLE001
        log.exception("could not write the CNI error to stdout")
    return 1

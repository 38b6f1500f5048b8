"""``json.loads``/``json.dumps`` for the plugin's exec path, without importing ``json``.

The stdlib ``json`` package imports ``re`` (and with it ``enum``, ``functools``,
``collections``, ``operator``, ...) and compiles seven regular expressions at import,
although the parsing and the encoding are done by its C accelerator ``_json``.  On a
CNI VERSION that was most of the exec's own work (issue 17).  This module drives ``_json``
directly for the common case -- the same C scanner and encoder ``json`` itself uses, so
the results are identical -- and hands everything else to the real ``json`` (imported
then): other keyword arguments, input that is not plain UTF-8 text, and every error (the
stdlib call is repeated, so the exception and its message are exactly ``json``'s).
"""
from _json import encode_basestring_ascii as _enc_ascii, make_encoder as _make_encoder, \
    make_scanner as _make_scanner

_WS = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
_scanners: dict = {}


class _Ctx:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder`` (its defaults)."""
    __slots__ = ("parse_constant",)
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    def __init__(self, parse_constant):
        self.parse_constant = parse_constant


def _std():
    import json
    return json


def loads(s, *, parse_constant=None, **kw):
    """``json.loads(s)`` (``parse_constant`` is the only keyword handled here)."""
    if kw:
        return _std().loads(s, parse_constant=parse_constant, **kw)
    text = s
    if not isinstance(s, str):
        # json.detect_encoding: anything with a BOM or a NUL in the first bytes is not UTF-8
        if (not isinstance(s, (bytes, bytearray)) or not s or not s[0] or (len(s) > 1 and not s[1])
                or s[:3] == b"\xef\xbb\xbf" or s[:2] in (b"\xff\xfe", b"\xfe\xff")):
            return _std().loads(s, parse_constant=parse_constant)
        try:
            text = s.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return _std().loads(s, parse_constant=parse_constant)
    scan = _scanners.get(parse_constant)
    if scan is None:
        scan = _scanners[parse_constant] = _make_scanner(_Ctx(parse_constant or _CONSTANTS.__getitem__))
    try:
        i, n = 0, len(text)
        while i < n and text[i] in _WS:
            i += 1
        obj, end = scan(text, i)
    except Exception:  # noqa: BLE001 -- the stdlib raises its own error, with its own message
        return _std().loads(s, parse_constant=parse_constant)
    if end != len(text) and text[end:].strip(_WS):
        return _std().loads(s, parse_constant=parse_constant)   # "Extra data"
    return obj


def _default(o):
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def dumps(obj, *, separators=None, sort_keys=False, **kw):
    """``json.dumps(obj)`` with ``separators``/``sort_keys``; other keywords go to ``json``."""
    if kw:
        return _std().dumps(obj, separators=separators, sort_keys=sort_keys, **kw)
    item_sep, key_sep = separators if separators is not None else (", ", ": ")
    if isinstance(obj, str):
        return _enc_ascii(obj)
    try:
        return "".join(_make_encoder({}, _default, _enc_ascii, None, key_sep, item_sep, sort_keys,
                                     False, True)(obj, 0))
    except Exception:  # noqa: BLE001 -- the stdlib raises its own error, with its own message
        return _std().dumps(obj, separators=separators, sort_keys=sort_keys)

"""IP addresses, networks and interfaces on the plugin's exec path, without ``ipaddress``.

``import ipaddress`` brings ``functools``, ``collections``, ``operator``, ``reprlib`` and
``keyword`` with it: ~21 M instructions, a fifth of every ADD exec (issue 17), for a few
integer operations per exec.  These classes hold ``(version, int[, prefixlen])`` and do what the
engine and the stored records do on the hot path: parse the canonical text the records hold,
``str``, ``int``, ``+``/``-``, containment, ``subnet_of``, and comparisons and hashes equal to
``ipaddress``'s, so mixed sets, dicts and ``==`` with ``ipaddress`` objects work both ways.

Anything else (``subnets()``, ``overlaps()``, ``netmask``, ``is_private``, iteration, ...) is
handed to the equivalent ``ipaddress`` object, made on first use: cold code keeps the whole
``ipaddress`` API and semantics.  Text that is not in canonical form (anything ``str()`` of an
``ipaddress`` object would not give back, e.g. ``"010.1.2.3"`` or ``"FD00::1"``) is parsed by
``ipaddress`` itself, so what is accepted and every error message are ``ipaddress``'s own.
"""
from __future__ import annotations

_MAX = {4: 32, 6: 128}
_ALL = {4: (1 << 32) - 1, 6: (1 << 128) - 1}


def _ipaddress():
    import ipaddress
    return ipaddress


# -- text <-> int -----------------------------------------------------------------------

def _v4_text(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def _v6_text(n: int) -> str:
    """``ipaddress``'s form: lowercase hex, no leading zeros, the longest run of two or more
    zero groups (the first of equal runs) as ``::``."""
    groups = [(n >> s) & 0xFFFF for s in range(112, -16, -16)]
    best, best_len, run, run_len = -1, 1, -1, 0
    for i, g in enumerate(groups):
        if g:
            run_len = 0
            continue
        if run_len == 0:
            run = i
        run_len += 1
        if run_len > best_len:
            best, best_len = run, run_len
    text = [f"{g:x}" for g in groups]
    if best < 0:
        return ":".join(text)
    return ":".join(text[:best]) + "::" + ":".join(text[best + best_len:])


def _text(version: int, n: int) -> str:
    return _v4_text(n) if version == 4 else _v6_text(n)


def _v4_int(text: str) -> int | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    n = 0
    for p in parts:
        if not p.isdigit() or not p.isascii() or len(p) > 3 or (p[0] == "0" and len(p) > 1):
            return None
        v = int(p)
        if v > 255:
            return None
        n = (n << 8) | v
    return n


def _v6_int(text: str) -> int | None:
    if not text.isascii() or "%" in text or "." in text:
        return None
    head, sep, tail = text.partition("::")
    if "::" in tail:
        return None
    hs = head.split(":") if head else []
    ts = tail.split(":") if tail else []
    if (not sep and len(hs) != 8) or (sep and len(hs) + len(ts) > 7):
        return None
    n = 0
    groups = hs + ["0"] * (8 - len(hs) - len(ts)) + ts
    for g in groups:
        if not 1 <= len(g) <= 4:
            return None
        try:
            n = (n << 16) | int(g, 16)
        except ValueError:
            return None
    return n


def _parse(text: str) -> tuple[int, int] | None:
    """(version, int) of canonical address text; None for anything else."""
    n = _v6_int(text) if ":" in text else _v4_int(text)
    if n is None:
        return None
    version = 6 if ":" in text else 4
    return (version, n) if _text(version, n) == text else None


# -- classes ------------------------------------------------------------------------------

class _Lazy:
    """Hands unknown attributes to the ``ipaddress`` equivalent (made once, on first use)."""
    __slots__ = ()

    def _std(self):
        raise NotImplementedError

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_obj", "_ip"):   # (_ip: what tells an address, which has it)
            raise AttributeError(name)
        return getattr(self._std(), name)

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(self._std(), spec)

    def __reduce__(self):
        return self._std().__reduce__()


class _Ordered(_Lazy):
    """What ``Address`` and ``Network`` share: ``version``, ``max_prefixlen``, and ``<``, ``<=``, ``>``, ``>=`` as ``ipaddress`` orders: within one version (``TypeError``
    across), against anything of the same kind (``ipaddress``'s too); ``NotImplemented`` else.
    Subclasses give ``_order_key(other)`` -> ``(version, key)`` or None, and ``_own_order_key()``."""
    __slots__ = ()

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_prefixlen(self) -> int:
        return _MAX[self._version]

    def _order_key(self, other):
        raise NotImplementedError

    def _own_order_key(self):
        raise NotImplementedError

    def _keys(self, other):
        got = self._order_key(other)
        if got is None:
            return None
        if got[0] != self._version:
            raise TypeError(f"{self} and {other} are not of the same version")
        return self._own_order_key(), got[1]

    def __lt__(self, other):
        k = self._keys(other)
        return NotImplemented if k is None else k[0] < k[1]

    def __le__(self, other):
        k = self._keys(other)
        return NotImplemented if k is None else k[0] <= k[1]

    def __gt__(self, other):
        k = self._keys(other)
        return NotImplemented if k is None else k[0] > k[1]

    def __ge__(self, other):
        k = self._keys(other)
        return NotImplemented if k is None else k[0] >= k[1]


class Address(_Ordered):
    """An IPv4 or IPv6 address: ``ipaddress.IPv4Address``/``IPv6Address``'s behaviour."""
    __slots__ = ("_version", "_ip", "_obj")
    _scope_id = None   # (ipaddress's IPv6 zone: never in a stored record)

    def __init__(self, version: int, value: int):
        if version not in _MAX:
            raise ValueError(f"IP version {version!r} is not 4 or 6")
        if not 0 <= value <= _ALL[version]:
            raise _ipaddress().AddressValueError(f"{value} is not an IPv{version} address")
        self._version, self._ip, self._obj = version, value, None

    def _std(self):
        if self._obj is None:
            ipa = _ipaddress()
            self._obj = (ipa.IPv4Address if self._version == 4 else ipa.IPv6Address)(self._ip)
        return self._obj

    def __int__(self) -> int:
        return self._ip

    def __str__(self) -> str:
        return _text(self._version, self._ip)

    def __repr__(self) -> str:
        return f"IPv{self._version}Address('{self}')"

    def __eq__(self, other) -> bool:
        try:
            return self._ip == other._ip and self._version == other._version
        except AttributeError:
            return NotImplemented

    def __hash__(self) -> int:
        # ipaddress's: hex of the int for IPv4, (int, zone) for IPv6
        return hash(hex(self._ip)) if self._version == 4 else hash((self._ip, None))

    def _order_key(self, other):
        try:
            return other._version, other._ip
        except AttributeError:
            return None

    def _own_order_key(self):
        return self._ip

    def __add__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return Address(self._version, self._ip + other)

    def __sub__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return Address(self._version, self._ip - other)


class Network(_Ordered):
    """An IPv4 or IPv6 network (host bits zero): ``ipaddress.IPv4Network``/``IPv6Network``'s
    behaviour."""
    __slots__ = ("_version", "_base", "_prefixlen", "_obj")

    def __init__(self, version: int, base: int, prefixlen: int):
        if version not in _MAX:
            raise ValueError(f"IP version {version!r} is not 4 or 6")
        if not 0 <= prefixlen <= _MAX[version] or not 0 <= base <= _ALL[version]:
            raise ValueError(f"{base}/{prefixlen} is not an IPv{version} network")
        if base & ((1 << (_MAX[version] - prefixlen)) - 1):
            raise ValueError(f"{_text(version, base)}/{prefixlen} has host bits set")
        self._version, self._base, self._prefixlen, self._obj = version, base, prefixlen, None

    def _std(self):
        if self._obj is None:
            self._obj = _ipaddress().ip_network(str(self))
        return self._obj

    @property
    def prefixlen(self) -> int:
        return self._prefixlen

    @property
    def num_addresses(self) -> int:
        return 1 << (_MAX[self._version] - self._prefixlen)

    @property
    def network_address(self) -> Address:
        return Address(self._version, self._base)

    @property
    def broadcast_address(self) -> Address:
        return Address(self._version, self._base + self.num_addresses - 1)

    @property
    def with_prefixlen(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{_text(self._version, self._base)}/{self._prefixlen}"

    def __repr__(self) -> str:
        return f"IPv{self._version}Network('{self}')"

    def _bounds(self, other) -> tuple[int, int, int] | None:
        """(version, first, last) of a network of either kind; None if ``other`` is none."""
        if isinstance(other, Network):
            return other._version, other._base, other._base + other.num_addresses - 1
        try:
            v, first, last = other._version, int(other.network_address), int(other.broadcast_address)
            other.prefixlen
        except AttributeError:
            return None
        return v, first, last

    def __contains__(self, other) -> bool:
        try:
            v, ip = other._version, other._ip
        except AttributeError:
            return False   # a network (or anything else) is never "in" a network, as in ipaddress
        return v == self._version and (ip >> (_MAX[v] - self._prefixlen)) == (self._base >> (_MAX[v] - self._prefixlen))

    def _within(self, a, b) -> bool:
        if a[0] != b[0]:
            raise TypeError(f"{self} and {b} are not of the same version")
        return b[1] <= a[1] and a[2] <= b[2]

    def subnet_of(self, other) -> bool:
        b = self._bounds(other)
        if b is None:
            raise TypeError(f"Unable to test subnet containment between {self} and {other}")
        return self._within(self._bounds(self), b)

    def supernet_of(self, other) -> bool:
        b = self._bounds(other)
        if b is None:
            raise TypeError(f"Unable to test subnet containment between {other} and {self}")
        return self._within(b, self._bounds(self))

    def _netmask_int(self) -> int:
        m = _MAX[self._version]
        return _ALL[self._version] ^ ((1 << (m - self._prefixlen)) - 1)

    def __eq__(self, other) -> bool:
        if isinstance(other, (Address, Interface)):
            return NotImplemented
        if isinstance(other, Network):
            return (self._version, self._base, self._prefixlen) == (other._version, other._base, other._prefixlen)
        try:
            return (self._version == other._version and self._base == int(other.network_address)
                    and self._netmask_int() == int(other.netmask))
        except AttributeError:
            return NotImplemented

    def __hash__(self) -> int:
        return hash(self._base ^ self._netmask_int())

    def _order_key(self, other):
        if isinstance(other, Network):
            return other._version, (other._base, other._prefixlen)
        try:
            return other._version, (int(other.network_address), other.prefixlen)
        except AttributeError:
            return None

    def _own_order_key(self):
        return self._base, self._prefixlen

    def __iter__(self):
        return iter(self._std())

    def __getitem__(self, n):
        return self._std()[n]


class Interface(_Lazy):
    """An address with its prefix length (a CNI result's ``address``): what the plugin's result
    needs of ``ipaddress.IPv4Interface``/``IPv6Interface``; the rest is handed to it."""
    __slots__ = ("ip", "_prefixlen", "_obj")

    # what ipaddress's comparisons read of an address (an interface is one)
    @property
    def _ip(self) -> int:
        return self.ip._ip

    @property
    def _version(self) -> int:
        return self.ip._version

    def __init__(self, ip: Address, prefixlen: int):
        if not 0 <= prefixlen <= _MAX[ip.version]:
            raise ValueError(f"prefix length {prefixlen} is out of range for {ip}")
        self.ip, self._prefixlen, self._obj = ip, prefixlen, None

    def _std(self):
        if self._obj is None:
            self._obj = _ipaddress().ip_interface(str(self))
        return self._obj

    @property
    def version(self) -> int:
        return self.ip.version

    @property
    def network(self) -> Network:
        m = _MAX[self.ip.version]
        host = m - self._prefixlen
        return Network(self.ip.version, (self.ip._ip >> host) << host, self._prefixlen)

    @property
    def with_prefixlen(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.ip}/{self._prefixlen}"

    def __repr__(self) -> str:
        return f"IPv{self.ip.version}Interface('{self}')"

    def __eq__(self, other) -> bool:
        if isinstance(other, Interface):
            return self.ip == other.ip and self._prefixlen == other._prefixlen
        try:
            return self.ip == other.ip and self.network == other.network and hasattr(other, "_prefixlen")
        except AttributeError:
            return NotImplemented

    def __hash__(self) -> int:
        return hash((self.ip._ip, self._prefixlen, int(self.network.network_address)))


# -- constructors ---------------------------------------------------------------------------

def ip_address(value) -> Address:
    """An ``Address`` from canonical text (fast), any text ``ipaddress.ip_address`` takes, an
    ``ipaddress`` address or an ``Address``; ``ValueError`` (``ipaddress``'s) otherwise."""
    if value.__class__ is Address:
        return value
    if isinstance(value, str):
        got = _parse(value)
        if got is not None:
            return Address(*got)
    obj = value if hasattr(value, "_ip") and not isinstance(value, str) else _ipaddress().ip_address(value)
    if getattr(obj, "scope_id", None) is not None:
        return obj   # an IPv6 zone (fe80::1%eth0): the ipaddress object itself, nothing dropped
    return Address(obj.version, int(obj))


def ip_network(value, strict: bool = True) -> Network:
    """A ``Network`` from canonical ``"address/prefixlen"`` text (fast), anything
    ``ipaddress.ip_network`` takes, or a network object; ``ValueError`` (``ipaddress``'s)
    otherwise."""
    if value.__class__ is Network:
        return value
    if isinstance(value, str):
        addr, sep, plen = value.partition("/")
        got = _parse(addr) if sep else None
        if got is not None and plen.isdigit() and plen.isascii() and (plen == "0" or plen[0] != "0"):
            v, base = got
            p = int(plen)
            if p <= _MAX[v]:
                host = (1 << (_MAX[v] - p)) - 1
                if not base & host:
                    return Network(v, base, p)
                if not strict:
                    return Network(v, base & ~host, p)
    obj = value if hasattr(value, "network_address") else _ipaddress().ip_network(value, strict=strict)
    if getattr(obj.network_address, "scope_id", None) is not None:
        return obj   # an IPv6 zone: the ipaddress object itself, nothing dropped
    return Network(obj.version, int(obj.network_address), obj.prefixlen)


def network_of(version: int, value: int, prefixlen: int) -> Network:
    """The network of ``prefixlen`` bits that holds the address ``value`` (host bits dropped)."""
    host = _MAX[version] - prefixlen
    return Network(version, (value >> host) << host, prefixlen)

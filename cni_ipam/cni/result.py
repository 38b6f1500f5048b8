"""Rendering an IPAM result in the shape of the config's cniVersion.

========== =================================================================
version    shape
========== =================================================================
0.1.0      ``{"cniVersion", "ip4"?: {"ip", "gateway"?, "routes"?},
0.2.0       "ip6"?: {...}, "dns"?}``
0.3.0      ``{"cniVersion", "ips": [{"version", "address", "gateway"?}],
0.3.1       "routes"?, "dns"?}``
0.4.0
1.0.0      as 0.4.0 without ``version`` in the IP entries
1.1.0
========== =================================================================

IPAM results carry no ``interfaces`` and no ``interface`` index.

Choices (mirroring the Go library's ``omitempty`` and 0.2.0 conversion):

* ``gateway`` is omitted when ``None``; ``dns`` is omitted when ``None`` or
  empty, and only its non-empty keys are kept; ``routes`` is omitted when
  empty (in 0.2.0: per family).  ``ips`` is always present for 0.3.0+.
* 0.1.0/0.2.0 can hold one address per family: the *first* IPv4 and the
  first IPv6 are used (as Go's converter does).  Routes go to ``ip4`` or
  ``ip6`` by the family of ``dst``, and are dropped if that family has no
  address.
* Route dicts are passed through.  Before 1.1.0 only ``dst`` and ``gw``
  are kept (``mtu``, ``advmss``, ``priority``, ``table``, ``scope`` are 1.1.0
  fields).  ``dst`` must be a CIDR and ``gw`` (if present) an IP address,
  of either family.
"""
from __future__ import annotations

import sys

from cni_ipam import ipnet  # addresses without importing ipaddress (issue 17)
from cni_ipam._records import dataclass

from .errors import CNIError, ERR_INCOMPATIBLE_CNI_VERSION
from .version import compare_versions, is_supported

__all__ = ["IPConfig", "render_result"]

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    import ipaddress
    IPInterface = ipnet.Interface | ipaddress.IPv4Interface | ipaddress.IPv6Interface
    IPAddress = ipnet.Address | ipaddress.IPv4Address | ipaddress.IPv6Address


def _is(value, ours: type, std: tuple[str, ...]) -> bool:
    """``value`` is an ipnet ``ours`` or one of the ``ipaddress`` classes ``std`` (which it can
    only be if something already imported ``ipaddress``)."""
    if isinstance(value, ours):
        return True
    ipa = sys.modules.get("ipaddress")
    return ipa is not None and isinstance(value, tuple(getattr(ipa, n) for n in std))


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None

    def __post_init__(self) -> None:
        if not _is(self.address, ipnet.Interface, ("IPv4Interface", "IPv6Interface")):
            raise TypeError(f"address must be an IPv4Interface/IPv6Interface, "
                            f"not {type(self.address).__name__}")
        if self.gateway is not None:
            if not _is(self.gateway, ipnet.Address, ("IPv4Address", "IPv6Address")):
                raise TypeError(f"gateway must be an IPv4Address/IPv6Address, "
                                f"not {type(self.gateway).__name__}")
            if self.gateway.version != self.address.version:
                raise ValueError(f"gateway {self.gateway} is not of the family "
                                 f"of {self.address}")

    @property
    def version(self) -> int:
        return self.address.version


_BASIC_ROUTE_KEYS = ("dst", "gw")


def _route_family(route: dict) -> int:
    if not isinstance(route, dict):
        raise TypeError(f"route must be a dict, not {type(route).__name__}")
    dst = route.get("dst")
    if dst is None or isinstance(dst, bool):
        raise ValueError(f"route needs a CIDR dst: {route!r}")
    net = ipnet.ip_network(str(dst), strict=False)
    gw = route.get("gw")
    if gw is not None:
        # No family check: an IPv4 route via an IPv6 next hop (RFC 5549) is legal.
        ipnet.ip_address(str(gw))
    return net.version


def _route_out(route: dict, full: bool) -> dict:
    out = dict(route) if full else {k: route[k] for k in _BASIC_ROUTE_KEYS if k in route}
    # dst/gw may be given as ipaddress objects; the result holds strings.
    for k in _BASIC_ROUTE_KEYS:
        if out.get(k) is not None:
            out[k] = str(out[k])
        else:
            out.pop(k, None)
    return out


def _dns_out(dns: dict | None) -> dict | None:
    if not dns:
        return None
    if not isinstance(dns, dict):
        raise TypeError(f"dns must be a dict, not {type(dns).__name__}")
    out = {k: v for k, v in dns.items() if v not in (None, "", [], {})}
    return out or None


def render_result(cni_version: str, ips: list[IPConfig], routes: list[dict],
                  dns: dict | None) -> dict:
    """The result dict for ``cni_version`` (whose ``cniVersion`` it carries).

    Raises ``CNIError(1)`` for an unsupported version; ``TypeError`` /
    ``ValueError`` for malformed inputs (programming errors).
    """
    if not is_supported(cni_version):
        raise CNIError(ERR_INCOMPATIBLE_CNI_VERSION, "incompatible CNI versions",
                       f"cannot render a result for cniVersion {cni_version!r}")
    for ip in ips:
        if not isinstance(ip, IPConfig):
            raise TypeError(f"ips must hold IPConfig, not {type(ip).__name__}")
    routes = list(routes or ())
    families = [_route_family(r) for r in routes]
    full_routes = compare_versions(cni_version, "1.1.0") >= 0
    dns_out = _dns_out(dns)

    result: dict = {"cniVersion": cni_version}

    if compare_versions(cni_version, "0.3.0") < 0:
        for fam, key in ((4, "ip4"), (6, "ip6")):
            first = next((ip for ip in ips if ip.version == fam), None)
            if first is None:
                continue
            entry: dict = {"ip": str(first.address)}
            if first.gateway is not None:
                entry["gateway"] = str(first.gateway)
            fam_routes = [_route_out(r, False) for r, f in zip(routes, families) if f == fam]
            if fam_routes:
                entry["routes"] = fam_routes
            result[key] = entry
    else:
        with_version = compare_versions(cni_version, "1.0.0") < 0
        out_ips = []
        for ip in ips:
            entry = {}
            if with_version:
                entry["version"] = str(ip.version)
            entry["address"] = str(ip.address)
            if ip.gateway is not None:
                entry["gateway"] = str(ip.gateway)
            out_ips.append(entry)
        result["ips"] = out_ips
        if routes:
            result["routes"] = [_route_out(r, full_routes) for r in routes]

    if dns_out is not None:
        result["dns"] = dns_out
    return result

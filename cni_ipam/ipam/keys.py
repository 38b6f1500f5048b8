"""The etcd key layout (all keys ASCII; outside names are percent-encoded).

    <prefix>/v1/config                         global IPAM settings (IPAMConfig)
    <prefix>/v1/pools/<name>                   one IP pool
    <prefix>/v1/blocks/v4/<hex addr>-<plen>    one block (hex so that keys sort numerically)
    <prefix>/v1/affinity/<node>/v4/<hex>-<plen> the node's claim on a block
    <prefix>/v1/handles/<net>/<cid>/<ifname>   what one attachment holds (the release index)
    <prefix>/v1/handles/<net>.<cid>.<ifname>   the same, as layout 1 (before 0.2) wrote it: still read
    <prefix>/v1/schema                         the data layout version (LAYOUT) and the oldest one that may use it
    <prefix>/v1/namespaces/<ns>                namespace annotations (without Kubernetes)
    <prefix>/v1/nodes/<node>                   node labels (without Kubernetes)
    <prefix>/v1/reservations                   every IPReservation, in one record (ipam/reservation.py)
"""
from __future__ import annotations

import ipaddress

from ..constants import DEFAULT_PREFIX

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def escape(name: str) -> str:
    """Percent-encode everything but [A-Za-z0-9_.-], so that no outside name can
    contain '/' (escape its place in the key space) or non-ASCII."""
    return "".join(chr(b) if b in _SAFE else "%%%02X" % b for b in name.encode("utf-8", "surrogatepass"))


def unescape(s: str) -> str:
    if "%" not in s:
        return s
    out = bytearray()
    i = 0
    while i < len(s):
        if s[i] == "%":
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(s[i]))
            i += 1
    return out.decode("utf-8", "surrogatepass")


def block_id(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """``v4/0a000040-26``: family, zero-padded hex network address, prefix length."""
    width = 8 if net.version == 4 else 32
    return "v%d/%0*x-%d" % (net.version, width, int(net.network_address), net.prefixlen)


def block_from_id(bid: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    fam, rest = bid.split("/", 1)
    hexaddr, plen = rest.split("-", 1)
    if fam == "v4":
        return ipaddress.IPv4Network((int(hexaddr, 16), int(plen)))
    if fam == "v6":
        return ipaddress.IPv6Network((int(hexaddr, 16), int(plen)))
    raise ValueError(f"bad block id {bid!r}")


#: the data layout this code writes.  1: handles at ``handles/<esc(net.cid.ifname)>``;
#: 2: handles at ``handles/<esc(net)>/<esc(cid)>/<esc(ifname)>`` (layout-1 handles are still
#: read, released and reported), plus the ``schema`` record itself.
LAYOUT = 2


def handle_id(network: str, container_id: str, ifname: str) -> str:
    """The id of the attachment (network, container ID, interface): ``<net>/<cid>/<ifname>``.
    None of the three may contain ``/`` (network names and container IDs are
    ``[A-Za-z0-9][A-Za-z0-9_.-]*``, interface names exclude ``/``), so the id is unambiguous."""
    return f"{network}/{container_id}/{ifname}"


def legacy_handle_id(network: str, container_id: str, ifname: str) -> str:
    """The id layout 1 gave the same attachment: ``<net>.<cid>.<ifname>``.  Ambiguous (each part
    may contain dots), so a record found under it belongs to this attachment only when its own
    ``network``/``containerID``/``ifname`` fields say so (``Handle.is_attachment``)."""
    return f"{network}.{container_id}.{ifname}"


class Keys:
    def __init__(self, prefix: str = DEFAULT_PREFIX):
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.root = prefix + "/v1/"
        self.config = self.root + "config"
        self.pools = self.root + "pools/"
        self.blocks = self.root + "blocks/"
        self.affinity = self.root + "affinity/"
        self.handles = self.root + "handles/"
        self.namespaces = self.root + "namespaces/"
        self.nodes = self.root + "nodes/"
        self.schema = self.root + "schema"
        self.reservations = self.root + "reservations"

    def pool(self, name: str) -> str:
        return self.pools + escape(name)

    def block(self, net) -> str:
        return self.blocks + block_id(net)

    def block_of_key(self, key: str):
        return block_from_id(key[len(self.blocks):])

    def node_affinity(self, node: str) -> str:
        return self.affinity + escape(node) + "/"

    def affinity_key(self, node: str, net) -> str:
        return self.node_affinity(node) + block_id(net)

    def handle(self, handle_id: str) -> str:
        """The key of a handle id: ``<net>/<cid>/<ifname>`` (layout 2) -> each part escaped,
        joined by ``/``; any other id (layout 1, or a name without two ``/``) -> escaped whole,
        so it holds no ``/`` and the two forms never meet."""
        parts = handle_id.split("/")
        if len(parts) == 3:
            return self.handles + "/".join(escape(p) for p in parts)
        return self.handles + escape(handle_id)

    def handle_of_key(self, key: str) -> str:
        """The handle id a key under ``handles/`` stands for (the inverse of ``handle``)."""
        rest = key[len(self.handles):]
        if "/" in rest:
            return "/".join(unescape(p) for p in rest.split("/"))
        return unescape(rest)

    def network_handles(self, network: str) -> str:
        """A prefix holding every handle of ``network`` in both layouts (and those of networks
        whose name starts with it: filter on the record's ``network``)."""
        return self.handles + escape(network)

    def namespace(self, ns: str) -> str:
        return self.namespaces + escape(ns)

    def node(self, node: str) -> str:
        return self.nodes + escape(node)

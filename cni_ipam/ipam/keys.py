"""The etcd key layout (all keys ASCII; outside names are percent-encoded).

    <prefix>/v1/config                         global IPAM settings (IPAMConfig)
    <prefix>/v1/pools/<name>                   one IP pool
    <prefix>/v1/blocks/v4/<hex addr>-<plen>    one block (hex so that keys sort numerically)
    <prefix>/v1/affinity/<node>/v4/<hex>-<plen> the node's claim on a block
    <prefix>/v1/handles/<handle id>            what one attachment holds (the release index)
    <prefix>/v1/namespaces/<ns>                namespace annotations (without Kubernetes)
    <prefix>/v1/nodes/<node>                   node labels (without Kubernetes)
"""
from __future__ import annotations

import ipaddress

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


class Keys:
    def __init__(self, prefix: str = "/cni-ipam"):
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.root = prefix + "/v1/"
        self.config = self.root + "config"
        self.pools = self.root + "pools/"
        self.blocks = self.root + "blocks/"
        self.affinity = self.root + "affinity/"
        self.handles = self.root + "handles/"
        self.namespaces = self.root + "namespaces/"
        self.nodes = self.root + "nodes/"

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
        return self.handles + escape(handle_id)

    def namespace(self, ns: str) -> str:
        return self.namespaces + escape(ns)

    def node(self, node: str) -> str:
        return self.nodes + escape(node)

"""Stored records other than blocks and pools: handles and the global IPAM config."""
from __future__ import annotations

from cni_ipam import ipnet  # addresses without importing ipaddress (issue 17)
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from cni_ipam._records import dataclass, field


@dataclass
class Assignment:
    """One address held by a handle, with what the CNI result needs."""
    ip: ipnet.Address
    block: ipnet.Network
    pool: str
    prefixlen: int
    gateway: ipnet.Address | None = None

    @property
    def interface(self):
        return ipnet.Interface(ipnet.ip_address(self.ip), self.prefixlen)

    def to_dict(self) -> dict:
        return {"ip": str(self.ip), "block": str(self.block), "pool": self.pool,
                "prefixlen": self.prefixlen, "gateway": str(self.gateway) if self.gateway else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Assignment":
        gw = d.get("gateway")
        return cls(ip=ipnet.ip_address(d["ip"]), block=ipnet.ip_network(d["block"]),
                   pool=str(d.get("pool", "")), prefixlen=int(d["prefixlen"]),
                   gateway=ipnet.ip_address(gw) if gw else None)


@dataclass
class Handle:
    """What one attachment (network, container, ifname) holds: the release index."""
    id: str
    node: str
    network: str = ""
    container_id: str = ""
    ifname: str = ""
    pod: str = ""
    namespace: str = ""
    pod_uid: str = ""
    mode: str = "bridge"
    created: str = ""
    addresses: list[Assignment] = field(default_factory=list)
    #: an attachment of a StatefulSet pod (keepStatefulSetIPs): the kept handle id its addresses
    #: move to on DEL (ipam/sticky.py); "" otherwise
    keep_as: str = ""
    #: a kept handle (ipam/sticky.py): {namespace, statefulSet, ordinal, pod, podUID, network, since}
    kept_for: dict | None = None

    def is_attachment(self, network: str, container_id: str, ifname: str) -> bool:
        """Whether this record is the one of that attachment (its own fields say so; a layout-1
        id alone cannot, see keys.legacy_handle_id)."""
        return (self.network, self.container_id, self.ifname) == (network, container_id, ifname)

    def to_json(self) -> bytes:
        d: dict = {"id": self.id, "node": self.node, "network": self.network, "containerID": self.container_id,
             "ifname": self.ifname, "pod": self.pod, "namespace": self.namespace, "podUID": self.pod_uid, "mode": self.mode,
             "created": self.created, "addresses": [a.to_dict() for a in self.addresses]}
        if self.keep_as:
            d["keepAs"] = self.keep_as
        if self.kept_for is not None:
            d["keptFor"] = self.kept_for
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Handle":
        try:
            d = json.loads(data)
            return cls(id=str(d["id"]), node=str(d["node"]), network=d.get("network", ""),
                       container_id=d.get("containerID", ""), ifname=d.get("ifname", ""),
                       pod=d.get("pod", ""), namespace=d.get("namespace", ""), pod_uid=d.get("podUID", ""),
                       mode=d.get("mode", "bridge"),
                       created=d.get("created", ""),
                       addresses=[Assignment.from_dict(a) for a in d.get("addresses", [])],
                       keep_as=str(d.get("keepAs") or ""),
                       kept_for=dict(d["keptFor"]) if isinstance(d.get("keptFor"), dict) else None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"undecodable handle: {e}") from None


MAX_COOLDOWN = 1200   # seconds (Calico's IPCooldownSeconds limit)


@dataclass
class IPAMConfig:
    """Cluster-wide settings (``kind: IPAMConfig``)."""
    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0  # 0: no limit
    #: StatefulSet pods keep their address across delete + recreate (ipam/sticky.py)
    keep_statefulset_ips: bool = False
    #: a released address is not handed out again for this long (0: off); at most MAX_COOLDOWN
    ip_cooldown_seconds: int = 0

    def to_dict(self) -> dict:
        # the opt-in fields only when set: the record (and its -o json) stays as older versions wrote it
        d = {"strictAffinity": self.strict_affinity, "autoAllocateBlocks": self.auto_allocate_blocks,
             "maxBlocksPerHost": self.max_blocks_per_host}
        if self.ip_cooldown_seconds:
            d["ipCooldownSeconds"] = self.ip_cooldown_seconds
        if self.keep_statefulset_ips:
            d["keepStatefulSetIPs"] = True
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | None) -> "IPAMConfig":
        if not data:
            return cls()
        try:
            d = json.loads(data)
            return cls(strict_affinity=bool(d.get("strictAffinity", False)),
                       auto_allocate_blocks=bool(d.get("autoAllocateBlocks", True)),
                       max_blocks_per_host=int(d.get("maxBlocksPerHost", 0)),
                       ip_cooldown_seconds=max(0, min(MAX_COOLDOWN, int(d.get("ipCooldownSeconds", 0) or 0))),
                       keep_statefulset_ips=bool(d.get("keepStatefulSetIPs", False)))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"undecodable IPAM config: {e}") from None


@dataclass
class Schema:
    """``<prefix>/v1/schema``: the data layout the store holds (``layout``: the newest any writer
    used) and the oldest layout a binary must understand to use it (``minLayout``).  A binary
    whose ``keys.LAYOUT`` is below ``minLayout`` refuses to work on the store (IncompatibleStore);
    one whose LAYOUT is above ``layout`` raises it with its next write.  Absent: layout 1."""
    layout: int = 1
    min_layout: int = 1
    written_by: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"layout": self.layout, "minLayout": self.min_layout, "writtenBy": self.written_by},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | None) -> "Schema":
        if not data:
            return cls()
        try:
            d = json.loads(data)
            layout, min_layout = d["layout"], d.get("minLayout", 1)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (layout, min_layout)):
                raise ValueError("layout and minLayout must be positive integers")
            return cls(layout=layout, min_layout=min_layout, written_by=str(d.get("writtenBy", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"undecodable schema record: {e}") from None

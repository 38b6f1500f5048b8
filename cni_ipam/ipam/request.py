"""What the engine's ADD is asked (``AssignRequest``, immutable) and answers (``AssignResult``),
and one attempt's plan (``_Plan``: a store.Txn with the blocks it allocates from and what it
must skip).  Split out of ipam/engine.py; engine re-exports the public names."""
from __future__ import annotations

from cni_ipam._records import dataclass, field
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable

from ..constants import DEFAULT_ANNOTATION_PREFIX
from .block import BRIDGE, Block
from .errors import CorruptData
from .model import Handle
from .pool import Pool
from .store import Txn


@dataclass(frozen=True)
class AssignRequest:
    """What one ADD asks for.  Immutable: a pool choice made elsewhere (Pod/Namespace
    annotations, ipam/annotations.py) gives a new request (``replace``)."""
    handle_id: str
    node: str
    #: the id an older layout gave this attachment (keys.legacy_handle_id): a record there is
    #: this attachment's only when its network/containerID/ifname fields match this request's
    legacy_handle_id: str = ""
    network: str = ""
    container_id: str = ""
    ifname: str = ""
    pod: str = ""
    namespace: str = ""
    pod_uid: str = ""
    mode: str = BRIDGE
    assign_v4: bool = True
    assign_v6: bool = False
    v4_pools: list[str] | None = None   # names or CIDRs; None: every matching enabled pool
    v6_pools: list[str] | None = None
    requested: list = field(default_factory=list)  # specific addresses, at most one per family
    gateways: dict = field(default_factory=dict)   # routed mode: {4: ip, 6: ip}
    routed_prefix: str = "host"   # routed mode: "host" -> /32 or /128; "block" -> the block's prefix
    node_matches: Callable[[Pool], bool] | None = None  # evaluates nodeSelector for this node
    ns_matches: Callable[[Pool], bool] | None = None    # evaluates namespaceSelector for the pod's namespace
    pool_sources: dict = field(default_factory=dict)    # per family {4: "...", 6: "..."}; default "config"
    # no Kubernetes: read the namespace's annotations and the node's labels from etcd
    # (<prefix>/v1/namespaces/<ns>, <prefix>/v1/nodes/<node>) in the first batched read
    labels_from_etcd: bool = False
    annotation_prefix: str = DEFAULT_ANNOTATION_PREFIX
    #: a StatefulSet pod's kept-handle id ``sts/<ns>/<sts>/<ordinal>`` (set from the Pod's
    #: ownerReferences; used only with IPAMConfig keepStatefulSetIPs: ipam/sticky.py)
    keep_as: str = ""
    keep_checked: bool = False   # sticky.assign found no kept record: allocate as usual (and mark)

    def replace(self, **changes) -> AssignRequest:
        """A copy with ``changes`` (the request itself never changes)."""
        return AssignRequest(**{**{n: getattr(self, n) for n in getattr(type(self), "__record_fields__")}, **changes})


@dataclass
class AssignResult:
    handle: Handle
    existing: bool = False   # True when the handle already held addresses (idempotent ADD)
    attempts: int = 1


class _Plan(Txn):
    """One attempt's transaction (store.Txn) with the blocks it rewrites, as ``Block``
    values still being allocated from (encoded by ``ops``), and what the plan must skip:
    ``reserved`` (a reservation.Reserved or None), ``cooldown`` seconds at ``now``."""

    __slots__ = ("blocks", "reserved", "cooldown", "now", "cooling_until")

    def __init__(self, by_value: bool = False):
        super().__init__(by_value)
        self.blocks: dict[str, Block] = {}
        self.reserved = None
        self.cooldown = 0
        self.now = 0.0
        self.cooling_until = 0.0   # the soonest a cooling address of a block looked at frees up

    def pick(self, b: Block) -> int | None:
        """The ordinal of ``b`` to allocate (skipping reserved and cooling addresses), or None."""
        if self.reserved is None and not self.cooldown:
            return b.free[0] if b.free else None   # the usual case: nothing to skip
        o, soon = b.pick(self.reserved.intervals(b.cidr) if self.reserved else (), self.cooldown, self.now)
        if o is None and soon and (not self.cooling_until or soon < self.cooling_until):
            self.cooling_until = soon
        return o

    def touch(self, key: str, rev: int, value: bytes | None, block: Block) -> None:
        """The plan allocates from ``block`` (read at ``rev`` holding ``value``)."""
        self.update(key, rev, value, block)
        self.blocks[key] = block


class _Fallback(Exception):
    """Internal: the snapshot cannot answer this request (a claim, a borrow, data it lacks)."""


class _Kept(_Fallback):
    """Internal: a StatefulSet pod with keepStatefulSetIPs on: ipam/sticky.py plans this ADD."""


def _reserved(key: str, value: bytes | None):
    """The store's reservations (ipam/reservation.py) or None when there is none: the module
    is imported only when a reservation exists."""
    if not value:
        return None
    from .reservation import Reserved, decode
    try:
        r = Reserved(decode(value))
    except ValueError as e:
        raise CorruptData(f"corrupt value at etcd key {key}: {e}") from None
    return r or None

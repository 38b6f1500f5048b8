"""IP pools as pure values, pool selection, and the free-block search.

Nothing in this module talks to etcd: the free-block search takes two small
callables (list block indexes from a point; count blocks in a range).
"""
from __future__ import annotations

from cni_ipam import ipnet  # addresses without importing ipaddress (issue 17)
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from cni_ipam._records import dataclass, field
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Sequence

from .block import usable_in_mode
from .errors import CorruptData, InvalidRequest
from ..log import log

try:  # blake2b without hashlib, which loads OpenSSL's libcrypto (~2 ms on every plugin exec)
    from _blake2 import blake2b as _blake2b
except ImportError:  # pragma: no cover - an interpreter without the builtin module
    from hashlib import blake2b as _blake2b

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
AUTOMATIC, MANUAL = "Automatic", "Manual"
ASSIGNMENT_MODES = (AUTOMATIC, MANUAL)
BLOCK_SIZE_RANGE = {4: (20, 32), 6: (116, 128)}


class PoolError(ValueError):
    pass


@dataclass
class Pool:
    name: str
    cidr: ipnet.Network
    block_size: int
    disabled: bool = False
    node_selector: str = "all()"
    allowed_uses: list[str] = field(default_factory=lambda: ["Workload", "Tunnel"])
    #: Automatic: the automatic choice may use the pool; Manual: only when named
    assignment_mode: str = AUTOMATIC
    #: matched against the pod's namespace labels by the automatic choice (with nodeSelector)
    namespace_selector: str = "all()"
    # Calico's fields: kept and shown, no effect on allocation
    ipip_mode: str | None = None
    vxlan_mode: str | None = None
    nat_outgoing: bool | None = None
    disable_bgp_export: bool | None = None

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def n_blocks(self) -> int:
        return 1 << (self.block_size - self.cidr.prefixlen)

    @property
    def block_addresses(self) -> int:
        return 1 << ((32 if self.version == 4 else 128) - self.block_size)

    def block_at(self, index: int):
        base = int(self.cidr.network_address) + index * self.block_addresses
        return ipnet.Network(self.version, base, self.block_size)

    def block_index(self, net) -> int:
        return (int(net.network_address) - int(self.cidr.network_address)) // self.block_addresses

    def block_of(self, ip):
        """The block (network) of this pool that contains ``ip``."""
        return ipnet.network_of(self.version, int(ip), self.block_size)

    def usable_in(self, mode: str) -> bool:
        return usable_in_mode(self.block_size, self.version, mode)

    # -- serialisation: the stored form is the manifest's spec -------------
    def to_dict(self) -> dict:
        d = {"name": self.name, "cidr": str(self.cidr), "blockSize": self.block_size,
             "disabled": self.disabled, "nodeSelector": self.node_selector,
             "allowedUses": list(self.allowed_uses)}
        # only when not the default: a pool record stays byte-identical to what older versions wrote
        if self.assignment_mode != AUTOMATIC:
            d["assignmentMode"] = self.assignment_mode
        if self.namespace_selector not in ("", "all()"):
            d["namespaceSelector"] = self.namespace_selector
        for k, v in (("ipipMode", self.ipip_mode), ("vxlanMode", self.vxlan_mode),
                     ("natOutgoing", self.nat_outgoing), ("disableBGPExport", self.disable_bgp_export)):
            if v is not None:
                d[k] = v
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict) -> "Pool":
        """Decode a stored pool, checking the rules every pool was written under (a value that
        breaks them would allocate outside the pool or crash the arithmetic): PoolError."""
        try:
            name, cidr, bs = d["name"], d["cidr"], d["blockSize"]
            disabled = d.get("disabled")
            if not isinstance(name, str) or not isinstance(cidr, str) or "/" not in cidr:
                raise ValueError("name and cidr (with a prefix length) must be strings")
            net = ipnet.ip_network(cidr)
            if isinstance(bs, bool) or not isinstance(bs, int):
                raise ValueError(f"blockSize {bs!r} is not an integer")
            lo, hi = BLOCK_SIZE_RANGE[net.version]
            if not (lo <= bs <= hi and bs >= net.prefixlen):
                raise ValueError(f"blockSize {bs} does not fit the IPv{net.version} pool {net}")
            if disabled is not None and not isinstance(disabled, bool):
                raise ValueError(f"disabled {disabled!r} is not a boolean")
            amode = d.get("assignmentMode") or AUTOMATIC
            if amode not in ASSIGNMENT_MODES:
                raise ValueError(f"assignmentMode {amode!r} is not Automatic or Manual")
            nsel = d.get("namespaceSelector") or "all()"
            if not isinstance(nsel, str):
                raise ValueError(f"namespaceSelector {nsel!r} is not a string")
            return cls(name=name, cidr=net, block_size=bs,
                       disabled=bool(disabled), node_selector=d.get("nodeSelector") or "all()",
                       allowed_uses=list(d.get("allowedUses") or ["Workload", "Tunnel"]),
                       ipip_mode=d.get("ipipMode"), vxlan_mode=d.get("vxlanMode"),
                       nat_outgoing=d.get("natOutgoing"), disable_bgp_export=d.get("disableBGPExport"),
                       assignment_mode=amode, namespace_selector=nsel)
        except (KeyError, ValueError, TypeError) as e:
            raise PoolError(f"undecodable pool: {e}") from None

    @classmethod
    def from_json(cls, data: bytes) -> "Pool":
        try:
            d = json.loads(data)
        except ValueError as e:
            raise PoolError(f"undecodable pool: {e}") from None
        if not isinstance(d, dict):
            raise PoolError("undecodable pool: not an object")
        return cls.from_dict(d)


def make_pool(name: str, cidr: str, block_size: int | None = None, **kw) -> Pool:
    """Build a pool from its fields through THE pool validator, ``manifest.parse_resource``
    (the rules of ``cni-ipam apply``); ``kw`` are Pool fields (``disabled``, ``node_selector``,
    ...).  PoolError names every problem."""
    from .manifest import pool_from_fields   # the admin path: never loaded by the plugin's exec path
    return pool_from_fields(name, cidr, block_size, **kw)


# -- pool selection ------------------------------------------------------------

def select_pools(version: int, wanted: Sequence[str] | None, pools: Sequence[Pool], mode: str,
                 node_matches: Callable[[Pool], bool] = lambda p: True,
                 source: str = "config",
                 ns_matches: Callable[[Pool], bool] | None = None) -> list[Pool]:
    """The pools to allocate from, in order.

    ``wanted`` (names or CIDRs, from an annotation or the CNI config): each must
    name an existing, enabled pool of this family; used even if its nodeSelector
    does not match (Manual pools too).  ``None``: every enabled Automatic pool whose
    nodeSelector matches the node and whose namespaceSelector ``ns_matches`` the pod's
    namespace (both tested only for the pools still in the running).
    Pools whose blocks are too small for ``mode`` are left out; if that leaves
    nothing, the error says so."""
    fam = [p for p in pools if p.version == version]
    if wanted:
        chosen: list[Pool] = []
        for ref in wanted:
            p = _find_pool(ref, fam)
            if p is None:
                raise InvalidRequest(f"IPv{version} pool {ref!r} (from {source}) does not exist")
            if p.disabled:
                raise InvalidRequest(f"IPv{version} pool {p.name!r} (from {source}) is disabled")
            if p not in chosen:
                chosen.append(p)
    else:
        auto = [p for p in sorted(fam, key=lambda p: p.name)
                if not p.disabled and p.assignment_mode != MANUAL]
        chosen = [p for p in auto if node_matches(p)]
        if not chosen:
            manual = "" if len(auto) == sum(1 for p in fam if not p.disabled) else \
                " (Manual pools are used only when named by the config or an annotation)"
            raise InvalidRequest(f"no enabled IPv{version} pool matches this node{manual}")
        if ns_matches is not None:
            on_node = chosen
            chosen = [p for p in on_node if ns_matches(p)]
            if not chosen:
                raise InvalidRequest(f"no enabled IPv{version} pool matches this node and the pod's namespace "
                                     f"(namespaceSelector of {', '.join(p.name for p in on_node)})")
    usable = [p for p in chosen if p.usable_in(mode)]
    if not usable:
        names = ", ".join(f"{p.name} (blockSize {p.block_size})" for p in chosen)
        raise InvalidRequest(f"no IPv{version} pool is usable in {mode} mode: the blocks of {names} "
                             f"are too small to hold a gateway and an address; use routed mode or a larger blockSize")
    return usable


def _find_pool(ref: str, pools: Sequence[Pool]) -> Pool | None:
    for p in pools:
        if p.name == ref:
            return p
    try:
        net = ipnet.ip_network(ref, strict=False)
    except ValueError:
        return None
    for p in pools:
        if p.cidr == net:
            return p
    return None


def pool_of_ip(ip, pools: Sequence[Pool]) -> Pool | None:
    for p in pools:
        if p.version == ip.version and ip in p.cidr:
            return p
    return None


# -- free-block search -----------------------------------------------------------

def start_index(node: str, n_blocks: int) -> int:
    """Where a node starts looking for a free block: hashed from its name, so that
    nodes claiming at the same time rarely race for the same block."""
    h = int.from_bytes(_blake2b(node.encode(), digest_size=8).digest(), "big")
    return h % n_blocks


def find_free_block(n_blocks: int, start: int,
                    list_from: Callable[[int, int, int], list[int]],
                    counts_in: Callable[[list[tuple[int, int]]], list[int]],
                    scan: int = 32, fanout: int = 64, probes: int = 4) -> int | None:
    """An unclaimed block index, or None when the pool has none.

    ``list_from(lo, hi, limit)`` returns the claimed indexes in [lo, hi) in order,
    at most ``limit``; ``counts_in(ranges)`` counts the claimed indexes of each
    [lo, hi) range -- all of them in ONE request.

    1. One short listing of the window at ``start`` (the node's hashed start
       point): the first gap there is the answer -- usually one request.
    2. If that window is dense (other nodes hold a run of blocks there), list the
       window just before ``start`` (runs grow forward from the start points of
       the nodes that claimed them), then a few windows spread over the pool: in
       a pool that is not nearly full one of them has a gap.
    3. Only in a nearly full pool: cut the pool into ``fanout`` ranges, count
       them all at once and descend into the first range with a gap --
       log_fanout(n) requests (3 for 262,144 blocks).
    No step lists every block of the pool.

    Each listing is bounded (``4 * scan`` indexes, at most ``scan`` keys
    returned): etcd 3.4 walks every key of a range before it applies the limit,
    so a range running to the end of the pool would cost time in proportion to
    the blocks other nodes claimed after it."""
    window = 4 * scan

    def gap_in(lo: int) -> int | None:
        hi = min(n_blocks, lo + window)
        claimed = list_from(lo, hi, scan)
        expect = lo
        for i in claimed:
            if i > expect:
                return expect
            expect = i + 1
        if len(claimed) < scan and expect < hi:
            return expect
        return None

    got = gap_in(start)
    if got is not None:
        return got
    if n_blocks > window:
        # first the window just BEFORE the start point (runs grow forward from the start
        # points of the nodes that claimed them), then windows spread over the pool
        for lo in [(start - window) % n_blocks] + [(start + k * n_blocks // probes) % n_blocks
                                                   for k in range(1, probes)]:
            got = gap_in(lo)
            if got is not None:
                return got
    for lo, hi in ((start, n_blocks), (0, start)):
        while lo < hi:
            k = min(fanout, hi - lo)
            cuts = [lo + (hi - lo) * j // k for j in range(k + 1)]
            ranges = [(cuts[j], cuts[j + 1]) for j in range(k) if cuts[j] < cuts[j + 1]]
            for (a, b), c in zip(ranges, counts_in(ranges)):
                if c < b - a:
                    if b - a == 1:
                        return a
                    lo, hi = a, b
                    break
            else:
                break  # every range is full: try the other side of the start point
    return None


# -- node and namespace selectors (pool choice; ipam/annotations.py re-exports them) --------

def node_matcher(node: str, get_labels: Callable[[], dict]) -> Callable:
    """``matches(pool)`` for select_pools: evaluates the pool's nodeSelector against
    the node's labels; ``get_labels`` is called at most once, and only when some
    pool's selector is not ``all()``."""
    cache: list[dict] = []

    def matches(pool) -> bool:
        if not pool.node_selector or pool.node_selector == "all()":
            return True   # the default: matches every node (no parser imported on an ADD's path)
        from .selector import SelectorError, parse as parse_selector
        try:
            sel = parse_selector(pool.node_selector)
        except SelectorError as e:
            raise CorruptData(f"pool {pool.name!r} has an invalid nodeSelector "
                              f"{pool.node_selector!r}: {e}") from None
        if sel.matches_all:
            return True
        if not cache:
            cache.append(get_labels() or {})
        ok = sel.matches(cache[0])
        log.debug("pool %s: nodeSelector %r %s node %s", pool.name, pool.node_selector,
                  "matches" if ok else "does not match", node)
        return ok
    return matches


def namespace_matcher(namespace: str, get_labels: Callable[[], dict]) -> Callable:
    """``matches(pool)`` for select_pools: the pool's namespaceSelector against the pod's
    namespace labels (``get_labels`` called at most once, only for a selector other than
    ``all()``).  Without a namespace (not a Kubernetes pod) only ``all()`` matches."""
    cache: list[dict] = []

    def matches(pool) -> bool:
        text = pool.namespace_selector
        if not text or text == "all()":
            return True
        from .selector import SelectorError, parse as parse_selector
        try:
            sel = parse_selector(text)
        except SelectorError as e:
            raise CorruptData(f"pool {pool.name!r} has an invalid namespaceSelector {text!r}: {e}") from None
        if sel.matches_all:
            return True
        if not namespace:
            return False
        if not cache:
            cache.append(get_labels() or {})
        ok = sel.matches(cache[0])
        log.debug("pool %s: namespaceSelector %r %s namespace %s", pool.name, text,
                  "matches" if ok else "does not match", namespace)
        return ok
    return matches

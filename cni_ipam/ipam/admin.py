"""Engine-side admin logic: manifests, apply, pool enable/disable/delete, usage, check, release.

Layout: the pure parts (manifest parsing and validation, ``plan_apply``, the
``Checker`` and the usage accumulator) take plain values and never touch etcd;
the thin functions below them (``apply``, ``set_pool_disabled``, ``delete_pool``,
``usage``, ``borrowed``, ``ip_info``, ``check``, ``release_*``) do the reads and the
compare-and-swap writes through the datastore interface.

Scale: nothing here reads blocks one by one.  Blocks, handles and affinities are
streamed with paged range reads (``iter_range``) and summarised as they go, so
memory does not grow with the number of blocks (except ``check``'s cross-index
of addresses, which is one small entry per allocated address).
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
import socket
import time
from cni_ipam._records import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from ..datastore import KV, Compare, Datastore, Delete, Put, Read, prefix_end, read_prefix
from ..datastore.base import MAX_TXN_OPS
from . import selector as _selector
from .block import BRIDGE, ROUTED, Block, BlockError, reserved_ordinals
from .errors import IPAMError
from .keys import Keys, block_from_id, unescape
from .model import Handle, IPAMConfig
from .pool import BLOCK_SIZE_RANGE, DEFAULT_BLOCK_SIZE, Pool, PoolError

# ----------------------------------------------------------------------------- errors


class AdminError(IPAMError):
    """An admin operation was refused; ``msg`` is one line for the operator."""
    code = 1


class ManifestError(AdminError):
    """A manifest is invalid; nothing from it was applied."""

    @property
    def problems(self) -> list[str]:
        return [self.msg]


class ManifestErrors(ManifestError):
    """Several problems, all reported at once (``problems``); nothing was applied."""

    def __init__(self, problems: list[str]):
        self._problems = list(problems)
        n = len(self._problems)
        super().__init__(self._problems[0] if n == 1 else
                         f"{n} problems in the manifests; nothing was applied")

    @property
    def problems(self) -> list[str]:
        return list(self._problems)


class _Problems:
    """Collects ManifestErrors so that every problem of a manifest is reported in one run."""

    def __init__(self):
        self.msgs: list[str] = []

    def run(self, fn, *args, default=None):
        try:
            return fn(*args)
        except ManifestError as e:
            self.msgs.extend(e.problems)
            return default

    def raise_any(self) -> None:
        if self.msgs:
            raise ManifestErrors(self.msgs)


class NotFound(AdminError):
    pass


class Conflict(AdminError):
    """A compare-and-swap lost against a concurrent writer."""


# ----------------------------------------------------------------------------- constants

API_VERSIONS = ("projectcalico.org/v3", "cni-ipam/v1")
OUR_API_VERSION = "cni-ipam/v1"
POOL_KIND = "IPPool"
CONFIG_KINDS = ("IPAMConfig", "IPAMConfiguration")   # ours / Calico v3's name for the same thing
LIST_KINDS = ("List", "IPPoolList")
TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec")
LIST_FIELDS = ("apiVersion", "kind", "metadata", "items")
# Kubernetes object metadata a calicoctl export carries; only ``name`` is used.
METADATA_FIELDS = ("name", "labels", "annotations", "uid", "resourceVersion", "creationTimestamp",
                   "generation")
POOL_SPEC_FIELDS = ("cidr", "blockSize", "disabled", "nodeSelector", "allowedUses", "ipipMode",
                    "vxlanMode", "natOutgoing", "disableBGPExport")
CONFIG_SPEC_FIELDS = ("strictAffinity", "autoAllocateBlocks", "maxBlocksPerHost")
ENCAP_MODES = ("Never", "Always", "CrossSubnet")
ALLOWED_USES = ("Workload", "Tunnel", "LoadBalancer")
CONFIG_NAME = "default"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: one apply is ONE etcd transaction: a compare per resource plus the config and the pool-set marker
MAX_RESOURCES = MAX_TXN_OPS - 2
MAX_NAME = 253
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
#: ranges no pool may overlap (link-local per the issue; loopback and multicast make no sense either)
FORBIDDEN = {4: [("link-local", ipaddress.ip_network("169.254.0.0/16")),
                 ("loopback", ipaddress.ip_network("127.0.0.0/8")),
                 ("multicast", ipaddress.ip_network("224.0.0.0/4"))],
             6: [("link-local", ipaddress.ip_network("fe80::/10")),
                 ("loopback", ipaddress.ip_network("::1/128")),
                 ("multicast", ipaddress.ip_network("ff00::/8")),
                 # IPv4 addresses written as IPv6 (::ffff:a.b.c.d): the same addresses as an IPv4
                 # pool could hold, and no IPv6 stack routes them as IPv6
                 ("IPv4-mapped", ipaddress.ip_network("::ffff:0:0/96"))]}

PAGE = 500  # keys per range request when streaming


def poolset_key(keys: Keys) -> str:
    """Bumped by every apply that creates a pool, and compared by every apply: two applies
    that race to create DIFFERENT but overlapping pools cannot both commit."""
    return keys.root + "poolset"


# ----------------------------------------------------------------------------- streaming

def iter_range(ds: Datastore, start: str, end: str, *, keys_only: bool = False,
               page: int = PAGE) -> Iterator[KV]:
    """Every key in [start, end), one page per request, without holding more than a page."""
    while True:
        res = ds.read([Read(start, end, keys_only=keys_only, limit=page)])[0]
        yield from res.kvs
        if not res.more or not res.kvs:
            return
        start = res.kvs[-1].key + "\0"


def iter_prefix(ds: Datastore, prefix: str, **kw) -> Iterator[KV]:
    return iter_range(ds, prefix, prefix_end(prefix), **kw)


def cidr_block_range(keys: Keys, net) -> tuple[str, str]:
    """The block-key range holding every block inside ``net``, whatever the blocks' size
    (keys are ``v4/<zero-padded hex network>-<plen>``; '.' sorts right after '-')."""
    width = 8 if net.version == 4 else 32
    base = keys.blocks + "v%d/" % net.version
    return (base + "%0*x" % (width, int(net.network_address)),
            base + "%0*x" % (width, int(net.broadcast_address)) + ".")


def _first(res) -> KV | None:
    return res.kvs[0] if res.kvs else None


def _short(v, n: int = 60) -> str:
    """A value for a one-line message: short, printable, and cheap even for hostile input."""
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, (list, tuple, set)):
        return "a list"
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return "a very large integer"
    if isinstance(v, str):
        v = v[:n]
        s = "'" + v + "'" if v.isprintable() and "'" not in v else repr(v)
    elif isinstance(v, (int, float, bool)) or v is None:
        s = repr(v)
    else:
        s = f"a {type(v).__name__}"
    return s if len(s) <= n else s[:n - 3] + "..."


# ============================================================================= manifests

@dataclass
class Doc:
    where: str          # "pools.yaml document 2" -- for messages
    body: object


@dataclass
class Resource:
    kind: str           # POOL_KIND or "IPAMConfig"
    name: str
    where: str
    pool: Pool | None = None
    config: IPAMConfig | None = None

    @property
    def label(self) -> str:
        return f'{self.kind} "{self.name}"'


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that rejects duplicate keys (a silently dropped key is a typo trap)."""

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "unhashable key", key_node.start_mark)
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_short(key)}",
                                                        key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def _no_dup_pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {_short(k)}")
        d[k] = v
    return d


def load_documents(data: bytes, source: str) -> list[Doc]:
    """Split a manifest into documents: JSON (an object or an array of objects) or
    multi-document YAML.  ``kind: List`` / ``IPPoolList`` documents are expanded."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: manifest is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not UTF-8 text (byte {e.start})") from None
    if "\0" in text:
        raise ManifestError(f"{source}: contains a NUL byte; not a text manifest")
    stripped = text.lstrip()
    raw: list = []
    if stripped[:1] in ("{", "["):
        try:
            obj = json.loads(text, object_pairs_hook=_no_dup_pairs)
        except RecursionError:
            raise ManifestError(f"{source}: invalid JSON: nested too deeply") from None
        except ValueError as e:
            raise ManifestError(f"{source}: invalid JSON: {e}") from None
        raw = obj if isinstance(obj, list) else [obj]
    else:
        import yaml
        try:
            raw = [d for d in yaml.load_all(text, Loader=_yaml_loader()) if d is not None]
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ManifestError(f"{source}: invalid YAML{at}: {problem}") from None
        except RecursionError:
            raise ManifestError(f"{source}: invalid YAML: nested too deeply") from None
    docs: list[Doc] = []
    for i, body in enumerate(raw, 1):
        where = f"{source} document {i}" if len(raw) > 1 else source
        if isinstance(body, dict) and body.get("kind") in LIST_KINDS:
            _check_fields(where, "", body, LIST_FIELDS, f'{body.get("kind")}')
            _check_api_version(where, body)
            items = body.get("items")
            if items is None:
                items = []
            if not isinstance(items, list):
                raise ManifestError(f"{where}: items: must be a list, not {type(items).__name__}")
            docs.extend(Doc(f"{where} item {j}", it) for j, it in enumerate(items, 1))
        else:
            docs.append(Doc(where, body))
    if not docs:
        raise ManifestError(f"{source}: no resources found")
    if len(docs) > MAX_RESOURCES:
        raise ManifestError(f"{source}: {len(docs)} resources; at most {MAX_RESOURCES} can be applied "
                            f"at once (one etcd transaction); split the file")
    return docs


def _check_fields(where: str, path: str, obj: dict, known: Sequence[str], ctx: str) -> None:
    """Every unknown field of ``obj`` (all of them, each with its 'did you mean')."""
    problems = _Problems()
    for k in obj:
        problems.run(_check_field, where, path, k, known, ctx)
    problems.raise_any()


def _check_field(where: str, path: str, k, known: Sequence[str], ctx: str) -> None:
    if not isinstance(k, str):
        raise ManifestError(f"{where}: {ctx}: {path}{_short(k)}: field names must be strings")
    if k not in known:
        hint = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
        if not hint:
            hint = [n for n in known if n.lower() == k.lower()]
        did = f" (did you mean {path}{hint[0]}?)" if hint else f" (known: {', '.join(known)})"
        shown = k if len(k) <= 40 else k[:37] + "..."
        if not shown.isprintable():
            shown = repr(shown)
        raise ManifestError(f"{where}: {ctx}: {path}{shown}: unknown field{did}")


def _check_api_version(where: str, doc: dict) -> None:
    av = doc.get("apiVersion")
    if av is None:
        raise ManifestError(f"{where}: apiVersion: missing (use {' or '.join(API_VERSIONS)})")
    if av not in API_VERSIONS:
        raise ManifestError(f"{where}: apiVersion: {_short(av)} is not supported "
                            f"(use {' or '.join(API_VERSIONS)})")


def parse_resources(docs: Iterable[Doc]) -> list[Resource]:
    """Validate every document on its own (fields, types, CIDRs, block sizes, selectors)
    and across the file (duplicate names, one IPAMConfig, overlaps inside the file)."""
    out: list[Resource] = []
    names: dict[str, str] = {}
    config_where = None
    problems = _Problems()
    for d in docs:
        r = problems.run(parse_resource, d)
        if r is None:
            continue
        if r.kind == POOL_KIND:
            if r.name in names:
                problems.msgs.append(f"{d.where}: {r.label}: metadata.name: defined twice "
                                     f"(also in {names[r.name]})")
                continue
            names[r.name] = d.where
        else:
            if config_where:
                problems.msgs.append(f"{d.where}: IPAMConfig: defined twice (also in {config_where})")
                continue
            config_where = d.where
        out.append(r)
    problems.raise_any()
    return out


def parse_resource(doc: Doc) -> Resource:
    where, body = doc.where, doc.body
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: not a mapping (got {type(body).__name__})")
    kind = body.get("kind")
    if kind is None:
        raise ManifestError(f"{where}: kind: missing (use {POOL_KIND} or IPAMConfig)")
    if kind != POOL_KIND and kind not in CONFIG_KINDS:
        raise ManifestError(f"{where}: kind: {_short(kind)} is not supported (use {POOL_KIND} or IPAMConfig)")
    _check_api_version(where, body)
    ctx = str(kind)
    problems = _Problems()
    problems.run(_check_fields, where, "", body, TOP_FIELDS, ctx)
    meta = body.get("metadata")
    if kind == POOL_KIND or meta is not None:
        if meta is None:
            problems.msgs.append(f"{where}: {ctx}: metadata.name: missing")
        elif not isinstance(meta, dict):
            problems.msgs.append(f"{where}: {ctx}: metadata: must be a mapping")
            meta = None
        else:
            problems.run(_check_fields, where, "metadata.", meta, METADATA_FIELDS, ctx)
    name = (meta or {}).get("name")
    if kind == POOL_KIND:
        if name is None:
            if meta is not None:
                problems.msgs.append(f"{where}: {ctx}: metadata.name: missing")
        elif not isinstance(name, str) or not name or len(name) > MAX_NAME or not _NAME_RE.match(name):
            problems.msgs.append(f"{where}: {ctx}: metadata.name: {_short(name)} is not a valid name "
                                 f"(lower-case letters, digits, '-' and '.', at most {MAX_NAME} characters, "
                                 f"starting and ending with a letter or digit)")
        else:
            ctx = f'{kind} "{name}"'
        spec = problems.run(_spec, where, ctx, body, POOL_SPEC_FIELDS)
        pool = problems.run(parse_pool_spec, where, ctx, str(name), spec) if spec is not None else None
        problems.raise_any()
        return Resource(POOL_KIND, name, where, pool=pool)
    if name is not None and name != CONFIG_NAME:
        problems.msgs.append(f"{where}: {ctx}: metadata.name: must be {CONFIG_NAME!r} "
                             f"(there is one global IPAM config), not {_short(name)}")
    spec = problems.run(_spec, where, ctx, body, CONFIG_SPEC_FIELDS)
    cfg = problems.run(parse_config_spec, where, ctx, spec) if spec is not None else None
    problems.raise_any()
    return Resource("IPAMConfig", CONFIG_NAME, where, config=cfg)


def _spec(where, ctx, body, known) -> dict:
    spec = body.get("spec")
    if spec is None:
        raise ManifestError(f"{where}: {ctx}: spec: missing")
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: {ctx}: spec: must be a mapping, not {type(spec).__name__}")
    problems = _Problems()
    problems.run(_check_fields, where, "spec.", spec, known, ctx)
    # the fields that are known are still validated (and their problems reported with these)
    known_part = {k: v for k, v in spec.items() if k in known}
    return _SpecWithProblems(known_part, problems.msgs)


class _SpecWithProblems(dict):
    """A spec (its known fields) carrying the unknown-field problems found so far."""

    def __init__(self, d: dict, problems: list[str]):
        super().__init__(d)
        self.problems = problems


def _bool_field(where, ctx, spec, k, default):
    v = spec.get(k)
    if v is None:
        return default
    if not isinstance(v, bool):
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            b = "true" if v.strip().lower() in ("true", "yes", "on") else "false"
            raise ManifestError(f"{where}: {ctx}: spec.{k}: must be a YAML boolean, not the quoted string "
                                f"{_short(v)} (write {k}: {b}, without quotes)")
        raise ManifestError(f"{where}: {ctx}: spec.{k}: must be true or false, not {_short(v)}")
    return v


def _enum_field(where, ctx, spec, k, allowed):
    v = spec.get(k)
    if v is None:
        return None
    if v not in allowed:
        raise ManifestError(f"{where}: {ctx}: spec.{k}: {_short(v)} is not one of {', '.join(allowed)}")
    return v


def _pool_cidr(where: str, ctx: str, spec: dict):
    raw = spec.get("cidr")
    if raw is None:
        raise ManifestError(f"{where}: {ctx}: spec.cidr: missing")
    if not isinstance(raw, str):
        raise ManifestError(f"{where}: {ctx}: spec.cidr: must be a string like 10.0.0.0/16, not {_short(raw)}")
    if "/" not in raw:
        raise ManifestError(f"{where}: {ctx}: spec.cidr: {_short(raw)} has no prefix length (e.g. 10.0.0.0/16)")
    try:
        loose = ipaddress.ip_network(raw.strip(), strict=False)
    except ValueError as e:
        raise ManifestError(f"{where}: {ctx}: spec.cidr: {_short(raw)} is not a valid CIDR: {e}") from None
    if int(ipaddress.ip_interface(raw.strip()).ip) != int(loose.network_address):
        raise ManifestError(f"{where}: {ctx}: spec.cidr: {_short(raw)} has host bits set "
                            f"(did you mean {loose}?)")
    net = loose
    for what, bad in FORBIDDEN[net.version]:
        if net.overlaps(bad):
            raise ManifestError(f"{where}: {ctx}: spec.cidr: {net} overlaps the {what} range {bad}")
    return net


def _pool_block_size(where: str, ctx: str, spec: dict, net) -> int:
    bs = spec.get("blockSize")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int)):
        raise ManifestError(f"{where}: {ctx}: spec.blockSize: must be an integer, not {_short(bs)}")
    if net is None:       # the cidr has its own problem: the size cannot be checked against it
        return bs
    if bs is None:
        bs = DEFAULT_BLOCK_SIZE[net.version]
    lo, hi = BLOCK_SIZE_RANGE[net.version]
    if not lo <= bs <= hi:
        raise ManifestError(f"{where}: {ctx}: spec.blockSize: {bs} is out of range {lo}-{hi} for IPv{net.version}")
    if bs < net.prefixlen:
        raise ManifestError(f"{where}: {ctx}: spec.blockSize: /{bs} is larger than the pool {net}")
    return bs


def _pool_selector(where: str, ctx: str, spec: dict) -> str:
    sel = spec.get("nodeSelector")
    if sel is None:
        sel = "all()"
    if not isinstance(sel, str):
        raise ManifestError(f"{where}: {ctx}: spec.nodeSelector: must be a string, not {_short(sel)}")
    try:
        _selector.parse(sel)
    except _selector.SelectorError as e:
        raise ManifestError(f"{where}: {ctx}: spec.nodeSelector: {e} in {_short(sel, 80)}") from None
    if not sel.strip():
        sel = "all()"
    return sel


def _pool_uses(where: str, ctx: str, spec: dict) -> list:
    uses = spec.get("allowedUses")
    if uses is None:
        uses = ["Workload", "Tunnel"]
    if not isinstance(uses, list) or not uses:
        raise ManifestError(f"{where}: {ctx}: spec.allowedUses: must be a non-empty list of "
                            f"{', '.join(ALLOWED_USES)}")
    for u in uses:
        if u not in ALLOWED_USES:
            raise ManifestError(f"{where}: {ctx}: spec.allowedUses: {_short(u)} is not one of "
                                f"{', '.join(ALLOWED_USES)}")
    if len(set(uses)) != len(uses):
        raise ManifestError(f"{where}: {ctx}: spec.allowedUses: lists a use twice")
    return list(uses)


def _pool_encap(where: str, ctx: str, spec: dict, net) -> tuple:
    problems = _Problems()
    ipip = problems.run(_enum_field, where, ctx, spec, "ipipMode", ENCAP_MODES)
    vxlan = problems.run(_enum_field, where, ctx, spec, "vxlanMode", ENCAP_MODES)
    problems.raise_any()
    if net is not None and net.version == 6 and ipip not in (None, "Never"):
        raise ManifestError(f"{where}: {ctx}: spec.ipipMode: IPIP is not supported on an IPv6 pool (use Never)")
    if ipip not in (None, "Never") and vxlan not in (None, "Never"):
        raise ManifestError(f"{where}: {ctx}: spec.vxlanMode: IPIP and VXLAN cannot both be enabled")
    return ipip, vxlan


def parse_pool_spec(where: str, ctx: str, name: str, spec: dict) -> Pool:
    """Validate every field of a pool's spec; ALL problems are reported together."""
    problems = _Problems()
    problems.msgs.extend(getattr(spec, "problems", ()))
    net = problems.run(_pool_cidr, where, ctx, spec)
    bs = problems.run(_pool_block_size, where, ctx, spec, net)
    sel = problems.run(_pool_selector, where, ctx, spec)
    uses = problems.run(_pool_uses, where, ctx, spec)
    encap = problems.run(_pool_encap, where, ctx, spec, net)
    disabled = problems.run(_bool_field, where, ctx, spec, "disabled", False)
    nat = problems.run(_bool_field, where, ctx, spec, "natOutgoing", None)
    bgp = problems.run(_bool_field, where, ctx, spec, "disableBGPExport", None)
    problems.raise_any()
    ipip, vxlan = encap
    return Pool(name=name, cidr=net, block_size=bs, disabled=disabled, node_selector=sel, allowed_uses=uses,
                ipip_mode=ipip, vxlan_mode=vxlan, nat_outgoing=nat, disable_bgp_export=bgp)


def parse_config_spec(where: str, ctx: str, spec: dict) -> IPAMConfig:
    d = IPAMConfig()
    problems = _Problems()
    problems.msgs.extend(getattr(spec, "problems", ()))
    cfg = IPAMConfig(strict_affinity=problems.run(_bool_field, where, ctx, spec, "strictAffinity",
                                                  d.strict_affinity, default=d.strict_affinity),
                     auto_allocate_blocks=problems.run(_bool_field, where, ctx, spec, "autoAllocateBlocks",
                                                       d.auto_allocate_blocks, default=d.auto_allocate_blocks))
    m = spec.get("maxBlocksPerHost")
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 1_000_000:
            problems.msgs.append(f"{where}: {ctx}: spec.maxBlocksPerHost: must be an integer "
                                 f"from 0 (no limit) to 1000000, not {_short(m)}")
        else:
            cfg.max_blocks_per_host = m
    problems.raise_any()
    problem = config_problem(cfg)
    if problem:
        raise ManifestError(f"{where}: {ctx}: spec: {problem}")
    return cfg


def config_problem(cfg: IPAMConfig) -> str | None:
    """Combinations of settings that make no sense."""
    if not cfg.auto_allocate_blocks and not cfg.strict_affinity:
        return ("autoAllocateBlocks false needs strictAffinity true: without automatic block "
                "allocation and without strict affinity, nodes could only borrow other nodes' addresses")
    if cfg.max_blocks_per_host < 0:
        return "maxBlocksPerHost must not be negative"
    return None


def pool_manifest(p: Pool) -> dict:
    """The manifest form of a stored pool (``pool get -o yaml`` | ``apply -f -`` round-trips)."""
    spec = p.to_dict()
    del spec["name"]
    return {"apiVersion": OUR_API_VERSION, "kind": POOL_KIND, "metadata": {"name": p.name}, "spec": spec}


# ============================================================================= apply

@dataclass
class Change:
    kind: str
    name: str
    action: str                      # created | configured | unchanged
    fields: dict = field(default_factory=dict)   # configured: field -> [old, new]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "action": self.action,
                "changed": {k: {"from": o, "to": n} for k, (o, n) in self.fields.items()}}


def _diff(old: dict, new: dict) -> dict:
    keys = list(new) + [k for k in old if k not in new]
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def plan_apply(keys: Keys, resources: Sequence[Resource], pool_kvs: Sequence[KV],
               config_kv: KV | None, marker_kv: KV | None):
    """Pure: what applying ``resources`` to the read state would change.

    Returns (changes, compares, ops).  Compares cover EVERY resource of the file (so the
    whole file is applied against one consistent state or not at all) and the pool-set
    marker (so a concurrent apply creating an overlapping pool makes this one fail)."""
    current: dict[str, tuple[KV, Pool | None]] = {}
    for kv in pool_kvs:
        name = unescape(kv.key[len(keys.pools):])
        try:
            current[name] = (kv, Pool.from_json(kv.value))
        except PoolError:
            current[name] = (kv, None)
    # overlaps are checked against the stored pools the file does not touch and the pools
    # earlier in the file, so the error names the document that introduces the overlap
    in_file = {r.name for r in resources if r.kind == POOL_KIND}
    final: dict[str, Pool] = {n: p for n, (_, p) in current.items() if p is not None and n not in in_file}
    changes: list[Change] = []
    compares: list[Compare] = []
    ops: list = []
    created = False
    problems = _Problems()
    for r in resources:
        if r.kind != POOL_KIND:
            continue
        ok = problems.run(_plan_pool_checks, keys, r, current, final, default=False)
        p = r.pool
        key = keys.pool(r.name)
        kv, old = current.get(r.name, (None, None))
        if not ok:
            if old is not None:    # refused: the stored pool stays, and later pools must not overlap it
                final[old.name] = old
            continue
        final[p.name] = p
        compares.append(Compare(key, kv.mod_revision if kv else 0))
        if old is None:
            created = True
            ops.append(Put(key, p.to_json()))
            changes.append(Change(POOL_KIND, r.name, "created"))
        elif old.to_dict() != p.to_dict():
            ops.append(Put(key, p.to_json()))
            changes.append(Change(POOL_KIND, r.name, "configured", _diff(old.to_dict(), p.to_dict())))
        else:
            changes.append(Change(POOL_KIND, r.name, "unchanged"))
    problems.raise_any()
    for r in resources:
        if r.kind == POOL_KIND:
            continue
        compares.append(Compare(keys.config, config_kv.mod_revision if config_kv else 0))
        old_cfg = None
        if config_kv is not None:
            try:
                old_cfg = IPAMConfig.from_json(config_kv.value)
            except ValueError:
                old_cfg = None   # replacing an undecodable config with a valid one is the repair
        if old_cfg is not None and old_cfg.to_dict() == r.config.to_dict() and config_kv is not None:
            changes.append(Change("IPAMConfig", r.name, "unchanged"))
        else:
            ops.append(Put(keys.config, r.config.to_json()))
            before = old_cfg.to_dict() if old_cfg else IPAMConfig().to_dict()
            changes.append(Change("IPAMConfig", r.name, "configured", _diff(before, r.config.to_dict())))
    mk = poolset_key(keys)
    compares.append(Compare(mk, marker_kv.mod_revision if marker_kv else 0))
    if created:
        ops.append(Put(mk, json.dumps({"updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()))
    return changes, compares, ops


def _plan_pool_checks(keys: Keys, r: Resource, current: dict, final: dict) -> bool:
    """A pool of the file against the stored state: undecodable stored record, cidr/blockSize
    change, overlaps (raises ManifestError)."""
    p = r.pool
    key = keys.pool(r.name)
    kv, old = current.get(r.name, (None, None))
    if kv is not None and old is None:
        raise ManifestError(f"{r.where}: {r.label}: the stored pool at etcd key {key} is undecodable; "
                            f"it is not overwritten blindly -- inspect it, then `cni-ipam pool delete "
                            f"{r.name} --force`")
    if old is not None and (old.cidr != p.cidr or old.block_size != p.block_size):
        fld = "cidr" if old.cidr != p.cidr else "blockSize"
        was, now = (old.cidr, p.cidr) if fld == "cidr" else (old.block_size, p.block_size)
        raise ManifestError(f"{r.where}: {r.label}: spec.{fld}: cannot change on an existing pool "
                            f"({was} -> {now}); create a new pool, move workloads, then delete this one")
    for other in final.values():
        if other.version == p.version and other.cidr.overlaps(p.cidr):
            raise ManifestError(f'{r.where}: {r.label}: spec.cidr: {p.cidr} overlaps pool '
                                f'"{other.name}" ({other.cidr})')
    return True


def apply(ipam, resources: Sequence[Resource], *, dry_run: bool = False,
          before_commit: Callable[[], None] | None = None) -> list[Change]:
    """Validate ``resources`` against the stored state and write them in ONE transaction."""
    k = ipam.keys
    snap = ipam.ds.read([read_prefix(k.pools), Read(k.config), Read(poolset_key(k))])
    changes, compares, ops = plan_apply(k, resources, snap[0].kvs, _first(snap[1]), _first(snap[2]))
    if dry_run or not ops:
        return changes
    if before_commit:
        before_commit()
    if not ipam.ds.commit(compares, ops):
        raise Conflict("pools or the IPAM config changed while this apply was running (another apply or "
                       "pool command won the race); nothing was applied -- run apply again")
    return changes


# ============================================================================= pools

def read_pools(ipam) -> tuple[list[Pool], list[str]]:
    """Decodable pools (by name) and the keys of undecodable ones (not fatal for reads)."""
    pools, bad = [], []
    for kv in ipam.ds.get_prefix(ipam.keys.pools):
        try:
            pools.append(Pool.from_json(kv.value))
        except PoolError:
            bad.append(kv.key)
    pools.sort(key=lambda p: p.name)
    return pools, bad


def get_pool(ipam, name: str) -> tuple[KV, Pool]:
    key = ipam.keys.pool(name)
    kv = ipam.ds.get(key)
    if kv is None:
        raise NotFound(f'pool "{name}" does not exist')
    try:
        return kv, Pool.from_json(kv.value)
    except PoolError as e:
        raise AdminError(f'pool "{name}": the value at etcd key {key} is undecodable: {e}') from None


def set_pool_disabled(ipam, name: str, disabled: bool, retries: int = 20) -> bool:
    """Flip ``disabled`` with CAS (re-read on conflict).  True when it changed."""
    for _ in range(retries):
        kv, p = get_pool(ipam, name)
        if p.disabled == disabled:
            return False
        p.disabled = disabled
        if ipam.ds.commit([Compare(kv.key, kv.mod_revision)], [Put(kv.key, p.to_json())]):
            return True
    raise Conflict(f'pool "{name}" kept changing; gave up after {retries} attempts')


def _commit_chunks(ds, items: list[tuple[list, list]], max_ops: int = MAX_TXN_OPS) -> int:
    """Commit (compares, ops) groups, packed into transactions within etcd's op limit.
    Returns how many groups were committed; failed transactions are skipped (caller re-scans)."""
    done = 0
    batch_c: list = []
    batch_o: list = []
    n = 0

    def flush():
        nonlocal batch_c, batch_o, n, done
        if batch_o and ds.commit(batch_c, batch_o):
            done += n
        batch_c, batch_o, n = [], [], 0

    for cs, os_ in items:
        if len(batch_c) + len(cs) > max_ops or len(batch_o) + len(os_) > max_ops:
            flush()
        batch_c.extend(cs)
        batch_o.extend(os_)
        n += 1
    flush()
    return done


def delete_pool(ipam, name: str, *, force: bool = False, max_rounds: int = 30) -> dict:
    """Delete a pool and everything of it, never leaving orphan blocks or affinities.

    Without ``force``, refuses while any address is allocated in it.  Steps, each CAS:
    disable the pool (so no ADD can claim or allocate in it any more: ADDs compare the
    pool's revision); with ``force`` release every handle holding an address in it;
    delete each empty block together with its affinity; delete affinities left
    without a block; finally delete the pool record, compared against the revision
    this function wrote."""
    ds, k = ipam.ds, ipam.keys
    key = k.pool(name)
    kv = ds.get(key)
    if kv is None:
        raise NotFound(f'pool "{name}" does not exist')
    try:
        pool = Pool.from_json(kv.value)
    except PoolError as e:
        if not force:
            raise AdminError(f'pool "{name}": the value at etcd key {key} is undecodable ({e}), so its '
                             f'blocks cannot be located; `pool delete {name} --force` removes just the '
                             f'record (then run `cni-ipam check`)') from None
        if not ds.commit([Compare(key, kv.mod_revision)], [Delete(key)]):
            raise Conflict(f'pool "{name}" changed while deleting it; try again')
        return {"pool": name, "releasedHandles": [], "blocksDeleted": 0, "affinitiesDeleted": 0,
                "undecodable": True}
    start, end = cidr_block_range(k, pool.cidr)

    def scan():
        blocks, holders, bad = [], {}, []
        for bkv in iter_range(ds, start, end):
            try:
                b = Block.from_json(bkv.value)
            except BlockError:
                bad.append(bkv)
                continue
            blocks.append((bkv, b))
            for o, hid in b.allocations.items():
                holders.setdefault(hid, b.ip(o))
        return blocks, holders, bad

    def refuse(holders, extra=""):
        n = len(holders)
        hid, ip = next(iter(holders.items()))
        raise AdminError(f'pool "{name}" has addresses allocated to {n} handle(s) (e.g. {ip} held by '
                         f'{hid}){extra}; release them first, or use --force, which releases them')

    _, holders, bad = scan()
    if holders and not force:
        refuse(holders)
    if bad and not force:
        raise AdminError(f'pool "{name}": block {bad[0].key} is undecodable; use --force to delete it '
                         f'with the pool')
    # 1. disable
    rev = kv.mod_revision
    was_disabled = pool.disabled
    if not pool.disabled:
        pool.disabled = True
        if not ds.commit([Compare(key, rev)], [Put(key, pool.to_json())]):
            raise Conflict(f'pool "{name}" changed while deleting it; nothing was deleted -- try again')
        now = ds.get(key)
        if now is None or now.value != pool.to_json():
            raise Conflict(f'pool "{name}" changed while deleting it; try again')
        rev = now.mod_revision

    def restore():
        if not was_disabled:
            pool.disabled = False
            ds.commit([Compare(key, rev)], [Put(key, pool.to_json())])

    released: list[str] = []
    orphan_holders: set[str] = set()   # allocations whose handle record is gone (corruption)
    blocks_deleted = 0
    for _ in range(max_rounds):
        blocks, holders, bad = scan()
        live = {h: ip for h, ip in holders.items() if h not in orphan_holders}
        if live and not force:
            restore()
            refuse(live, " (allocated while the delete was starting)")
        for hid in live:
            if ipam.release(hid) is not None:
                released.append(hid)
            else:
                orphan_holders.add(hid)
        if live:
            continue   # re-scan: the released blocks have new revisions
        groups = []
        for bkv, b in blocks:
            ops = [Delete(bkv.key)]
            if b.node:
                ops.append(Delete(k.affinity_key(b.node, b.cidr)))
            groups.append(([Compare(bkv.key, bkv.mod_revision)], ops))
        for bkv in bad:
            groups.append(([Compare(bkv.key, bkv.mod_revision)], [Delete(bkv.key)]))
        if not groups:
            break
        blocks_deleted += _commit_chunks(ds, groups)
    else:
        raise AdminError(f'pool "{name}": its blocks kept changing; gave up after {max_rounds} rounds '
                         f'(the pool stays disabled; run the delete again)')
    # affinities left without a block (a block deleted by hand, an interrupted delete)
    stale = []
    for akv in iter_prefix(ds, k.affinity, keys_only=True):
        rest = akv.key[len(k.affinity):]
        _, _, bid = rest.partition("/")
        try:
            net = block_from_id(bid)
        except (ValueError, IndexError):
            continue
        if net.version == pool.version and net.subnet_of(pool.cidr):
            stale.append(([], [Delete(akv.key)]))
    aff_deleted = _commit_chunks(ds, stale)
    if ds.count(start, end):
        raise AdminError(f'pool "{name}": blocks appeared while deleting it; the pool stays disabled -- '
                         f'run the delete again')
    if not ds.commit([Compare(key, rev)], [Delete(key)]):
        raise Conflict(f'pool "{name}" was changed by someone else while deleting it (its blocks are '
                       f'already released); run the delete again')
    return {"pool": name, "releasedHandles": released, "blocksDeleted": blocks_deleted,
            "affinitiesDeleted": aff_deleted, "undecodable": False}


# ============================================================================= config

def get_config(ipam) -> tuple[KV | None, IPAMConfig]:
    kv = ipam.ds.get(ipam.keys.config)
    if kv is None:
        return None, IPAMConfig()
    try:
        return kv, IPAMConfig.from_json(kv.value)
    except ValueError as e:
        raise AdminError(f"the IPAM config at etcd key {ipam.keys.config} is undecodable: {e} "
                         f"(`cni-ipam apply` an IPAMConfig to replace it)") from None


def configure(ipam, *, strict_affinity: bool | None = None, auto_allocate_blocks: bool | None = None,
              max_blocks_per_host: int | None = None, retries: int = 20) -> tuple[IPAMConfig, IPAMConfig]:
    """Change some settings (CAS read-modify-write).  Returns (before, after)."""
    for _ in range(retries):
        kv, cfg = get_config(ipam)
        before = IPAMConfig(**vars(cfg))
        if strict_affinity is not None:
            cfg.strict_affinity = strict_affinity
        if auto_allocate_blocks is not None:
            cfg.auto_allocate_blocks = auto_allocate_blocks
        if max_blocks_per_host is not None:
            cfg.max_blocks_per_host = max_blocks_per_host
        problem = config_problem(cfg)
        if problem:
            raise AdminError(f"refusing this IPAM config: {problem}")
        if kv is not None and cfg == before:
            return before, cfg
        if ipam.ds.commit([Compare(ipam.keys.config, kv.mod_revision if kv else 0)],
                          [Put(ipam.keys.config, cfg.to_json())]):
            return before, cfg
    raise Conflict(f"the IPAM config kept changing; gave up after {retries} attempts")


# ============================================================================= usage

@dataclass
class PoolUsage:
    """What a pool can really hand out.

    ``capacity``: claimed blocks count what they can hand out (their free + allocated
    addresses: a bridge-mode block's network, gateway and broadcast are not capacity);
    unclaimed blocks count as blocks of ``unclaimed_mode`` would -- the mode most of
    the pool's claimed blocks use, or bridge (the plugin's default mode) while none is
    claimed (routed when bridge cannot use blocks this small).  With a node filter only
    that node's blocks count."""
    pool: Pool
    addresses: int = 0        # the pool's size (with a node filter: that node's blocks' size)
    in_use: int = 0
    claimed_capacity: int = 0  # free + allocated addresses of the claimed blocks
    blocks_claimed: int = 0
    undecodable: int = 0
    modes: dict = field(default_factory=dict)   # mode -> claimed blocks in it
    node: str | None = None

    @property
    def unclaimed_blocks(self) -> int:
        return 0 if self.node is not None else max(self.pool.n_blocks - self.blocks_claimed - self.undecodable, 0)

    @property
    def unclaimed_mode(self) -> str:
        if self.modes:
            return max(sorted(self.modes), key=lambda m: self.modes[m])
        return BRIDGE if self.pool.usable_in(BRIDGE) else ROUTED

    @property
    def unclaimed_block_capacity(self) -> int:
        """What one unclaimed block would hand out once claimed in ``unclaimed_mode``."""
        p = self.pool
        if not p.usable_in(self.unclaimed_mode):
            return 0
        return p.block_addresses - len(reserved_ordinals(p.block_at(0), self.unclaimed_mode))

    @property
    def capacity(self) -> int:
        return self.claimed_capacity + self.unclaimed_blocks * self.unclaimed_block_capacity

    @property
    def reserved(self) -> int:
        """Addresses of the pool that are not capacity (never handed out)."""
        return max(self.addresses - self.capacity, 0)

    @property
    def free(self) -> int:
        return max(self.capacity - self.in_use, 0)

    def to_dict(self, node: str | None = None) -> dict:
        p = self.pool
        cap = self.capacity
        d = {"name": p.name, "cidr": str(p.cidr), "blockSize": p.block_size, "disabled": p.disabled,
             "addresses": self.addresses, "inUse": self.in_use, "reserved": self.reserved, "free": self.free,
             "blocksClaimed": self.blocks_claimed, "blocksTotal": p.n_blocks,
             "utilization": round(100.0 * self.in_use / cap, 2) if cap else (100.0 if self.addresses else 0.0),
             "capacity": cap, "blockAddresses": p.block_addresses,
             "unclaimedBlocks": self.unclaimed_blocks,
             "unclaimedBlocksCountedAs": {"mode": self.unclaimed_mode,
                                          "capacityPerBlock": self.unclaimed_block_capacity}}
        if node is not None:
            d["node"] = node
        return d


def block_row(b: Block) -> dict:
    return {"cidr": str(b.cidr), "pool": b.pool, "node": b.node, "mode": b.mode, "inUse": b.in_use,
            "capacity": b.capacity, "free": len(b.free)}


def usage(ipam, *, node: str | None = None, blocks: bool = False,
          pools: Sequence[Pool] | None = None) -> tuple[list[PoolUsage], list[dict], list[str]]:
    """Per-pool totals (and per-block rows), streaming each pool's block range.

    Returns (pool usages, block rows, keys of undecodable records)."""
    bad: list[str] = []
    if pools is None:
        pools, bad = read_pools(ipam)
    out, rows = [], []
    for p in pools:
        u = PoolUsage(p, addresses=0 if node is not None else p.cidr.num_addresses, node=node)
        start, end = cidr_block_range(ipam.keys, p.cidr)
        for kv in iter_range(ipam.ds, start, end):
            try:
                b = Block.from_json(kv.value)
            except BlockError:
                u.undecodable += 1
                bad.append(kv.key)
                continue
            if node is not None and b.node != node:
                continue
            u.blocks_claimed += 1
            u.in_use += b.in_use
            u.claimed_capacity += b.capacity
            u.modes[b.mode] = u.modes.get(b.mode, 0) + 1
            if node is not None:
                u.addresses += b.cidr.num_addresses
            if blocks:
                rows.append(block_row(b))
        out.append(u)
    return out, rows, bad


def block_nodes(ipam) -> list[str]:
    """The nodes that hold an affinity for some block (sorted; read from the affinity keys only)."""
    nodes = set()
    for kv in iter_prefix(ipam.ds, ipam.keys.affinity, keys_only=True):
        enode = kv.key[len(ipam.keys.affinity):].partition("/")[0]
        try:
            nodes.add(unescape(enode))
        except (ValueError, UnicodeDecodeError):
            continue
    return sorted(nodes)


def claimed_blocks(ipam, pool: Pool) -> int:
    """How many blocks of ``pool`` are claimed (one count request)."""
    start, end = cidr_block_range(ipam.keys, pool.cidr)
    return ipam.ds.count(start, end)


def borrowed(ipam, node: str | None = None) -> list[dict]:
    """Addresses held by a handle of one node in a block owned by another node."""
    owners: dict[str, tuple[str | None, str]] = {}
    for kv in iter_prefix(ipam.ds, ipam.keys.blocks):
        try:
            d = json.loads(kv.value)
            owners[str(ipaddress.ip_network(d["cidr"]))] = (d.get("node"), d.get("pool", ""))
        except (ValueError, KeyError, TypeError):
            continue
    out = []
    for kv in iter_prefix(ipam.ds, ipam.keys.handles):
        try:
            h = Handle.from_json(kv.value)
        except ValueError:
            continue
        for a in h.addresses:
            owner, pool = owners.get(str(a.block), (None, a.pool))
            if owner is None or owner == h.node:
                continue
            if node is not None and node not in (owner, h.node):
                continue
            out.append({"ip": str(a.ip), "block": str(a.block), "pool": pool, "blockNode": owner,
                        "node": h.node, "handle": h.id, "namespace": h.namespace, "pod": h.pod})
    return out


def ip_info(ipam, ip) -> dict:
    """Everything known about one address."""
    ip = ipaddress.ip_address(ip)
    pools, _ = read_pools(ipam)
    d: dict = {"ip": str(ip), "allocated": False, "pool": None, "block": None, "blockNode": None,
               "handle": None, "node": None, "namespace": None, "pod": None, "network": None,
               "containerID": None, "interface": None, "created": None, "reason": None}
    p = next((p for p in pools if p.version == ip.version and ip in p.cidr), None)
    if p is None:
        d["reason"] = "not in any pool"
        return d
    d["pool"] = p.name
    net = p.block_of(ip)
    d["block"] = str(net)
    bkv = ipam.ds.get(ipam.keys.block(net))
    if bkv is None:
        d["reason"] = "its block is not claimed by any node"
        return d
    try:
        b = Block.from_json(bkv.value)
    except BlockError as e:
        raise AdminError(f"block {net}: the value at etcd key {bkv.key} is undecodable: {e}") from None
    d["blockNode"] = b.node
    hid = b.holder(ip)
    if hid is None:
        o = b.ordinal(ip)
        d["reason"] = ("reserved (network, gateway or broadcast address of a bridge-mode block)"
                       if o not in b.free else "free")
        return d
    d.update(allocated=True, handle=hid)
    h = ipam.get_handle(hid)
    if h is None:
        d["reason"] = "the block records a handle whose record is missing (run `cni-ipam check`)"
        return d
    d.update(node=h.node, namespace=h.namespace or None, pod=h.pod or None, network=h.network or None,
             containerID=h.container_id or None, interface=h.ifname or None, created=h.created or None)
    return d


# ============================================================================= release

def release_ips(ipam, ips) -> tuple[list[tuple[str, str]], list[str]]:
    """Release single addresses.  Returns ([(ip, handle)] released, [ip] that were not allocated)."""
    wanted = list(dict.fromkeys(ipaddress.ip_address(i) for i in ips))
    done = ipam.release_ips(wanted)
    got = {ip for ip, _ in done}
    return done, [str(i) for i in wanted if str(i) not in got]


def release_handle(ipam, handle_id: str) -> list[str]:
    """Release a handle; when its record is missing, release the addresses blocks still
    record for it (orphans from a lost handle record).  Returns the released addresses."""
    h = ipam.release(handle_id)
    if h is not None:
        return [str(a.ip) for a in h.addresses]
    orphans = []
    for kv in iter_prefix(ipam.ds, ipam.keys.blocks):
        try:
            b = Block.from_json(kv.value)
        except BlockError:
            continue
        orphans.extend(b.ip(o) for o, hid in b.allocations.items() if hid == handle_id)
    if not orphans:
        raise NotFound(f"handle {handle_id!r} does not exist and no block records an address for it")
    done, _ = release_ips(ipam, orphans)
    return [ip for ip, _ in done]


# ============================================================================= check

@dataclass
class Finding:
    kind: str
    key: str                    # the etcd key at fault
    message: str
    keys: tuple = ()            # every key the finding depends on (for re-verification)
    subject: str = ""           # what inside the key (an address, a node)
    info: dict = field(default_factory=dict)

    @property
    def ident(self):
        return (self.kind, self.key, self.subject)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "key": self.key, "message": self.message}
        d.update(self.info)
        return d


FINDING_KINDS = (
    "undecodable",                # a value (or a key name) that cannot be decoded
    "allocation-without-handle",  # a block allocates an address to a handle whose record is missing
    "allocation-handle-mismatch",  # ... to a handle whose record does not list that address
    "handle-not-held",            # a handle lists an address its block does not record for it
    "handle-key-mismatch",        # a handle record's id differs from its key
    "block-key-mismatch",         # a block's value describes another CIDR than its key
    "block-outside-pools",        # a block inside no pool
    "block-pool-mismatch",        # a block inside pool P that records another pool
    "block-wrong-size",           # a block whose size is not its pool's blockSize
    "block-without-affinity",     # the owner node has no affinity record for the block
    "affinity-other-node",        # the block's affinity is held by another node than its owner
    "duplicate-affinity",         # more than one node holds an affinity for the block
    "affinity-without-block",     # an affinity record whose block does not exist
)


def _ipkey(ip) -> tuple[int, int]:
    return (ip.version, int(ip))


class Checker:
    """Pure consistency check over the store's records, fed in this order: pools, config,
    affinities, handles, blocks (blocks are the big part and are only streamed through).

    ``partial``: the checker sees only some keys (re-verification); findings it makes
    about records it was not shown are meaningless and are filtered by the caller."""

    def __init__(self, keys: Keys):
        self.k = keys
        self.findings: list[Finding] = []
        self.pools: list[Pool] = []
        self.bad_pools = 0
        self.aff: dict[str, list[str]] = {}          # block id -> nodes with an affinity for it
        self.handle_ids: set[str] = set()
        self.bad_handles: set[str] = set()
        self.held: dict[tuple, str] = {}              # address -> handle listing it
        self.held_extra: dict[tuple, list[str]] = {}  # address -> further handles listing it
        self.held_block: dict[tuple, str] = {}        # address -> block key the handle names
        self.blocks_seen: set[str] = set()
        self.bad_blocks: list = []                    # networks of undecodable blocks
        self._bkeys: dict[str, str] = {}
        self._gws: set[str] = set()
        self.counts = {"pools": 0, "blocks": 0, "affinities": 0, "handles": 0, "allocations": 0}

    def add(self, kind, key, message, keys=(), subject="", **info):
        self.findings.append(Finding(kind, key, message, tuple(keys) or (key,), subject, info))

    # -- feeding -----------------------------------------------------------
    def feed(self, kv: KV) -> None:
        k = self.k
        if kv.key.startswith(k.pools):
            self.feed_pool(kv)
        elif kv.key == k.config:
            self.feed_config(kv)
        elif kv.key.startswith(k.affinity):
            self.feed_affinity(kv)
        elif kv.key.startswith(k.handles):
            self.feed_handle(kv)
        elif kv.key.startswith(k.blocks):
            self.feed_block(kv)

    def feed_pool(self, kv: KV) -> None:
        self.counts["pools"] += 1
        try:
            self.pools.append(Pool.from_json(kv.value))
        except PoolError as e:
            self.bad_pools += 1
            self.add("undecodable", kv.key, f"pool record {kv.key} is undecodable: {e}")

    def feed_config(self, kv: KV) -> None:
        try:
            IPAMConfig.from_json(kv.value)
        except ValueError as e:
            self.add("undecodable", kv.key, f"IPAM config {kv.key} is undecodable: {e}")

    def feed_affinity(self, kv: KV) -> None:
        self.counts["affinities"] += 1
        rest = kv.key[len(self.k.affinity):]
        enode, _, bid = rest.partition("/")
        try:
            node = unescape(enode)
            block_from_id(bid)
        except (ValueError, IndexError, UnicodeDecodeError):
            self.add("undecodable", kv.key, f"affinity key {kv.key} does not name a node and a block")
            return
        try:
            v = json.loads(kv.value)
            if not isinstance(v, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.add("undecodable", kv.key, f"affinity record {kv.key} is undecodable: {e}")
        self.aff.setdefault(bid, []).append(node)

    def feed_handle(self, kv: KV) -> None:
        self.counts["handles"] += 1
        try:
            hid = self.k.handle_of_key(kv.key)
        except (ValueError, UnicodeDecodeError):
            self.add("undecodable", kv.key, f"handle key {kv.key} is not a valid name")
            return
        self.handle_ids.add(hid)
        try:
            rid, addrs = self._fast_handle(kv.value)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            try:   # the model's decoder has the last word (and the precise message)
                h = Handle.from_json(kv.value)
            except ValueError as e:
                self.bad_handles.add(hid)
                self.add("undecodable", kv.key, f"handle record {kv.key} is undecodable: {e}")
                return
            rid, addrs = h.id, [(_ipkey(a.ip), self._block_key(str(a.block))) for a in h.addresses]
        if rid != hid:
            self.add("handle-key-mismatch", kv.key, f"handle record {kv.key} says its id is {rid!r}",
                     handle=hid)
        for ik, bkey in addrs:
            if ik in self.held:
                self.held_extra.setdefault(ik, []).append(hid)
            else:
                self.held[ik] = hid
                self.held_block[ik] = bkey

    def _block_key(self, block: str) -> str:
        """Block string -> its etcd key (validated like the model does; cached: many handles
        share a block, and the cached string is shared too)."""
        bkey = self._bkeys.get(block)
        if bkey is None:
            bkey = self._bkeys[block] = self.k.block(ipaddress.ip_network(block))
        return bkey

    def _fast_handle(self, value: bytes):
        """The parts of a handle record the check needs, ~5x faster than Handle.from_json
        (addresses via inet_pton; block and gateway parses cached).  Raises on anything odd;
        the caller then falls back to the model's decoder."""
        d = json.loads(value)
        rid = str(d["id"])
        str(d["node"])
        out = []
        for a in d.get("addresses", []):
            ip = a["ip"]
            if ":" in ip:
                ik = (6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big"))
            else:
                ik = (4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big"))
            int(a["prefixlen"])
            gw = a.get("gateway")
            if gw and gw not in self._gws:
                ipaddress.ip_address(gw)
                self._gws.add(gw)
            out.append((ik, self._block_key(a["block"])))
        return rid, out

    def _pool_of(self, net) -> Pool | None:
        for p in self.pools:
            if p.version == net.version and net.subnet_of(p.cidr):
                return p
        return None

    def feed_block(self, kv: KV) -> None:
        k = self.k
        self.counts["blocks"] += 1
        bid = kv.key[len(k.blocks):]
        try:
            net = block_from_id(bid)
        except (ValueError, IndexError):
            self.add("undecodable", kv.key, f"block key {kv.key} does not name a block")
            return
        self.blocks_seen.add(bid)
        try:
            b = Block.from_json(kv.value)
        except BlockError as e:
            self.bad_blocks.append(net)
            self.add("undecodable", kv.key, f"block {net} ({kv.key}) is undecodable: {e}", block=str(net))
            return
        if b.cidr != net:
            self.add("block-key-mismatch", kv.key, f"block key {kv.key} holds a block for {b.cidr}",
                     block=str(net))
            return
        p = self._pool_of(net)
        if p is None:
            extra = f" ({self.bad_pools} pool record(s) are undecodable)" if self.bad_pools else ""
            self.add("block-outside-pools", kv.key, f"block {net} (node {b.node}) is outside every pool{extra}",
                     [kv.key] + [k.pool(b.pool)], block=str(net), node=b.node)
        elif net.prefixlen != p.block_size:
            self.add("block-wrong-size", kv.key, f"block {net} is a /{net.prefixlen} in pool {p.name!r}, "
                     f"whose blockSize is {p.block_size}", block=str(net), pool=p.name)
        elif b.pool != p.name:
            self.add("block-pool-mismatch", kv.key, f"block {net} lies in pool {p.name!r} but records "
                     f"pool {b.pool!r}", block=str(net), pool=p.name)
        nodes = self.aff.get(bid, [])
        akeys = [k.affinity_key(n, net) for n in nodes]
        if b.node:
            own = k.affinity_key(b.node, net)
            if b.node not in nodes:
                if nodes:
                    self.add("affinity-other-node", kv.key, f"block {net} belongs to node {b.node} but its "
                             f"affinity record is held by {', '.join(nodes)}", [kv.key, own] + akeys,
                             block=str(net), node=b.node, affinityNodes=nodes)
                else:
                    self.add("block-without-affinity", kv.key, f"block {net} belongs to node {b.node}, which "
                             f"has no affinity record for it ({own})", [kv.key, own], block=str(net), node=b.node)
            if len(nodes) > 1:
                self.add("duplicate-affinity", kv.key, f"block {net} has affinity records for several nodes: "
                         f"{', '.join(nodes)}", [kv.key, own] + akeys, block=str(net), affinityNodes=nodes)
        elif nodes:
            self.add("affinity-other-node", kv.key, f"block {net} has no owner but node(s) {', '.join(nodes)} "
                     f"hold an affinity for it", [kv.key] + akeys, block=str(net), affinityNodes=nodes)
        base = int(net.network_address)
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        for o, hid in b.allocations.items():
            self.counts["allocations"] += 1
            ik = (net.version, base + o)
            if self.held.get(ik) == hid:
                del self.held[ik]
                continue
            extra = self.held_extra.get(ik)
            if extra and hid in extra:
                extra.remove(hid)
                continue
            if hid in self.bad_handles:
                continue
            ip = cls(base + o)
            hkey = k.handle(hid)
            if hid not in self.handle_ids:
                self.add("allocation-without-handle", kv.key, f"{ip} in block {net} is allocated to handle "
                         f"{hid!r}, whose record is missing (`cni-ipam release --ip {ip}` frees it)",
                         [kv.key, hkey], f"{ip} {hid}", ip=str(ip), block=str(net), handle=hid)
            else:
                self.add("allocation-handle-mismatch", kv.key, f"{ip} in block {net} is allocated to handle "
                         f"{hid!r}, whose record does not list it", [kv.key, hkey], f"{ip} {hid}", ip=str(ip),
                         block=str(net), handle=hid)

    def finish(self) -> list[Finding]:
        k = self.k
        cls = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}
        left = [(ik, hid) for ik, hid in self.held.items()]
        left += [(ik, hid) for ik, hids in self.held_extra.items() for hid in hids]
        for ik, hid in sorted(left):
            ip = cls[ik[0]](ik[1])
            if any(ip in net for net in self.bad_blocks):
                continue   # its block is undecodable: reported once, as such
            hkey = k.handle(hid)
            bkey = self.held_block.get(ik, "")
            self.add("handle-not-held", hkey, f"handle {hid!r} lists {ip}, but its block does not record "
                     f"it as held by this handle", [hkey, bkey] if bkey else [hkey], str(ip), ip=str(ip),
                     handle=hid)
        for bid, nodes in self.aff.items():
            if bid not in self.blocks_seen:
                net = block_from_id(bid)
                for n in nodes:
                    akey = k.affinity_key(n, net)
                    self.add("affinity-without-block", akey, f"node {n} has an affinity for block {net}, "
                             f"which does not exist ({akey})", [akey, k.block(net)], n, block=str(net), node=n)
        return self.findings


def check(ipam, *, verify: bool = True) -> dict:
    """The whole-store consistency report.  Streams everything once (pages, no per-block
    requests); then, because pages are read at different revisions while ADDs and DELs go
    on, re-reads just the keys of each suspect in one batched read and keeps only the
    findings that still hold."""
    ds, k = ipam.ds, ipam.keys
    c = Checker(k)
    for kv in ds.get_prefix(k.pools):
        c.feed_pool(kv)
    cfg = ds.get(k.config)
    if cfg is not None:
        c.feed_config(cfg)
    from .gc import Splits   # ranges between split points: O(keys) for etcd, not O(keys^2 / page)
    splits = Splits()
    for prefix, fn in ((k.affinity, c.feed_affinity), (k.handles, c.feed_handle), (k.blocks, c.feed_block)):
        for kv in splits.iter(ds, prefix):
            fn(kv)
    findings = c.finish()
    if findings and verify:
        findings = _reverify(ipam, findings)
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    out = []
    for f in findings:
        d = f.to_dict()
        d["fix"] = fix_hint(k, d)
        d["fixable"] = fixable(k, d)
        out.append(d)
    return {"clean": not findings, "findings": out, "summary": counts, "scanned": dict(c.counts)}


def _reverify(ipam, findings: list[Finding]) -> list[Finding]:
    ds, k = ipam.ds, ipam.keys
    want = list(dict.fromkeys(x for f in findings for x in f.keys if x))
    c = Checker(k)
    for kv in ds.get_prefix(k.pools):
        c.feed_pool(kv)
    got = [kv for kv in ds.get_many(want) if kv is not None]   # one consistent read (per 128 keys)
    order = {k.config: 0, k.affinity: 1, k.handles: 2, k.blocks: 3}

    def rank(kv):
        for p, r in order.items():
            if kv.key.startswith(p):
                return r
        return 9
    for kv in sorted(got, key=rank):
        if not kv.key.startswith(k.pools):
            c.feed(kv)
    still = {f.ident for f in c.finish()}
    return [f for f in findings if f.ident in still]


# ============================================================================= fixes for check findings

def _kind_of_key(k: Keys, key: str) -> str:
    for what, prefix in (("block", k.blocks), ("affinity", k.affinity), ("handle", k.handles),
                         ("pool", k.pools)):
        if key.startswith(prefix):
            return what
    return "config" if key == k.config else "other"


def _affinity_bid(k: Keys, key: str) -> tuple[str, str] | None:
    """(node, block id) of an affinity key, or None."""
    rest = key[len(k.affinity):]
    enode, _, bid = rest.partition("/")
    try:
        node = unescape(enode)
        block_from_id(bid)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return node, bid


def fixable(k: Keys, f: dict) -> bool:
    """Findings ``check --fix`` repairs: a missing affinity (written from the block), an
    affinity without a block (deleted), an undecodable block (rebuilt from the handles that
    hold its addresses) or affinity record (rewritten from its block, or deleted)."""
    kind = f["kind"]
    if kind in ("block-without-affinity", "affinity-without-block"):
        return True
    if kind == "undecodable":
        what = _kind_of_key(k, f["key"])
        if what == "block":
            try:
                block_from_id(f["key"][len(k.blocks):])
                return True
            except (ValueError, IndexError):
                return False
        return what == "affinity" and _affinity_bid(k, f["key"]) is not None
    return False


def fix_hint(k: Keys, f: dict) -> str:
    """What repairs a finding: ``cni-ipam check --fix``, or the exact command."""
    kind, key = f["kind"], f["key"]
    if fixable(k, f):
        what = {"block-without-affinity": "writes the missing affinity record from the block",
                "affinity-without-block": "deletes the stale affinity record"}.get(kind)
        if what is None:
            what = ("rebuilds the block from the handles that hold its addresses"
                    if _kind_of_key(k, key) == "block" else "rewrites the record from its block (or deletes it "
                                                            "when the block is gone)")
        return f"`cni-ipam check --fix` {what}"
    ip, handle = f.get("ip"), f.get("handle")
    if kind in ("allocation-without-handle", "allocation-handle-mismatch"):
        return f"once no pod uses {ip}: `cni-ipam release --ip {ip}`"
    if kind == "handle-not-held":
        return f"once its pod is gone: `cni-ipam release --handle {handle}`"
    if kind == "undecodable":
        what = _kind_of_key(k, key)
        if what == "config":
            return "`cni-ipam apply -f` an IPAMConfig manifest replaces it"
        if what == "pool":
            name = unescape(key[len(k.pools):])
            return (f"inspect it (`etcdctl get {key}`), then `cni-ipam pool delete {name} --force` and "
                    f"apply its manifest again")
        if what == "handle":
            return (f"inspect it (`etcdctl get {key}`); `etcdctl del {key}` removes it, then `cni-ipam check` "
                    f"lists its addresses, which `cni-ipam release --ip` frees once their pods are gone")
        return f"a key no cni-ipam version writes: inspect it, then `etcdctl del {key}`"
    if kind in ("handle-key-mismatch", "block-key-mismatch"):
        return f"inspect it (`etcdctl get {key}`), then `etcdctl del {key}`"
    if kind == "block-outside-pools":
        return ("apply the pool that held it again, or, once no pod uses its addresses, "
                f"`etcdctl del {key}` (and its affinity record)")
    if kind in ("block-pool-mismatch", "block-wrong-size"):
        return "once no pod uses its addresses: `cni-ipam release --ip` them, then `etcdctl del` the block"
    if kind in ("affinity-other-node", "duplicate-affinity"):
        return (f"`etcdctl del` the affinity record(s) of the node(s) that do not own the block "
                f"({', '.join(f.get('affinityNodes') or [])})")
    return "inspect the key with `etcdctl get`"


def _rebuild_block(ipam, net, pools: list[Pool]) -> tuple[list[Compare], list] | str:
    """A block value from the handles that list addresses in ``net`` (the block's own value is
    undecodable): owner from its affinity record, mode from the handles."""
    k = ipam.keys
    pool = next((p for p in pools if p.version == net.version and net.subnet_of(p.cidr)), None)
    if pool is None:
        return f"block {net} lies in no pool; cannot rebuild it"
    holders: list[tuple] = []
    modes = set()
    for kv in iter_prefix(ipam.ds, k.handles):
        try:
            h = Handle.from_json(kv.value)
        except ValueError:
            continue
        for a in h.addresses:
            if a.block == net:
                holders.append((a.ip, h.id))
                modes.add(h.mode)
    nodes = [n for n, bid in (_affinity_bid(k, kv.key) or (None, None)
                              for kv in iter_prefix(ipam.ds, k.affinity, keys_only=True)) if bid == block_id_of(net)]
    if len(modes) > 1:
        return f"block {net}: its handles disagree on the mode ({', '.join(sorted(modes))}); cannot rebuild it"
    mode = modes.pop() if modes else BRIDGE
    node = nodes[0] if len(nodes) == 1 else None
    try:
        b = Block.new(net, pool.name, node, mode if pool.usable_in(mode) else ROUTED)
        for ip, hid in holders:
            b.allocate(hid, ip)
    except BlockError as e:
        return f"block {net}: cannot rebuild it from its handles: {e}"
    return [], [Put(k.block(net), b.to_json())]


def block_id_of(net) -> str:
    from .keys import block_id
    return block_id(net)


def fix_findings(ipam, findings: list[dict]) -> list[dict]:
    """Repair the fixable findings, each with one compare-and-swap on the keys it read.
    Returns one entry per finding: {kind, key, action, done, why?}."""
    ds, k = ipam.ds, ipam.keys
    pools, _ = read_pools(ipam)
    out = []
    for f in findings:
        if not fixable(k, f):
            continue
        kind, key = f["kind"], f["key"]
        entry = {"kind": kind, "key": key, "action": "", "done": False}
        out.append(entry)
        kv = ds.get(key)
        compares = [Compare(key, kv.mod_revision if kv else 0)]
        ops: list = []
        if kind == "block-without-affinity" or (kind == "undecodable" and _kind_of_key(k, key) == "affinity"):
            if kind == "block-without-affinity":
                bkv = kv
            else:
                node, bid = _affinity_bid(k, key)
                bkv = ds.get(k.blocks + bid)
            try:
                b = Block.from_json(bkv.value) if bkv else None
            except BlockError:
                b = None
            if b is None or not b.node:
                if kind == "undecodable":
                    entry["action"] = f"delete {key} (its block is gone or has no owner)"
                    if bkv is not None:
                        compares.append(Compare(bkv.key, bkv.mod_revision))
                    else:
                        compares.append(Compare(k.blocks + bid, 0))
                    ops = [Delete(key)]
                else:
                    entry["why"] = "the block changed or has no owner; run check again"
            else:
                akey = k.affinity_key(b.node, b.cidr)
                entry["action"] = f"write {akey} (node {b.node}, block {b.cidr})"
                akv = kv if akey == key else ds.get(akey)
                compares = [Compare(bkv.key, bkv.mod_revision), Compare(akey, akv.mod_revision if akv else 0)]
                if kind == "undecodable" and akey != key:   # an undecodable record under another node's name
                    compares.append(Compare(key, kv.mod_revision if kv else 0))
                    ops.append(Delete(key))
                ops.append(Put(akey, json.dumps({"pool": b.pool, "mode": b.mode}, separators=(",", ":")).encode()))
        elif kind == "affinity-without-block":
            node, bid = _affinity_bid(k, key)
            entry["action"] = f"delete {key}"
            compares.append(Compare(k.blocks + bid, 0))
            ops = [Delete(key)]
        else:   # undecodable block
            net = block_from_id(key[len(k.blocks):])
            got = _rebuild_block(ipam, net, pools)
            if isinstance(got, str):
                entry["why"] = got
            else:
                entry["action"] = f"rebuild block {net} from the handles holding its addresses"
                compares += got[0]
                ops = got[1]
        if ops:
            if kv is None and kind != "affinity-without-block" and kind != "block-without-affinity":
                entry["why"] = "the key is gone; run check again"
            elif ds.commit(compares, ops):
                entry["done"] = True
            else:
                entry["why"] = "changed while fixing; run check again"
    return out


# ============================================================================= previews (before asking)

def _describe_handle(ipam, hid: str, cache: dict) -> dict:
    if hid not in cache:
        try:
            h = ipam.get_handle(hid)
        except IPAMError:
            h = None
        cache[hid] = ({"handle": hid, "node": h.node, "namespace": h.namespace or None, "pod": h.pod or None,
                       "addresses": [str(a.ip) for a in h.addresses]} if h is not None else
                      {"handle": hid, "node": None, "namespace": None, "pod": None, "addresses": []})
    return cache[hid]


def pool_holders(ipam, name: str) -> list[dict]:
    """Who holds addresses in a pool (what ``pool delete --force`` would release): one entry per
    handle with its pod and the addresses it holds in the pool."""
    _, pool = get_pool(ipam, name)
    start, end = cidr_block_range(ipam.keys, pool.cidr)
    held: dict[str, list[str]] = {}
    for kv in iter_range(ipam.ds, start, end):
        try:
            b = Block.from_json(kv.value)
        except BlockError:
            continue
        for o, hid in sorted(b.allocations.items()):
            held.setdefault(hid, []).append(str(b.ip(o)))
    cache: dict = {}
    out = []
    for hid, ips in held.items():
        d = dict(_describe_handle(ipam, hid, cache))
        d["inPool"] = ips
        out.append(d)
    return out


def release_preview(ipam, ips, handles) -> tuple[list[dict], list[str]]:
    """What ``release --ip/--handle`` would release: ([{ip, handle, node, namespace, pod}], [not found])."""
    out, missing = [], []
    cache: dict = {}
    for ip in dict.fromkeys(ipaddress.ip_address(i) for i in ips):
        d = ip_info(ipam, ip)
        if not d["allocated"]:
            missing.append(f"{ip} is not allocated")
            continue
        out.append({"ip": str(ip), "handle": d["handle"], "node": d["node"], "namespace": d["namespace"],
                    "pod": d["pod"]})
    for hid in handles:
        h = _describe_handle(ipam, hid, cache)
        addrs = list(h["addresses"])
        if not addrs:   # no record: the blocks may still record addresses for it
            for kv in iter_prefix(ipam.ds, ipam.keys.blocks):
                try:
                    b = Block.from_json(kv.value)
                except BlockError:
                    continue
                addrs += [str(b.ip(o)) for o, x in b.allocations.items() if x == hid]
        if not addrs:
            missing.append(f"handle {hid!r} does not exist and no block records an address for it")
            continue
        out += [{"ip": a, "handle": hid, "node": h["node"], "namespace": h["namespace"], "pod": h["pod"]}
                for a in addrs]
    return out, missing

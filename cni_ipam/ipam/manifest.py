"""Manifests: loading YAML/JSON documents and validating IPPool / IPAMConfig resources.

Pure: plain values in, ``Resource``s (or ``ManifestError``s naming every problem) out;
nothing here touches etcd.  This is THE pool validator: ``cni-ipam apply`` and the
pools tests build (``pool.make_pool``, ``IPAM.create_pool``) all go through
``parse_resource``."""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
from cni_ipam._records import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from ..constants import DNS_SUBDOMAIN_RE
from ..datastore.base import MAX_TXN_OPS
from . import selector as _selector
from .errors import AdminError
from .model import MAX_COOLDOWN, IPAMConfig
from .pool import ASSIGNMENT_MODES, AUTOMATIC, BLOCK_SIZE_RANGE, DEFAULT_BLOCK_SIZE, Pool, PoolError

if TYPE_CHECKING:  # pragma: no cover
    from .reservation import Reservation

# ----------------------------------------------------------------------------- errors


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



API_VERSIONS = ("projectcalico.org/v3", "cni-ipam/v1")
OUR_API_VERSION = "cni-ipam/v1"
POOL_KIND = "IPPool"
CONFIG_KINDS = ("IPAMConfig", "IPAMConfiguration")   # ours / Calico v3's name for the same thing
LIST_KINDS = ("List", "IPPoolList", "IPReservationList")
TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec")
LIST_FIELDS = ("apiVersion", "kind", "metadata", "items")
# Kubernetes object metadata a calicoctl export carries; only ``name`` is used.
METADATA_FIELDS = ("name", "labels", "annotations", "uid", "resourceVersion", "creationTimestamp",
                   "generation")
POOL_SPEC_FIELDS = ("cidr", "blockSize", "disabled", "nodeSelector", "allowedUses", "ipipMode",
                    "vxlanMode", "natOutgoing", "disableBGPExport", "assignmentMode", "namespaceSelector")
CONFIG_SPEC_FIELDS = ("strictAffinity", "autoAllocateBlocks", "maxBlocksPerHost", "ipCooldownSeconds",
                      "keepStatefulSetIPs")
RESERVATION_KIND = "IPReservation"
RESERVATION_SPEC_FIELDS = ("reservedCIDRs",)
ENCAP_MODES = ("Never", "Always", "CrossSubnet")
ALLOWED_USES = ("Workload", "Tunnel", "LoadBalancer")
CONFIG_NAME = "default"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: one apply is ONE etcd transaction: a compare per resource plus the config and the pool-set marker
MAX_RESOURCES = MAX_TXN_OPS - 2
MAX_NAME = 253
_NAME_RE = re.compile(DNS_SUBDOMAIN_RE + r"\Z")
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


# ----------------------------------------------------------------------------- documents

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
    reservation: Reservation | None = None   # kind IPReservation

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
    names: dict[tuple[str, str], str] = {}
    config_where = None
    problems = _Problems()
    for d in docs:
        r = problems.run(parse_resource, d)
        if r is None:
            continue
        if r.kind in (POOL_KIND, RESERVATION_KIND):
            if (r.kind, r.name) in names:
                problems.msgs.append(f"{d.where}: {r.label}: metadata.name: defined twice "
                                     f"(also in {names[(r.kind, r.name)]})")
                continue
            names[(r.kind, r.name)] = d.where
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
        raise ManifestError(f"{where}: kind: missing (use {POOL_KIND}, {RESERVATION_KIND} or IPAMConfig)")
    if kind != POOL_KIND and kind != RESERVATION_KIND and kind not in CONFIG_KINDS:
        raise ManifestError(f"{where}: kind: {_short(kind)} is not supported "
                            f"(use {POOL_KIND}, {RESERVATION_KIND} or IPAMConfig)")
    _check_api_version(where, body)
    ctx = str(kind)
    problems = _Problems()
    problems.run(_check_fields, where, "", body, TOP_FIELDS, ctx)
    meta = body.get("metadata")
    named = kind in (POOL_KIND, RESERVATION_KIND)
    if named or meta is not None:
        if meta is None:
            problems.msgs.append(f"{where}: {ctx}: metadata.name: missing")
        elif not isinstance(meta, dict):
            problems.msgs.append(f"{where}: {ctx}: metadata: must be a mapping")
            meta = None
        else:
            problems.run(_check_fields, where, "metadata.", meta, METADATA_FIELDS, ctx)
    name = (meta or {}).get("name")
    if named:
        if name is None:
            if meta is not None:
                problems.msgs.append(f"{where}: {ctx}: metadata.name: missing")
        elif not isinstance(name, str) or not name or len(name) > MAX_NAME or not _NAME_RE.match(name):
            problems.msgs.append(f"{where}: {ctx}: metadata.name: {_short(name)} is not a valid name "
                                 f"(lower-case letters, digits, '-' and '.', at most {MAX_NAME} characters, "
                                 f"starting and ending with a letter or digit)")
        else:
            ctx = f'{kind} "{name}"'
        if kind == RESERVATION_KIND:
            spec = problems.run(_spec, where, ctx, body, RESERVATION_SPEC_FIELDS)
            res = problems.run(parse_reservation_spec, where, ctx, str(name), spec) if spec is not None else None
            problems.raise_any()
            assert isinstance(name, str)   # (else a problem was raised above)
            return Resource(RESERVATION_KIND, name, where, reservation=res)
        spec = problems.run(_spec, where, ctx, body, POOL_SPEC_FIELDS)
        pool = problems.run(parse_pool_spec, where, ctx, str(name), spec) if spec is not None else None
        problems.raise_any()
        assert isinstance(name, str)
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


def _pool_block_size(where: str, ctx: str, spec: dict, net) -> int | None:
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


def _pool_selector(where: str, ctx: str, spec: dict, k: str = "nodeSelector") -> str:
    sel = spec.get(k)
    if sel is None:
        sel = "all()"
    if not isinstance(sel, str):
        raise ManifestError(f"{where}: {ctx}: spec.{k}: must be a string, not {_short(sel)}")
    try:
        _selector.parse(sel)
    except _selector.SelectorError as e:
        raise ManifestError(f"{where}: {ctx}: spec.{k}: {e} in {_short(sel, 80)}") from None
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
    amode = problems.run(_enum_field, where, ctx, spec, "assignmentMode", ASSIGNMENT_MODES)
    nsel = problems.run(_pool_selector, where, ctx, spec, "namespaceSelector")
    problems.raise_any()
    ipip, vxlan = encap
    return Pool(name=name, cidr=net, block_size=bs, disabled=disabled, node_selector=sel, allowed_uses=uses,
                ipip_mode=ipip, vxlan_mode=vxlan, nat_outgoing=nat, disable_bgp_export=bgp,
                assignment_mode=amode or AUTOMATIC, namespace_selector=nsel)


def parse_reservation_spec(where: str, ctx: str, name: str, spec: dict):
    """``kind: IPReservation``: ``spec.reservedCIDRs``, a non-empty list of CIDRs or addresses."""
    from .reservation import Reservation, ReservationError, parse_cidrs
    problems = _Problems()
    problems.msgs.extend(getattr(spec, "problems", ()))
    cidrs = None
    try:
        cidrs = parse_cidrs(name, spec.get("reservedCIDRs"))
    except ReservationError as e:
        problems.msgs.append(f"{where}: {ctx}: spec.reservedCIDRs: {str(e).split(': ', 1)[1]}")
    if cidrs is not None and len(cidrs) > 1000:
        problems.msgs.append(f"{where}: {ctx}: spec.reservedCIDRs: at most 1000 CIDRs per reservation")
    problems.raise_any()
    assert cidrs is not None   # (else a problem was raised above)
    return Reservation(name, cidrs)


def parse_config_spec(where: str, ctx: str, spec: dict) -> IPAMConfig:
    d = IPAMConfig()
    problems = _Problems()
    problems.msgs.extend(getattr(spec, "problems", ()))
    cfg = IPAMConfig(strict_affinity=problems.run(_bool_field, where, ctx, spec, "strictAffinity",
                                                  d.strict_affinity, default=d.strict_affinity),
                     auto_allocate_blocks=problems.run(_bool_field, where, ctx, spec, "autoAllocateBlocks",
                                                       d.auto_allocate_blocks, default=d.auto_allocate_blocks),
                     keep_statefulset_ips=problems.run(_bool_field, where, ctx, spec, "keepStatefulSetIPs",
                                                       d.keep_statefulset_ips, default=d.keep_statefulset_ips))
    m = spec.get("maxBlocksPerHost")
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 1_000_000:
            problems.msgs.append(f"{where}: {ctx}: spec.maxBlocksPerHost: must be an integer "
                                 f"from 0 (no limit) to 1000000, not {_short(m)}")
        else:
            cfg.max_blocks_per_host = m
    c = spec.get("ipCooldownSeconds")
    if c is not None:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_COOLDOWN:
            problems.msgs.append(f"{where}: {ctx}: spec.ipCooldownSeconds: must be an integer "
                                 f"from 0 (off) to {MAX_COOLDOWN}, not {_short(c)}")
        else:
            cfg.ip_cooldown_seconds = c
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


#: ``Pool`` field -> manifest spec field (``pool_from_fields``)
_SPEC_OF_FIELD = {"disabled": "disabled", "node_selector": "nodeSelector", "allowed_uses": "allowedUses",
                  "ipip_mode": "ipipMode", "vxlan_mode": "vxlanMode", "nat_outgoing": "natOutgoing",
                  "disable_bgp_export": "disableBGPExport", "assignment_mode": "assignmentMode",
                  "namespace_selector": "namespaceSelector"}


def pool_from_fields(name: str, cidr, block_size: int | None = None, **kw) -> Pool:
    """A pool from Python fields, validated as the manifest ``cni-ipam apply`` would get
    (``pool.make_pool``); PoolError (naming every problem) when the manifest rules refuse it."""
    unknown = [k for k in kw if k not in _SPEC_OF_FIELD]
    if unknown:
        raise TypeError(f"make_pool: unknown pool field(s) {', '.join(unknown)}")
    spec: dict = {"cidr": str(cidr)}
    if block_size is not None:
        spec["blockSize"] = block_size
    spec.update((_SPEC_OF_FIELD[k], v) for k, v in kw.items() if v is not None)
    body = {"apiVersion": OUR_API_VERSION, "kind": POOL_KIND, "metadata": {"name": name}, "spec": spec}
    try:
        pool = parse_resource(Doc("make_pool", body)).pool
    except ManifestError as e:
        raise PoolError("; ".join(e.problems)) from None
    assert pool is not None   # (an IPPool resource carries its pool)
    return pool

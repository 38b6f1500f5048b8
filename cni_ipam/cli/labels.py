"""``cni-ipam namespace ...`` and ``cni-ipam node ...``: namespace annotations and
node labels stored in etcd, for clusters without Kubernetes (plain containerd,
podman, Nomad).  The plugin reads them when its config has no ``kubernetes``
section: a namespace's ``<prefix>/ipv4pools`` / ``ipv6pools`` choose its pools,
a node's labels are matched against pools' ``nodeSelector``.

    cni-ipam namespace annotate NS KEY=VALUE... [--overwrite]
    cni-ipam namespace annotate NS KEY-
    cni-ipam namespace label NS KEY=VALUE... [--overwrite]      (KEY- removes)
    cni-ipam namespace get NS [-o json|yaml]
    cni-ipam namespace list
    cni-ipam node label NODE KEY=VALUE... [--overwrite]     (KEY- removes)
    cni-ipam node get NODE [-o json|yaml]
    cni-ipam node list

Every change is a compare-and-swap on the record's revision (retried on a
conflict), so concurrent edits of one namespace never lose each other's keys.
"""
from __future__ import annotations

import re

from cni_ipam.constants import DNS_SUBDOMAIN_RE
from .common import CLIError, add_connection_args, add_output_arg, emit, open_ipam, warn

_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_RE)
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
MAX_RETRIES = 20

# (object kind, record field, verb for messages)
NAMESPACE = ("namespace", "annotations", "annotated")
NODE = ("node", "labels", "labeled")
NAMESPACE_LABELS = ("namespace", "labels", "labeled")


def _check_key(key: str, what: str) -> None:
    """Kubernetes' rule for annotation and label keys: [prefix/]name, the prefix a DNS
    subdomain (<= 253), the name <= 63 alphanumerics, '-', '_', '.'."""
    prefix, slash, name = key.rpartition("/")
    ok = bool(name) and len(name) <= 63 and _NAME.fullmatch(name) and (
        not slash or (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)))
    if not ok:
        raise CLIError(f"invalid {what} key {key!r}: expected [prefix/]name, the prefix a DNS subdomain, "
                       f"the name at most 63 characters [A-Za-z0-9-_.] starting and ending alphanumeric")


def parse_changes(items: list[str], kind: str, field: str = "") -> tuple[dict, list[str]]:
    """``KEY=VALUE`` (set) and ``KEY-`` (remove), as kubectl takes them."""
    sets: dict[str, str] = {}
    removes: list[str] = []
    what = "label" if kind == "node" or field == "labels" else "annotation"
    for item in items:
        if "=" in item:
            k, v = item.split("=", 1)
            _check_key(k, what)
            if what == "label" and not (len(v) <= 63 and _LABEL_VALUE.fullmatch(v)):
                raise CLIError(f"invalid label value {v!r} for {k!r}: at most 63 characters [A-Za-z0-9-_.], "
                               f"starting and ending alphanumeric")
            if k in sets and sets[k] != v:
                raise CLIError(f"{what} {k!r} is given twice with different values")
            sets[k] = v
        elif item.endswith("-") and len(item) > 1:
            k = item[:-1]
            _check_key(k, what)
            removes.append(k)
        else:
            raise CLIError(f"{item!r}: expected KEY=VALUE to set or KEY- to remove")
    both = set(sets) & set(removes)
    if both:
        raise CLIError(f"{what} {sorted(both)[0]!r} is both set and removed")
    return sets, removes


def _validate_annotation_values(ns: str, sets: dict, ipam) -> list[str]:
    """Pool and address annotations must parse as the plugin will parse them; returns
    warnings (pools that do not exist yet)."""
    from ..ipam import annotations as ann
    warnings = []
    pools = None
    known = (ann.IPV4POOLS, ann.IPV6POOLS, ann.IPADDRS)
    for k, v in sets.items():
        prefix, _, name = k.rpartition("/")
        if name not in known:
            import difflib
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75) or [
                n for n in known if n.lower() == name.lower()]
            if close or "projectcalico" in prefix:
                did = f"did you mean {(prefix + '/' if prefix else '')}{close[0]}?" if close else (
                    f"the plugin reads {', '.join(known)}")
                warnings.append(f"annotation {k!r} is not one the plugin reads ({did}); it is stored as given")
            continue
        try:
            if name in (ann.IPV4POOLS, ann.IPV6POOLS):
                fam = 4 if name == ann.IPV4POOLS else 6
                refs = ann.parse_pools(v, k, f"namespace {ns}", fam)
                if pools is None:
                    pools = ipam.pools()
                for ref in refs:
                    if not any(p.name == ref or str(p.cidr) == ref for p in pools if p.version == fam):
                        import difflib
                        names = [p.name for p in pools if p.version == fam]
                        close = difflib.get_close_matches(ref, names, n=1, cutoff=0.6)
                        did = f" (did you mean {close[0]!r}?)" if close else (
                            f" (IPv{fam} pools: {', '.join(names)})" if names else f" (no IPv{fam} pool exists)")
                        warnings.append(f"IPv{fam} pool {ref!r} does not exist (yet){did}; "
                                        f"ADDs in namespace {ns} fail until it does")
            elif name == ann.IPADDRS:
                ann.parse_ip_addrs(v, k, f"namespace {ns}")
                warnings.append(f"{k} is only read from pods; on a namespace it has no effect")
        except ann.AnnotationError as e:
            raise CLIError(e.msg) from None
    return warnings


def update(ipam, spec, name: str, sets: dict, removes: list[str], overwrite: bool) -> tuple[dict, bool]:
    """Apply the changes to the record with CAS; returns (the new map, changed?)."""
    from ..ipam.annotations import decode_record, encode_record
    from ..ipam.store import Conflict, Txn, commit
    kind, field, _ = spec
    key = ipam.keys.namespace(name) if kind == "namespace" else ipam.keys.node(name)
    for _attempt in range(MAX_RETRIES):
        kv = ipam.ds.get(key)
        try:
            cur = decode_record(key, kv.value if kv else None, field)
        except Exception as e:  # CorruptData: name the key, never overwrite blindly
            raise CLIError(str(e)) from None
        new = dict(cur)
        for k, v in sets.items():
            if k in cur and cur[k] != v and not overwrite:
                raise CLIError(f"{kind} {name}: {field[:-1]} {k!r} already has a value ({cur[k]}), "
                               f"and --overwrite is false")
            new[k] = v
        for k in removes:
            new.pop(k, None)
        if new == cur:
            return cur, False
        txn = Txn()
        txn.read(key, kv.mod_revision if kv else 0)
        if new or (kv is not None and _has_other_fields(kv.value, field)):
            txn.put(key, encode_record(name, field, new, kv.value if kv else None))
        else:
            txn.delete(key)
        try:
            commit(ipam.ds, txn)
            return new, True
        except Conflict:
            continue
    raise CLIError(f"{kind} {name}: gave up after {MAX_RETRIES} conflicting concurrent changes")


def _has_other_fields(value: bytes, field: str) -> bool:
    """Does the record hold a non-empty map besides ``field`` (a namespace's labels besides its
    annotations, or the other way round)?"""
    from .. import _json as json
    try:
        d = json.loads(value)
    except ValueError:
        return False
    return isinstance(d, dict) and any(v for k, v in d.items() if k not in ("name", field))


def read(ipam, spec, name: str) -> dict:
    from ..ipam.annotations import decode_record
    kind, field, _ = spec
    key = ipam.keys.namespace(name) if kind == "namespace" else ipam.keys.node(name)
    kv = ipam.ds.get(key)
    try:
        return decode_record(key, kv.value if kv else None, field)
    except Exception as e:
        raise CLIError(str(e)) from None


def read_all(ipam, spec) -> list[dict]:
    from ..ipam.annotations import decode_record
    kind, field, _ = spec
    k = ipam.keys
    prefix, name_of = (k.namespaces, k.namespace_name_of_key) if kind == "namespace" else (k.nodes, k.node_name_of_key)
    out = []
    for kv in ipam.ds.get_prefix(prefix):
        try:
            m = decode_record(kv.key, kv.value, field)
        except Exception as e:
            raise CLIError(str(e)) from None
        row = {"name": name_of(kv.key), field: m}
        if kind == "namespace":
            try:
                labels = decode_record(kv.key, kv.value, "labels")
            except Exception as e:
                raise CLIError(str(e)) from None
            if labels:
                row["labels"] = labels
        out.append(row)
    return out


# -- output --------------------------------------------------------------------------

def _table_one(field):
    def table(d: dict) -> str:
        lines = [f"Name:         {d['name']}"]
        for f in [field] + [f for f in ("labels",) if f != field and f in d]:
            lines.append(f"{f.capitalize() + ':':<14}{'' if d[f] else '<none>'}".rstrip())
            for k, v in sorted(d[f].items()):
                lines.append(f"  {k}={v}")
        return "\n".join(lines)
    return table


def _table_list(field):
    def table(rows: list) -> str:
        if not rows:
            return f"No {'namespace' if field == 'annotations' else 'node'} has {field} in etcd."
        w = max(4, *(len(r["name"]) for r in rows))
        lines = [f"{'NAME':<{w}}  {field.upper()}"]
        for r in rows:
            vals = ",".join(f"{k}={v}" for k, v in sorted(r[field].items())) or "<none>"
            lines.append(f"{r['name']:<{w}}  {vals}")
        return "\n".join(lines)
    return table


# -- commands ------------------------------------------------------------------------

def _change(spec):
    kind, field, verb = spec

    def run(args) -> int:
        sets, removes = parse_changes(args.changes, kind, field)
        ipam = open_ipam(args)     # closed by main (common.close_all)
        warnings = _validate_annotation_values(args.name, sets, ipam) if field == "annotations" else []
        _, changed = update(ipam, spec, args.name, sets, removes, args.overwrite)
        for w in warnings:
            warn(w)
        print(f"{kind}/{args.name} {verb}" if changed else f"{kind}/{args.name} unchanged")
        return 0
    return run


def _get(spec):
    kind, field, _ = spec

    def run(args) -> int:
        ipam = open_ipam(args)
        data = {"name": args.name, field: read(ipam, spec, args.name)}
        if field == "annotations":   # + its labels (namespaceSelector) when it has any (added field)
            labels = read(ipam, NAMESPACE_LABELS, args.name)
            if labels:
                data["labels"] = labels
        emit(args, data, _table_one(field))
        return 0
    return run


def _list(spec):
    kind, field, _ = spec

    def run(args) -> int:
        rows = read_all(open_ipam(args), spec)
        emit(args, rows, _table_list(field))
        return 0
    return run


def register(subparsers) -> None:
    for spec, change_verb, change_help, noun in (
            (NAMESPACE, "annotate", "set (KEY=VALUE) or remove (KEY-) a namespace's annotations", "NAMESPACE"),
            (NODE, "label", "set (KEY=VALUE) or remove (KEY-) a node's labels", "NODE")):
        kind, field, _ = spec
        top = subparsers.add_parser(kind, help=f"{kind} {field} stored in etcd (used when the plugin has "
                                               f"no kubernetes section)")
        sub = top.add_subparsers(dest=f"{kind}_cmd", metavar="COMMAND")

        p = sub.add_parser(change_verb, help=change_help, description=change_help + (
            ". Pool choice: <prefix>/ipv4pools='[\"pool\"]' (prefix: the ipam config's annotation_prefix, "
            "default cni.projectcalico.org)." if kind == "namespace" else
            ". Pools' nodeSelector expressions are matched against these labels."))
        p.add_argument("name", metavar=noun)
        p.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
        p.add_argument("--overwrite", action="store_true", help="replace existing values")
        add_connection_args(p)
        p.set_defaults(func=_change(spec))

        p = sub.add_parser("get", help=f"show a {kind}'s {field}")
        p.add_argument("name", metavar=noun)
        add_connection_args(p)
        add_output_arg(p)
        p.set_defaults(func=_get(spec))

        p = sub.add_parser("list", help=f"every {kind} that has {field} in etcd")
        add_connection_args(p)
        add_output_arg(p)
        p.set_defaults(func=_list(spec))

        if kind == "namespace":
            what = "set (KEY=VALUE) or remove (KEY-) a namespace's labels"
            p = sub.add_parser("label", help=what, description=what + (
                ". Pools' namespaceSelector expressions are matched against these labels."))
            p.add_argument("name", metavar=noun)
            p.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
            p.add_argument("--overwrite", action="store_true", help="replace existing values")
            add_connection_args(p)
            p.set_defaults(func=_change(NAMESPACE_LABELS))

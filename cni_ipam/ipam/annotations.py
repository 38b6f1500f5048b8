"""Pool choice by pod, namespace and node.

Annotation keys (``<prefix>`` is the ipam config's ``annotation_prefix``,
default ``cni.projectcalico.org`` so Calico manifests keep working):

* ``<prefix>/ipv4pools``, ``<prefix>/ipv6pools``: a JSON list of pool names or CIDRs;
* ``<prefix>/ipAddrs``: a JSON list of addresses, at most one per family (pods only).

Precedence, per IP family: the pod's annotation > the namespace's annotation >
the config's ``ipv4_pools``/``ipv6_pools`` > every enabled pool whose
``nodeSelector`` matches the node.  Pools named explicitly (by an annotation or
the config) are used even if their nodeSelector does not match, as Calico does.

Where annotations and labels come from:

* Kubernetes (an ipam ``kubernetes`` section): :func:`from_kubernetes` GETs the
  Pod, the Namespace only when the pod does not name pools for every family it
  needs, and the Node only when a candidate pool has a nodeSelector other than
  ``all()``.
* etcd (no ``kubernetes`` section): records written by ``cni-ipam namespace
  annotate`` / ``cni-ipam node label``; the engine reads them in its first
  batched read (:meth:`IPAM._assign_once`), so the fast path stays 3 requests.

Nothing here talks to etcd.
"""
from __future__ import annotations

from cni_ipam import ipnet
from cni_ipam import _json as json  # json.loads/dumps without importing json (+ re)
from cni_ipam._records import dataclass, field
TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable  # noqa: F401

from .errors import CorruptData, InvalidRequest, IPAMError, TryAgain  # noqa: F401 (CorruptData re-exported)
from .store import decode_record, encode_record  # noqa: F401 (the records' codec lives in the store layer)

from ..log import log

from ..constants import DEFAULT_ANNOTATION_PREFIX as DEFAULT_PREFIX, ERR_INVALID_NETWORK_CONFIG  # noqa: E402
IPV4POOLS, IPV6POOLS, IPADDRS = "ipv4pools", "ipv6pools", "ipAddrs"


class AnnotationError(InvalidRequest):
    """A malformed annotation value (CNI code 7); the message quotes key and object."""


class KubernetesError(IPAMError):
    """A Kubernetes API failure, as an engine error: code 11 when worth retrying
    (unreachable, timeout, 5xx, 429), else 7."""
    code = ERR_INVALID_NETWORK_CONFIG


def key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}"


def pools_key(prefix: str, version: int) -> str:
    return key(prefix, IPV4POOLS if version == 4 else IPV6POOLS)


# -- values ------------------------------------------------------------------------

def _bad(k: str, where: str, why: str, value: str) -> AnnotationError:
    shown = value if len(value) <= 200 else value[:200] + "..."
    return AnnotationError(f"invalid annotation {k!r} on {where}: {why}: {shown!r}")


def _json_list(value, k: str, where: str) -> list:
    if not isinstance(value, str):
        raise _bad(k, where, "not a string", repr(value))
    try:
        v = json.loads(value)
    except ValueError as e:
        raise _bad(k, where, f"not JSON ({e})", value) from None
    if not isinstance(v, list):
        raise _bad(k, where, f"not a JSON list (a {type(v).__name__})", value)
    if not all(isinstance(x, str) and x.strip() for x in v):
        raise _bad(k, where, "every item must be a non-empty string", value)
    return [x.strip() for x in v]


def parse_pools(value, k: str, where: str, version: int) -> list[str]:
    """A pool list annotation: names, or CIDRs of this family (a CIDR has a '/')."""
    refs = _json_list(value, k, where)
    for ref in refs:
        if "/" in ref:
            try:
                net = ipnet.ip_network(ref, strict=False)
            except ValueError:
                raise _bad(k, where, f"{ref!r} is not a valid CIDR", value) from None
            if net.version != version:
                raise _bad(k, where, f"{ref!r} is not an IPv{version} CIDR", value)
    return list(dict.fromkeys(refs))


def parse_ip_addrs(value, k: str, where: str) -> list:
    """An ``ipAddrs`` annotation: plain addresses, at most one per family."""
    out: list = []
    for item in _json_list(value, k, where):
        try:
            ip = ipnet.ip_address(item)
        except ValueError:
            raise _bad(k, where, f"{item!r} is not an IP address", value) from None
        if any(o.version == ip.version for o in out):
            raise _bad(k, where, f"more than one IPv{ip.version} address", value)
        out.append(ip)
    return out


# -- precedence --------------------------------------------------------------------

@dataclass
class PoolChoice:
    pools: dict[int, list[str] | None] = field(default_factory=dict)   # None: by nodeSelector
    sources: dict[int, str] = field(default_factory=dict)
    ip_addrs: list = field(default_factory=list)                        # from the pod's ipAddrs
    ip_addrs_source: str = ""


def choose(prefix: str, *, config_pools: dict[int, list[str] | None], namespace: str = "", pod: str = "",
           ns_annotations: dict | None = None, pod_annotations: dict | None = None,
           config_source: str = "config") -> PoolChoice:
    """Apply the precedence: pod annotation > namespace annotation > config > nodeSelector."""
    out = PoolChoice()
    pod_where, ns_where = f"pod {namespace}/{pod}", f"namespace {namespace}"
    for fam in (4, 6):
        k = pools_key(prefix, fam)
        conf_name = "ipv4_pools" if fam == 4 else "ipv6_pools"
        out.pools[fam], out.sources[fam] = None, "nodeSelector"
        # an empty list names nothing: like an absent key, it falls through to the next level
        if pod_annotations and k in pod_annotations and (refs := parse_pools(pod_annotations[k], k, pod_where, fam)):
            out.pools[fam], out.sources[fam] = refs, f"annotation {k} of {pod_where}"
        elif ns_annotations and k in ns_annotations and (refs := parse_pools(ns_annotations[k], k, ns_where, fam)):
            out.pools[fam], out.sources[fam] = refs, f"annotation {k} of {ns_where}"
        elif config_pools.get(fam):
            out.pools[fam] = list(config_pools[fam] or ())
            out.sources[fam] = f"{config_source} {conf_name}"
    k = key(prefix, IPADDRS)
    if pod_annotations and k in pod_annotations:
        out.ip_addrs = parse_ip_addrs(pod_annotations[k], k, pod_where)
        out.ip_addrs_source = f"annotation {k} of {pod_where}"
    return out


def apply_choice(req, choice: PoolChoice, **changes):
    """The AssignRequest ``req`` with a choice put in (a new request; ``changes``: more fields
    to set): pools per family, and the pod's ipAddrs (unless the runtime requested addresses
    itself: then they must agree).  With ipAddrs the pod gets exactly the listed addresses
    (Calico's rule)."""
    changes.update(v4_pools=choice.pools.get(4), v6_pools=choice.pools.get(6), pool_sources=dict(choice.sources))
    if choice.ip_addrs:
        if req.requested and set(req.requested) != set(choice.ip_addrs):
            raise InvalidRequest(f"the runtime requested {', '.join(map(str, req.requested))} but "
                                 f"{choice.ip_addrs_source} asks for {', '.join(map(str, choice.ip_addrs))}")
        # as Calico: a pod with ipAddrs gets exactly those addresses, nothing picked besides
        changes.update(requested=list(choice.ip_addrs), assign_v4=False, assign_v6=False)
    return req.replace(**changes)


# -- node and namespace selectors: node_matcher / namespace_matcher, in ipam/pool.py (the ADD
#    path uses them without loading this module)
from .pool import namespace_matcher, node_matcher  # noqa: E402,F401 (re-exported)


# -- records stored in etcd (no Kubernetes): encode_record / decode_record, in ipam/store.py

# -- Kubernetes --------------------------------------------------------------------

def _k8s_error(e) -> KubernetesError:
    return KubernetesError(e.msg, code=TryAgain.code if e.transient else KubernetesError.code)


def from_kubernetes(req, client, prefix: str):
    """``req`` with its pool choice (pools, sources, ipAddrs, node_matches) from the Kubernetes
    API (a new request).

    GETs the Pod (a 404 is not an error: it may not be visible yet -- fall back
    to the namespace), the Namespace only when the pod does not name pools for
    every family needed (a 404 is an error), and -- lazily, from inside the
    engine -- the Node only when a candidate pool's nodeSelector is not all()."""
    from ..k8s import K8sError, annotations as annotations_of, labels as labels_of
    pod_ann = ns_ann = None
    ns_obj: list = []   # the Namespace, once GET (for its annotations or its labels)
    pod_where = f"pod {req.namespace}/{req.pod}"
    try:
        if req.namespace and req.pod:
            pod = client.get_pod(req.namespace, req.pod)
            if pod is None:
                log.info("pod %s/%s not found in Kubernetes: using the namespace's annotations",
                         req.namespace, req.pod)
            else:
                pod_ann = annotations_of(pod)  # type: ignore[operator]  # (mypy: the __future__ name)
                if pod.get("metadata", {}).get("ownerReferences"):   # (StatefulSet pods: ipam/sticky.py)
                    from ..k8s import statefulset_slot
                    slot = statefulset_slot(pod)
                    if slot is not None:
                        req = req.replace(keep_as="sts/%s/%s/%d" % (req.namespace, slot[0], slot[1]))
        if req.namespace:
            asked = {ip.version for ip in req.requested}
            k = key(prefix, IPADDRS)
            if pod_ann and k in pod_ann:
                asked |= {ip.version for ip in parse_ip_addrs(pod_ann[k], k, pod_where)}
            need = [f for f, on in ((4, req.assign_v4), (6, req.assign_v6)) if on and f not in asked]
            # the namespace only when the pod does not name pools for every family it needs
            if any(not (pod_ann and pools_key(prefix, f) in pod_ann
                        and parse_pools(pod_ann[pools_key(prefix, f)], pools_key(prefix, f), pod_where, f))
                   for f in need):
                ns_obj.append(client.get_namespace(req.namespace))
                ns_ann = annotations_of(ns_obj[0])  # type: ignore[operator]
    except K8sError as e:
        raise _k8s_error(e) from None
    choice = choose(prefix, config_pools={4: req.v4_pools, 6: req.v6_pools}, namespace=req.namespace,
                    pod=req.pod, ns_annotations=ns_ann, pod_annotations=pod_ann)

    def node_labels() -> dict:
        try:
            return labels_of(client.get_node(req.node))
        except K8sError as e:
            raise _k8s_error(e) from None

    def namespace_labels() -> dict:
        if not ns_obj:
            try:
                ns_obj.append(client.get_namespace(req.namespace))
            except K8sError as e:
                raise _k8s_error(e) from None
        return labels_of(ns_obj[0])
    return apply_choice(req, choice, node_matches=node_matcher(req.node, node_labels),
                        ns_matches=namespace_matcher(req.namespace, namespace_labels))

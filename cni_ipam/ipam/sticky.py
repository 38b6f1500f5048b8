"""StatefulSet pods keep their address (IPAMConfig ``spec.keepStatefulSetIPs: true``).

A pod whose controller is a StatefulSet (the plugin reads its ownerReferences with the
Pod it already GETs for annotations: ``k8s.statefulset_slot``) gets ``keep_as`` =
``sts/<namespace>/<statefulset>/<ordinal>`` on its ADD request; its attachment handle
records it (``keepAs``).

* **DEL** (and CNI GC) of such an attachment does not free its addresses: ONE guarded txn
  deletes the attachment handle, writes the *kept handle* ``sts/<ns>/<sts>/<ordinal>`` (a
  handle record with ``keptFor``; key ``<prefix>/v1/handles/sts%2F<ns>%2F<sts>%2F<ordinal>``:
  four ``/``-separated parts, escaped whole, so it never meets an attachment's
  ``<net>/<cid>/<ifname>`` key nor a layout-1 id, which hold no ``/``) and rewrites each
  block so that the kept handle holds the address.  The address stays allocated: automatic
  allocation never hands it out, a request for it is refused (``already allocated``).
* **ADD** of the next pod with that name (new container ID, new UID) moves the addresses
  back in ONE guarded txn (kept handle deleted, attachment handle written, blocks
  rewritten), on another node too in routed mode (the address then sits in another
  node's block: borrowed); in bridge mode only on the kept address's node (its gateway
  is there), else a clear error (code 111).
* The controller releases a kept handle when its StatefulSet is gone or has fewer
  replicas than ordinal+1, or when keepStatefulSetIPs is off (controller/reconcile.py).

Kept handles record no ``pod`` and no ``network``: an older controller (which frees only
handles with a recorded pod) and the CNI GC of a network (which filters on ``network``)
never touch them.  Nothing here is imported unless keepStatefulSetIPs is on and the pod
is a StatefulSet's (the engine raises ``_Kept`` from its plan; DEL sees ``keepAs``).
"""
from __future__ import annotations

import time

from ..datastore import Read
from ..log import log
from .block import BRIDGE
from .errors import AddressUnavailable, CorruptData, InvalidRequest
from .model import Handle
from .store import Txn, commit, decode_block, decode_config, decode_handle

PREFIX = "sts/"
NOT_KEPT = object()     # keep(): not kept (flag off, already kept, ...): release as usual
_FRESH = object()       # no kept record: allocate as usual (and mark the handle)
_UNMARKED = object()    # the kept record is another attachment's (another network): allocate, not kept


def kept_id(namespace: str, statefulset: str, ordinal: int) -> str:
    return f"{PREFIX}{namespace}/{statefulset}/{int(ordinal)}"


def parse_kept_id(hid: str) -> tuple[str, str, int] | None:
    """``(namespace, statefulset, ordinal)`` of a kept handle id, else None."""
    if not hid.startswith(PREFIX):
        return None
    parts = hid[len(PREFIX):].split("/")
    if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _kept_config(ipam, res) -> tuple[int, bool]:
    if not res.kvs:
        return 0, False
    cfg = decode_config(res.kvs[0].value, ipam.keys.config)
    return res.kvs[0].mod_revision, cfg.keep_statefulset_ips


# ----------------------------------------------------------------------------- DEL
def keep(ipam, hkey: str, hkv, h: Handle):
    """DEL of an attachment with ``keepAs``: move its addresses to the kept handle (one txn).
    Returns the attachment's Handle (done) or
    NOT_KEPT (keepStatefulSetIPs is off, the slot already keeps an address, the blocks do
    not record the attachment as holder...: the caller releases as usual); raises Conflict
    when the txn lost (the caller retries)."""
    k, ds = ipam.keys, ipam.ds
    kid = h.keep_as
    slot = parse_kept_id(kid)
    if slot is None:
        log.warning("DEL %s: keepAs %r is not a kept handle id: releasing", h.id, kid)
        return NOT_KEPT
    kkey = k.handle(kid)
    cfg_res, kept_res = ds.read([Read(k.config), Read(kkey)])
    cfg_rev, on = _kept_config(ipam, cfg_res)
    if not on:
        return NOT_KEPT
    if kept_res.kvs:
        log.warning("DEL %s: %s already keeps an address (another incarnation of the pod): releasing", h.id, kid)
        return NOT_KEPT
    bkeys = list(dict.fromkeys(k.block(a.block) for a in h.addresses))
    txn = Txn()
    txn.read(hkey, hkv.mod_revision)
    txn.delete(hkey)
    txn.absent(kkey)
    txn.read(k.config, cfg_rev)
    for key, kv in zip(bkeys, ds.get_many(bkeys) if bkeys else []):
        if kv is None:
            return NOT_KEPT
        b = decode_block(key, kv.value)
        for a in h.addresses:
            if a.ip in b.cidr:
                if b.holder(a.ip) != h.id:
                    log.warning("DEL %s: %s is not held by it in block %s: releasing, not keeping", h.id, a.ip, b.cidr)
                    return NOT_KEPT
                b.allocations[b.ordinal(a.ip)] = kid
        b.seq += 1
        txn.update(key, kv.mod_revision, kv.value, b)
    ns, sts, ordinal = slot
    kept = Handle(id=kid, node=h.node, namespace=ns, mode=h.mode, created=h.created, addresses=list(h.addresses),
                  kept_for={"namespace": ns, "statefulSet": sts, "ordinal": ordinal, "pod": h.pod, "podUID": h.pod_uid,
                            "network": h.network, "containerID": h.container_id, "ifname": h.ifname,
                            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    txn.put(kkey, kept)
    ipam._note_written(commit(ds, txn))
    log.info("DEL %s: %s kept for %s (StatefulSet %s/%s, ordinal %d)", h.id,
             ", ".join(str(a.ip) for a in h.addresses), kid, ns, sts, ordinal)
    return h


# ----------------------------------------------------------------------------- ADD
def assign(ipam, req):
    """ADD of a StatefulSet pod with keepStatefulSetIPs on: its kept addresses if there are
    any (one txn), else an allocation as usual that records ``keepAs`` (guarded by "no kept
    record"; a kept record appearing meanwhile makes it retry from here).
    Returns ``(AssignResult, attempts)``."""
    def attempt():
        out = _resume_once(ipam, req)
        if out is not _FRESH and out is not _UNMARKED:
            return out
        return ipam._assign_once(req.replace(keep_checked=True,
                                             keep_as="" if out is _UNMARKED else req.keep_as))
    return ipam._retry(f"assign {req.handle_id}", attempt)


def _resume_once(ipam, req):
    from .engine import AssignResult
    k, ds = ipam.keys, ipam.ds
    hkey, kkey = k.handle(req.handle_id), k.handle(req.keep_as)
    lkey = k.handle(req.legacy_handle_id) if req.legacy_handle_id else None
    got = ds.read([Read(hkey), Read(kkey), Read(k.config), Read(k.schema)] + ([Read(lkey)] if lkey else []))
    if got[0].kvs:
        return _FRESH                     # a repeated ADD: the usual path returns what it holds
    cfg_rev, on = _kept_config(ipam, got[2])
    if not on or not got[1].kvs:
        return _FRESH
    kept_kv = got[1].kvs[0]
    kept = decode_handle(kkey, kept_kv.value)
    cfg = decode_config(got[2].kvs[0].value, k.config)
    was = kept.kept_for or {}
    if (was.get("network"), was.get("ifname")) != (req.network, req.ifname):
        # a pod with several cni-ipam networks: the slot keeps the first one DEL saw; the
        # others get (and on DEL release) addresses as usual
        log.info("ADD %s: %s keeps the address of network %s/%s, not this one's: not kept", req.handle_id,
                 req.keep_as, was.get("network"), was.get("ifname"))
        return _UNMARKED
    who = f"pod {req.namespace}/{req.pod}"
    addrs = ", ".join(str(a.ip) for a in kept.addresses)
    hint = f"(or free it: `cni-ipam release --handle {req.keep_as}`)"
    if kept.mode != req.mode:
        raise AddressUnavailable(f"{who} keeps {addrs} ({req.keep_as}), allocated in {kept.mode} mode; this "
                                 f"network uses {req.mode} mode {hint}")
    if kept.node != req.node:
        if req.mode == BRIDGE:
            raise AddressUnavailable(
                f"{who} keeps {addrs} ({req.keep_as}) in a block of node {kept.node!r}; in bridge mode it can "
                f"get it back only on that node (the block's gateway is there), this ADD is for node "
                f"{req.node!r}: schedule the pod on {kept.node!r} {hint}")
        if cfg.strict_affinity:
            raise AddressUnavailable(
                f"{who} keeps {addrs} ({req.keep_as}) in a block of node {kept.node!r}; strict affinity forbids "
                f"using another node's block on node {req.node!r} {hint}")
    fams = {a.ip.version for a in kept.addresses}
    want = {f for f, on_ in ((4, req.assign_v4), (6, req.assign_v6)) if on_} | {ip.version for ip in req.requested}
    missing = [str(ip) for ip in req.requested if ip not in {a.ip for a in kept.addresses}]
    if missing or fams != want:
        raise InvalidRequest(f"{who} keeps {addrs} ({req.keep_as}), but this ADD asks for "
                             f"{', '.join(missing) if missing else 'IPv' + '+IPv'.join(map(str, sorted(want)))} "
                             f"{hint}")
    txn = Txn()
    schema = got[3].kvs[0] if got[3].kvs else None
    ipam._schema_guard(schema.value if schema else None, schema.mod_revision if schema else 0, txn)
    txn.absent(hkey)
    txn.read(kkey, kept_kv.mod_revision)
    txn.read(k.config, cfg_rev)
    if lkey:
        if got[4].kvs:
            return _FRESH                 # an older layout's record of this attachment: the usual path
        txn.absent(lkey)
    bkeys = list(dict.fromkeys(k.block(a.block) for a in kept.addresses))
    blocks = {}
    for key, kv in zip(bkeys, ds.get_many(bkeys)):
        if kv is None:
            raise CorruptData(f"kept handle {req.keep_as} lists addresses in block {key}, which does not exist "
                              f"(run `cni-ipam check`)")
        blocks[key] = decode_block(key, kv.value)
        txn.update(key, kv.mod_revision, kv.value, blocks[key])   # (encoded at commit: rewritten below)
    handle = Handle(id=req.handle_id, node=req.node, network=req.network, container_id=req.container_id,
                    ifname=req.ifname, pod=req.pod, namespace=req.namespace, pod_uid=req.pod_uid, mode=req.mode,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), keep_as=req.keep_as)
    for a in kept.addresses:
        b = blocks[k.block(a.block)]
        if b.holder(a.ip) != req.keep_as:
            raise CorruptData(f"kept handle {req.keep_as} lists {a.ip}, which block {b.cidr} records for "
                              f"{b.holder(a.ip)!r} (run `cni-ipam check`)")
        b.allocations[b.ordinal(a.ip)] = req.handle_id
        handle.addresses.append(ipam._assignment(req, b, a.ip))
    for b in blocks.values():
        b.seq += 1
    txn.put(hkey, handle)
    txn.delete(kkey)
    ipam._note_written(commit(ds, txn))
    log.info("ADD %s: %s is back from %s (kept since %s on node %s)", req.handle_id, addrs, req.keep_as,
             (kept.kept_for or {}).get("since", "?"), kept.node)
    return AssignResult(handle)

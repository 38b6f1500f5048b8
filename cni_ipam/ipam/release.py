"""Releasing addresses by hand (``cni-ipam release``), and the preview shown before asking."""
from __future__ import annotations

import ipaddress

from .block import Block, BlockError
from .errors import NotFound
from .report import describe_handle, ip_info
from .paged import iter_prefix


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
    orphans: list = []   # ip addresses
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
        h = describe_handle(ipam, hid, cache)
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

"""Paged range reads: stream every key of a range without holding more than a page.

Nothing in the admin code reads blocks one by one: blocks, handles and affinities are
streamed (``iter_range``) and summarised as they go, so memory does not grow with the
number of blocks."""
from __future__ import annotations

from typing import Iterator

from ..datastore import KV, Datastore, Read, prefix_end
from .keys import Keys

PAGE = 500  # keys per range request when streaming



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


def first(res) -> KV | None:
    return res.kvs[0] if res.kvs else None

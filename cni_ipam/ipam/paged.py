"""Paged range reads: stream every key of a range without holding more than a page.

Nothing in the admin code reads blocks one by one: blocks, handles and affinities are
streamed (``iter_range``) and summarised as they go, so memory does not grow with the
number of blocks.  (The streaming itself is the store layer's: ipam/store.py.)"""
from __future__ import annotations

from ..datastore import KV
from .store import PAGE, Keys, iter_prefix, iter_range  # noqa: F401 (re-exported)

__all__ = ["PAGE", "iter_range", "iter_prefix", "cidr_block_range", "first"]


def cidr_block_range(keys: Keys, net) -> tuple[str, str]:
    """The block-key range holding every block inside ``net`` (``Keys.block_range``)."""
    return keys.block_range(net)


def first(res) -> KV | None:
    return res.kvs[0] if res.kvs else None

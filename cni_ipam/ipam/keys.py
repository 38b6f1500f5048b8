"""The etcd key layout: now part of the store layer (ipam/store.py); re-exported here for
callers that import it by its old name."""
from .store import LAYOUT, Keys, block_from_id, block_id, escape, handle_id, legacy_handle_id, unescape  # noqa: F401

__all__ = ["LAYOUT", "Keys", "block_from_id", "block_id", "escape", "handle_id", "legacy_handle_id", "unescape"]

"""The CNI protocol layer (spec 1.1): env, config, versions, results, errors.

Stdlib-only and free of any datastore knowledge.  Modules:
``errors``, ``version``, ``env``, ``netconf``, ``result``, ``skel``.
Only the (import-free) error type is re-exported here.
"""
from .errors import CNIError

__all__ = ["CNIError"]

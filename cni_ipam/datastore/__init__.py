"""The only code that talks to etcd.

``open_datastore`` picks a transport: ``gateway`` (etcd's v3 JSON gateway over
http.client; no grpc import, used on the plugin's exec path) or ``grpc``
(python3-etcd3; for the CLI and long-running code)."""
import os

# gRPC's C core logs failed TLS handshakes and the like straight to stderr ("E1125 ...
# ssl_transport_security.cc] Handshake failed ..."); the CLI reports every failure as ONE line,
# from the exception.  This must be set before grpc is first imported (the CLI may import it to
# pick a transport), hence here; an explicit GRPC_VERBOSITY still wins (debugging).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from .base import (Compare, Datastore, DatastoreError, DatastoreUnavailable, Delete, KV, Put,
                   RangeResult, Read, prefix_end, read_key, read_prefix)

__all__ = ["Compare", "Datastore", "DatastoreError", "DatastoreUnavailable", "Delete", "KV", "Put",
           "RangeResult", "Read", "prefix_end", "read_key", "read_prefix", "open_datastore"]


def open_datastore(endpoints, *, transport: str = "gateway", timeout: float = 10.0,
                   ca_cert: str | None = None, cert: str | None = None, key: str | None = None,
                   username: str | None = None, password: str | None = None) -> Datastore:
    """Open a datastore client.  ``endpoints``: list of URLs or a comma-separated string."""
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if transport == "gateway":
        from .gateway import GatewayDatastore
        return GatewayDatastore(endpoints, timeout=timeout, ca_cert=ca_cert, cert=cert, key=key,
                                username=username, password=password)
    if transport == "grpc":
        from .grpc import GrpcDatastore
        return GrpcDatastore(endpoints, timeout=timeout, ca_cert=ca_cert, cert=cert, key=key,
                             username=username, password=password)
    raise ValueError(f"unknown datastore transport {transport!r}")

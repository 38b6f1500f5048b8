"""``socket.create_connection`` for the plugin's exec path, on ``_socket`` alone.

``import socket`` costs more than the rest of an ADD's etcd client: it imports ``enum``,
``selectors`` (+ ``math``, ``select``, ``collections.abc``) and converts four ``IntEnum``\\ s
at import (issue 17).  The gateway client (gateway.py) needs a TCP connection, ``sendall``,
``recv_into`` through a buffered reader and ``settimeout``: ``_socket`` has them all.  When
``socket`` is already imported (``ssl`` imports it: https endpoints) the real
``socket.create_connection`` is used, so TLS sees an ordinary ``socket.socket``.  Any other
attribute is looked up in the real ``socket`` module (imported then).
"""
import io
import sys

import _socket
from _socket import IPPROTO_TCP, SOCK_STREAM, TCP_NODELAY, gaierror, getaddrinfo, herror, timeout  # noqa: F401

error = OSError


class _Reader(io.RawIOBase):
    """``socket.SocketIO`` for reading: ``readinto`` is ``recv_into``."""

    def __init__(self, sock):
        io.RawIOBase.__init__(self)
        self._sock = sock

    def readable(self):
        return True

    def readinto(self, b):
        self._checkClosed()
        return self._sock.recv_into(b)


class _Socket(_socket.socket):
    __slots__ = ()

    def makefile(self, mode="rb"):
        if mode != "rb":
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_Reader(self))


def create_connection(address, timeout=None):
    """``socket.create_connection(address, timeout)``: the same tries, the same errors."""
    real = sys.modules.get("socket")
    if real is not None:
        return real.create_connection(address, timeout)
    host, port = address
    last = None
    for af, socktype, proto, _, sa in getaddrinfo(host, port, 0, SOCK_STREAM):
        sock = None
        try:
            sock = _Socket(af, socktype, proto)
            sock.settimeout(timeout)
            sock.connect(sa)
            return sock
        except OSError as exc:
            last = exc
            if sock is not None:
                sock.close()
    if last is not None:
        try:
            raise last
        finally:
            last = None
    raise OSError("getaddrinfo returns an empty list")


def __getattr__(name):
    import socket
    return getattr(socket, name)

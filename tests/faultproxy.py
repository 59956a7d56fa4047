"""A TCP proxy on 127.0.0.1 that tests control, to make a database connection hang or drop.

``FaultProxy(upstream_port=...)`` listens on a free local port and forwards every connection
to ``127.0.0.1:upstream_port``. :meth:`FaultProxy.hang` stops forwarding in both directions
while keeping every socket open, which is what a client sees when a peer or a network path
stops responding without closing anything. :meth:`FaultProxy.resume` forwards again, and
:meth:`FaultProxy.drop_connections` closes every forwarded connection at once (a reset).
Only loopback addresses are used: the proxy never connects anywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from dataclasses import dataclass, field
from typing import Self

from psycopg.conninfo import make_conninfo

logger = logging.getLogger("dbsync.testing.faultproxy")

LOOPBACK = "127.0.0.1"
_POLL_SECONDS = 0.05
_CHUNK_BYTES = 65536


@dataclass
class _Pair:
    """One client connection and its upstream connection."""

    client: socket.socket
    upstream: socket.socket

    def close(self) -> None:
        for end in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                end.close()


@dataclass
class FaultProxy:
    """A forwarding proxy from a free port on 127.0.0.1 to ``upstream_port`` on 127.0.0.1."""

    upstream_port: int
    port: int = field(default=0, init=False)
    _listener: socket.socket | None = field(default=None, init=False)
    _forwarding: threading.Event = field(default_factory=threading.Event, init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)
    _pairs: list[_Pair] = field(default_factory=list, init=False)
    _pairs_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    accepted_connections: int = field(default=0, init=False)

    def start(self) -> None:
        """Listen on a free loopback port and start accepting connections."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(64)
        listener.settimeout(_POLL_SECONDS)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._forwarding.set()
        self._spawn(self._accept_loop, name="faultproxy-accept")

    def dsn_for(self, dsn: str) -> str:
        """Return ``dsn`` pointed at the proxy instead of the server."""
        return make_conninfo(dsn, host=LOOPBACK, port=str(self.port))

    def hang(self) -> None:
        """Stop forwarding in both directions. Sockets stay open and nothing is forwarded."""
        self._forwarding.clear()

    def resume(self) -> None:
        """Forward again, including bytes that arrived while hung."""
        self._forwarding.set()

    def drop_connections(self) -> int:
        """Close every forwarded connection (both ends) and return how many there were."""
        with self._pairs_lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        return len(pairs)

    @property
    def open_connections(self) -> int:
        """Number of forwarded connections not yet closed."""
        with self._pairs_lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the worker threads."""
        self._stopped.set()
        self._forwarding.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self.drop_connections()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *, name: str, args: tuple[object, ...] = ()) -> None:
        thread = threading.Thread(target=target, args=args, name=name,  # type: ignore[arg-type]
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=5)
            except OSError as error:
                logger.warning("proxy cannot reach 127.0.0.1:%d: %s", self.upstream_port, error)
                client.close()
                continue
            pair = _Pair(client=client, upstream=upstream)
            with self._pairs_lock:
                self._pairs.append(pair)
            self.accepted_connections += 1
            self._spawn(self._forward_loop, name="faultproxy-forward", args=(pair,))

    def _forward_loop(self, pair: _Pair) -> None:
        peers = {pair.client: pair.upstream, pair.upstream: pair.client}
        try:
            while not self._stopped.is_set():
                # While hung, bytes stay in the kernel buffers unread, so neither end gets
                # a response and neither sees the connection close.
                if not self._forwarding.wait(timeout=_POLL_SECONDS):
                    continue
                readable, _, _ = select.select(list(peers), [], [], _POLL_SECONDS)
                for source in readable:
                    if not self._forwarding.is_set():
                        break
                    data = source.recv(_CHUNK_BYTES)
                    if not data:
                        return
                    peers[source].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._pairs_lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            pair.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

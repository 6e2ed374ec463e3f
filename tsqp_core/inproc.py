"""The ``inproc`` transport: client and server in one process, for tests and debugging.

The server channel is served by a thread of the same process; frames are handed over by
reference through queues, so it measures the protocol and the server loop with no copies and
no operating-system IPC. Each client is its own peer (:attr:`ServerChannel.peer`) with its
own reply queue, so several clients may share one server; a closed client is reported by
:meth:`InprocServer.departed`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any

from tsqp_core.transport import (ClientChannel, Frames, Peer, PeerDead, PeerTimeout,
                                 ServerChannel, Transport, TransportError, Watchdog)

_servers: dict[str, "InprocServer"] = {}
_lock = threading.Lock()
_names = itertools.count()
_clients = itertools.count(1)


class InprocServer(ServerChannel):
    def __init__(self, address: str) -> None:
        self.address = address
        # each request carries a token its reply echoes: a late reply to an abandoned request
        # is recognised and dropped, never returned for the next one
        self.requests: queue.Queue[tuple[object, Peer, queue.Queue, list[Any]]] = queue.Queue()
        self._answer: tuple[object, queue.Queue] | None = None
        self._departed: list[Peer] = []
        self.closed = False

    def recv(self, timeout: float | None) -> list[Any] | None:
        try:
            token, peer, replies, frames = self.requests.get(timeout=timeout)
        except queue.Empty:
            return None
        self._answer = (token, replies)
        self.peer = peer
        return frames

    def send(self, frames: Frames) -> None:
        if self._answer is None:
            raise TransportError("send() without a request to answer")
        token, replies = self._answer
        self._answer = None
        replies.put((token, list(frames)))

    def departed(self) -> list[Peer]:
        with _lock:
            gone, self._departed = self._departed, []
        return gone

    def close(self) -> None:
        with _lock:
            if _servers.get(self.address) is self:
                del _servers[self.address]
        self.closed = True


class InprocClient(ClientChannel):
    def __init__(self, server: InprocServer, watchdog: Watchdog | None) -> None:
        self.server = server
        self.watchdog = watchdog
        self.peer = Peer(f"inproc-{next(_clients)}")
        self.replies: queue.Queue[tuple[object, list[Any]]] = queue.Queue()
        self.closed = False

    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        if self.closed or self.server.closed:
            raise PeerDead(f"{self.server.address}: channel closed")
        token = object()
        self.server.requests.put((token, self.peer, self.replies, list(frames)))
        waited = 0.0
        while True:
            try:
                answered, reply = self.replies.get(timeout=0.1)
                if answered is token:
                    return reply
            except queue.Empty:
                waited += 0.1
                reason = self.watchdog() if self.watchdog else None
                if reason:
                    raise PeerDead(reason) from None
                if self.server.closed:
                    raise PeerDead(f"{self.server.address}: server closed") from None
                if timeout is not None and waited >= timeout:
                    raise PeerTimeout(f"no reply from {self.server.address} within {timeout:g} s") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with _lock:
                self.server._departed.append(self.peer)


class InprocTransport(Transport):
    name = "inproc"
    in_process = True

    def listen(self, address: str | None = None) -> InprocServer:
        address = address or f"inproc://tsqp-{next(_names)}"
        with _lock:
            if address in _servers:
                raise TransportError(f"{address} is already served")
            server = _servers[address] = InprocServer(address)
        return server

    def check_address(self, address: str) -> None:
        if not address.startswith("inproc://"):
            raise TransportError(f"inproc cannot reach {address!r}: use inproc://NAME")

    def connect(self, address: str, watchdog: Watchdog | None = None) -> InprocClient:
        with _lock:
            server = _servers.get(address)
        if server is None:
            raise PeerDead(f"no inproc server at {address}")
        return InprocClient(server, watchdog)

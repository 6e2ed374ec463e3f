"""The ``inproc`` transport: client and server in one process, for tests and debugging.

The server channel is served by a thread of the same process; frames are handed over by
reference through two queues, so it measures the protocol and the server loop with no
copies and no operating-system IPC.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, ClassVar

from tsqp_core.transport import (ClientChannel, Frames, PeerDead, PeerTimeout, ServerChannel,
                                 Transport, TransportError, Watchdog)

_servers: dict[str, "InprocServer"] = {}
_lock = threading.Lock()
_names = itertools.count()


class InprocServer(ServerChannel):
    def __init__(self, address: str) -> None:
        self.address = address
        # each request carries a token its reply echoes: a late reply to an abandoned request
        # is recognised and dropped, never returned for the next one
        self.requests: queue.Queue[tuple[object, list[Any]]] = queue.Queue(maxsize=1)
        self.replies: queue.Queue[tuple[object, list[Any]]] = queue.Queue(maxsize=1)
        self._token: object = None
        self.closed = False

    def recv(self, timeout: float | None) -> list[Any] | None:
        try:
            self._token, frames = self.requests.get(timeout=timeout)
        except queue.Empty:
            return None
        return frames

    def send(self, frames: Frames) -> None:
        self.replies.put((self._token, list(frames)))

    def close(self) -> None:
        with _lock:
            if _servers.get(self.address) is self:
                del _servers[self.address]
        self.closed = True


class InprocClient(ClientChannel):
    def __init__(self, server: InprocServer, watchdog: Watchdog | None) -> None:
        self.server = server
        self.watchdog = watchdog
        self.closed = False

    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        if self.closed or self.server.closed:
            raise PeerDead(f"{self.server.address}: channel closed")
        token = object()
        self.server.requests.put((token, list(frames)))
        waited = 0.0
        while True:
            try:
                answered, reply = self.server.replies.get(timeout=0.1)
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
        self.closed = True


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

    def connect(self, address: str, watchdog: Watchdog | None = None) -> InprocClient:
        with _lock:
            server = _servers.get(address)
        if server is None:
            raise PeerDead(f"no inproc server at {address}")
        return InprocClient(server, watchdog)

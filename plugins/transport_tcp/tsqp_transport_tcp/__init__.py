"""tsqp transport ``tcp``: ZeroMQ (ROUTER/DEALER) with tensors as separate frames.

Frames go out with ``copy=False`` (pyzmq copies only frames under its copy threshold), and
arrive as ``zmq.Frame`` buffers that the codec wraps in place. The server binds loopback by
default; any other interface needs ``transport.options.allow_remote=true``. ``ipc://``
addresses work too (the seed's setting).

Liveness: the client polls in short slices, so a dead server child is reported by the
watchdog at once and a silent one after ``timeout``; after a timeout the client's socket is
rebuilt (the "lazy pirate" pattern), so a late reply to an abandoned request can never be
mistaken for the answer to the next one.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any
from urllib.parse import urlsplit

import zmq
from pydantic import Field

from tsqp_core import hookimpl
from tsqp_core.plugins import PluginOptions
from tsqp_core.transport import (ClientChannel, Frames, MessageTooLarge, PeerDead, PeerTimeout,
                                 ServerChannel, Transport, TransportError, Watchdog)

POLL_S = 0.05


class TcpOptions(PluginOptions):
    #: Where ``serve`` binds; port 0 picks a free one.
    bind: str = "tcp://127.0.0.1:0"
    #: Permit binding a non-loopback interface (only with a network you trust, or CurveZMQ).
    allow_remote: bool = False
    #: The largest frame either side sends (MessageTooLarge before sending) or the server
    #: accepts (ZeroMQ drops the connection of a peer that sends a bigger one).
    max_frame_bytes: int = Field(1 << 32, gt=0)
    #: pyzmq copies frames smaller than this rather than pinning them.
    copy_threshold: int = Field(1 << 16, ge=0)


def _check_size(frames: Frames, limit: int) -> None:
    """Too large is an error before anything is sent, never a dropped connection."""
    for i, frame in enumerate(frames):
        size = memoryview(frame).nbytes
        if size > limit:
            raise MessageTooLarge(f"frame {i} is {size} bytes; transport.options.max_frame_bytes "
                                  f"is {limit}")


def is_loopback(address: str) -> bool:
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TcpServer(ServerChannel):
    def __init__(self, ctx: zmq.Context, address: str, options: TcpOptions) -> None:
        self._ctx = ctx
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, options.max_frame_bytes)
        self._limit = options.max_frame_bytes
        self._sock.copy_threshold = options.copy_threshold
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise TransportError(f"cannot bind {address}: {exc}") from None
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peer: bytes | None = None
        self._closed = False

    def recv(self, timeout: float | None) -> list[Any] | None:
        ms = None if timeout is None else int(timeout * 1000)
        if not self._sock.poll(ms, zmq.POLLIN):
            return None
        parts = self._sock.recv_multipart(copy=False)
        self._peer = parts[0].bytes
        return [p.buffer for p in parts[1:]]

    def send(self, frames: Frames) -> None:
        if self._peer is None:
            raise TransportError("send() without a request to answer")
        _check_size(frames, self._limit)  # the request stays answerable (a small error)
        self._sock.send_multipart([self._peer, *frames], copy=False)
        self._peer = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()


class TcpClient(ClientChannel):
    def __init__(self, address: str, options: TcpOptions, watchdog: Watchdog | None) -> None:
        self.address = address
        self.options = options
        self.watchdog = watchdog
        self._ctx = zmq.Context()
        self._sock = self._socket()
        self._closed = False

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.copy_threshold = self.options.copy_threshold
        sock.connect(self.address)
        return sock

    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        if self._closed:
            raise TransportError("channel is closed")
        _check_size(frames, self.options.max_frame_bytes)
        self._sock.send_multipart(list(frames), copy=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._sock.poll(int(POLL_S * 1000), zmq.POLLIN):
                return [p.buffer for p in self._sock.recv_multipart(copy=False)]
            reason = self.watchdog() if self.watchdog else None
            if reason:
                self._reset()
                raise PeerDead(f"{self.address}: {reason}")
            if deadline is not None and time.monotonic() >= deadline:
                self._reset()
                raise PeerTimeout(f"no reply from {self.address} within {timeout:g} s "
                                  "(is the server running?)")

    def _reset(self) -> None:
        self._sock.close(linger=0)
        self._sock = self._socket()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()


class TcpTransport(Transport):
    name = "tcp"
    Options = TcpOptions
    size_limit_option = "max_frame_bytes"

    def listen(self, address: str | None = None) -> TcpServer:
        opts: TcpOptions = self.options  # type: ignore[assignment]
        address = address or opts.bind
        if not is_loopback(address) and not opts.allow_remote:
            raise TransportError(
                f"refusing to bind {address}: not a loopback address; set "
                "transport.options.allow_remote=true to serve other hosts")
        return TcpServer(zmq.Context(), address, opts)

    def connect(self, address: str, watchdog: Watchdog | None = None) -> TcpClient:
        if urlsplit(address).scheme not in ("tcp", "ipc"):
            raise TransportError(f"tcp transport cannot reach {address!r}: use tcp://HOST:PORT or ipc://PATH")
        return TcpClient(address, self.options, watchdog)  # type: ignore[arg-type]


@hookimpl
def tsqp_register_transports(register):
    register(TcpTransport)

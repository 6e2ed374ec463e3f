"""tsqp transport ``tcp``: ZeroMQ (ROUTER/DEALER) with tensors as separate frames.

Frames go out with ``copy=False`` (pyzmq copies only frames under its copy threshold), and
arrive as ``zmq.Frame`` buffers that the codec wraps in place. ``ipc://`` addresses work too
(the seed's setting); the socket file is removed when the server closes.

**Who may connect.** The server binds loopback by default. With
``transport.options.curve=DIR`` both sides speak CurveZMQ (:mod:`.curve`): encrypted,
authenticated, and the server accepts only the client keys listed in ``DIR/authorized``; every
request then carries its client's public key (:attr:`Peer.key`). Binding anything but
loopback (``allow_remote=true``) is refused without Curve, unless
``insecure_remote_plaintext=true`` says, loudly, that anyone who can reach the port may use
the server and read every tensor.

**Peers.** The ROUTER socket gives each connection its own routing id (:attr:`Peer.conn`).
A socket monitor reports connections accepted and closed by file descriptor, and each
request says which descriptor it came in on (``ZMQ_SRCFD``), so a closed connection's peer
is reported by :meth:`TcpServer.departed`. A request larger than ``max_frame_bytes`` in any
frame is dropped by ZeroMQ before it is buffered (the connection with it).

Liveness: the client polls in short slices, so a dead server child is reported by the
watchdog at once and a silent one after ``timeout``; after a timeout the client's socket is
rebuilt (the "lazy pirate" pattern), so a late reply to an abandoned request can never be
mistaken for the answer to the next one. A socket monitor follows the connection: a client
that has not connected for ``connect_timeout_s`` (nobody listening, host unreachable, a
server gone) or whose key the server refused fails at once with what it saw, not after the
request's timeout.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import zmq
from pydantic import Field

from tsqp_core import hookimpl
from tsqp_core.plugins import PluginOptions
from tsqp_core.transport import (ClientChannel, Frames, MessageTooLarge, Peer, PeerDead,
                                 PeerTimeout, ServerChannel, Transport, TransportError,
                                 Watchdog)
from tsqp_transport_tcp import curve

POLL_S = 0.05


class TcpOptions(PluginOptions):
    #: Where ``serve`` binds; port 0 picks a free one.
    bind: str = "tcp://127.0.0.1:0"
    #: Permit binding a non-loopback interface; needs ``curve`` (or the insecure option).
    allow_remote: bool = False
    #: A CurveZMQ keys directory (``python -m tsqp_core keys DIR``): encrypt, authenticate,
    #: and accept only the client keys in ``DIR/authorized``.
    curve: str | None = None
    #: Serve other hosts in plaintext, with no authentication: anyone who can reach the port
    #: can use the server and read every tensor. Only on a network you fully control.
    insecure_remote_plaintext: bool = False
    #: The largest frame either side sends (MessageTooLarge before sending) or accepts
    #: (ZeroMQ drops a bigger frame, with its connection, before it is buffered).
    max_frame_bytes: int = Field(1 << 30, gt=0)
    #: pyzmq copies frames smaller than this rather than pinning them.
    copy_threshold: int = Field(1 << 16, ge=0)
    #: A client that cannot connect (refused, unreachable, handshake failing) for this long
    #: gives up with what it saw, whatever the request's own timeout.
    connect_timeout_s: float = Field(10.0, gt=0)


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


def check_address(address: str, *, server: bool) -> None:
    """``tcp://HOST:PORT`` with a port in range (0 or ``*`` only where a server binds), or
    ``ipc://PATH``; anything else is a clear error, never a silently different port."""
    parts = urlsplit(address)
    if parts.scheme == "ipc":
        if not address[len("ipc://"):]:
            raise TransportError(f"{address!r}: ipc:// needs a path")
        return
    if parts.scheme != "tcp":
        raise TransportError(f"tcp transport cannot use {address!r}: use tcp://HOST:PORT or "
                             "ipc://PATH")
    netloc = parts.netloc
    host, sep, port = netloc.rpartition(":")
    if not sep or not host:
        raise TransportError(f"{address!r}: tcp:// needs HOST:PORT")
    if port == "*" and server:
        return
    if not port.isdigit() or not (0 if server else 1) <= int(port) <= 65535:
        raise TransportError(f"{address!r}: port {port!r} is not a TCP port "
                             f"({'0' if server else '1'} to 65535)")


class TcpServer(ServerChannel):
    def __init__(self, ctx: zmq.Context, address: str, options: TcpOptions,
                 keys: curve.ServerKeys | None) -> None:
        self._ctx = ctx
        self._zap = curve.Zap(ctx, keys) if keys is not None else None
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, options.max_frame_bytes)
        self._limit = options.max_frame_bytes
        self._sock.copy_threshold = options.copy_threshold
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        #: descriptor -> the peer last seen on it (a closed connection's peer departs)
        self._by_fd: dict[int, Peer] = {}
        if keys is not None:
            curve.serve_socket(self._sock, keys)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close()
            if self._zap:
                self._zap.close()
            ctx.term()
            raise TransportError(f"cannot bind {address}: {exc}") from None
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ipc_path = self.address[len("ipc://"):] if self.address.startswith("ipc://") else None
        self._answer: bytes | None = None
        self._departed: list[Peer] = []
        self._closed = False

    def recv(self, timeout: float | None) -> list[Any] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._sock.poll(None if left is None else int(left * 1000), zmq.POLLIN):
                parts = self._sock.recv_multipart(copy=False)
                if len(parts) < 2:
                    continue
                self._connections()
                user = parts[1].get("User-Id") if self._zap else None
                self._answer = parts[0].bytes
                self.peer = Peer(self._answer, user or None)
                fd = parts[1].get(zmq.SRCFD)
                old = self._by_fd.get(fd)
                if old is not None and old != self.peer:  # the descriptor was reused
                    self._departed.append(old)
                self._by_fd[fd] = self.peer
                return [p.buffer for p in parts[1:]]
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def send(self, frames: Frames) -> None:
        if self._answer is None:
            raise TransportError("send() without a request to answer")
        _check_size(frames, self._limit)  # the request stays answerable (a small error)
        self._sock.send_multipart([self._answer, *frames], copy=False)
        self._answer = None

    def _connections(self) -> None:
        """Read the monitor: a descriptor accepted or closed ends the peer last seen on it."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except (zmq.Again, zmq.ZMQError):
                return
            old = self._by_fd.pop(event["value"], None)
            if old is not None:
                self._departed.append(old)

    def departed(self) -> list[Peer]:
        self._connections()
        gone, self._departed = self._departed, []
        return gone

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            if self._zap:
                self._zap.close()
            self._ctx.term()
            if self._ipc_path:
                try:
                    os.unlink(self._ipc_path)
                except OSError:
                    pass


#: Socket monitor events worth naming when a client gets no reply.
_EVENTS = {
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_CONNECT_DELAYED: "connecting",
    zmq.EVENT_CONNECT_RETRIED: "connection refused or unreachable, retrying",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol: a Curve server "
                                         "without curve here, or the reverse?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake failed: the server did not accept this "
                                     "client's key",
}


_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
             zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_FAILURE_NAMES = {_EVENTS[e] for e in _FAILURES}
#: Failures that another try will not mend: the server refused this client (or spoke
#: another mechanism). A refused TCP connect is retried until the connect timeout.
_REFUSED_NAMES = {_EVENTS[zmq.EVENT_HANDSHAKE_FAILED_AUTH],
                  _EVENTS[zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL]}


class TcpClient(ClientChannel):
    def __init__(self, address: str, options: TcpOptions, watchdog: Watchdog | None,
                 keys: curve.ClientKeys | None) -> None:
        self.address = address
        self.options = options
        self.watchdog = watchdog
        self.keys = keys
        self._ctx = zmq.Context()
        self._last_event: str | None = None
        self._sock, self._monitor = self._socket()
        #: Whether the connection is up (handshake done), and since when it has not been.
        self._connected = False
        self._waiting_since = time.monotonic()
        self._closed = False

    def _socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.options.max_frame_bytes)
        sock.copy_threshold = self.options.copy_threshold
        if self.keys is not None:
            curve.client_socket(sock, self.keys)
        monitor = sock.get_monitor_socket(sum(_EVENTS))
        sock.connect(self.address)
        return sock, monitor

    def _events(self) -> None:
        """Remember the last connection event worth naming."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            name = _EVENTS.get(event["event"])
            if name is None:
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED and self._connected:
                self._connected = False
                self._waiting_since = time.monotonic()
            elif event["event"] in _FAILURES:
                self._connected = False
            # a handshake failure says more than the disconnect and retry that follow it
            if event["event"] in _FAILURES or self._last_event not in _FAILURE_NAMES:
                self._last_event = name

    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        if self._closed:
            raise TransportError("channel is closed")
        if not frames:
            raise TransportError("a message needs at least one frame")
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
            self._events()
            now = time.monotonic()
            if not self._connected and (
                    self._last_event in _REFUSED_NAMES
                    or now - self._waiting_since >= self.options.connect_timeout_s):
                seen = self._last_event or "nothing answered at that address"
                self._reset()
                raise PeerDead(f"cannot reach {self.address}: {seen} (transport.options."
                               f"connect_timeout_s={self.options.connect_timeout_s:g})")
            if deadline is not None and time.monotonic() >= deadline:
                self._events()
                seen = f"; last seen: {self._last_event}" if self._last_event else \
                    "; nothing answered at that address"
                self._reset()
                raise PeerTimeout(f"no reply from {self.address} within {timeout:g} s"
                                  f"{seen} (is the server running?)")

    def _reset(self) -> None:
        self._close_sockets()
        self._last_event = None
        self._connected = False
        self._waiting_since = time.monotonic()
        self._sock, self._monitor = self._socket()

    def _close_sockets(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_sockets()
            self._ctx.term()


class TcpTransport(Transport):
    name = "tcp"
    Options = TcpOptions
    size_limit_option = "max_frame_bytes"

    def listen(self, address: str | None = None) -> TcpServer:
        opts: TcpOptions = self.options  # type: ignore[assignment]
        address = address or opts.bind
        check_address(address, server=True)
        keys = self._keys(curve.ServerKeys)
        if not is_loopback(address):
            if not opts.allow_remote:
                raise TransportError(
                    f"refusing to bind {address}: not a loopback address; set "
                    "transport.options.allow_remote=true (with transport.options.curve=DIR) "
                    "to serve other hosts")
            if keys is None and not opts.insecure_remote_plaintext:
                raise TransportError(
                    f"refusing to serve {address} without CurveZMQ: anyone who can reach it "
                    "could use the server and read every tensor. Make keys with `python -m "
                    "tsqp_core keys DIR` and set transport.options.curve=DIR (or, on a "
                    "network you fully control, transport.options.insecure_remote_plaintext"
                    "=true)")
            if keys is None:
                print(f"tsqp tcp: WARNING: serving {address} IN PLAINTEXT WITH NO "
                      "AUTHENTICATION (insecure_remote_plaintext=true): anyone who can reach "
                      "it can use this server and read every tensor", file=sys.stderr,
                      flush=True)
        return TcpServer(zmq.Context(), address, opts, keys)  # type: ignore[arg-type]

    def check_address(self, address: str) -> None:
        check_address(address, server=False)

    def connect(self, address: str, watchdog: Watchdog | None = None) -> TcpClient:
        check_address(address, server=False)
        return TcpClient(address, self.options, watchdog,  # type: ignore[arg-type]
                         self._keys(curve.ClientKeys))

    def _keys(self, kind: Any) -> Any:
        directory = self.options.curve  # type: ignore[attr-defined]
        if directory is None:
            return None
        try:
            return kind.load(directory)
        except curve.KeyError_ as exc:
            raise TransportError(f"transport.options.curve: {exc}") from None
        except OSError as exc:
            raise TransportError(f"transport.options.curve: {exc.filename}: "
                                 f"{exc.strerror}") from None


@hookimpl
def tsqp_register_transports(register):
    register(TcpTransport)

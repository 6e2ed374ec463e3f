"""CurveZMQ for the ``tcp`` transport: key files, the client allow-list, the ``keys`` command.

Threat model: anyone who can reach the server's port (another local user, another host) and
anyone on the path between the two hosts. With Curve on, every byte is encrypted and
authenticated (CurveZMQ: Curve25519 key agreement, XSalsa20-Poly1305 per message, perfect
forward secrecy per connection); the server accepts a connection only from a client whose
public key is in its allow-list, and the client accepts only the server whose public key it
was given. Without the client's secret key file nobody can say hello.

Key files are ZeroMQ's certificate format (``zmq.auth``): ``NAME.key`` holds a public key,
``NAME.key_secret`` the public and the secret key (mode 0600). A keys directory made by
``python -m tsqp_core keys DIR`` holds::

    DIR/server.key            the server's public key        -> both hosts
    DIR/server.key_secret     the server's secret key        -> the GPU host only
    DIR/client.key            the client's public key
    DIR/client.key_secret     the client's secret key        -> the TEE host only
    DIR/authorized/client.key the public keys the server accepts (one file per client)

``transport.options.curve=DIR`` turns it on for both sides: ``serve`` reads
``server.key_secret`` and ``authorized/``; ``run`` reads ``client.key_secret`` and
``server.key``. Keys never travel on a command line, an environment variable or a log line:
only paths do, and messages name a key by the first characters of its public half.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class KeyError_(ValueError):
    """A keys directory that is missing, incomplete or readable by others."""


def _secret(path: Path) -> tuple[bytes, bytes]:
    """The (public, secret) pair of a ``*.key_secret`` file, refusing one others can read."""
    if not path.is_file():
        raise KeyError_(f"no secret key file {path} (make one with: python -m tsqp_core keys "
                        f"{path.parent})")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise KeyError_(f"secret key file {path} is readable by others: chmod 600 it")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read secret key file {path}: "
                        f"{getattr(exc, 'strerror', None) or 'not a key file'}") from None
    if secret is None:
        raise KeyError_(f"{path} holds no secret key")
    return public, secret


def _public(path: Path) -> bytes:
    if not path.is_file():
        raise KeyError_(f"no public key file {path}")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read public key file {path}: "
                        f"{getattr(exc, 'strerror', None) or 'not a key file'}") from None
    return public


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    #: Z85 public keys of the clients allowed to connect.
    allowed: frozenset[bytes]

    def __repr__(self) -> str:  # never the secret
        return f"ServerKeys(public={self.public[:8]!r}..., {len(self.allowed)} clients)"

    @classmethod
    def load(cls, directory: str | Path) -> "ServerKeys":
        d = Path(directory).expanduser()
        public, secret = _secret(d / f"{SERVER}.key_secret")
        allowed_dir = d / AUTHORIZED
        allowed = frozenset(_public(f) for f in sorted(allowed_dir.glob("*.key"))) \
            if allowed_dir.is_dir() else frozenset()
        if not allowed:
            raise KeyError_(f"{allowed_dir} lists no client keys (*.key): nobody could connect")
        return cls(public, secret, allowed)


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes

    def __repr__(self) -> str:  # never the secret
        return f"ClientKeys(public={self.public[:8]!r}..., server={self.server[:8]!r}...)"

    @classmethod
    def load(cls, directory: str | Path) -> "ClientKeys":
        d = Path(directory).expanduser()
        public, secret = _secret(d / f"{CLIENT}.key_secret")
        return cls(public, secret, _public(d / f"{SERVER}.key"))


def serve_socket(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Make ``sock`` a Curve server (before it binds)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = b"tsqp"


def client_socket(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``sock`` a Curve client of ``keys.server`` (before it connects)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server


class Zap:
    """The ZAP handler (RFC 27) of one server context: a client key in the allow-list gets
    ``200`` with its Z85 public key as the user id (which every request then carries as
    ``User-Id``); anything else ``400``. Its own thread answers, bound before the server
    socket, so a handshake never waits for the server's loop (which may be busy with a long
    call of another client)."""

    POLL_MS = 100

    def __init__(self, ctx: zmq.Context, keys: ServerKeys) -> None:
        self.allowed = keys.allowed
        self.refused = 0
        self._ctx = ctx
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="tsqp-zap")
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)  # used by this thread only
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._bound.set()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                if sock.poll(self.POLL_MS):
                    sock.send_multipart(self.answer(sock.recv_multipart()))
        finally:
            sock.close(linger=0)

    def answer(self, msg: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request (REP must answer each one, malformed ones too)."""
        if len(msg) < 6:
            return [b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"malformed ZAP request",
                    b"", b""]
        _version, request_id, _domain, _address, _identity, mechanism = msg[:6]
        key = zmq.utils.z85.encode(msg[6]) if mechanism == b"CURVE" and len(msg) > 6 \
            and len(msg[6]) == 32 else None
        if key is not None and key in self.allowed:
            return [b"1.0", request_id, b"200", b"OK", key, b""]
        self.refused += 1
        return [b"1.0", request_id, b"400", b"client key not authorised", b"", b""]

    def close(self) -> None:
        """Stop the thread (its socket closes with it); before the context terminates."""
        self._stop.set()
        self._thread.join()


# --- python -m tsqp_core keys DIR ---------------------------------------------------------------


def _write_pair(directory: Path, name: str) -> Path:
    """``NAME.key`` (0644) and ``NAME.key_secret`` (0600, never readable by others, not even
    for an instant: the umask holds while it is written)."""
    old = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return Path(pub_path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsqp_core keys",
        description="Make CurveZMQ key files for the tcp transport (see "
                    "plugins/transport_tcp/tsqp_transport_tcp/curve.py). Prints paths and "
                    "public keys only, never a secret.")
    parser.add_argument("dir", help="the keys directory (created 0700 if missing)")
    parser.add_argument("--client", metavar="NAME",
                        help="add (and authorise) one more client key pair NAME instead of "
                             "making the server and first client")
    args = parser.parse_args(argv)
    d = Path(args.dir).expanduser()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    (d / AUTHORIZED).mkdir(mode=0o700, exist_ok=True)
    if args.client:
        if not args.client.isidentifier():
            print(f"tsqp keys: error: client name {args.client!r} must be a plain word",
                  file=sys.stderr)
            return 2
        names = [args.client]
    else:
        if (d / f"{SERVER}.key_secret").exists():
            print(f"tsqp keys: error: {d} already holds a server key; use --client NAME to "
                  "add a client", file=sys.stderr)
            return 2
        names = [SERVER, CLIENT]
    for name in names:
        if (d / f"{name}.key_secret").exists():
            print(f"tsqp keys: error: {d / name}.key_secret exists", file=sys.stderr)
            return 2
        pub = _write_pair(d, name)
        if name != SERVER:
            (d / AUTHORIZED / pub.name).write_bytes(pub.read_bytes())
            if name != CLIENT:  # the client side reads client.key_secret: say where this went
                print(f"tsqp keys: client '{name}': give {d / name}.key_secret (renamed to "
                      f"client.key_secret) and {d / SERVER}.key to that TEE host")
        print(f"tsqp keys: {name}: {pub} (public {_public(pub).decode()[:8]}...)")
    print(f"tsqp keys: GPU host needs {d / SERVER}.key_secret and {d / AUTHORIZED}/; the TEE "
          f"host {d / CLIENT}.key_secret and {d / SERVER}.key; both: "
          f"transport.options.curve=DIR")
    return 0

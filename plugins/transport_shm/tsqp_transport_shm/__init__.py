"""tsqp transport ``shm``: POSIX shared memory for the bytes, POSIX semaphores for the signal.

Address ``shm://NAME``. The server listens on the abstract Unix socket ``@tsqp.shm/NAME`` (no
file; it vanishes with the process). That socket is used only to connect and to notice that
the peer died -- never per message. Each connection gets its own two segments and two
semaphores, created by the server with mode 0600, opened by the client and **unlinked by the
server as soon as the handshake ends**, whatever its outcome (:func:`_unlink` is the one place
names go away). From then on nothing of ours is named in ``/dev/shm``: the kernel frees the
memory when both sides have unmapped it, however they exit (Ctrl-C, kill -9, several jobs in
one process). A server killed inside the millisecond of a handshake is the only way a name
can be left; the next ``listen`` on the machine removes such names (their pid is dead).

Layout of one direction's segment. ``req`` is written by the client only and mapped
read-only by the server; ``rep`` the reverse::

    0                         4096                                         4096 + arena_bytes
    +-------------------------+--------------------------------------------+
    | control block           | arena                                      |
    |  magic "TSQPSHM1"   8 B |  frame table: n x (offset u64, length u64) |
    |  seq              u64   |  frame 0 | frame 1 | ...  (64-B aligned)   |
    |  nframes          u32   |  offsets relative to the arena start       |
    |  (pad)            u32   |                                            |
    |  used             u64   |  (bytes of the arena this message uses)    |
    +-------------------------+--------------------------------------------+

The segment is sparse. The writer reserves tmpfs pages (``posix_fallocate``) as its largest
message grows, so a 1 GiB arena costs only what is used, and a full ``/dev/shm`` is a
:class:`MessageTooLarge` error rather than a SIGBUS. Each frame is copied once, into the
arena; the receiver gets read-only memoryviews of it (the codec wraps them in place).

One exchange (each semaphore counts 0 or 1)::

    client                                     server
    write frames, table, ctrl(seq=k) in req
    sem_post(req) ───────────────────────────► sem_wait(req)   in slices; between slices
                                               check the client's socket for EOF
    sem_wait(rep)  in slices; between slices   check ctrl: magic, seq == k, table bounds
    ask the watchdog, check the socket for     recv() -> read-only views into req
    EOF, check the deadline                    ... handler reads them in place ...
                                               send(): write reply, ctrl(seq=k) in rep
                                  ◄─────────── sem_post(rep)
    check ctrl: seq == k, table bounds
    return read-only views into rep (borrowed until the next request)

Every ``sem_wait`` first polls the semaphore for ``spin_us`` (waking a sleeping process costs
more than a small exchange), then sleeps on it in slices.

``sem_post``/``sem_wait`` are full memory barriers: everything written before the post is
visible after the wait, so a reader never sees a half-written message (no torn reads); the
sequence number in the control block rejects a stale or replayed one.

Server states::

    LISTENING --accept + handshake--> CONNECTED --recv--> ANSWERING --send--> CONNECTED
        ^                                 |                                     |
        +------ client socket EOF, malformed request: drop the link -----------+

Client states::

    connect --handshake--> READY --request--> WAITING --reply--> READY
                             ^                   |  timeout, peer dead, bad reply:
                             |                   v  drop the link, raise
                             +-- next request -- DISCONNECTED
                                 (new handshake: reconnects to a restarted server)

Dropping the link after a timeout (as the ``tcp`` transport rebuilds its socket) means a late
reply to an abandoned request can never be read as the answer to the next one.

Handshake, length-prefixed msgpack on the socket::

    client connects; server checks SO_PEERCRED: same uid, else closes
    server creates req/rep segments + semaphores (O_EXCL, 0600) -> {v, req, rep, arena}
    client opens them, checks owner, mode and size, maps them    -> {ok: true}
    server unlinks all four names (always, in a ``finally``)     -> {ready: true}
    (``connect`` returns only now: from here on, nothing of ours is named)

One client at a time: another waits in the socket's backlog until the first leaves, and
gives up after ``connect_timeout_s``. Linux only (abstract sockets, ``/dev/shm``).

Known limit: the two sides share a file, so a hostile peer could ``ftruncate`` it and make
the other side's reads fault (SIGBUS). Sealed memfds passed over the socket would close that
hole; POSIX named segments cannot.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import re
import secrets
import select
import socket
import stat
import struct
import sys
import time
from typing import Any

import msgpack
import posix_ipc
from pydantic import Field

from tsqp_core import hookimpl
from tsqp_core.plugins import PluginOptions
from tsqp_core.transport import (ClientChannel, Frames, MessageTooLarge, PeerDead, PeerTimeout,
                                 ServerChannel, Transport, TransportError, Watchdog)

SCHEME = "shm://"
VERSION = 1
MAGIC = b"TSQPSHM1"
CTRL_BYTES = 4096  # the control block's page; the arena starts after it
ALIGN = 64  # every frame starts on a cache line
MAX_FRAMES = 4096
SLICE_S = 0.05  # a blocked wait checks that its peer lives this often
RESERVE_STEP = 2 << 20  # tmpfs pages are reserved in steps of this many bytes
MAX_HANDSHAKE_BYTES = 1 << 16
SHM_DIR = "/dev/shm"

_CTRL = struct.Struct("<8sQIIQ")  # magic, seq, nframes, pad, used
_LEN = struct.Struct("<I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NAME = re.compile(r"[A-Za-z0-9._-]{1,80}")
#: What this transport ever names in /dev/shm (segments, and semaphores as ``sem.NAME``).
_OURS = re.compile(r"(?:sem\.)?(tsqp-(\d+)-[0-9a-f]{8}-\d+-(?:req|rep))")


class ShmOptions(PluginOptions):
    #: Most bytes one message may occupy, per direction (table and alignment included). Set
    #: on the server; a client uses the server's. Pages are reserved only as they are used.
    arena_bytes: int = Field(1 << 30, ge=1 << 16, le=1 << 40)
    #: How long a handshake may take (the server serves one client at a time).
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Poll the semaphore this long before sleeping on it. Waking a sleeping process (and
    #: an idle vCPU) costs tens of microseconds, more than a small round trip itself; a
    #: short spin catches the replies and requests that follow quickly. 0 never spins.
    spin_us: int = Field(50, ge=0, le=10_000)


class _Malformed(TransportError):
    """A control block or frame table that does not describe a message we can read."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@functools.lru_cache(maxsize=64)
def _table(n: int) -> struct.Struct:
    return struct.Struct(f"<{2 * n}Q")


def _flat(frame: Any) -> memoryview:
    view = memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except TypeError:
            raise TransportError("frames must be C-contiguous buffers") from None
    return view


def _abstract(name: str) -> bytes:
    return b"\0tsqp.shm/" + name.encode()


def _parse(address: str) -> str:
    name = address[len(SCHEME):] if address.startswith(SCHEME) else ""
    if not _NAME.fullmatch(name):
        raise TransportError(f"shm transport cannot reach {address!r}: use shm://NAME "
                             "(letters, digits, '.', '_', '-')")
    return name


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _slice(deadline: float | None) -> float:
    return SLICE_S if deadline is None else max(0.0, min(SLICE_S, deadline - time.monotonic()))


def _acquire(sem: posix_ipc.Semaphore, deadline: float | None, spin_s: float) -> None:
    """Take ``sem``: poll it for ``spin_s``, then sleep on it for one slice (BusyError if
    it stays unavailable)."""
    if spin_s:
        end = time.perf_counter() + spin_s
        while True:
            try:
                sem.acquire(0)
                return
            except posix_ipc.BusyError:
                if time.perf_counter() >= end:
                    break
    sem.acquire(_slice(deadline))


# --- names: created by the server, unlinked in one place -------------------------------------


def _unlink(names: list[str]) -> None:
    """Remove segments and semaphores by name; the only code that unlinks anything."""
    for name in names:
        for unlink in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
            try:
                unlink(name)
            except posix_ipc.ExistentialError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale() -> None:
    """Unlink names left by one of our servers killed mid-handshake (its pid is gone)."""
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return
    stale = set()
    for entry in entries:
        match = _OURS.fullmatch(entry.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        stale.add("/" + match.group(1))
    _unlink(sorted(stale))


# --- one direction's segment ----------------------------------------------------------------


class _Region:
    """One direction's segment as one side sees it: the writer maps it read-write and
    reserves pages before it writes; the reader maps it read-only."""

    def __init__(self, shm: posix_ipc.SharedMemory, arena: int, writer: bool) -> None:
        self.shm = shm
        self.arena = arena
        self.writer = writer
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writer else 0)
        self.map = mmap.mmap(shm.fd, CTRL_BYTES + arena, mmap.MAP_SHARED, prot)
        self.view = memoryview(self.map)
        self.reserved = 0

    def _reserve(self, used: int) -> None:
        want = min(self.arena, -(-used // RESERVE_STEP) * RESERVE_STEP)
        try:
            os.posix_fallocate(self.shm.fd, 0, CTRL_BYTES + want)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.reserved = self.arena  # this file system cannot reserve: pages on touch
                return
            raise MessageTooLarge(
                f"cannot reserve {want} bytes of shared memory for a {used}-byte message "
                f"({exc.strerror}); free or enlarge {SHM_DIR}") from None
        self.reserved = want

    def write(self, seq: int, frames: Frames) -> None:
        """Copy ``frames`` into the arena, then the table, then the control block."""
        views = [_flat(f) for f in frames]
        n = len(views)
        if n > MAX_FRAMES:
            raise MessageTooLarge(f"{n} frames; the shm transport carries at most {MAX_FRAMES}")
        offsets = []
        end = _align(16 * n)
        for v in views:
            offsets.append(end)
            offsets.append(v.nbytes)
            end = _align(end + v.nbytes)
        if end > self.arena:
            raise MessageTooLarge(
                f"a message of {end} bytes does not fit the {self.arena}-byte shm arena; raise "
                "transport.options.arena_bytes")
        if end > self.reserved:
            self._reserve(end)
        buf = self.view
        for v, at in zip(views, offsets[0::2]):
            if v.nbytes:
                at += CTRL_BYTES
                buf[at:at + v.nbytes] = v
        _table(n).pack_into(buf, CTRL_BYTES, *offsets)
        _CTRL.pack_into(buf, 0, MAGIC, seq, n, 0, end)

    def read(self, seq: int) -> list[memoryview]:
        """Read-only views of the message numbered ``seq``; anything else is malformed."""
        buf = self.view
        magic, got, n, _, used = _CTRL.unpack_from(buf, 0)
        if magic != MAGIC:
            raise _Malformed("control block has no magic")
        if got != seq:
            raise _Malformed(f"message is numbered {got}, expected {seq}")
        if n > MAX_FRAMES or used > self.arena or 16 * n > used:
            raise _Malformed(f"control block claims {n} frames in {used} bytes")
        table = _table(n).unpack_from(buf, CTRL_BYTES)
        low = 16 * n
        frames = []
        for i in range(0, 2 * n, 2):
            at, size = table[i], table[i + 1]
            if at < low or at + size > used:
                raise _Malformed(f"frame {i // 2} at {at}+{size} lies outside the message")
            at += CTRL_BYTES
            frames.append(buf[at:at + size])
        return frames

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # borrowed views are still alive: the mapping goes with the last of them
        self.map = None  # type: ignore[assignment]
        try:
            self.shm.close_fd()
        except posix_ipc.Error:
            pass


class _Link:
    """One connection: its socket (handshake and liveness only), two regions, two semaphores."""

    def __init__(self, sock: socket.socket, req: _Region, rep: _Region,
                 req_sem: posix_ipc.Semaphore, rep_sem: posix_ipc.Semaphore) -> None:
        self.sock = sock
        self.req, self.rep = req, rep
        self.req_sem, self.rep_sem = req_sem, rep_sem
        self.seq = 0
        self.pending = False

    def alive(self) -> bool:
        """False once the peer closed its end (it exited, however) or broke the protocol."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF, or bytes nobody should send after the handshake

    def close(self) -> None:
        self.sock.close()
        for sem in (self.req_sem, self.rep_sem):
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        self.req.close()
        self.rep.close()


# --- the handshake's messages ---------------------------------------------------------------


def _send_msg(sock: socket.socket, obj: dict[str, Any]) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    try:
        sock.sendall(_LEN.pack(len(body)) + body)
    except OSError as exc:
        raise PeerDead(f"connection lost during the shm handshake: {exc}") from None


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, what: str,
                check: Watchdog | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = _left(deadline)
        if left is not None and left <= 0:
            raise PeerTimeout(what)
        ready, _, _ = select.select([sock], [], [], SLICE_S if left is None else min(SLICE_S, left))
        if not ready:
            reason = check() if check else None
            if reason:
                raise PeerDead(reason)
            continue
        try:
            chunk = sock.recv(n - len(buf))
        except OSError as exc:
            raise PeerDead(f"connection lost during the shm handshake: {exc}") from None
        if not chunk:
            raise PeerDead("the peer closed the connection during the shm handshake")
        buf += chunk
    return bytes(buf)


def _recv_msg(sock: socket.socket, deadline: float | None, what: str,
              check: Watchdog | None = None) -> dict[str, Any]:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline, what, check))
    if size > MAX_HANDSHAKE_BYTES:
        raise TransportError(f"shm handshake message of {size} bytes is too large")
    try:
        obj = msgpack.unpackb(_recv_exact(sock, size, deadline, what, check), raw=False)
    except ValueError as exc:
        raise TransportError(f"shm handshake message is not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise TransportError("shm handshake message is not a map")
    return obj


# --- server ---------------------------------------------------------------------------------


class ShmServer(ServerChannel):
    """Serves one client at a time; see the module docstring for layout and states.

    ``recv`` accepts a client when none is connected, then waits for its requests; a client
    that vanishes (even mid-request) is noticed within ``SLICE_S`` of the next wait and the
    server goes back to accepting. ``close`` must not race a ``recv`` in another thread."""

    def __init__(self, name: str, options: ShmOptions) -> None:
        self.options = options
        self.address = SCHEME + name
        self._prefix = f"tsqp-{os.getpid()}-{secrets.token_hex(4)}"
        self._links = 0
        self._link: _Link | None = None
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(_abstract(name))
            self._listener.listen(8)
        except OSError as exc:
            self._listener.close()
            raise TransportError(f"cannot listen at {self.address}: {exc.strerror}") from None

    def recv(self, timeout: float | None) -> list[Any] | None:
        if self._closed:
            raise TransportError(f"{self.address}: channel is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            link = self._link
            if link is None:
                if not self._accept(deadline):
                    return None
                continue
            try:
                _acquire(link.req_sem, deadline, self.options.spin_us / 1e6)
            except posix_ipc.BusyError:
                if not link.alive():
                    self._drop()
                    continue
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            except posix_ipc.SignalError:
                continue
            try:
                frames = link.req.read(link.seq + 1)
            except _Malformed as exc:
                print(f"tsqp shm: dropping a client that sent a malformed request: {exc}",
                      file=sys.stderr)
                self._drop()
                continue
            link.seq += 1
            link.pending = True
            return frames

    def send(self, frames: Frames) -> None:
        link = self._link
        if link is None or not link.pending:
            raise TransportError("send() without a request to answer")
        link.rep.write(link.seq, frames)  # MessageTooLarge: nothing sent, still answerable
        link.pending = False
        link.rep_sem.release()

    def _accept(self, deadline: float | None) -> bool:
        left = _left(deadline)
        wait = None if left is None else max(0.0, left)
        ready, _, _ = select.select([self._listener], [], [], wait)
        if not ready:
            return False
        sock, _ = self._listener.accept()
        try:
            self._link = self._handshake(sock)
        except (OSError, TransportError, posix_ipc.Error) as exc:
            sock.close()
            print(f"tsqp shm: a connection failed its handshake: {exc}", file=sys.stderr)
        return True

    def _handshake(self, sock: socket.socket) -> _Link:
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid != os.getuid():
            raise TransportError(f"refused a client of uid {uid}")
        self._links += 1
        base = f"/{self._prefix}-{self._links}"
        names = [base + "-req", base + "-rep"]
        arena = self.options.arena_bytes
        deadline = time.monotonic() + self.options.connect_timeout_s
        opened: list[Any] = []
        shms, sems = [], []
        try:
            try:
                for name in names:
                    shms.append(posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600,
                                                       size=CTRL_BYTES + arena))
                    opened.append(shms[-1])
                    sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600,
                                                    initial_value=0))
                    opened.append(sems[-1])
                _send_msg(sock, {"v": VERSION, "req": names[0], "rep": names[1], "arena": arena})
                reply = _recv_msg(sock, deadline, "the client did not finish the shm handshake")
            finally:
                _unlink(names)  # both sides hold what they need; ok or not, the names go
            if reply.get("ok") is not True:
                raise TransportError(f"client refused the segments: {reply.get('error')!r:.200}")
            link = _Link(sock, _Region(shms[0], arena, writer=False),
                         _Region(shms[1], arena, writer=True), sems[0], sems[1])
            opened.clear()
        finally:
            for obj in opened:
                if isinstance(obj, posix_ipc.SharedMemory):
                    obj.close_fd()
                else:
                    obj.close()
        try:
            _send_msg(sock, {"ready": True})  # the client returns from connect only now
        except BaseException:
            link.close()
            raise
        return link

    def _drop(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop()
            self._listener.close()


# --- client ---------------------------------------------------------------------------------


class ShmClient(ClientChannel):
    """One request at a time. A wait that times out, finds the server dead or gets a
    malformed reply drops the link; the next request reconnects (a new handshake)."""

    def __init__(self, address: str, options: ShmOptions, watchdog: Watchdog | None) -> None:
        self.address = address
        self.options = options
        self.watchdog = watchdog
        self._name = _parse(address)
        self._closed = False
        self._link: _Link | None = None
        self._link = self._connect(time.monotonic() + options.connect_timeout_s)

    def _connect(self, deadline: float | None) -> _Link:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(_abstract(self._name))
        except OSError:
            sock.close()
            reason = self.watchdog() if self.watchdog else None
            raise PeerDead(f"no shm server at {self.address}" + (f": {reason}" if reason else ""))
        try:
            hello = _recv_msg(sock, deadline,
                              f"{self.address} did not answer the connection in time (it serves "
                              "one client at a time: is it busy with another?)", self.watchdog)
            link = self._open(sock, hello)
        except BaseException:
            sock.close()
            raise
        try:
            _send_msg(sock, {"ok": True})
            if _recv_msg(sock, deadline, f"{self.address} did not finish the shm handshake",
                         self.watchdog).get("ready") is not True:
                raise TransportError(f"{self.address} did not confirm the shm handshake")
        except BaseException:
            link.close()
            raise
        return link

    def _open(self, sock: socket.socket, hello: dict[str, Any]) -> _Link:
        names, arena = [hello.get("req"), hello.get("rep")], hello.get("arena")
        if hello.get("v") != VERSION:
            raise TransportError(f"{self.address} speaks shm protocol {hello.get('v')!r}, "
                                 f"this client {VERSION}")
        if not (all(isinstance(n, str) and _OURS.fullmatch(n[1:]) for n in names)
                and isinstance(arena, int) and 1 << 16 <= arena <= 1 << 40):
            raise TransportError(f"{self.address} sent a malformed shm handshake")
        opened: list[Any] = []
        try:
            shms = [posix_ipc.SharedMemory(n) for n in names]
            opened += shms
            for shm in shms:
                st = os.fstat(shm.fd)
                if (st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077
                        or st.st_size < CTRL_BYTES + arena):
                    raise TransportError(f"shm segment {shm.name} is not ours (owner, mode 0600, "
                                         "size)")
            sems = [posix_ipc.Semaphore(n) for n in names]
            opened += sems
            link = _Link(sock, _Region(shms[0], arena, writer=True),
                         _Region(shms[1], arena, writer=False), sems[0], sems[1])
            opened.clear()
            return link
        except posix_ipc.Error as exc:
            raise TransportError(f"cannot open the shm segments of {self.address}: {exc}") from None
        finally:
            for obj in opened:
                if isinstance(obj, posix_ipc.SharedMemory):
                    obj.close_fd()
                else:
                    obj.close()

    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        if self._closed:
            raise TransportError(f"{self.address}: channel is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        link = self._link
        if link is None:
            connect_by = time.monotonic() + self.options.connect_timeout_s
            link = self._link = self._connect(connect_by if deadline is None
                                              else min(deadline, connect_by))
        seq = link.seq + 1
        link.req.write(seq, frames)  # MessageTooLarge: nothing sent, the link stays up
        link.seq = seq
        link.req_sem.release()
        try:
            while True:
                try:
                    _acquire(link.rep_sem, deadline, self.options.spin_us / 1e6)
                    break
                except posix_ipc.BusyError:
                    self._check(link, deadline, timeout)
                except posix_ipc.SignalError:
                    continue
        except BaseException:  # Ctrl-C included: a reply may still come, so the link goes
            self._drop()
            raise
        try:
            return link.rep.read(seq)
        except _Malformed as exc:
            self._drop()
            raise TransportError(f"malformed reply from {self.address}: {exc}") from None

    def _check(self, link: _Link, deadline: float | None, timeout: float | None) -> None:
        reason = self.watchdog() if self.watchdog else None
        if reason is None and not link.alive():  # the watchdog may know more by now
            reason = ((self.watchdog() if self.watchdog else None)
                      or "the server closed the connection")
        if reason:
            self._drop()
            raise PeerDead(f"{self.address}: {reason}")
        if deadline is not None and time.monotonic() >= deadline:
            self._drop()
            raise PeerTimeout(f"no reply from {self.address} within {timeout:g} s")

    def _drop(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop()


class ShmTransport(Transport):
    """POSIX shared memory + semaphores; see the module docstring."""

    name = "shm"
    Options = ShmOptions
    size_limit_option = "arena_bytes"
    borrowed_frames = True

    def listen(self, address: str | None = None) -> ShmServer:
        name = _parse(address) if address else f"tsqp-{os.getpid()}-{secrets.token_hex(4)}"
        _sweep_stale()
        return ShmServer(name, self.options)  # type: ignore[arg-type]

    def connect(self, address: str, watchdog: Watchdog | None = None) -> ShmClient:
        return ShmClient(address, self.options, watchdog)  # type: ignore[arg-type]


@hookimpl
def tsqp_register_transports(register):
    register(ShmTransport)

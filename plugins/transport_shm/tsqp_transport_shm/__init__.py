"""tsqp transport ``shm``: shared memory for the bytes, POSIX semaphores for the signal.

Address ``shm://NAME``. The server listens on the abstract Unix socket ``@tsqp.shm/NAME`` (no
file; it vanishes with the process). That socket is used only to connect, to pass the
segments, and to notice that the peer died -- never per message. Each connection gets its own
two segments and two semaphores:

* the **segments** are sealed memfds (``memfd_create`` + ``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL``) created by the server and passed to the client over the socket
  (``SCM_RIGHTS``). They have no name anywhere, and neither side -- a hostile one included --
  can shrink them under the other's reads (the SIGBUS an ``ftruncate`` of a shared file
  would cause); the client refuses segments without those seals or of the wrong size;
* the **semaphores** are POSIX named semaphores, created by the server with mode 0600 and
  **unlinked as soon as the handshake ends**, whatever its outcome (:func:`_unlink` is the one
  place names go away). From then on nothing of ours is named in ``/dev/shm``. A server
  killed inside the millisecond of a handshake is the only way a name can be left; the next
  ``listen`` on the machine removes such names (their pid is dead).

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

The segment is sparse. The writer reserves pages (``posix_fallocate``) as its largest
message grows, so a 1 GiB arena costs only what is used, and memory that cannot be had is a
:class:`MessageTooLarge` error rather than a SIGBUS. Each frame is copied once, into the
arena; the receiver gets read-only memoryviews of it (the codec wraps them in place). A
reader checks every control block and frame table against the arena before it makes a
view; a peer that rewrites the arena while it is read can change the values read, never
where they are read from.

One exchange (each semaphore counts 0 or 1)::

    client                                     server
    write frames, table, ctrl(seq=k) in req
    sem_post(req) ───────────────────────────► sem_wait(req)   (several clients: see below)
    sem_wait(rep)  in slices; between slices   check ctrl: magic, seq == k, table bounds
    ask the watchdog, check the socket for     recv() -> read-only views into req
    EOF, check the deadline                    ... handler reads them in place ...
                                               send(): write reply, ctrl(seq=k) in rep
                                  ◄─────────── sem_post(rep)
    check ctrl: seq == k, table bounds
    return read-only views into rep (borrowed until the next request)

Every ``sem_wait`` first polls the semaphore for up to ``spin_us`` (waking a sleeping process
costs more than a small exchange), then sleeps on it in slices. The poll adapts (:class:`_Spin`):
after waits longer than ``spin_us`` it shrinks, so a side whose peer is slow, or that shares
its cores with other busy processes, does not burn the cores its peer needs.

``sem_post``/``sem_wait`` are full memory barriers: everything written before the post is
visible after the wait, so a reader never sees a half-written message (no torn reads); the
sequence number in the control block rejects a stale or replayed one.

**Several clients.** The server holds up to ``max_clients`` links at once, each its own
peer (:attr:`ServerChannel.peer`). With one link it sleeps on that link's semaphore (the
fast path above). With more, it polls every link's semaphore for ``spin_us``, then sleeps on
the semaphore of the link it served last for at most ``MULTI_SLICE_S`` before polling the
others again: an idle client costs the others at most that much latency, never their turn.
Accepting a connection and its handshake never block serving: a client that connects and
stalls mid-handshake is dropped after ``connect_timeout_s``, a client that stalls
mid-request holds only its own link, and a client beyond ``max_clients`` is refused with a
reason.

Server states, per link::

    accept --send segments--> HANDSHAKE --client ok, send ready--> CONNECTED <--> ANSWERING
                                  |  timeout, refusal, EOF                |
                                  v                                       v  EOF, malformed
                               dropped (names unlinked)                dropped (departed)

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
    server: full?                                       -> {error: "...full..."}, closes
    server creates two sealed memfds, two semaphores (O_EXCL, 0600)
                                -> {v, req, rep, arena} + the two memfds (SCM_RIGHTS)
    client checks seals and sizes, maps them, opens the semaphores  -> {ok: true}
    server unlinks both semaphore names (always, in a ``finally``)  -> {ready: true}
    (``connect`` returns only now: from here on, nothing of ours is named)

**Compiled per-message work.** Writing a message (copies, table, control block), reading
one (every check above) and waiting on a semaphore (the spin, then sleeping in slices) run
in C (``_native.c``, built by ``setup.py`` where a compiler and Python's headers are at
hand) unless ``native: false``; the Python below does the same with the same layout, so the
two sides of a link may each use either. The C path also lets a client that knows a
reply's sizes take it straight into buffers of its own (``request_into``): one copy out of
the arena and no views made. On the tiny model that is a few tens of microseconds less per
call (README, "Where a call's time goes").

**Pinned for a device.** A server on CUDA hands the channel a pinner (``pin``): each
link's request arena (read-only here) is registered as far as the messages read from it
reach, after the read and before its frames go to the device; the reply arena as far as it
is reserved, before anything is written into the new span. A span grows in ``RESERVE_STEP``
steps: the smaller registration is dropped before the larger is made, and all of it before
the mapping is closed. How far is the client's to say (``used``), bounded by the arena --
memory the client could fill anyway.

Linux only (abstract sockets, memfd seals, ``/dev/shm`` for the semaphores).
"""

from __future__ import annotations

import errno
import fcntl
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
from tsqp_core.protocol import clean_text
from tsqp_core.transport import (ClientChannel, Frames, HostPinner, MessageTooLarge, Peer,
                                 PeerDead, PeerTimeout, ServerChannel, ThreadBudget, Transport,
                                 TransportError, Watchdog)

SCHEME = "shm://"
VERSION = 2
MAGIC = b"TSQPSHM1"
CTRL_BYTES = 4096  # the control block's page; the arena starts after it
ALIGN = 64  # every frame starts on a cache line
MAX_FRAMES = 4096
SLICE_S = 0.05  # a blocked wait checks that its peer lives this often
MULTI_SLICE_S = 0.002  # with several links: the longest sleep on one link's semaphore
HOUSEKEEPING_S = 0.01  # with links up, accept and check connections at least this often
RESERVE_STEP = 2 << 20  # pages are reserved in steps of this many bytes
MAX_HANDSHAKE_BYTES = 1 << 16
SHM_DIR = "/dev/shm"
#: The seals every segment carries: nobody can shrink it, grow it, or change its seals.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

try:  # the per-message work in C (setup.py builds it where it can); else the Python below
    from tsqp_transport_shm import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None  # type: ignore[assignment]

_CTRL = struct.Struct("<8sQIIQ")  # magic, seq, nframes, pad, used
_USED = struct.Struct("<Q")  # the control block's ``used``, alone
_USED_AT = 24
_LEN = struct.Struct("<I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NAME = re.compile(r"[A-Za-z0-9._-]{1,80}")
#: What this transport ever names in /dev/shm (semaphores, as ``sem.NAME``; segments before
#: version 2).
_OURS = re.compile(r"(?:sem\.)?(tsqp-(\d+)-[0-9a-f]{8}-\d+-(?:req|rep))")


class ShmOptions(PluginOptions):
    #: Most bytes one message may occupy, per direction (table and alignment included). Set
    #: on the server; a client uses the server's. Pages are reserved only as they are used.
    arena_bytes: int = Field(1 << 30, ge=1 << 16, le=1 << 40)
    #: How long a handshake may take.
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Poll the semaphore this long before sleeping on it. Waking a sleeping process (and
    #: an idle vCPU) costs tens of microseconds, more than a small round trip itself; a
    #: short spin catches the replies and requests that follow quickly. 0 never spins.
    #: ``null`` (auto): :data:`SPIN_US` when the run's two sides have a core each for every
    #: thread (``threads.tee + threads.gpu`` <= cores, less those other work keeps busy
    #: now), else 0 -- a waiter spinning on a
    #: core its peer needs delays the very reply it waits for. A side used without a run
    #: (``fit`` never called) spins :data:`SPIN_US`.
    spin_us: int | None = Field(None, ge=0, le=10_000)
    #: Links a server holds at once (handshakes included); one more is refused.
    max_clients: int = Field(8, ge=1, le=1024)
    #: Write, read and wait through the compiled ``_native`` module (the same layout and
    #: checks as the Python path, without the interpreter per message). ``null`` (auto): when
    #: it was built; ``true``: an error if it was not; ``false``: the Python path.
    native: bool | None = None


def _use_native(options: ShmOptions) -> bool:
    if options.native and _native is None:
        raise TransportError("transport.options.native=true but the shm transport's C module "
                             "was not built (reinstall tsqp-transport-shm where a C compiler "
                             "and Python's headers are available) -- or use native=null")
    return _native is not None and options.native is not False


#: The spin of ``spin_us: null`` when the budget leaves cores to spin on: long enough to
#: span the TEE's own work between two calls of a small model (README, "Spinning versus
#: sleeping"), short enough not to burn a core through a long GPU-side computation.
SPIN_US = 500


def _spin_s(options: ShmOptions) -> float:
    return (SPIN_US if options.spin_us is None else options.spin_us) / 1e6


class _Spin:
    """How long one side polls before it sleeps: ``spin_us``, while waits are that short.

    Spinning pays only when the peer answers within the spin. A wait that takes longer (a
    long GPU-side computation, a user thinking between runs, a machine with more busy
    processes than cores) halves the next spin, down to a sixteenth; a wait that ended
    within ``spin_us`` -- polling or asleep -- restores it. So a quiet machine running a
    small model spins every wait, and an oversubscribed one hardly at all."""

    __slots__ = ("limit", "now")

    def __init__(self, limit_s: float) -> None:
        self.limit = self.now = limit_s

    def done(self, waited_s: float) -> None:
        if waited_s <= self.limit:
            self.now = self.limit
        else:
            self.now = max(self.limit / 16, self.now / 2)


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
        if view.nbytes == 0:  # memoryview cannot cast a shape with a zero in it
            return memoryview(b"")
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


class _IpcSem:
    """A semaphore through posix_ipc: the Python path's (``_native.Sem`` is the other, with
    the same three methods)."""

    __slots__ = ("sem",)

    def __init__(self, sem: posix_ipc.Semaphore) -> None:
        self.sem = sem

    def take(self, spin_s: float, wait_s: float) -> bool:
        """Poll for ``spin_s``, then sleep at most ``wait_s``; False if still unavailable
        (or a signal interrupted the sleep)."""
        sem = self.sem
        try:
            sem.acquire(0)
            return True
        except posix_ipc.BusyError:
            pass
        if spin_s:
            end = time.perf_counter() + spin_s
            while time.perf_counter() < end:
                try:
                    sem.acquire(0)
                    return True
                except posix_ipc.BusyError:
                    pass
        if wait_s <= 0:
            return False
        try:
            sem.acquire(wait_s)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False

    def post(self) -> None:
        self.sem.release()

    def close(self) -> None:
        try:
            self.sem.close()
        except posix_ipc.Error:
            pass


def _open_sem(name: str, native: bool) -> Any:
    """The existing semaphore ``name``, opened through the path this link uses."""
    if native:
        return _native.Sem(name)
    return _IpcSem(posix_ipc.Semaphore(name))


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

    def __init__(self, fd: int, arena: int, writer: bool, native: bool = False) -> None:
        self.fd = fd  # owned: closed by close()
        self.arena = arena
        self.writer = writer
        #: write and read through ``_native`` (same layout and checks, compiled)
        self.native = native
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writer else 0)
        self.map = mmap.mmap(fd, CTRL_BYTES + arena, mmap.MAP_SHARED, prot)
        self.view = memoryview(self.map)
        self.reserved = 0
        #: Bytes ``write`` copied into the arena (headers included): the copy-count tests.
        self.copied = 0
        self._reserved_views: tuple[list[memoryview], list[tuple[int, int]], int] | None = None
        #: The sizes of the last ``reserve`` and what it handed out (reused for equal sizes).
        self._layout: tuple[tuple[int, ...], tuple[list[memoryview], list[tuple[int, int]],
                                                   int]] | None = None
        #: Who page-locks this mapping (``pin``), and the bytes from its start registered
        #: with it now; ``pin_refused``: it said no once, so it is not asked again.
        self.pinner: HostPinner | None = None
        self.pinned = 0
        self.pin_refused = False

    def _reserve(self, used: int) -> None:
        want = min(self.arena, -(-used // RESERVE_STEP) * RESERVE_STEP)
        try:
            os.posix_fallocate(self.fd, 0, CTRL_BYTES + want)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.reserved = self.arena  # this file system cannot reserve: pages on touch
                return
            raise MessageTooLarge(
                f"cannot reserve {want} bytes of shared memory for a {used}-byte message "
                f"({exc.strerror}); free or enlarge {SHM_DIR}") from None
        self.reserved = want
        if self.pinner is not None:  # before anything is written into the new span
            self._cover(want)

    # --- page-locking for a device (ServerChannel.pin) -------------------------------------

    def pin(self, pinner: HostPinner) -> None:
        """Have ``pinner`` page-lock what this mapping uses: a writer's reserved span now
        and as it grows; a reader's, as the messages it reads grow (:meth:`pin_read`)."""
        self.pinner = pinner
        if self.writer and self.reserved:
            self._cover(self.reserved)

    def pin_read(self) -> None:
        """After a ``read``, before the message's frames reach a device: pin as far as the
        message uses the arena (its ``used``, checked against the arena by ``read``)."""
        used = _USED.unpack_from(self.view, _USED_AT)[0]
        if CTRL_BYTES + used > self.pinned:
            self._cover(min(self.arena, -(-used // RESERVE_STEP) * RESERVE_STEP))

    def _cover(self, arena_bytes: int) -> None:
        """Registered: the control block and the first ``arena_bytes`` of the arena, as one
        span from the mapping's start (a smaller one is unregistered first: spans of one
        mapping never overlap)."""
        nbytes = CTRL_BYTES + arena_bytes
        if self.pinner is None or self.pin_refused or nbytes <= self.pinned:
            return
        self._unpin()
        if self.pinner.register(self._address(), nbytes, not self.writer):
            self.pinned = nbytes
        else:
            self.pin_refused = True

    def _unpin(self) -> None:
        if self.pinned and self.pinner is not None:
            self.pinned = 0
            self.pinner.unregister(self._address())

    def _address(self) -> int:
        import numpy

        return int(numpy.frombuffer(self.view, numpy.uint8).ctypes.data)

    def _fit(self, end: int) -> None:
        if end > self.arena:
            raise MessageTooLarge(
                f"a message of {end} bytes does not fit the {self.arena}-byte shm arena; raise "
                "transport.options.arena_bytes")
        if end > self.reserved:
            self._reserve(end)

    def reserve(self, sizes: list[int]) -> list[memoryview]:
        """Writable views of the arena for the tensor frames of the next message (frames 1..n
        of ``write``; the header, written last, goes after them). Valid until the next
        ``write`` or ``reserve``. The layout for the sizes of the last call is kept: a decode
        step asks for the same sizes every time."""
        key = tuple(sizes)
        last = self._layout
        if last is not None and last[0] == key:
            self._reserved_views = last[1]
            return last[1][0]
        n = len(sizes) + 1
        if n > MAX_FRAMES:
            raise MessageTooLarge(f"{n} frames; the shm transport carries at most {MAX_FRAMES}")
        at, spans = _align(16 * n), []
        for size in sizes:
            spans.append((at, size))
            at = _align(at + size)
        self._fit(at)
        views = [self.view[CTRL_BYTES + a:CTRL_BYTES + a + size] for a, size in spans]
        self._reserved_views = (views, spans, at)
        self._layout = (key, self._reserved_views)
        return views

    def write(self, seq: int, frames: Frames) -> None:
        """Copy ``frames`` into the arena, then the table, then the control block. Frames
        that are the views :meth:`reserve` handed out are already in place: not copied."""
        n = len(frames)
        if n > MAX_FRAMES:
            raise MessageTooLarge(f"{n} frames; the shm transport carries at most {MAX_FRAMES}")
        reserved, self._reserved_views = self._reserved_views, None
        if self.native:  # the same layout (reserved views are found in place by address)
            try:
                copied = _native.write(self.view, self.reserved, seq, frames)
                if copied < 0:  # the arena must be reserved further first (or cannot be)
                    self._fit(-copied)
                    copied = _native.write(self.view, self.reserved, seq, frames)
            except TypeError:
                raise TransportError("frames must be C-contiguous buffers") from None
            if copied < 0:  # pragma: no cover - _fit reserved it or raised
                raise MessageTooLarge(f"a message of {-copied} bytes could not be reserved")
            self.copied += copied
            return
        if reserved is not None and n == len(reserved[0]) + 1 and all(
                f is r for f, r in zip(frames[1:], reserved[0])):
            _, spans, end = reserved  # the tensors are in place; the header goes last
            header = _flat(frames[0])
            offsets = [end, header.nbytes]
            for at, size in spans:
                offsets += [at, size]
            views = [header]
            end = _align(end + header.nbytes)
            starts = [offsets[0]]
        else:
            views = [_flat(f) for f in frames]
            offsets = []
            end = _align(16 * n)
            for v in views:
                offsets.append(end)
                offsets.append(v.nbytes)
                end = _align(end + v.nbytes)
            starts = offsets[0::2]
        self._fit(end)
        buf = self.view
        for v, at in zip(views, starts):
            if v.nbytes:
                at += CTRL_BYTES
                buf[at:at + v.nbytes] = v
                self.copied += v.nbytes
        _table(n).pack_into(buf, CTRL_BYTES, *offsets)
        _CTRL.pack_into(buf, 0, MAGIC, seq, n, 0, end)

    def read(self, seq: int, outs: list[Any] | None = None) -> list[Any]:
        """Read-only views of the message numbered ``seq``; anything else is malformed.
        ``outs`` (native only): writable buffers for frames 1..n; where the message has
        exactly those sizes, its frames are copied into them and returned in their place
        (frame 0 as bytes) -- the one copy a borrowed reply needs, with no views made."""
        if self.native:
            try:
                return _native.read(self.view, seq, outs)
            except _native.Malformed as exc:
                raise _Malformed(str(exc)) from None
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
        self._layout = self._reserved_views = None  # our own views go first
        self._unpin()  # before the memory can go
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # borrowed views are still alive: the mapping goes with the last of them
        self.map = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- segments: sealed memfds ------------------------------------------------------------------


def _segment(size: int, label: str) -> int:
    """A sealed memfd of ``size`` bytes (mode 0600, no name): no one can resize it."""
    fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_segment(fd: int, size: int) -> None:
    """Refuse a segment a peer could still shrink (or that is not the size agreed)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise TransportError("a shm segment that is not a sealable memfd") from None
    st = os.fstat(fd)
    if seals & SEALS != SEALS or not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise TransportError(f"a shm segment without the seals {SEALS:#x} or not of "
                             f"{size} bytes (seals {seals:#x}, size {st.st_size})")


class _Link:
    """One connection: its socket (handshake and liveness only), two regions, two semaphores
    (``_IpcSem`` or ``_native.Sem``: ``take``, ``post``, ``close``)."""

    def __init__(self, sock: socket.socket, req: _Region, rep: _Region, req_sem: Any,
                 rep_sem: Any, peer: Peer = Peer(0)) -> None:
        self.sock = sock
        self.req, self.rep = req, rep
        self.req_sem, self.rep_sem = req_sem, rep_sem
        self.peer = peer
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
        self.req_sem.close()
        self.rep_sem.close()
        self.req.close()
        self.rep.close()


# --- the handshake's messages ---------------------------------------------------------------


def _pack(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = _pack(obj)
    try:
        if fds:
            sent = socket.send_fds(sock, [data], fds)
            data = data[sent:]
        if data:
            sock.sendall(data)
    except OSError as exc:
        raise PeerDead(f"connection lost during the shm handshake: {exc}") from None


def _unpack(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False)
    except ValueError as exc:
        raise TransportError(f"shm handshake message is not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise TransportError("shm handshake message is not a map")
    return obj


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, what: str,
                check: Watchdog | None, fds: list[int] | None = None) -> bytes:
    """``n`` bytes; with ``fds`` (a list to fill) also the descriptors that came with them."""
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
            if fds is not None:
                chunk, got, flags, _ = socket.recv_fds(sock, n - len(buf), 2)
                fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise TransportError("the shm handshake passed more descriptors than two")
            else:
                chunk = sock.recv(n - len(buf))
        except OSError as exc:
            raise PeerDead(f"connection lost during the shm handshake: {exc}") from None
        if not chunk:
            raise PeerDead("the peer closed the connection during the shm handshake")
        buf += chunk
    return bytes(buf)


def _recv_msg(sock: socket.socket, deadline: float | None, what: str,
              check: Watchdog | None = None, fds: list[int] | None = None) -> dict[str, Any]:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline, what, check, fds))
    if size > MAX_HANDSHAKE_BYTES:
        raise TransportError(f"shm handshake message of {size} bytes is too large")
    return _unpack(_recv_exact(sock, size, deadline, what, check, fds))


# --- server ---------------------------------------------------------------------------------


class _Handshake:
    """A connection between accept and the client's ``ok``: never waited on, only polled."""

    def __init__(self, sock: socket.socket, names: list[str], link: _Link,
                 deadline: float) -> None:
        self.sock, self.names, self.link, self.deadline = sock, names, link, deadline
        self.buf = bytearray()

    def message(self) -> dict[str, Any] | None:
        """The client's answer once it is all here (reads what is there; never blocks)."""
        try:
            chunk = self.sock.recv(MAX_HANDSHAKE_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise PeerDead(f"connection lost during the shm handshake: {exc}") from None
        if not chunk:
            raise PeerDead("the client closed the connection during the shm handshake")
        self.buf += chunk
        if len(self.buf) < _LEN.size:
            return None
        (size,) = _LEN.unpack_from(self.buf)
        if size > MAX_HANDSHAKE_BYTES:
            raise TransportError(f"shm handshake message of {size} bytes is too large")
        if len(self.buf) < _LEN.size + size:
            return None
        return _unpack(bytes(self.buf[_LEN.size:_LEN.size + size]))


class ShmServer(ServerChannel):
    """Serves up to ``max_clients`` clients; see the module docstring for layout and states.

    ``recv`` accepts connections and moves their handshakes on while it waits for requests;
    a client that vanishes (even mid-request) is noticed within ``SLICE_S`` and reported by
    :meth:`departed`. ``close`` must not race a ``recv`` in another thread."""

    def __init__(self, name: str, options: ShmOptions) -> None:
        self.options = options
        self.address = SCHEME + name
        self._prefix = f"tsqp-{os.getpid()}-{secrets.token_hex(4)}"
        self._count = 0
        self._links: list[_Link] = []
        self._handshakes: list[_Handshake] = []
        self._answer: _Link | None = None
        self._hot: _Link | None = None
        self._departed: list[Peer] = []
        self._housekept = 0.0
        self._closed = False
        self._spin = _Spin(_spin_s(options))
        self._native = _use_native(options)
        self._pinner: HostPinner | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(_abstract(name))
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError as exc:
            self._listener.close()
            raise TransportError(f"cannot listen at {self.address}: {exc.strerror}") from None

    # --- receiving ------------------------------------------------------------------------

    def recv(self, timeout: float | None) -> list[Any] | None:
        if self._closed:
            raise TransportError(f"{self.address}: channel is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if time.monotonic() - self._housekept >= HOUSEKEEPING_S:
                self._housekeeping()
            link = self._wait(deadline)
            if link is None:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            try:
                frames = link.req.read(link.seq + 1)
            except _Malformed as exc:
                self._log(f"dropping a client that sent a malformed request: {exc}")
                self._drop(link)
                continue
            if self._pinner is not None:
                link.req.pin_read()
            link.seq += 1
            link.pending = True
            self._answer = self._hot = link
            self.peer = link.peer
            return frames

    def _wait(self, deadline: float | None) -> _Link | None:
        """Take one link's request semaphore; ``None`` after a slice with nothing."""
        links = self._links
        spin = self._spin.now
        if not links:
            left = _left(deadline)
            self._select(SLICE_S if left is None else max(0.0, min(SLICE_S, left)))
            return None
        if len(links) == 1 and not self._handshakes:
            link = links[0]
            started = time.perf_counter()
            if link.req_sem.take(spin, _slice(deadline)):
                self._spin.done(time.perf_counter() - started)
                return link
            self._spin.done(SLICE_S)
            self._housekept = 0.0  # a quiet slice (or a signal): look at the connections now
            return None
        # several links: poll them all, then sleep briefly on the one served last
        end = time.perf_counter() + spin
        while True:
            for link in links:
                if link.req_sem.take(0.0, 0.0):
                    return link
            if time.perf_counter() >= end:
                break
        hot = self._hot if self._hot in links else links[0]
        left = _left(deadline)
        wait = MULTI_SLICE_S if left is None else max(0.0, min(MULTI_SLICE_S, left))
        return hot if hot.req_sem.take(0.0, wait) else None

    def _select(self, wait: float) -> None:
        """Sleep until a connection or handshake needs us (no links to wait on)."""
        socks = [self._listener, *(h.sock for h in self._handshakes)]
        if self._handshakes:
            wait = min(wait, max(0.0, min(h.deadline for h in self._handshakes)
                                 - time.monotonic()))
        ready, _, _ = select.select(socks, [], [], wait)
        if ready:
            self._housekept = 0.0

    # --- connections ------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Accept connections, move handshakes on, drop links whose client is gone."""
        self._housekept = time.monotonic()
        for link in list(self._links):
            if not link.pending and not link.alive():
                self._drop(link)
        for hs in list(self._handshakes):
            self._progress(hs)
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log(f"accept failed: {exc}")
                return
            try:
                self._start(sock)
            except (OSError, TransportError, posix_ipc.Error) as exc:
                sock.close()
                self._log(f"a connection failed its handshake: {exc}")

    def _start(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
        if uid != os.getuid():
            raise TransportError(f"refused a client of uid {uid}")
        if len(self._links) + len(self._handshakes) >= self.options.max_clients:
            _send_msg(sock, {"error": f"the server is full: it serves "
                                      f"{self.options.max_clients} clients at once (shm "
                                      "max_clients); try again later"})
            raise TransportError(f"refused a client: {self.options.max_clients} connected")
        self._count += 1
        base = f"/{self._prefix}-{self._count}"
        names = [base + "-req", base + "-rep"]
        arena = self.options.arena_bytes
        opened: list[Any] = []
        try:
            fds = [_segment(CTRL_BYTES + arena, "tsqp-" + n[-3:]) for n in ("req", "rep")]
            opened += fds
            sems = []
            for name in names:
                posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600,
                                    initial_value=0).close()  # made; opened below
                sems.append(_open_sem(name, self._native))
                opened.append(sems[-1])
            _send_msg(sock, {"v": VERSION, "req": names[0], "rep": names[1], "arena": arena},
                      fds)
            link = _Link(sock, _Region(fds[0], arena, writer=False, native=self._native),
                         _Region(fds[1], arena, writer=True, native=self._native), sems[0],
                         sems[1], Peer(self._count))
            opened.clear()
            if self._pinner is not None:
                link.req.pin(self._pinner)
                link.rep.pin(self._pinner)
        except BaseException:
            _unlink(names)
            raise
        finally:
            for obj in opened:
                if isinstance(obj, int):
                    os.close(obj)
                else:
                    obj.close()
        self._handshakes.append(_Handshake(sock, names, link,
                                           time.monotonic() + self.options.connect_timeout_s))

    def _progress(self, hs: _Handshake) -> None:
        try:
            try:
                reply = hs.message()
                if reply is None:
                    if time.monotonic() < hs.deadline:
                        return
                    raise PeerTimeout("the client did not finish the shm handshake in time")
            finally:
                if hs.buf or time.monotonic() >= hs.deadline:
                    _unlink(hs.names)  # the client has opened them, or never will
            if reply.get("ok") is not True:
                raise TransportError("client refused the segments: "
                                     f"{clean_text(reply.get('error'), 200)}")
            _unlink(hs.names)
        except (OSError, TransportError) as exc:
            self._handshakes.remove(hs)
            _unlink(hs.names)
            hs.link.close()
            self._log(f"a connection failed its handshake: {exc}")
            return
        self._handshakes.remove(hs)
        self._links.append(hs.link)
        try:
            _send_msg(hs.sock, {"ready": True})  # the client returns from connect only now
        except TransportError:
            self._drop(hs.link)

    def _drop(self, link: _Link) -> None:
        if link in self._links:
            self._links.remove(link)
            self._departed.append(link.peer)
        if self._answer is link:
            self._answer = None
        link.close()

    @staticmethod
    def _log(message: str) -> None:
        print(f"tsqp shm: {message}", file=sys.stderr)

    def pin(self, pinner: HostPinner) -> None:
        """Page-lock, with ``pinner``, each link's arenas as far as they are used: the
        request arena (mapped read-only here, so registered read-only) and the reply arena."""
        self._pinner = pinner
        for link in [*self._links, *(hs.link for hs in self._handshakes)]:
            link.req.pin(pinner)
            link.rep.pin(pinner)

    # --- answering --------------------------------------------------------------------------

    def reserve(self, sizes: list[int]) -> list[memoryview] | None:
        link = self._answer
        if link is None or not link.pending:
            raise TransportError("reserve() without a request to answer")
        return link.rep.reserve(sizes)

    @property
    def copied_bytes(self) -> int:
        """Bytes this side copied into its reply arenas, over the links up now."""
        return sum(link.rep.copied for link in self._links)

    def send(self, frames: Frames) -> None:
        link = self._answer
        if link is None or not link.pending:
            raise TransportError("send() without a request to answer")
        link.rep.write(link.seq, frames)  # MessageTooLarge: nothing sent, still answerable
        link.pending = False
        self._answer = None
        link.rep_sem.post()

    def departed(self) -> list[Peer]:
        gone, self._departed = self._departed, []
        return gone

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for hs in self._handshakes:
                _unlink(hs.names)
                hs.link.close()
            self._handshakes.clear()
            for link in list(self._links):
                self._drop(link)
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
        self._spin = _Spin(_spin_s(options))
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
        fds: list[int] = []
        try:
            hello = _recv_msg(sock, deadline, f"{self.address} did not answer the connection "
                              "in time", self.watchdog, fds)
            link = self._open(sock, hello, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
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

    def _open(self, sock: socket.socket, hello: dict[str, Any], fds: list[int]) -> _Link:
        """Map the segments the server passed (``fds``: owned from here) and open the
        semaphores it named; refuse anything that is not what the protocol says."""
        if "error" in hello:
            raise TransportError(f"{self.address} refused the connection: "
                                 f"{clean_text(hello['error'], 300)}")
        names, arena = [hello.get("req"), hello.get("rep")], hello.get("arena")
        if hello.get("v") != VERSION:
            raise TransportError(f"{self.address} speaks shm protocol "
                                 f"{clean_text(hello.get('v'), 20)}, this client {VERSION}")
        if not (all(isinstance(n, str) and _OURS.fullmatch(n[1:]) for n in names)
                and isinstance(arena, int) and 1 << 16 <= arena <= 1 << 40 and len(fds) == 2):
            raise TransportError(f"{self.address} sent a malformed shm handshake")
        for fd in fds:
            _check_segment(fd, CTRL_BYTES + arena)
        opened: list[Any] = []
        native = _use_native(self.options)
        try:
            for n in names:
                opened.append(_open_sem(n, native))
            link = _Link(sock, _Region(fds[0], arena, writer=True, native=native),
                         _Region(fds[1], arena, writer=False, native=native), *opened)
            fds.clear()  # the regions own them now
            opened.clear()
            return link
        except (OSError, posix_ipc.Error) as exc:
            raise TransportError(f"cannot open the shm semaphores of {self.address}: "
                                 f"{exc}") from None
        finally:
            for sem in opened:
                sem.close()

    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        return self.request_into(frames, None, timeout)

    def request_into(self, frames: Frames, outs: list[Any] | None,
                     timeout: float | None) -> list[Any]:
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
        started = time.perf_counter()
        link.req_sem.post()
        try:
            while not link.rep_sem.take(self._spin.now, _slice(deadline)):
                self._check(link, deadline, timeout)  # a slice (or a signal) went by
            self._spin.done(time.perf_counter() - started)
        except BaseException:  # Ctrl-C included: a reply may still come, so the link goes
            self._drop()
            raise
        try:
            return link.rep.read(seq, outs)
        except _Malformed as exc:
            self._drop()
            raise TransportError(f"malformed reply from {self.address}: {exc}") from None

    def reserve(self, sizes: list[int]) -> list[memoryview] | None:
        if self._closed or self._link is None:
            return None  # request() connects, then copies as usual
        return self._link.req.reserve(sizes)

    @property
    def copied_bytes(self) -> int:
        """Bytes this side copied into its request arena (0 before the first connection)."""
        return self._link.req.copied if self._link is not None else 0

    def _check(self, link: _Link, deadline: float | None, timeout: float | None) -> None:
        reason = self.watchdog() if self.watchdog else None
        if reason is None and not link.alive():
            # a server that stops closes its end just before it exits: give the watchdog a
            # moment to say how it ended, which says more than the closed socket
            wait_until = time.monotonic() + 0.5
            while reason is None and self.watchdog and time.monotonic() < wait_until:
                time.sleep(0.02)
                reason = self.watchdog()
            reason = reason or "the server closed the connection"
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
    """Shared memory + semaphores; see the module docstring."""

    name = "shm"
    Options = ShmOptions
    size_limit_option = "arena_bytes"
    borrowed_frames = True

    def listen(self, address: str | None = None) -> ShmServer:
        name = _parse(address) if address else f"tsqp-{os.getpid()}-{secrets.token_hex(4)}"
        _sweep_stale()
        return ShmServer(name, self.options)  # type: ignore[arg-type]

    def fit(self, budget: ThreadBudget) -> None:
        update: dict[str, Any] = {"native": _use_native(self.options)}  # (true, unbuilt: raises)
        if self.options.spin_us is None:
            update["spin_us"] = SPIN_US if budget.spare else 0
        self.options = self.options.model_copy(update=update)

    def check_address(self, address: str) -> None:
        _parse(address)

    def connect(self, address: str, watchdog: Watchdog | None = None) -> ShmClient:
        return ShmClient(address, self.options, watchdog)  # type: ignore[arg-type]


@hookimpl
def tsqp_register_transports(register):
    register(ShmTransport)

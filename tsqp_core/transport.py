"""The transport family: byte channels that move lists of buffers between the two sides.

A transport knows nothing of tensors or methods; :mod:`tsqp_core.codec` turns messages into
frames (``[header, *buffers]``) and back. The contract every transport honours, and that
the contract suite (:mod:`tsqp_core.testing.transport_contract`) checks for each registered one:

* **Frames are buffers.** Any C-contiguous object with the buffer protocol, of any shape
  (zero-sized ones too): a call's tensors go as numpy arrays of their own shape and dtype
  (:func:`codec.tensor_frames`); a frame's size is ``memoryview(frame).nbytes``, never
  ``len(frame)``.
* **One outstanding request per client.** ``ClientChannel.request`` sends frames and blocks
  until the reply frames arrive, the timeout passes (:class:`PeerTimeout`) or the peer is known
  dead (:class:`PeerDead`). A reply whose request id does not match is never returned.
* **Borrowed replies.** The frames returned by ``request`` (and by ``ServerChannel.recv``) may
  be views of transport-owned memory, valid only until the next ``request`` (``send``) on the
  same channel; ``Transport.borrowed_frames`` says so, and callers copy what they keep.
* **One timeout convention:** every blocking call takes ``timeout`` in seconds; ``None``
  waits forever.
* **close() is idempotent** and releases every OS resource (sockets, segments, semaphores).
* **Servers keep serving.** A malformed message is the server loop's problem (it replies with
  an error), never a reason for the channel to die.
* **Servers know who asks.** After ``recv`` returns a request, ``ServerChannel.peer`` names the
  connection it came from: equal for every request of one connection, different for any two
  connections (a reconnect is a new peer), with the client's authenticated key where the
  transport has one (:class:`Peer`). ``departed()`` lists the peers known to have gone since
  it was last called, so the server frees what they held. Several clients may be connected
  at once; none of them -- idle, stalled mid-handshake or mid-request -- keeps the others
  from being served.
* **Memory it lends (optional).** A transport with memory of its own (shm's arenas) may lend
  it: ``ClientChannel.reserve`` / ``ServerChannel.reserve`` hand out writable buffers for the
  tensor frames of the next request / the reply; a message whose frames are those very
  buffers is sent without copying them again. The core asks for them where that saves a
  copy -- large messages, strided values, device tensors (:func:`codec.tensor_frames`); a
  small message of host tensors it hands over as views, for the transport's own copy. Either
  way each tensor is copied once per direction (``tests/test_copies.py`` counts the bytes);
  ``None`` (the default) means "copy as usual". The other way,
  ``ClientChannel.request_into`` lets a client that knows the reply's sizes hand over its
  own buffers: a borrowed reply is copied straight into them, once, instead of lent and
  then copied.
* **Memory it can pin (optional).** ``ServerChannel.pin(pinner)``: a transport whose
  server reads requests from and writes replies into memory of its own (shm's arenas)
  registers that memory with ``pinner`` -- the server's device, on CUDA: page-locked, so
  each input's host-to-device copy and each output's copy back is one DMA, from and into
  the very bytes the peer wrote or reads. It registers a span before the device can touch
  it and unregisters it before the memory goes away (a link dropped, a span grown:
  unregister, register the larger one), never two overlapping spans; a span the pinner
  refuses (``register`` returns ``False``) is used as it is, pageable, and not asked for
  again. The default: nothing to pin.
* **Settled for the machine.** ``Transport.fit(ThreadBudget)`` is called once before a run
  starts, so options marked automatic (shm's spin) can follow the run's threads and cores.
* **Too large is an error, never a fallback.** A message the channel cannot carry raises
  :class:`MessageTooLarge` before anything is sent; the channel stays usable, and a server
  answers the same request with a small error instead (:func:`tsqp_core.gpu.server.send_reply`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Hashable, NamedTuple, Protocol, Sequence

from tsqp_core.plugins import PluginOptions

Frames = Sequence[Any]
#: Returns ``None`` while the peer is believed alive, else a reason it is not.
Watchdog = Callable[[], "str | None"]


class TransportError(RuntimeError):
    """The channel cannot deliver: nobody listening, peer gone, misuse."""


class PeerTimeout(TransportError):
    """No reply within the timeout."""


class PeerDead(TransportError):
    """The peer is known to be gone (its process exited, its heartbeat stopped)."""


class MessageTooLarge(TransportError):
    """The message does not fit the channel (an arena, a frame limit); nothing was sent."""


class Peer(NamedTuple):
    """Who sent a request: the connection (``conn``: opaque, never reused for another
    connection while the channel lives) and the key it authenticated with (``key``: e.g. a
    CurveZMQ public key in Z85; ``None`` where the transport has no authentication)."""

    conn: Hashable
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.conn!r}" + (f" (key {self.key[:8]}...)" if self.key else "")


#: The peer of a transport that cannot tell connections apart (and of direct calls).
ANONYMOUS = Peer("anonymous")


class HostPinner(Protocol):
    """What a server lends a channel to page-lock the memory it serves from (see the module
    doc): on CUDA, :class:`tsqp_core.gpu.pinning.CudaPinner`."""

    def register(self, address: int, nbytes: int, read_only: bool) -> bool:
        """Page-lock ``nbytes`` from ``address`` for the device (``read_only``: the mapping
        is, and the device only reads it). ``False``: refused -- use it as it is."""

    def unregister(self, address: int) -> None:
        """Undo the registration that starts at ``address``."""


class ClientChannel(ABC):
    """TEE side: sends a request, waits for its reply."""

    @abstractmethod
    def request(self, frames: Frames, timeout: float | None) -> list[Any]:
        """Send ``frames`` and return the reply frames (borrowed, see module doc)."""

    def request_into(self, frames: Frames, outs: list[Any], timeout: float | None
                     ) -> list[Any]:
        """``request``, for a caller that knows what the reply should hold: ``outs`` are
        writable buffers, one per tensor frame it expects. A transport that lends its memory
        may copy a reply whose tensor frames have exactly those sizes into them, returning
        ``[header, *outs]`` -- the very objects -- so the caller does not copy them again;
        any other reply (an error, a wrong size) comes back as :meth:`request` returns it.
        The default: :meth:`request`, ``outs`` unused."""
        return self.request(frames, timeout)

    def reserve(self, sizes: list[int]) -> list[memoryview] | None:
        """Writable buffers of ``sizes`` bytes in the transport's own memory for the tensor
        frames of the next request, or ``None`` (the default: the transport has no such
        memory, or no connection yet). ``request([header, *buffers])`` with those very
        objects sends them without copying them again. Raises :class:`MessageTooLarge`
        when they cannot fit."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""

    def __enter__(self) -> "ClientChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerChannel(ABC):
    """GPU side: receives one request at a time and answers it."""

    #: The address a client passes to :meth:`Transport.connect` to reach this server.
    address: str
    #: Who sent the request last returned by :meth:`recv` (see the module doc).
    peer: Peer = ANONYMOUS

    @abstractmethod
    def recv(self, timeout: float | None) -> list[Any] | None:
        """The next request's frames, or ``None`` if none arrived within ``timeout``."""

    @abstractmethod
    def send(self, frames: Frames) -> None:
        """Answer the request last returned by :meth:`recv`."""

    def reserve(self, sizes: list[int]) -> list[memoryview] | None:
        """Writable buffers of ``sizes`` bytes in the transport's own memory for the tensor
        frames of the reply to the request last returned by :meth:`recv` -- or ``None``
        where the transport has no such memory (the default). The server writes each output
        of a reply it is asked for straight into its buffer; ``send([header, *buffers])``
        with those very objects then commits them without copying them again. Raises
        :class:`MessageTooLarge` when they cannot fit."""
        return None

    def pin(self, pinner: HostPinner) -> None:
        """Register the memory requests are read from and replies written into with
        ``pinner``, from now on, for every connection (see the module doc). The default:
        nothing -- the transport has no memory of its own to lend."""

    def departed(self) -> list[Peer]:
        """Peers whose connection closed since the last call (each reported once). A
        transport that cannot tell returns ``[]``; the server then relies on idle expiry."""
        return []

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent. The one place server-owned resources go away."""

    def __enter__(self) -> "ServerChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadBudget(NamedTuple):
    """The threads each side of a run computes with, the cores this machine gives the run and
    how many of them other work keeps busy: a transport that busy-waits (spins) should do so
    only when both sides have cores of their own (``tee + gpu + busy <= cores``), else a
    spinning waiter steals the core its peer needs to produce the reply."""

    tee: int
    gpu: int
    cores: int
    #: Cores other work keeps busy now (runnable tasks besides this one; see
    #: ``tsqp_core.run.prepare.busy_cores``).
    busy: int = 0

    @property
    def spare(self) -> bool:
        """Both sides can spin without taking a core from the other or from other work."""
        return self.tee + self.gpu + self.busy <= self.cores


class Transport(ABC):
    """A transport plugin. Subclasses set ``name`` and ``Options`` and are registered through
    the ``tsqp_register_transports`` hook."""

    name: ClassVar[str]
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: Frames returned by recv/request are views valid only until the next call.
    borrowed_frames: ClassVar[bool] = False
    #: The server lives in the client's process (``inproc``): ``run`` starts no child.
    in_process: ClassVar[bool] = False
    #: The option that caps the bytes of one message (``arena_bytes``; ``max_frame_bytes``
    #: for tcp, per frame), or ``None`` when any size is carried. The contract suite sets it
    #: small to check "too large is an error, never a fallback".
    size_limit_option: ClassVar[str | None] = None

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    @abstractmethod
    def listen(self, address: str | None = None) -> ServerChannel:
        """Start serving at ``address`` (``None``: the transport's loopback default)."""

    @abstractmethod
    def connect(self, address: str, watchdog: Watchdog | None = None) -> ClientChannel:
        """Connect to a server; ``watchdog`` lets blocking waits notice a dead peer early."""

    def fit(self, budget: ThreadBudget) -> None:
        """Resolve options that depend on the machine and the run's threads (``auto``
        values), before the run starts and its options are recorded; default: nothing."""

    def check_address(self, address: str) -> None:
        """Raise :class:`TransportError` if a client could never reach ``address`` (wrong
        scheme, a port out of range): called before anything starts."""

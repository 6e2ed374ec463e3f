"""Message <-> frames: a msgpack header followed by one raw buffer per tensor.

A :class:`Message` is a small header (msgpack-able scalars, lists and string-keyed maps) and
an ordered mapping of named tensors. :func:`encode` turns it into ``[header, *buffers]``,
where each buffer is the tensor's own memory (no copy for contiguous tensors); :func:`decode`
validates everything an untrusted peer could get wrong -- header size and shape, dtype names,
frame count, byte counts -- and builds tensors *in place* over the received buffers with
``torch.frombuffer``. Nothing here ever unpickles.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import msgpack
import numpy
import torch

# Received frames are often read-only (zmq, shm); tensors over them are never written to.
warnings.filterwarnings("ignore", message="The given buffer is not writable")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 1024
MAX_DIMS = 8


class ProtocolError(ValueError):
    """A frame or header that does not follow the protocol."""


@dataclass
class Message:
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


#: numpy has no bfloat16: its bytes travel through the same-sized integer view.
_NUMPY_VIEW = {torch.bfloat16: torch.int16}


def tensor_array(t: torch.Tensor) -> numpy.ndarray:
    """The bytes of ``t`` as a C-contiguous numpy array over its memory (bfloat16: int16),
    a buffer any transport takes as a frame; copies only a non-contiguous or device tensor.
    On the hot path (every tensor of every call): each check is the cheap kind, and numpy's
    array is the cheapest buffer torch hands out (half a flat memoryview's cost)."""
    if not t.is_cpu:
        t = t.cpu()
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return _NO_BYTES
    view = _NUMPY_VIEW.get(t.dtype)
    if view is not None:
        t = t.view(view)
    return t.numpy()


#: An empty tensor's frame: flat (a memoryview cannot cast a shape with a zero in it).
_NO_BYTES = numpy.empty(0, numpy.uint8)


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as a flat memoryview (:func:`tensor_array`, cast to bytes)."""
    return memoryview(tensor_array(t)).cast("B")


#: numpy's name for each dtype's bytes (bfloat16: read as int16, then viewed).
_NUMPY = {torch.float32: numpy.float32, torch.float16: numpy.float16,
          torch.bfloat16: numpy.int16, torch.float64: numpy.float64, torch.int64: numpy.int64,
          torch.int32: numpy.int32, torch.int16: numpy.int16, torch.int8: numpy.int8,
          torch.uint8: numpy.uint8}


#: The same, as numpy dtype objects (what the array constructor takes fastest).
_NUMPY_DTYPES = {k: numpy.dtype(v) for k, v in _NUMPY.items()}


def _array(buffer: Any, dtype: torch.dtype, shape: Sequence[int]) -> numpy.ndarray:
    """An array over ``buffer``'s first bytes (callers check it holds exactly that many;
    fewer is numpy's TypeError)."""
    return numpy.ndarray(shape, _NUMPY_DTYPES[dtype], buffer)


def _tensor(array: numpy.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(array)
    return t.view(dtype) if dtype is torch.bfloat16 else t


def over(buffer: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` over ``buffer``'s memory (no copy): writing to
    it writes the buffer. ``buffer`` must hold exactly those bytes."""
    return _tensor(_array(buffer, dtype, shape), dtype)


#: Below this many bytes a copy is cheapest through numpy (no dispatch); above it, torch's
#: copy runs on every thread (a 262 MB reply: 93 ms against numpy's 490 ms here).
SMALL_COPY = 1 << 16


def owned(buffer: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` holding a copy of ``buffer``'s bytes."""
    if memoryview(buffer).nbytes > SMALL_COPY:
        return over(buffer, dtype, shape).clone()
    return _tensor(_array(buffer, dtype, shape).copy(), dtype)


def empty(dtype: torch.dtype, shape: Sequence[int]) -> numpy.ndarray:
    """An uninitialised array of ``dtype``'s bytes in ``shape`` (bfloat16: int16): a buffer
    a transport can write into; :func:`tensor_of` makes the tensor over it. Half what
    ``torch.empty`` and then :func:`tensor_buffer` cost, on the hot path."""
    return numpy.empty(shape, _NUMPY[dtype])


def tensor_of(array: numpy.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``dtype`` over ``array`` (from :func:`empty`), sharing its memory."""
    return _tensor(array, dtype)


def describe(tensors: dict[str, torch.Tensor]) -> list[list]:
    """The header's descriptors ``[name, dtype, shape]`` of ``tensors``, in order."""
    specs = []
    for name, t in tensors.items():
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ProtocolError(f"tensor '{name}' has unsupported dtype {t.dtype}")
        specs.append([name, dtype, list(t.shape)])
    return specs


def place(t: torch.Tensor, buffer: Any, non_blocking: bool = False) -> None:
    """Copy ``t`` into ``buffer`` (exactly its bytes): one copy, whatever ``t``'s strides or
    device -- from a device, the one device-to-host transfer. ``non_blocking``: a device's
    copy is only queued on its stream (a DMA where ``buffer`` is page-locked); the caller
    waits for it (:meth:`~tsqp_core.executor.Backend.synchronize`) before ``buffer`` is
    read."""
    if t.numel() == 0:
        return
    if t.is_cpu and t.is_contiguous() and t.numel() * t.element_size() <= SMALL_COPY:
        memoryview(buffer)[:] = tensor_buffer(t)  # the cheapest for small ones
    else:
        over(buffer, t.dtype, t.shape).copy_(t, non_blocking=non_blocking and not t.is_cpu)


def tensor_frames(values: Collection[torch.Tensor], nbytes: int,
                  reserve: Callable[[list[int]], list[Any] | None] | None,
                  non_blocking: bool = False) -> tuple[list[Any], int]:
    """The frames of a call's tensors ``values`` (``nbytes`` in all), each copied once on
    its way, and the bytes this side copied. A small message of host tensors goes as views:
    the transport's own copy (into its memory, or onto the wire) is the one. Anything else,
    where the transport lends its memory (``reserve``, a channel's), is copied straight into
    it -- whatever its strides, from whatever device (the one device-to-host copy; only
    queued with ``non_blocking``, see :func:`place`), large ones by torch on every thread --
    and the transport copies only the header."""
    host = all(t.is_cpu and t.is_contiguous() for t in values)
    if reserve is not None and (nbytes > SMALL_COPY or not host):
        buffers = reserve([t.numel() * t.element_size() for t in values])
        if buffers is not None:
            for t, buf in zip(values, buffers):
                place(t, buf, non_blocking)
            return buffers, nbytes
    copied = 0 if host else sum(t.numel() * t.element_size() for t in values
                                if not (t.is_cpu and t.is_contiguous()))
    return [tensor_array(t) for t in values], copied


def encode_tensors(tensors: dict[str, torch.Tensor]) -> tuple[list[list], list[Any]]:
    """Tensor descriptors and raw buffers, in order."""
    return describe(tensors), [tensor_buffer(t) for t in tensors.values()]


def pack(header: dict[str, Any], specs: list[list], buffers: list[Any]) -> list[Any]:
    return [msgpack.packb({**header, "tensors": specs}, use_bin_type=True), *buffers]


def encode(msg: Message) -> list[Any]:
    return pack(msg.header, *encode_tensors(msg.tensors))


def _check_spec(spec: Any) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """A tensor descriptor checked: its name, dtype, shape and byte count."""
    if not (isinstance(spec, list) and len(spec) == 3):
        raise ProtocolError(f"tensor descriptor must be [name, dtype, shape], got {spec!r:.80}")
    name, dtype, shape = spec
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise ProtocolError(f"bad tensor name {name!r:.80}")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list is not even hashable)
        raise ProtocolError(f"tensor '{name}': unsupported dtype {dtype!r:.40}")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
    ):
        raise ProtocolError(f"tensor '{name}': bad shape {shape!r:.80}")
    torch_dtype = DTYPES[dtype]
    return name, torch_dtype, tuple(shape), math.prod(shape) * torch_dtype.itemsize


def decode(frames: Sequence[Any], *, copy: bool = False) -> Message:
    """Parse and validate ``frames``; with ``copy`` the tensors own their memory."""
    if not frames:
        raise ProtocolError("empty message")
    raw = frames[0]
    if len(memoryview(raw)) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header larger than {MAX_HEADER_BYTES} bytes")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0,
                                 max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    specs = header.pop("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError("header 'tensors' must be a list of at most %d" % MAX_TENSORS)
    if len(specs) != len(frames) - 1:
        raise ProtocolError(
            f"header describes {len(specs)} tensors but {len(frames) - 1} buffers arrived"
        )
    tensors: dict[str, torch.Tensor] = {}
    for spec, buf in zip(specs, frames[1:]):
        name, dtype, shape, want = _check_spec(spec)
        if name in tensors:
            raise ProtocolError(f"tensor '{name}' appears twice")
        view = memoryview(buf)
        if view.nbytes != want:
            raise ProtocolError(
                f"tensor '{name}': {list(shape)} {DTYPE_NAMES[dtype]} needs {want} bytes, "
                f"frame has {view.nbytes}"
            )
        if want == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = owned(view, dtype, shape) if copy else over(view, dtype, shape)
    return Message(header, tensors)

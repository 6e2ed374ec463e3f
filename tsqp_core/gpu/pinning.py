"""Page-locking the memory a transport lends, for the server's CUDA device.

A channel that serves from memory of its own (shm's arenas) registers it here through
:meth:`~tsqp_core.transport.ServerChannel.pin`: ``cudaHostRegister`` makes those pages
page-locked and known to the driver, so a call's inputs go to the device and its outputs
come back as one DMA each, from and into the bytes the peer wrote or will read -- no staging
copy through the driver's own pinned buffers, and a device-to-host copy that can be queued
(``non_blocking``) and waited for with the call's other work (one event, not a synchronize
per tensor).

Two things make this more than one call:

* A failed CUDA runtime call is also remembered as the thread's "last error", and torch
  checks that after every kernel launch: a refused registration left there would surface
  as the *next kernel's* error. So a refusal is cleared at once (``cudaGetLastError``,
  through the runtime library torch loaded), and where that library cannot be reached
  nothing is registered.
* The request arena is mapped read-only on the server (the client is its only writer):
  registering it needs ``cudaHostRegisterReadOnly``, which not every device supports
  (``cudaDevAttrHostRegisterReadOnlySupported``); where it is not, that arena stays pageable
  and the reply arena is still pinned.

What was registered, refused and why is in :meth:`CudaPinner.summary` (the ``server``
section of results, ``host_memory``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

#: cudaHostRegister flags and the device attribute that says read-only registration works.
PORTABLE = 0x01
READ_ONLY = 0x08
ATTR_READ_ONLY_SUPPORTED = 113


def _loaded_cudart() -> Any | None:
    """The CUDA runtime library this process has loaded (torch's), through ctypes -- the
    same instance, so its per-thread last error is torch's -- or ``None``."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


class CudaPinner:
    """A :class:`~tsqp_core.transport.HostPinner` for one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cudart = torch.cuda.cudart()
        self._runtime = _loaded_cudart()
        #: address -> (bytes, read-only) of what is registered now
        self.registered: dict[int, tuple[int, bool]] = {}
        #: why a registration was refused (the distinct reasons, in order: a few at most,
        #: however many links come and go)
        self.refused: list[str] = []
        self.read_only_supported = self._attribute(ATTR_READ_ONLY_SUPPORTED)

    def _attribute(self, attribute: int) -> bool:
        if self._runtime is None:
            return False  # cannot be asked, so read-only registration is never tried
        value = ctypes.c_int(0)
        index = (self.device.index if self.device.index is not None
                 else torch.cuda.current_device())
        err = self._runtime.cudaDeviceGetAttribute(ctypes.byref(value), attribute, index)
        if err:
            self._clear()
            return False
        return bool(value.value)

    def _clear(self) -> None:
        if self._runtime is not None:
            self._runtime.cudaGetLastError()

    def _refuse(self, reason: str) -> bool:
        if reason not in self.refused:
            self.refused.append(reason)
        return False

    def register(self, address: int, nbytes: int, read_only: bool) -> bool:
        if read_only and not self.read_only_supported:
            return self._refuse("read-only host registration is not supported here (the "
                                "request arena stays pageable)")
        if self._runtime is None:  # a refusal could not be cleared: try nothing
            return self._refuse("the CUDA runtime library torch uses was not found, so a "
                                "refused registration could not be cleared: not pinned")
        flags = PORTABLE | (READ_ONLY if read_only else 0)
        with torch.cuda.device(self.device):
            err = int(self._cudart.cudaHostRegister(address, nbytes, flags))
        if err:
            self._clear()
            return self._refuse(f"cudaHostRegister failed (CUDA error {err})")
        self.registered[address] = (nbytes, read_only)
        return True

    def unregister(self, address: int) -> None:
        if self.registered.pop(address, None) is None:
            return
        with torch.cuda.device(self.device):
            err = int(self._cudart.cudaHostUnregister(address))
        if err:
            self._clear()
            self._refuse(f"cudaHostUnregister failed: error {err}")

    def summary(self) -> dict[str, Any]:
        """For results (read at hello): how memory is pinned and what was refused so far --
        a device without read-only registration shows it here from the first request."""
        return {"pinned": "yes (cudaHostRegister)",
                "read_only_supported": self.read_only_supported,
                "refused": list(self.refused)}

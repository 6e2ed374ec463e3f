"""The GPU-ready data path on a real device (run by scripts/gpu_check.sh when one is lent;
skipped without CUDA): page-locked shm arenas, event fences, non-blocking copies.

On a CPU the same logic is checked with the device faked: the pinner's handling of CUDA's
answers (below), the shm transport's registration rules (tests/test_transport_shm.py,
``RecordingPinner``) and the server's fence order (tests/test_server.py)."""

from __future__ import annotations

import mmap

import pytest
import torch

from tsqp_core.testing.parity import (FP32_TOL, greedy, max_diff, prefill, prompts,  # noqa: F401
                                      split_model, step_diff)

#: The tests that need a device (the rest of this file runs anywhere, the device faked).
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def on_gpu(test):
    for mark in gpu:
        test = mark(test)
    return test


def _address(buf) -> int:
    import numpy

    return int(numpy.frombuffer(buf, numpy.uint8).ctypes.data)


@on_gpu
def test_the_pinner_page_locks_a_mapping_and_a_refusal_does_not_poison_the_next_kernel():
    from tsqp_core.gpu.pinning import CudaPinner

    pinner = CudaPinner(torch.device("cuda"))
    area = mmap.mmap(-1, 4 << 20)
    view = torch.frombuffer(area, dtype=torch.uint8)
    at = _address(area)
    assert not view.is_pinned()
    assert pinner.register(at, 4 << 20, read_only=False)
    assert view.is_pinned()
    # registering the same memory again is refused by CUDA; the refusal is recorded and
    # cleared, so the next kernel launch is not reported as failing
    assert not pinner.register(at, 4 << 20, read_only=False)
    assert pinner.refused and "failed" in pinner.refused[-1]
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    assert float((x * 2).sum()) == float(x.sum()) * 2
    # a queued copy into the pinned mapping, fenced by an event, lands whole
    out = torch.frombuffer(area, dtype=torch.float32)
    out.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    assert torch.equal(out, x.cpu())
    pinner.unregister(at)
    assert not view.is_pinned() and pinner.registered == {}
    del view, out
    area.close()


@on_gpu
@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "pageable"])
def test_stage3_over_shm_on_cuda_matches_the_in_process_run(pin, prompts):
    """Two processes over shm on CUDA (inputs non-blocking from the request arena, outputs
    queued into the reply arena, each call fenced by events): the same logits and tokens as
    the in-process run on the same card."""
    with split_model("stage=stage3", "dtype=float32", "executor.options.attention=sdpa",
                     device="cuda") as (model, _):
        want = prefill(model, prompts["prefill"]), greedy(model, prompts["generate"])
    with split_model("stage=stage3", "dtype=float32", "executor.options.attention=sdpa",
                     "transport=shm", f"server.pin_memory={pin}", device="cuda") as (model, _):
        got = prefill(model, prompts["prefill"]), greedy(model, prompts["generate"])
        memory = model.remote.server["host_memory"]
    assert memory["pinned"].startswith("yes" if pin else "no"), memory
    assert max_diff(got[0], want[0]) <= FP32_TOL
    assert got[1].tokens == want[1].tokens
    assert step_diff(got[1].step_logits, want[1].step_logits) <= FP32_TOL


class _FakeRuntime:
    """What the pinner asks the CUDA runtime, answered as a device would; it keeps the
    last-error slot the way the runtime does (set by a failed call, cleared when read)."""

    def __init__(self, read_only: int, fail: set[int]) -> None:
        self.read_only, self.fail = read_only, fail
        self.last_error = 0
        self.calls: list[tuple] = []

    # torch.cuda.cudart()'s two bindings
    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", address, nbytes, flags))
        err = 712 if address in self.fail else 0  # cudaErrorHostMemoryAlreadyRegistered
        self.last_error = err or self.last_error
        return err

    def cudaHostUnregister(self, address: int) -> int:
        self.calls.append(("unregister", address))
        return 0

    # the runtime library through ctypes
    def cudaDeviceGetAttribute(self, value, attribute: int, device: int) -> int:
        value._obj.value = self.read_only if attribute == 113 else 0
        return 0

    def cudaGetLastError(self) -> int:
        err, self.last_error = self.last_error, 0
        return err


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    from tsqp_core.gpu import pinning

    def install(read_only: int = 1, fail: set[int] = frozenset(), found: bool = True):
        rt = _FakeRuntime(read_only, set(fail))
        monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(pinning, "_loaded_cudart", lambda: rt if found else None)
        return rt, pinning.CudaPinner(torch.device("cuda", 0))

    return install


def test_the_pinner_registers_with_the_right_flags_and_unregisters_what_it_registered(
        fake_cuda):
    from tsqp_core.gpu.pinning import PORTABLE, READ_ONLY

    rt, pinner = fake_cuda()
    assert pinner.register(0x1000, 8192, read_only=False)
    assert pinner.register(0x9000, 4096, read_only=True)
    assert rt.calls == [("register", 0x1000, 8192, PORTABLE),
                        ("register", 0x9000, 4096, PORTABLE | READ_ONLY)]
    pinner.unregister(0x1000)
    pinner.unregister(0x5000)  # never registered: CUDA is not asked
    assert rt.calls[2:] == [("unregister", 0x1000)]
    assert pinner.registered == {0x9000: (4096, True)}
    assert pinner.summary() == {"pinned": "yes (cudaHostRegister)", "read_only_supported": True,
                                "refused": []}


def test_a_refused_registration_is_cleared_from_the_last_error_slot(fake_cuda):
    """Left there, torch would raise it as the next kernel launch's error."""
    rt, pinner = fake_cuda(fail={0x1000})
    assert not pinner.register(0x1000, 8192, read_only=False)
    assert rt.last_error == 0 and pinner.registered == {}
    assert pinner.refused == ["cudaHostRegister failed (CUDA error 712)"]
    assert not pinner.register(0x1000, 4 << 20, read_only=False)
    assert len(pinner.refused) == 1  # the same reason, once, however often


def test_read_only_registration_is_tried_only_where_the_device_supports_it(fake_cuda):
    rt, pinner = fake_cuda(read_only=0)
    assert not pinner.register(0x9000, 4096, read_only=True)
    assert pinner.register(0x1000, 4096, read_only=False)
    assert [c[0] for c in rt.calls] == ["register"]  # only the writable one reached CUDA
    assert "read-only" in pinner.refused[0] and not pinner.summary()["read_only_supported"]


def test_without_the_runtime_library_nothing_is_registered(fake_cuda):
    """A refusal could not be cleared, so nothing that can be refused is tried."""
    rt, pinner = fake_cuda(found=False)
    assert not pinner.register(0x1000, 4096, read_only=False)
    assert rt.calls == [] and "not found" in pinner.refused[0]

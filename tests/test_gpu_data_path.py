"""The GPU-ready data path on a real device (run by scripts/gpu_check.sh when one is lent;
skipped without CUDA): page-locked shm arenas, event fences, non-blocking copies.

On a CPU the same logic is checked with the device faked: the shm transport's registration
rules (tests/test_transport_shm.py, ``RecordingPinner``) and the server's fence order
(tests/test_server.py)."""

from __future__ import annotations

import mmap

import pytest
import torch

from tsqp_core.testing.parity import (FP32_TOL, greedy, max_diff, prefill, prompts,  # noqa: F401
                                      split_model, step_diff)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _address(buf) -> int:
    import numpy

    return int(numpy.frombuffer(buf, numpy.uint8).ctypes.data)


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

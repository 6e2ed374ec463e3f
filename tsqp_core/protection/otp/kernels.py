"""Products of residues modulo small primes: ``k`` GEMMs, exact on any device.

``residue_matmul(x, t, primes)`` computes ``x[i] @ t[i] mod p_i`` for int8 residues, with
``torch._int_mm`` (int8 x int8 -> int32) where the device has it: on the CPU always; on CUDA
it needs more than 16 rows and both other dimensions multiples of 8, so rows and the
reduction dimension are padded with zeros (which add nothing) and extra columns are cut off.
The fallback, and ``gemm="float64"``, is a float64 GEMM: every product of centred residues
is below ``127**2`` and every sum below ``K * 127**2 < 2**53`` for ``K < 2**39``, so it is
exact too, only slower. Either way the result is reduced modulo ``p_i`` and centred to int8.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tsqp_core.protection.otp.rns import MAX_K_INT32, centre

Gemm = Literal["auto", "int8", "float64"]


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n]


def residue_matmul(x: torch.Tensor, t: torch.Tensor, primes: tuple[int, ...],
                   gemm: Gemm = "auto") -> torch.Tensor:
    """``x`` int8 ``[k, R, K]``, ``t`` int8 ``[k, K, N]`` -> int8 ``[k, R, N]``, entry ``i``
    being ``x[i] @ t[i]`` reduced modulo ``primes[i]`` and centred."""
    k, rows, width = x.shape
    out = torch.empty(k, rows, t.shape[2], dtype=torch.int8, device=x.device)
    use_int8 = gemm != "float64" and width <= MAX_K_INT32
    for i, p in enumerate(primes):
        if use_int8:
            try:
                prod = _int_mm(x[i], t[i])
            except RuntimeError:
                if gemm == "int8":
                    raise
                use_int8 = False
        if not use_int8:
            prod = (x[i].to(torch.float64) @ t[i].to(torch.float64)).to(torch.int64)
        out[i] = centre(prod, p).to(torch.int8)
    return out

"""Fixed point with per-row power-of-two scales: floats to integers and back, exactly.

A row ``x`` (the last dimension) with largest magnitude ``m = f * 2**E``, ``f`` in
``[0.5, 1)``, becomes ``x_int = round(x * 2**(bits - 1 - E))``, so ``|x_int| <= 2**(bits-1)``:
the row's scale exponent ``s = bits - 1 - E`` is the TEE's secret (the GPU side never sees a
scale). Weights are quantised the same way per output row. A product of quantised rows is
then exact in the integers, ``y_int = x_int . w_int``, and ``y = y_int * 2**-(s_x + s_w)``.

The integer product must stay inside the ring the residues can represent: by Cauchy-Schwarz
``|y_int| <= ||x_int|| * ||w_int||``, which :func:`shrink_to_bound` enforces per row by
giving up low bits of rows whose norm is too large (rare: it is the worst case where every
element is at the row's maximum).
"""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_int, s)``: int64 ``x_int`` of ``x``'s shape and per-row int64 exponents ``s``
    (``x.shape[:-1]``) with ``x ~= x_int * 2**-s`` and ``|x_int| <= 2**(bits-1)``."""
    # exact in float32 up to 24 bits (a power-of-two scale, then rounding to an integer
    # below 2**24); more bits need float64
    x = x.to(torch.float32 if bits <= 24 and x.dtype in (torch.float32, torch.bfloat16,
                                                          torch.float16) else torch.float64)
    peak = x.abs().amax(dim=-1)
    _, e = torch.frexp(peak)  # peak < 2**e (0 -> e = 0)
    s = (bits - 1) - e.to(torch.int64)
    x_int = torch.round(torch.ldexp(x, s.unsqueeze(-1))).to(torch.int64)
    return x_int, s


def shrink_to_bound(x_int: torch.Tensor, s: torch.Tensor, w_norm: float, bound: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Make every row satisfy ``||x_int_row|| * w_norm <= bound`` by dropping low bits
    (a right shift with rounding, the exponent lowered to match). Returns the new
    ``(x_int, s)`` and how many rows were shrunk."""
    norm = x_int.to(torch.float64).norm(dim=-1)
    over = norm * w_norm > bound
    if not bool(over.any()):
        return x_int, s, 0
    # bits to drop: the smallest d with (norm / 2**d + sqrt(K)/2) * w_norm <= bound
    slack = 0.5 * x_int.shape[-1] ** 0.5  # rounding can add up to 1/2 per element
    need = torch.log2(norm * w_norm / max(bound - slack * w_norm, 1.0))
    drop = torch.where(over, torch.ceil(need).clamp(min=1).to(torch.int64), 0)
    scaled = torch.round(torch.ldexp(x_int.to(torch.float64), -drop.unsqueeze(-1)))
    return scaled.to(torch.int64), s - drop, int(over.sum())


def dequantize(y_int: torch.Tensor, s_rows: torch.Tensor, s_cols: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """``y_int * 2**-(s_rows[..., None] + s_cols)`` in float64, then ``dtype``."""
    y = torch.ldexp(y_int.to(torch.float64), -(s_rows.unsqueeze(-1) + s_cols))
    return y.to(dtype)

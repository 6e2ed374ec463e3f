"""What the TEE side accepts as a value computed by the GPU side, beyond its form.

:class:`~tsqp_core.tee.client.RemoteGpu` checks a reply's *form* (names, dtypes, shapes,
ids, timings); a protection scheme's ``open`` checks what its scheme can prove (``otp``:
residue ranges, Cauchy-Schwarz bounds, Freivalds). :class:`ValueCheck` adds the check every
scheme gets, ``none`` included: each floating-point value a call returns must be finite and
no larger in magnitude than a bound the model implies. A value that fails is an
:class:`~tsqp_core.protection.IntegrityError` (exit code 3): a lying or broken GPU side
never turns into silent garbage tokens.

The bound. Honest activations of LLaMA-family models stay far below 1e5: the largest value
crossing in SmolLM2-135M (a "massive activation" entering ``down_proj``) is 2.6e4, attention
scores and logits are smaller still. :data:`DEFAULT_MAX_ABS` (2**24, where float32 stops
holding every integer) leaves a factor of ~600 above that, and the dtype's own largest
finite value caps it (float16: 65504). ``server.max_abs_value`` overrides it for a model
that needs more.

It costs one pass over each reply (counted as ``serialize``: reply validation): for a small
float32 or bfloat16 tensor -- every reply of a decode step -- in C (``_bounds.c``, built by
``setup.py`` where a compiler is at hand), else one ``torch.aminmax``; both give the same
answer (``tests/test_hostile_gpu.py`` checks them against each other).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from tsqp_core.codec import SMALL_COPY
from tsqp_core.protection.base import CallSite, IntegrityError

try:
    from tsqp_core.tee import _bounds
except ImportError:  # not built (no C compiler at install): torch does the check
    _bounds = None  # type: ignore[assignment]

#: Largest magnitude accepted from the GPU side unless ``server.max_abs_value`` says otherwise.
DEFAULT_MAX_ABS = float(2**24)

#: The dtypes ``_bounds`` reads, and the most elements it is given: above that, torch's
#: ``aminmax`` (on every thread) is as fast or faster.
_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_SMALL = {0: SMALL_COPY // 4, 1: SMALL_COPY // 2}


class ValueCheck:
    """Finite and within ``max_abs``: every floating-point value a call returns."""

    def __init__(self, dtype: torch.dtype, max_abs: float | None = None) -> None:
        limit = DEFAULT_MAX_ABS if max_abs is None else float(max_abs)
        if dtype.is_floating_point:
            limit = min(limit, torch.finfo(dtype).max)
        if not limit > 0:
            raise ValueError(f"max_abs must be positive, got {max_abs!r}")
        self.max_abs = limit
        #: Whether small float32 and bfloat16 values are checked in C (``_bounds``).
        self._fast = _bounds is not None and math.isfinite(limit)

    def check(self, site: CallSite, values: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`IntegrityError` naming the call and the value that fails."""
        for name, t in values.items():
            if not t.is_floating_point() or t.numel() == 0:
                continue
            kind = _KINDS.get(t.dtype) if self._fast else None
            if (kind is not None and t.is_cpu and t.is_contiguous()
                    and t.numel() <= _SMALL[kind]):
                ok = _bounds.within(t.data_ptr(), t.numel(), kind, self.max_abs)
            else:
                lo, hi = torch.aminmax(t)
                ok = -self.max_abs <= float(lo) and float(hi) <= self.max_abs  # NaN: False
            if not ok:
                raise IntegrityError(f"call {site.call.index} ({site.call.method}): "
                                     f"{self._describe(name, t)}")

    def _describe(self, name: str, t: torch.Tensor) -> str:
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        if nan or inf:
            parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n]
            return (f"the GPU side returned '{name}' with {' and '.join(parts)} of "
                    f"{t.numel()} values")
        top = float(t.abs().max())
        return (f"the GPU side returned '{name}' with |value| up to {top:.3g}, beyond the "
                f"{self.max_abs:.3g} no honest run of this model reaches "
                "(server.max_abs_value raises it)")

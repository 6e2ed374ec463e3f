"""A lying GPU side, on purpose: corrupt chosen replies to show that the TEE notices.

``server.tamper`` (off by default) makes the GPU side change the first wire output of chosen
calls after computing it honestly -- the malicious host of the threat model. It exists for
tests, demonstrations and the integrity figures; a real deployment never sets it, and it
changes nothing about what the TEE side checks.

* ``what``: ``element`` (one element nudged: +1 for integer tensors, which for residues is
  another residue class; for floats, by ``size`` times the tensor's mean magnitude), ``nan``,
  ``inf``, ``huge`` (1e30), ``zero`` (the whole output zeroed);
* ``call``: the call index of the plan to corrupt (``null``: every call);
* ``after``: leave this many matching calls honest first;
* ``seed``: which element is nudged is drawn from a generator with this seed;
* ``size``: the relative nudge of a float element (default 1e-2).

On the command line: ``server.tamper={what:element,call:7}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Tamper(BaseModel):
    model_config = ConfigDict(extra="forbid")

    what: Literal["element", "nan", "inf", "huge", "zero"] = "element"
    call: int | None = Field(None, ge=0)
    after: int = Field(0, ge=0)
    seed: int = 0
    #: How far a float element is nudged, relative to the tensor's mean magnitude.
    size: float = Field(1e-2, gt=0)

    @field_validator("what", mode="before")
    @classmethod
    def _yaml_floats(cls, v: object) -> object:
        """``what=nan`` and ``what=inf`` arrive from the command line as floats."""
        if isinstance(v, float):
            return "nan" if v != v else "inf" if v in (float("inf"), float("-inf")) else v
        return v

    def model_post_init(self, _: object) -> None:
        self._seen = 0
        self._gen = torch.Generator().manual_seed(self.seed)

    def apply(self, call: int, out: dict[str, torch.Tensor]) -> None:
        """Corrupt ``out``'s first tensor in place (a copy replaces it) when chosen."""
        if self.call is not None and call != self.call:
            return
        self._seen += 1
        if self._seen <= self.after or not out:
            return
        name = next(iter(out))
        t = out[name].clone()
        flat = t.view(-1)
        if flat.numel() == 0:
            return
        i = int(torch.randint(flat.numel(), (1,), generator=self._gen))
        if self.what == "zero":
            t.zero_()
        elif t.is_floating_point():
            value = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}.get(self.what)
            if value is None:  # element
                scale = float(flat.float().abs().mean()) or 1.0
                value = float(flat[i]) + self.size * scale
            flat[i] = value
        else:
            flat[i] = flat[i] + 1 if int(flat[i]) < torch.iinfo(t.dtype).max else flat[i] - 1
        out[name] = t

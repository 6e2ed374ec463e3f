"""A lying GPU side, on purpose: corrupt chosen replies to show that the TEE notices.

``server.tamper`` (off by default) makes the GPU side misbehave on chosen calls after
computing them honestly -- the malicious host of the threat model. It exists for tests,
demonstrations and the integrity figures; a real deployment never sets it, and it changes
nothing about what the TEE side checks. Every kind has its expected clear error on the TEE
side (``tests/test_hostile_gpu.py`` holds the list); none lets a run exit 0.

* ``what``, the lie:

  - in the first wire output of the call: ``element`` (one element nudged: +1 for integer
    tensors, which for residues is another residue class; for floats, by ``size`` times the
    tensor's mean magnitude), ``nan``, ``inf``, ``huge`` (1e30), ``zero`` (the whole output
    zeroed);
  - in the reply around it: ``timing`` (the server claims 10^15 ns), ``error`` (the call
    is refused with 100 KB of text full of terminal escape codes), ``oversize`` (an extra
    16 MiB tensor rides along), ``stall`` (the call is never answered), ``exit`` (the GPU
    side dies mid-call);
  - at ``hello`` (``call`` is ignored): ``no_plan_id`` (the reply lacks its plan id),
    ``dims`` (it reports other model dimensions);

* ``call``: the call index of the plan to corrupt (``null``: every call);
* ``after``: leave this many matching calls honest first;
* ``seed``: which element is nudged is drawn from a generator with this seed;
* ``size``: the relative nudge of a float element (default 1e-2).

On the command line: ``server.tamper={what:element,call:7}``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Lies told in a call's first wire output.
TENSOR_LIES = ("element", "nan", "inf", "huge", "zero")
#: Lies told in the call's reply around its tensors.
REPLY_LIES = ("timing", "error", "oversize", "stall", "exit")
#: Lies told at hello.
HELLO_LIES = ("no_plan_id", "dims")

#: What ``error`` answers with: long, and full of escape codes a terminal would obey.
ERROR_TEXT = ("\x1b[2J\x1b[31mGPU side says: " + "\x07\x1b]0;pwned\x07" * 4) * 2000


class Tamper(BaseModel):
    model_config = ConfigDict(extra="forbid")

    what: Literal["element", "nan", "inf", "huge", "zero", "timing", "error", "oversize",
                  "stall", "exit", "no_plan_id", "dims"] = "element"
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

    # --- hello ------------------------------------------------------------------------------

    def hello(self, header: dict[str, Any]) -> None:
        """Lie in a hello reply's header (in place), when told to."""
        if self.what == "no_plan_id":
            header.pop("plan_id", None)
        elif self.what == "dims":
            header["dims"] = {**header["dims"], "hidden": header["dims"]["hidden"] * 2}

    # --- calls --------------------------------------------------------------------------------

    def chosen(self, call: int) -> bool:
        """Whether call ``call`` is to be corrupted (counts it against ``after``)."""
        if self.what in HELLO_LIES or (self.call is not None and call != self.call):
            return False
        self._seen += 1
        return self._seen > self.after

    def before_reply(self) -> str | None:
        """For a chosen call: act out ``stall`` and ``exit`` here; ``error`` returns the text
        to refuse the call with."""
        if self.what == "stall":
            time.sleep(3600)
        elif self.what == "exit":
            os._exit(17)
        elif self.what == "error":
            return ERROR_TEXT
        return None

    def reply(self, timings: Any, out: dict[str, torch.Tensor]) -> Any:
        """Lie in a chosen call's reply: the timings returned, the tensors in place."""
        if self.what == "timing":
            return timings._replace(compute_ns=10**15)
        if self.what == "oversize":
            out["padding"] = torch.zeros(16 << 20, dtype=torch.uint8)
        elif self.what in TENSOR_LIES:
            self._tensor(out)
        return timings

    def _tensor(self, out: dict[str, torch.Tensor]) -> None:
        """Corrupt ``out``'s first tensor (a copy replaces it)."""
        if not out:
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

    def apply(self, call: int, out: dict[str, torch.Tensor]) -> None:
        """Corrupt ``out``'s first tensor in place when ``call`` is chosen (tensor lies)."""
        if self.chosen(call) and self.what in TENSOR_LIES:
            self._tensor(out)

"""``python -m tsqp_core fuzz``: a structure-aware, seeded fuzzer of the GPU side.

The fuzzer speaks the protocol (:mod:`tsqp_core.protocol`): it holds the tiny model's real
plan and fingerprint, so most of what it sends gets past the first checks -- valid hellos,
calls with tensors of the declared shapes, ends, pings -- and then mutates them the way a
hostile peer would: header fields of the wrong type or size (huge, negative, NaN, deep,
long, missing, unknown), methods swapped, plan entries with unknown ops, layers and shapes,
tensor descriptors that disagree with their bytes, dtypes swapped, NaN contents, frames
dropped, added, truncated or bit-flipped, messages past the size limits, calls out of
sequence with the cache, and new connections that say nothing first. Calls go as call frames
(:data:`tsqp_core.protocol.CALL_REQUEST`) whose fields take extreme values, or -- where a
mutation leaves them unpackable -- as msgpack, which no server may take for a call.

Every reply is checked: it arrives (else a *hang*), it decodes, it says ``ok`` true or
false with a bounded error text, and it answers the request's id whenever that id was
readable (:func:`tsqp_core.gpu.server._peek_id`). The server must stay up (else a
*crash*) and, at the end, still answer an honest hello and call correctly.

Targets: ``direct`` (``GpuServer.handle`` in this process, peers simulated: fast, what CI
runs) or a transport (``tcp``, ``shm``, ``inproc``: the GPU side started as ``run`` starts
it, a child process for tcp and shm, whose resident memory is read from ``/proc`` after a
warm-up and at the end)::

    python -m tsqp_core fuzz --target tcp --messages 100000 --seed 1

prints, and with ``--out FILE`` writes as JSON: messages sent, by outcome (ok, refused),
crashes, hangs, bad replies, and the server's memory growth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch

from tsqp_core import codec, protocol
from tsqp_core.codec import DTYPES, Message

#: Values a hostile peer puts where a field should be.
NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**32 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 0.5,
    float("nan"), float("inf"), -float("inf"), "", "x" * 5000, "\x1b[2J\x07", "\udcff"[:0],
    [], {}, [[[[[[[[[[[]]]]]]]]]]], {"a": {"b": {"c": {"d": {}}}}}, list(range(2000)),
    ["B", "T"], ["Z"], [1, "S", -3], {"name": "none"}, "hello", "call", "end", "ping",
    "float32", "int64", "complex64", "00" * 8,
]


#: How the server's catch-all words an error it did not expect (``TypeError: ...``).
UNEXPECTED = re.compile(r"^[A-Z]\w*(Error|Exception|Interrupt): ")


@dataclass
class Outcome:
    sent: int = 0
    ok: int = 0
    refused: int = 0
    crashes: int = 0
    hangs: int = 0
    #: Refusals that came from the server's catch-all (a check missing somewhere).
    unexpected: list[str] = field(default_factory=list)
    bad_replies: list[str] = field(default_factory=list)
    final_check: str = "not run"
    memory: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"messages": self.sent, "ok": self.ok, "refused": self.refused,
                "crashes": self.crashes, "hangs": self.hangs,
                "unexpected_errors": len(self.unexpected), "unexpected": self.unexpected[:5],
                "bad_replies": len(self.bad_replies), "examples": self.bad_replies[:5],
                "final_check": self.final_check, "memory": self.memory,
                "seconds": round(self.seconds, 1)}


class Fuzzer:
    """Makes messages: honest ones from the plan, then mutated (seeded)."""

    def __init__(self, seed: int, hello: protocol.Hello, dims: dict[str, int]) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.hello = hello
        self.dims = dims
        self.plan_id: str | None = None
        self.ids = 0

    # --- honest messages ---------------------------------------------------------------------

    def _id(self) -> int:
        self.ids += 1
        return self.ids

    def honest_hello(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {**self.hello.header(), "m": "hello", "id": self._id()}, {}

    def honest_call(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        rng = self.rng
        index = rng.randrange(len(self.hello.plan))
        entry = self.hello.plan[index]
        last = rng.random() < 0.3
        tokens = rng.randint(1, 4)
        past = rng.choice([0, 0, rng.randint(0, 8)])
        sizes = protocol.sizes(1, tokens, past, last)
        tensors = {}
        for t in entry.wire.inputs:
            shape = t.resolve(sizes)
            if t.torch_dtype.is_floating_point:
                tensors[t.name] = torch.randn(shape, generator=self.gen).to(t.torch_dtype)
            else:
                tensors[t.name] = torch.randint(0, self.dims.get("vocab", 2), shape,
                                                generator=self.gen).to(t.torch_dtype)
        header = {"m": "call", "id": self._id(), "plan": int(self.plan_id or "0" * 16, 16),
                  "c": index, "s": rng.choice([1, 2, 3, rng.getrandbits(62)]), "past": past,
                  "last": last, "batch": 1, "tokens": tokens}
        return header, tensors

    def honest(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        r = self.rng.random()
        if r < 0.1:
            return self.honest_hello()
        if r < 0.85:
            return self.honest_call()
        if r < 0.95:
            return {"m": "end", "id": self._id(), "s": self.rng.choice([1, 2, 3])}, {}
        return {"m": "ping", "id": self._id()}, {}

    # --- mutations ----------------------------------------------------------------------------

    def nasty(self) -> Any:
        return self.rng.choice(NASTY)

    def mutate_header(self, h: dict[str, Any]) -> None:
        rng = self.rng
        if h.get("m") == "call" and rng.random() < 0.5:  # still a call frame, extreme fields
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(["plan", "c", "s", "past", "batch", "tokens", "id"])
                h[key] = rng.choice([0, 1, 2, 63, 64, 65, 2**16, 2**31, 2**32 - 1,
                                     rng.getrandbits(32)])
            return
        for _ in range(rng.randint(1, 3)):
            what = rng.random()
            keys = list(h)
            if what < 0.45 and keys:
                h[rng.choice(keys)] = self.nasty()
            elif what < 0.6 and keys:
                del h[rng.choice(keys)]
            elif what < 0.7:
                h[rng.choice(["zz", "tensors", "t", "ok", "error", "x" * 70])] = self.nasty()
            elif what < 0.8:
                h["m"] = rng.choice(["hello", "call", "end", "ping", "nope", 7, None])
            elif what < 0.9 and isinstance(h.get("plan"), list) and h["plan"]:
                self.mutate_plan(h["plan"])
            elif isinstance(h.get("limits"), dict):
                h["limits"][rng.choice(["batch", "positions"])] = self.nasty()

    def mutate_plan(self, plan: list) -> None:
        rng = self.rng
        i = rng.randrange(len(plan))
        entry = plan[i]
        if not (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[3], list)):
            plan[i] = self.nasty()
            return
        what = rng.random()
        if what < 0.2:
            plan.pop(i)
        elif what < 0.3:
            plan.append(entry)
        elif what < 0.5:
            entry[0] = [[rng.choice(["embed", "qkv_proj", "lm_head", "warp"]),
                         rng.choice([None, 0, 15, 16, -1, 10**9])]]
        elif what < 0.7 and entry[3] and isinstance(entry[3][0], list) and entry[3][0]:
            tensor = entry[3][0]
            tensor[rng.randrange(len(tensor))] = self.nasty()
        elif what < 0.85:
            entry[rng.randrange(5)] = self.nasty()
        else:
            plan[i] = self.nasty()

    def mutate_tensors(self, h: dict[str, Any], tensors: dict[str, torch.Tensor]
                       ) -> list[Any]:
        """Frames whose descriptors or bytes disagree with the plan (or with each other)."""
        rng = self.rng
        what = rng.random()
        if what < 0.2 and tensors:  # another dtype of the same shape
            name = rng.choice(list(tensors))
            dtype = rng.choice(list(DTYPES.values()))
            tensors[name] = tensors[name].to(dtype)
        elif what < 0.35 and tensors:  # another shape
            name = rng.choice(list(tensors))
            t = tensors[name]
            tensors[name] = torch.zeros(*[max(0, d + rng.choice([-1, 1, 5])) for d in t.shape],
                                        dtype=t.dtype)
        elif what < 0.45 and tensors:  # non-finite contents
            name = rng.choice(list(tensors))
            t = tensors[name]
            if t.is_floating_point() and t.numel():
                t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, 1e38])
        elif what < 0.55:  # renamed, extra, none
            if tensors and rng.random() < 0.5:
                name = rng.choice(list(tensors))
                tensors[name + "x"] = tensors.pop(name)
            else:
                tensors["extra"] = torch.zeros(rng.randint(0, 64))
        frames = encode(h, tensors)
        frames = [bytes(memoryview(f)) for f in frames]
        if what >= 0.55 and not protocol.is_call_frame(frames[0]):
            header = msgpack.unpackb(frames[0], raw=False)
            specs = header.get("tensors", [])
            if specs and what < 0.75:  # a descriptor that lies about its bytes
                spec = rng.choice(specs)
                spec[2] = rng.choice([[2**39], [1, 2**20, 2**20], [-1], [0], spec[2] + [1],
                                      [1] * 9])
            elif specs and what < 0.85:
                rng.choice(specs)[1] = rng.choice(["complex64", "bool", None, "float32"])
            frames[0] = msgpack.packb(header, use_bin_type=True)
        return frames

    def mutate_frames(self, frames: list[Any]) -> list[Any]:
        rng = self.rng
        what = rng.random()
        head = bytearray(frames[0]) if frames else bytearray()
        if what < 0.25 and head:  # bit flips in the header
            for _ in range(rng.randint(1, 8)):
                head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
            return [bytes(head), *frames[1:]]
        if what < 0.4 and head:  # truncated header
            return [bytes(head[:rng.randrange(len(head))]), *frames[1:]]
        if what < 0.55:  # frames dropped or added
            if len(frames) > 1 and rng.random() < 0.5:
                frames = list(frames)
                frames.pop(rng.randrange(1, len(frames)))
                return frames
            return [*frames, os.urandom(rng.randint(0, 256))]
        if what < 0.65:  # garbage, empty
            return rng.choice([[], [b""], [os.urandom(rng.randint(1, 512))],
                               [msgpack.packb([1, 2, 3])], [b"\xc1"]])
        if what < 0.75:  # deep nesting, long maps (msgpack bombs within the header limit)
            bomb = rng.choice([b"\x91" * 5000 + b"\x90", b"\xdf\xff\xff\xff\xff",
                               b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"])
            return [bomb]
        if what < 0.85:  # over the size limits, or one byte short of a tensor
            return [*frames, bytes(rng.choice([protocol.PRE_HELLO_BYTES + 1, 3 << 20]))]
        if len(frames) > 1:
            body = bytes(memoryview(frames[-1]))
            return [*frames[:-1], body[:-1] if body else b"\0"]
        return frames

    def message(self) -> list[Any]:
        """One message: honest (1 in 4) or mutated at one or more levels."""
        h, tensors = self.honest()
        r = self.rng.random()
        if r < 0.25:
            return encode(h, tensors)
        if r < 0.5:
            self.mutate_header(h)
            try:
                return encode(h, tensors)
            except (TypeError, ValueError, OverflowError):  # unpackable: send it raw
                return [msgpack.packb(repr(h)[:1000])]
        if r < 0.75:
            return self.mutate_tensors(h, tensors)
        return self.mutate_frames(encode(h, tensors))


def encode(h: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Any]:
    """A call as a call frame while its fields fit one, else (and every other message) as
    msgpack."""
    if h.get("m") == "call":
        try:
            req = protocol.CallRequest(*(h[k] for k in ("plan", "c", "s", "past", "last",
                                                        "batch", "tokens")))
            return protocol.encode_request(h["id"], req, tensors)
        except (KeyError, TypeError, codec.ProtocolError):
            pass
    return codec.encode(Message(h, tensors))


# --- checking replies ---------------------------------------------------------------------


def check_reply(request: list[Any], reply: list[Any]) -> str | None:
    """What is wrong with ``reply`` to ``request`` (``None``: nothing)."""
    from tsqp_core.gpu.server import _peek_id

    want = _peek_id(request) if request else None
    if reply and protocol.is_call_frame(reply[0]):
        if not (request and protocol.is_call_frame(request[0])):
            return "a call reply to a request that is not a call"
        try:
            protocol.CallReply.parse(reply, want)
        except codec.ProtocolError as exc:
            return f"call reply does not parse: {exc}"
        return None
    try:
        msg = codec.decode(reply, copy=True)
    except codec.ProtocolError as exc:
        return f"reply does not decode: {exc}"
    h = msg.header
    if not isinstance(h.get("ok"), bool):
        return f"reply without ok: {h!r:.200}"
    if want is not None and h.get("id") != want:
        return f"reply id {h.get('id')!r} to request {want}"
    if h["ok"] is False:
        err = h.get("error")
        if not isinstance(err, str) or len(err) > protocol.MAX_ERROR_CHARS + 20:
            return f"error text missing or unbounded ({len(str(err))} chars)"
        if any(not (c.isprintable() or c == "\n") for c in err):
            return "error text with control characters"
    return None


# --- targets ---------------------------------------------------------------------------------


class Direct:
    """``GpuServer.handle`` in this process; a few simulated peers, some forgotten."""

    def __init__(self, server: Any, rng: random.Random) -> None:
        from tsqp_core.transport import Peer

        self.server, self.rng = server, rng
        self.peers = [Peer(f"fuzz-{i}") for i in range(3)]
        self.pid = os.getpid()

    def request(self, frames: list[Any], timeout: float) -> list[Any]:
        if self.rng.random() < 0.01:
            self.server.forget(self.rng.choice(self.peers))
        return self.server.handle(frames, self.rng.choice(self.peers))

    def dead(self) -> str | None:
        return None

    def reconnect(self) -> None:
        pass

    def close(self) -> None:
        pass


def campaign(messages: int, seed: int, target: str = "direct", timeout: float = 10.0,
             warmup: int = 1000, progress: Callable[[str], None] | None = None,
             extra: list[str] | None = None) -> Outcome:
    """Run ``messages`` fuzzed messages against ``target``; see the module docstring."""
    from tsqp_core.metrics import Meter
    from tsqp_core.run import connect, prepare
    from tsqp_core.schedule import plan_entries
    from tsqp_core.soak import compose, rss_bytes
    from tsqp_core.transport import PeerDead, PeerTimeout, TransportError

    transport = "inproc" if target == "direct" else target
    p = prepare(compose(["model=tiny", f"transport={transport}", "workload=prefill",
                         "workload.prompt_tokens=4", "threads.tee=1", "threads.gpu=1",
                         "server.timeout_s=30", *(extra or [])]))
    hello = protocol.Hello(p.fingerprint, p.cfg.executor.name, p.cfg.dtype,
                           {"name": p.cfg.protection.name,
                            "options": dict(p.cfg.protection.options)},
                           plan_entries(p.schedule, p.wires), batch=2, positions=64)
    out = Outcome()
    fuzzer = Fuzzer(seed, hello, p.ckpt.dims.__dict__)
    t0 = time.monotonic()
    with connect(p, batch=2, positions=64) as conn:  # starts the GPU side; its hello is honest
        fuzzer.plan_id = conn.model.remote.plan_id
        pid = conn.server_pid
        if target == "direct":
            chan: Any = Direct(conn.local_server, fuzzer.rng)
        else:
            chan = _Channel(p, conn)
        baseline = None
        try:
            for i in range(messages):
                if i == min(warmup, messages // 2) and pid is not None:
                    baseline = rss_bytes(pid)
                frames = fuzzer.message()
                if fuzzer.rng.random() < 0.005:
                    chan.reconnect()  # a new connection: a new peer that has said nothing yet
                out.sent += 1
                try:
                    reply = chan.request(frames, timeout)
                except PeerTimeout:
                    out.hangs += 1
                    continue
                except (PeerDead, TransportError) as exc:
                    if chan.dead():
                        out.crashes += 1
                        out.bad_replies.append(f"message {i}: the server died: {exc}")
                        break
                    out.bad_replies.append(f"message {i}: the channel failed: {exc}")
                    chan.reconnect()
                    continue
                except Exception as exc:  # direct: handle() must never raise
                    out.crashes += 1
                    out.bad_replies.append(f"message {i}: {type(exc).__name__}: {exc}")
                    continue
                problem = check_reply(frames, reply)
                if problem:
                    out.bad_replies.append(f"message {i}: {problem}")
                    continue
                if protocol.is_call_frame(reply[0]):
                    out.ok += 1
                elif codec.decode(reply).header["ok"]:
                    out.ok += 1
                    hdr = _header(frames)
                    if hdr.get("m") == "hello" and isinstance(
                            codec.decode(reply).header.get("plan_id"), str):
                        fuzzer.plan_id = codec.decode(reply).header["plan_id"]
                else:
                    out.refused += 1
                    err = codec.decode(reply).header.get("error", "")
                    if UNEXPECTED.match(err):
                        out.unexpected.append(f"message {i}: {err[:200]}")
                if progress and (i + 1) % 10_000 == 0:
                    progress(f"{i + 1} messages: {out.ok} ok, {out.refused} refused, "
                             f"{out.crashes} crashes, {out.hangs} hangs"
                             + (f", server rss {rss_bytes(pid) / 2**20:.1f} MiB"
                                if pid else ""))
            if pid is not None and baseline is not None:
                end = rss_bytes(pid)
                out.memory = {"process": "server" if pid != os.getpid() else "this (direct)",
                              "baseline_mib": round(baseline / 2**20, 2),
                              "end_mib": round(end / 2**20, 2),
                              "growth_mib": round((end - baseline) / 2**20, 2)}
        finally:
            chan.close()
        # the server still does honest work, for the run's own (honest) connection
        try:
            from tsqp_core.tee.pipeline import prefill

            logits = prefill(conn.model, p.prompt, Meter())
            out.final_check = "ok" if bool(torch.isfinite(logits).all()) else "non-finite"
        except Exception as exc:
            out.final_check = f"failed: {type(exc).__name__}: {exc}"
    out.seconds = time.monotonic() - t0
    return out


def _header(frames: list[Any]) -> dict[str, Any]:
    try:
        h = msgpack.unpackb(frames[0], raw=False)
        return h if isinstance(h, dict) else {}
    except Exception:
        return {}


class _Channel:
    """A second connection to the run's GPU side, for the fuzzer's messages."""

    def __init__(self, p: Any, conn: Any) -> None:
        self.p, self.conn = p, conn
        self.address = conn.address
        self.watchdog = conn.watchdog
        self.channel = p.transport.connect(self.address, self.watchdog)

    def request(self, frames: list[Any], timeout: float) -> list[Any]:
        reply = self.channel.request(frames or [b""], timeout)  # zmq cannot send nothing
        return [bytes(memoryview(f)) for f in reply]  # borrowed (shm): keep a copy

    def dead(self) -> str | None:
        return self.watchdog() if self.watchdog else None

    def reconnect(self) -> None:
        self.channel.close()
        self.channel = self.p.transport.connect(self.address, self.watchdog)

    def close(self) -> None:
        self.channel.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsqp_core fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="direct",
                        help="direct (in process), or a transport: tcp, shm, inproc")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds without a reply that count as a hang")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = campaign(args.messages, args.seed, args.target, args.timeout,
                   progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    report = {"target": args.target, "seed": args.seed, **out.report()}
    print(json.dumps(report, indent=2))
    if args.out:
        with args.out.open("a") as fh:
            fh.write(json.dumps(report) + "\n")
    bad = (out.crashes or out.hangs or out.bad_replies or out.unexpected
           or out.final_check != "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

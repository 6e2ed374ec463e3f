"""``python -m tsqp_core bench transport``: round trips through each transport, beside memcpy.

For every registered out-of-process transport (or ``--transports``), an echo server runs in a
child process started like the GPU side (:mod:`tsqp_core.launch`: ``OMP_WAIT_POLICY=PASSIVE``,
a ready line, always stopped and reaped). For each payload size the client sends one frame of
that many bytes and gets it back; the server answers with the frames it received (``raw``
echo: no codec, only the transport). Warm-up round trips are excluded; the figure is the
median of the repeats, beside the median of an in-process memcpy of the same size. A table
goes to stdout and one JSON object per (transport, size) to ``--out``::

    {"transport": "shm", "payload_bytes": 8, "rtt_us": 9.1, "memcpy_us": 0.1, ...}

The echo server here is also what the transport contract suite runs against.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from tsqp_core.transport import ServerChannel, Watchdog

SIZES = [8, 8 << 10, 8 << 20, 64 << 20]
#: (warm-up, repeats) per payload size: enough that the median is stable, small enough to
#: keep the whole benchmark around a minute on 2 cores.
PLAN = {8: (500, 5000), 8 << 10: (500, 5000), 8 << 20: (10, 100), 64 << 20: (5, 30)}


# --- the echo server ------------------------------------------------------------------------


class EchoServer:
    """Answers every request with what it carried.

    ``raw`` returns the received frames as they came (the transport alone). ``codec`` decodes
    them (a malformed message gets an error reply), honours two header fields -- ``sleep``
    (seconds, a stand-in for a slow call), ``grow`` (bytes: adds a tensor of that size to the
    reply) and ``reserve`` (true: the reply's tensors are written into the channel's own
    memory, :meth:`~tsqp_core.transport.ServerChannel.reserve`, where it has some) -- and
    answers ``{id, ok: true, ...}`` with the same tensors. Duck-types the part of
    :class:`tsqp_core.gpu.server.GpuServer` that :func:`tsqp_core.gpu.server.serve_forever` uses."""

    def __init__(self, mode: str = "codec") -> None:
        if mode not in ("raw", "codec"):
            raise ValueError(f"echo mode must be raw or codec, not {mode!r}")
        self.mode = mode

    def handle(self, frames: list[Any], peer: Any = None, reserve: Any = None) -> list[Any]:
        if self.mode == "raw":
            return list(frames)
        import torch

        from tsqp_core import codec, protocol

        req_id: Any = None
        try:
            msg = codec.decode(frames)
            req_id = protocol.request_id(msg.header)
            sleep = msg.header.get("sleep")
            if isinstance(sleep, (int, float)) and sleep > 0:
                time.sleep(sleep)
            tensors = dict(msg.tensors)
            grow = msg.header.get("grow")
            if isinstance(grow, int) and grow > 0:
                tensors["grown"] = torch.zeros(grow, dtype=torch.uint8)
            header = {**msg.header, "ok": True}
            if msg.header.get("reserve") is True and reserve is not None:
                from tsqp_core.transport import MessageTooLarge

                try:
                    buffers = reserve([t.numel() * t.element_size() for t in tensors.values()])
                except MessageTooLarge:
                    buffers = None  # send() says so, as for any reply too large
                if buffers is not None:
                    for t, buf in zip(tensors.values(), buffers):
                        codec.place(t, buf)
                    header["reserved"] = True
                    return codec.pack(header, codec.describe(tensors), buffers)
            return codec.encode(codec.Message(header, tensors))
        except codec.ProtocolError as exc:
            return protocol.encode_error(req_id, str(exc))

    def serve(self, channel: ServerChannel, stop: threading.Event | None = None,
              poll_s: float = 0.05) -> None:
        from tsqp_core.gpu.server import serve_loop

        serve_loop(channel, self.handle, stop, poll_s)


def _child(spec_json: str) -> int:
    """Entry of the echo child: listen, say ready, serve until SIGTERM/SIGINT."""
    from tsqp_core.launch import READY
    from tsqp_core.plugins import get_plugins
    from tsqp_core.gpu.server import serve_forever

    spec = json.loads(spec_json)
    transport = get_plugins().transports.create(spec["transport"], spec.get("options"))
    channel = transport.listen(spec.get("address"))

    def ready(address: str) -> None:
        print(READY + json.dumps({"address": address, "pid": os.getpid()}), flush=True)

    serve_forever(EchoServer(spec.get("mode", "raw")), channel, ready)  # type: ignore[arg-type]
    return 0


@contextlib.contextmanager
def echo_process(transport: str, options: dict[str, Any] | None = None, *, mode: str = "raw",
                 address: str | None = None, startup_timeout: float = 120.0,
                 ) -> Iterator[tuple[str, Watchdog, subprocess.Popen]]:
    """An echo server in a child process; yields ``(address, watchdog, process)`` and always
    stops and reaps the child."""
    from tsqp_core.launch import spawn_ready

    spec = {"transport": transport, "options": options or {}, "mode": mode, "address": address}
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    with spawn_ready([sys.executable, "-m", "tsqp_core.bench_transport", "_echo",
                      json.dumps(spec)], env, startup_timeout, "echo server") as ready:
        yield ready


# --- the benchmark --------------------------------------------------------------------------


def _median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


def memcpy_ns(size: int, warmup: int, repeats: int) -> list[int]:
    """One in-process copy of ``size`` bytes between two warm buffers, per sample."""
    src, dst = memoryview(bytearray(b"\x5a" * size)), memoryview(bytearray(size))
    dst[:] = src  # both buffers touched: no copy from the shared zero page
    samples = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter_ns()
        dst[:] = src
        t = time.perf_counter_ns() - t0
        if i >= warmup:
            samples.append(t)
    return samples


def rtt_ns(channel: Any, size: int, warmup: int, repeats: int, progress: Any) -> list[int]:
    payload = bytearray(b"\x5a" * size)
    frames = [payload]
    reply = channel.request(frames, 60.0)
    if len(reply) != 1 or bytes(reply[0]) != bytes(payload):
        raise RuntimeError(f"echo of {size} bytes came back wrong")
    del reply
    samples = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter_ns()
        reply = channel.request(frames, 60.0)
        t = time.perf_counter_ns() - t0
        if len(memoryview(reply[0])) != size:
            raise RuntimeError(f"echo of {size} bytes came back with {len(memoryview(reply[0]))}")
        del reply
        if i >= warmup:
            samples.append(t)
        progress.update()
    return samples


def _human(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def run(transports: list[str], sizes: list[int], repeats: int | None, out: Path) -> list[dict]:
    from tqdm import tqdm

    from tsqp_core.plugins import get_plugins

    plugins = get_plugins()
    rows: list[dict] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as sink:
        for name in transports:
            transport = plugins.transports.create(name)
            print(f"bench transport: starting a {name} echo server ...", file=sys.stderr)
            with echo_process(name) as (address, watchdog, _):
                channel = transport.connect(address, watchdog)
                try:
                    for size in sizes:
                        warmup, reps = PLAN.get(size, (10, 100))
                        if repeats is not None:
                            warmup, reps = max(1, repeats // 10), repeats
                        with tqdm(total=warmup + reps, desc=f"{name} {_human(size)}", unit="rt",
                                  file=sys.stderr, leave=False,
                                  disable=not sys.stderr.isatty()) as bar:
                            rtt = rtt_ns(channel, size, warmup, reps, bar)
                        copy = memcpy_ns(size, warmup, reps)
                        row = {"transport": name, "payload_bytes": size,
                               "rtt_us": round(_median_us(rtt), 2),
                               "memcpy_us": round(_median_us(copy), 3),
                               "rtt_p90_us": round(sorted(rtt)[int(0.9 * (len(rtt) - 1))] / 1e3, 2),
                               "repeats": reps}
                        rows.append(row)
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                        print(f"  {name:8s} {_human(size):>8s}  rtt {row['rtt_us']:>10.1f} us  "
                              f"memcpy {row['memcpy_us']:>9.1f} us", file=sys.stderr)
                finally:
                    channel.close()
    return rows


def table(rows: list[dict]) -> str:
    head = ("transport", "payload", "rtt median", "rtt p90", "memcpy", "rtt/memcpy")
    body = [(r["transport"], _human(r["payload_bytes"]), f"{r['rtt_us']:.1f} us",
             f"{r['rtt_p90_us']:.1f} us", f"{r['memcpy_us']:.2f} us",
             f"{r['rtt_us'] / r['memcpy_us']:.2f}x" if r["memcpy_us"] else "-") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str]) -> int:
    from tsqp_core.plugins import PluginError, get_plugins

    everyone = [e.name for e in get_plugins().transports.entries() if not e.cls.in_process]
    parser = argparse.ArgumentParser(
        prog="python -m tsqp_core bench transport",
        description="Round-trip medians through each out-of-process transport (echo server in "
                    "a child process), beside an in-process memcpy of the same payload.")
    parser.add_argument("--transports", default=",".join(everyone),
                        help=f"comma-separated (default: {','.join(everyone)})")
    parser.add_argument("--sizes", default="8,8K,8M,64M",
                        help="payload sizes, comma-separated, K/M/G binary (default: 8,8K,8M,64M)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed round trips per size "
                             "(default: 5000 small, 100 at 8M, 30 at 64M)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON lines file (default: outputs/bench/transport-TIMESTAMP.jsonl)")
    args = parser.parse_args(argv)
    names = [n for n in args.transports.split(",") if n]
    try:
        for n in names:
            get_plugins().transports.get(n)
        sizes = [_size(s) for s in args.sizes.split(",") if s]
    except (PluginError, ValueError) as exc:
        parser.error(str(exc))
    out = args.out or Path("outputs/bench") / f"transport-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    print(f"bench transport: {', '.join(names)}; payloads {', '.join(map(_human, sizes))}; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus", file=sys.stderr)
    rows = run(names, sizes, args.repeats, out)
    print(table(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_echo"]:
        sys.exit(_child(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))

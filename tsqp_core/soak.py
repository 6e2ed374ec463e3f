"""``python -m tsqp_core soak``: many calls through the real pipeline, watching memory and
file descriptors of both sides.

For each transport, a run of the tiny model (``model=tiny``, one thread per side, the GPU
side started as ``run`` starts it) generates short sequences over and over -- each its own
session, ended as a run ends it -- until ``--calls`` calls have crossed. The resident
memory (``VmRSS``) and the open descriptors of the TEE process and of the GPU-side process
are read from ``/proc`` after a warm-up (the baseline: the first ``--warmup`` calls) and then
at every tenth of the way; the report is the growth from the baseline to the end::

    transport  calls    s     TEE rss MiB (growth)  fds    GPU rss MiB (growth)  fds
    tcp        100254   160   412.3 (+0.4)          21/21  398.0 (+0.1)          19/19

``--out FILE`` gets one JSON object per transport with every sample. Extra Hydra overrides
after ``--`` go to every run (``-- model=llama-3.2-1b``). Memory that grows with the number
of calls -- a cache never freed, a buffer pinned per call -- shows as growth here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def compose(overrides: list[str]) -> Any:
    """The validated RunConfig that ``run OVERRIDES`` would use (plugins' groups included)."""
    from omegaconf import OmegaConf

    from tsqp_core.config import parse
    from tsqp_core.configs import compose as hydra_compose

    cfg = hydra_compose(overrides)
    return parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def soak(transport: str, calls: int, warmup: int, new_tokens: int, extra: list[str],
         progress: bool = True) -> dict[str, Any]:
    import torch

    from tsqp_core.metrics import Meter
    from tsqp_core.run import connect, prepare
    from tsqp_core.tee.pipeline import generate
    from tsqp_core.tee.sampling import Sampler, Sampling

    cfg = compose(["model=tiny", f"transport={transport}", "workload=generate",
                   "workload.prompt_tokens=8", f"workload.new_tokens={new_tokens}",
                   "prompt=null", "threads.tee=1", "threads.gpu=1", *extra])
    p = prepare(cfg)
    torch.set_num_threads(cfg.threads.tee)
    samples: list[dict[str, Any]] = []
    me = os.getpid()
    done = 0
    t0 = time.monotonic()
    with connect(p) as conn:
        gpu = conn.server_pid
        marks = [warmup + (calls - warmup) * k // 10 for k in range(11)]

        def sample() -> None:
            gc_collect()
            s = {"calls": done, "s": time.monotonic() - t0,
                 "tee_rss": rss_bytes(me), "tee_fds": fds(me)}
            if gpu is not None and gpu != me:
                s |= {"gpu_rss": rss_bytes(gpu), "gpu_fds": fds(gpu)}
            samples.append(s)
            if progress:
                print(f"  {transport}: {done} calls, TEE {s['tee_rss'] / 2**20:.1f} MiB"
                      + (f", GPU side {s['gpu_rss'] / 2**20:.1f} MiB" if "gpu_rss" in s
                         else ""), file=sys.stderr, flush=True)

        while done < calls:
            meter = Meter()
            generate(conn.model, p.prompt, new_tokens, Sampler(Sampling()), meter)
            done += meter.calls
            while marks and done >= marks[0]:
                marks.pop(0)
                sample()
    return {"transport": transport, "calls": done, "seconds": time.monotonic() - t0,
            "same_process": gpu == me, "samples": samples, **growth(samples)}


def gc_collect() -> None:
    import gc

    gc.collect()


def growth(samples: list[dict[str, Any]]) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    out = {f"{k}_growth": last[k] - first[k] for k in first if k.endswith(("rss", "fds"))}
    out["baseline"] = first
    out["end"] = last
    return out


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="python -m tsqp_core soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transports", default="tcp,shm,inproc")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=5_000,
                        help="calls before the baseline sample")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="decode steps per generation (each its own session)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for name in args.transports.split(","):
        res = soak(name, args.calls, min(args.warmup, args.calls // 2), args.new_tokens, extra)
        rows.append(res)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
    print(f"{'transport':9}  {'calls':>7}  {'s':>6}  {'TEE rss MiB (growth)':>22}  "
          f"{'fds':>7}  {'GPU rss MiB (growth)':>22}  {'fds':>7}")
    for r in rows:
        b, e = r["baseline"], r["end"]
        tee = f"{e['tee_rss'] / 2**20:.1f} ({r['tee_rss_growth'] / 2**20:+.2f})"
        gpu = (f"{e['gpu_rss'] / 2**20:.1f} ({r['gpu_rss_growth'] / 2**20:+.2f})"
               if "gpu_rss" in e else "(same process)")
        gpu_fds = f"{b['gpu_fds']}/{e['gpu_fds']}" if "gpu_fds" in e else "-"
        print(f"{r['transport']:9}  {r['calls']:>7}  {r['seconds']:>6.0f}  {tee:>22}  "
              f"{b['tee_fds']}/{e['tee_fds']:<4}  {gpu:>22}  {gpu_fds:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

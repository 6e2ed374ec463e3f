"""Five concurrent runs against one GPU side (``serve`` over tcp, on a thread here): all
finish with the right tokens, or -- when the server is full -- the extra ones are refused
with a clear reason and nobody else's generation is disturbed."""

from __future__ import annotations

import threading

import pytest
import torch

from tsqp_core.gpu.server import GpuServer
from tsqp_core.metrics import Meter
from tsqp_core.plugins import get_plugins
from tsqp_core.run import connect, prepare
from tsqp_core.tee.client import RemoteError
from tsqp_core.tee.pipeline import generate
from tsqp_core.tee.sampling import Sampler, Sampling

from conftest import compose

RUNS = 5


def serve(max_clients: int):
    from tsqp_core.executor import UnfusedExecutor
    from tsqp_core.models.source import resolve
    from tsqp_core.plugins import PluginOptions

    server = GpuServer(resolve(compose("model=tiny").model), UnfusedExecutor(PluginOptions()),
                       "unfused", torch.float32, torch.device("cpu"), max_clients=max_clients)
    channel = get_plugins().transports.create("tcp").listen()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(channel, stop, 0.05), daemon=True)
    thread.start()
    return server, channel, stop, thread


@pytest.mark.parametrize("max_clients,served", [(8, RUNS), (3, 3)])
def test_five_concurrent_runs_finish_or_are_refused_clearly(max_clients, served):
    server, channel, stop, thread = serve(max_clients)
    said_hello = threading.Barrier(RUNS, timeout=120)
    results: dict[int, object] = {}

    prepared = [prepare(compose("model=tiny", "transport=tcp",  # Hydra: not in threads
                                f"server.address={channel.address}", "workload=generate",
                                "workload.prompt_tokens=6", "workload.new_tokens=6", f"seed={i}",
                                "threads.tee=1")) for i in range(RUNS)]

    def one(i: int) -> None:
        p = prepared[i]
        try:
            with connect(p) as conn:
                said_hello.wait()  # all five connected (or refused) before anyone generates
                gen = generate(conn.model, p.prompt, 6, Sampler(Sampling()), Meter())
                results[i] = (p.prompt, gen.tokens)
        except RemoteError as exc:
            results[i] = exc
            said_hello.wait()
        except BaseException as exc:
            results[i] = exc
            said_hello.abort()
            raise

    threads = [threading.Thread(target=one, args=(i,)) for i in range(RUNS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        stop.set()
        thread.join(10)
        channel.close()
    assert len(results) == RUNS
    ok = {i: r for i, r in results.items() if not isinstance(r, Exception)}
    refused = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert len(ok) == served, results
    for r in refused.values():
        assert "the GPU side is full" in str(r) and "max_clients" in str(r), str(r)
    # every run that was served got the tokens a run alone gets
    alone = prepare(compose("model=tiny", "transport=inproc", "threads.tee=1"))
    with connect(alone, batch=1, positions=12) as conn:
        for prompt, tokens in ok.values():
            want = generate(conn.model, prompt, 6, Sampler(Sampling()), Meter()).tokens
            assert tokens == want

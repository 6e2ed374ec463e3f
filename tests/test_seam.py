"""The call seam: the TEE side stays apart from the GPU side, hello agrees on contents, and
results say what actually ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tsqp_core.launch import build_server
from tsqp_core.models import source
from tsqp_core.models.source import fingerprint, resolve
from tsqp_core.run import connect, prepare
from tsqp_core.run.connect import server_spec
from tsqp_core.tee.client import RemoteError

from conftest import compose

REPO = Path(__file__).resolve().parent.parent

#: Modules that belong to the GPU side only.
GPU_ONLY = ("tsqp_core.gpu", "tsqp_executor_fused.backend", "tsqp_executor_fused.cache",
            "flash_attn")


def test_the_tee_side_loads_no_gpu_side_module(tmp_path):
    """A whole stage-3 run (shm, fused executor, GPU side in a child process) and the CLI's
    entry points, in a fresh interpreter: nothing of the GPU side is imported, CUDA is not
    initialised."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO / 'tests')!r})
import tsqp_core.__main__, tsqp_core.app, tsqp_core.run, tsqp_core.tee.pipeline
from conftest import compose
from tsqp_core.run import run
from pathlib import Path
res = run(compose("model=tiny", "stage=stage3", "workload=prefill", "workload.prompt_tokens=8",
                  "threads.tee=1", "threads.gpu=1"), Path({str(tmp_path)!r}))
print(json.dumps({{"modules": sorted(sys.modules), "cuda": torch.cuda.is_initialized(),
                  "calls": res["rpc"]["calls_per_forward"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["calls"] == 18  # it ran through the child's fused executor
    loaded = [m for m in got["modules"] if m.startswith(GPU_ONLY)]
    assert loaded == [], f"the TEE side imported GPU-side modules: {loaded}"
    assert got["cuda"] is False


def test_two_checkpoints_that_differ_only_in_weights_are_refused_at_hello():
    """Same config and file sizes, different weights (seeds 0 and 1): hello says so."""
    dir0 = resolve(compose("model=tiny", "model.seed=0").model)
    dir1 = resolve(compose("model=tiny", "model.seed=1").model)
    assert (dir0 / "config.json").read_bytes() == (dir1 / "config.json").read_bytes()
    assert (dir0 / "model.safetensors").stat().st_size == (dir1 / "model.safetensors").stat().st_size
    assert fingerprint(dir0) != fingerprint(dir1)
    # a GPU side holding seed 0, a TEE side holding seed 1
    p = prepare(compose("model=tiny", "model.seed=1", "transport=inproc"))
    spec = server_spec(prepare(compose("model=tiny", "model.seed=0", "transport=inproc")))
    server, channel = build_server(spec)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(channel, stop, 0.05), daemon=True)
    thread.start()
    try:
        p.cfg = p.cfg.model_copy(update={"server": p.cfg.server.model_copy(
            update={"address": channel.address})})
        with pytest.raises(RemoteError, match=r"model fingerprint .* is not this server's "
                                               r"\(the checkpoints' contents differ\)"):
            with connect(p):
                pass
    finally:
        stop.set()
        thread.join(timeout=5)
        channel.close()


def test_the_fingerprint_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    first = fingerprint(ckpt)

    def no_hashing(f):
        raise AssertionError("hashed again although nothing changed")

    real = source._file_sha256
    monkeypatch.setattr(source, "_file_sha256", no_hashing)
    assert fingerprint(ckpt) == first  # from the cache, no file read
    monkeypatch.setattr(source, "_file_sha256", real)
    (ckpt / "model.safetensors").write_bytes(b"\1" + b"\0" * 63)  # same size, new contents
    assert fingerprint(ckpt) != first


@pytest.mark.parametrize("stage,attention", [("stage0", "eager"), ("stage3", "sdpa")])
def test_results_say_what_the_server_ran(run_tiny, stage, attention):
    res = run_tiny(f"stage={stage}", "transport=inproc", "workload=prefill",
                   "workload.prompt_tokens=8")
    server = res["server"]
    assert server["attention"] == attention  # on this CPU: never flash-attn
    assert server["device"] == "cpu" and server["torch"] == torch.__version__
    assert server["dtype"] == res["config"]["dtype"]
    assert server["executor"] == res["config"]["executor"]
    assert "breakdown" in res["latency_ms"] and "protect" in res["latency_ms"]["breakdown"]

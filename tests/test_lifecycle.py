"""Bad input gets a clear error before anything starts; the GPU side is always stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tsqp_core.tee.client import RemoteGpu
from tsqp_core.config import ConfigError
from tsqp_core.launch import ServerSpec, gpu_side
from tsqp_core.models.source import ModelError, resolve
from tsqp_core.plugins import PluginError, get_plugins
from tsqp_core.run import InputError, prepare
from tsqp_core.transport import PeerDead, PeerTimeout, TransportError

from conftest import compose

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsqp_core", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, **kw)


@pytest.mark.parametrize("overrides,error,words", [
    (["transport.name=nope"], PluginError, ["unknown transport 'nope'", "inproc", "tcp"]),
    (["executor.name=nope"], PluginError, ["unknown executor", "unfused"]),
    (["partition.name=nope"], PluginError, ["unknown partition", "seed"]),
    (["+transport.options.typo=1"], PluginError, ["typo", "valid options"]),
    (["partition=custom", "partition.options.gpu=[embed,warp_drive]"], PluginError,
     ["warp_drive", "qkv_proj"]),
    (["model.path=/does/not/exist"], ModelError, ["does not exist"]),
    (["prompt=hello"], InputError, ["no tokenizer"]),
    (["workload.prompt_tokens=4090", "workload=generate", "workload.new_tokens=16"], InputError,
     ["exceeds the model's context of 4096"]),
    (["model.tokenizer=llama3", "prompt=hello world"], InputError,
     ["outside the model's vocabulary of 512", "do not match"]),
    (["server.address=tcp://127.0.0.1:99999"], ConfigError,
     ["server.address", "port '99999' is not a TCP port"]),
    (["server.address=tcp://127.0.0.1"], ConfigError, ["needs HOST:PORT"]),
    (["server.address=http://127.0.0.1:80"], ConfigError, ["use tcp://HOST:PORT"]),
    (["transport=shm", "server.address=tcp://127.0.0.1:5"], ConfigError, ["shm://NAME"]),
])
def test_bad_input_is_rejected_before_anything_starts(overrides, error, words):
    with pytest.raises(error) as exc:
        prepare(compose("model=tiny", *overrides))
    for w in words:
        assert w in str(exc.value)


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="workload.batch"):
        compose("model=tiny", "workload.batch=0")
    with pytest.raises(ConfigError, match="dtype"):
        compose("model=tiny", "dtype=int3")


def test_not_a_llama_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="'gpt2' model; tsqp runs LLaMA-family"):
        prepare(compose("model=tiny", f"model.path={tmp_path}"))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        prepare(compose("model=tiny", f"model.path={tmp_path}"))


def test_cli_errors_are_one_clear_line():
    res = cli("run", "model=tiny", "transport.name=nope")
    assert res.returncode == 2
    assert "tsqp: error: unknown transport 'nope'; choose one of:" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli("run", "model=tiny", "transport=nope")  # Hydra lists the group's options
    assert res.returncode != 0 and "Available options" in res.stderr and "tcp" in res.stderr


def test_no_server_at_the_address_fails_within_the_connect_timeout():
    """Not the 300 s startup timeout, and the message says what the client saw."""
    t0 = time.monotonic()
    res = cli("run", "model=tiny", "server.address=tcp://127.0.0.1:9",
              "transport.options.connect_timeout_s=1.5")
    assert res.returncode == 1
    assert "cannot reach tcp://127.0.0.1:9: connection refused or unreachable" in res.stderr
    assert "connect_timeout_s=1.5" in res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60


def test_cli_refuses_what_cannot_work_in_one_line():
    """A non-UTF-8 argument (before Hydra's parser sees it), serve on a transport nobody can
    reach, a port out of range."""
    for args, words in [
        (["run", "model=tiny", b"prompt=caf\xe9".decode("utf-8", "surrogateescape")],
         ["prompt: not valid UTF-8 (byte 0xe9 at character 10)"]),
        (["serve", "model=tiny", "transport=inproc"], ["serves only clients in its own process"]),
        (["serve", "model=tiny", "transport.options.bind=tcp://127.0.0.1:99999"],
         ["port '99999' is not a TCP port"]),
    ]:
        res = cli(*args)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        for w in words:
            assert w in res.stderr, res.stderr


def test_an_ipc_socket_file_is_removed_after_a_clean_stop(tmp_path):
    transport = get_plugins().transports.create("tcp")
    path = tmp_path / "tsqp.sock"
    server = transport.listen(f"ipc://{path}")
    assert path.exists()
    server.close()
    assert not path.exists()


def _spec(model_dir: Path) -> ServerSpec:
    return ServerSpec(transport={"name": "tcp", "options": {}}, address=None,
                      model_dir=str(model_dir), executor={"name": "unfused", "options": {}},
                      dtype="float32", device="cpu", threads=1, max_sessions=2)


def test_server_killed_mid_run_is_reported_and_reaped():
    cfg = compose("model=tiny", "transport=tcp")
    p = prepare(cfg)
    with gpu_side(_spec(p.model_dir), in_process=False, external=None,
                  startup_timeout=120) as side:
        remote = RemoteGpu(p.transport.connect(side.address, side.watchdog), borrowed=False,
                           timeout=60)
        remote.ping()
        pid = int(subprocess.check_output(["pgrep", "-P", str(os.getpid()), "-f", "_child"]).split()[0])
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(PeerDead, match="exited"):
            remote.ping()
        assert time.monotonic() - t0 < 5  # the watchdog, not the 60 s timeout
        remote.channel.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


def test_serve_alone_then_run_against_it(tmp_path):
    serve = subprocess.Popen([sys.executable, "-m", "tsqp_core", "serve", "model=tiny",
                              "threads.gpu=1"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        banner = serve.stdout.readline()
        assert "listening at tcp://127.0.0.1:" in banner
        address = json.loads(serve.stdout.readline())["address"]
        for _ in range(2):  # the server outlives its clients
            res = cli("run", "model=tiny", "workload=prefill", "workload.prompt_tokens=8",
                      f"server.address={address}", f"hydra.run.dir={tmp_path}")
            assert res.returncode == 0, res.stderr
            assert "98 calls/forward" in res.stdout
        assert serve.poll() is None
    finally:
        serve.terminate()
        assert serve.wait(timeout=10) == 0


def test_serve_refuses_a_public_bind():
    res = cli("serve", "model=tiny", "transport.options.bind=tcp://0.0.0.0:0")
    assert res.returncode != 0 and "not a loopback address" in res.stderr

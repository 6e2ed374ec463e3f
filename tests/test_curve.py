"""Who may use a GPU side: CurveZMQ for ``tcp`` (keys, the allow-list, remote binds), a
second local user, and a GPU side on another "host" (a network namespace).

The fast tests run an echo server on a thread; the slow ones run ``serve`` and ``run`` as
processes, as another uid (``setpriv``) or in a network namespace (``ip netns``), and skip
where this machine does not allow that (not root, no ``ip``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import zmq

from tsqp_core import codec
from tsqp_core.bench_transport import EchoServer
from tsqp_core.plugins import get_plugins
from tsqp_core.transport import PeerDead, TransportError

pytest.importorskip("tsqp_transport_tcp")
from tsqp_transport_tcp import curve  # noqa: E402

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")


def keys_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsqp_core", "keys", *args],
                          capture_output=True, text=True, env=ENV, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "curve"
    res = keys_cli(str(d))
    assert res.returncode == 0, res.stderr
    return d


def tcp(**options):
    return get_plugins().transports.create("tcp", options)


@contextmanager
def echo(transport, address=None):
    server = transport.listen(address)
    stop = threading.Event()
    seen = []

    def serve():
        while not stop.is_set():
            frames = server.recv(0.02)
            if frames is not None:
                seen.append(server.peer)
                server.send(EchoServer("codec").handle(frames))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.address, seen
    finally:
        stop.set()
        thread.join(10)
        server.close()


def ping(channel, timeout=10.0):
    frames = codec.encode(codec.Message({"id": 1}, {"x": torch.arange(3)}))
    reply = codec.decode(channel.request(frames, timeout), copy=True)
    assert reply.header["ok"] is True and reply.tensors["x"].tolist() == [0, 1, 2]


# --- keys ------------------------------------------------------------------------------------


def test_the_keys_command_writes_owner_only_secrets_and_prints_none(keys):
    for name in ("server", "client"):
        secret = keys / f"{name}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE((keys / f"{name}.key").stat().st_mode) == 0o644
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    res = keys_cli(str(keys))  # never overwrites
    assert res.returncode == 2 and "already holds a server key" in res.stderr
    res = keys_cli(str(keys), "--client", "second")
    assert res.returncode == 0 and (keys / "authorized" / "second.key").exists()
    for name in ("server", "client", "second"):
        _, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
        assert secret.decode() not in res.stdout + res.stderr
    assert "secret" not in repr(curve.ServerKeys.load(keys)).lower().replace("key_secret", "")


def test_a_secret_key_file_others_can_read_is_refused(keys, tmp_path):
    d = tmp_path / "k"
    shutil.copytree(keys, d)
    os.chmod(d / "server.key_secret", 0o644)
    with pytest.raises(TransportError, match="readable by others: chmod 600"):
        tcp(curve=str(d)).listen()
    with pytest.raises(TransportError, match="no secret key file"):
        tcp(curve=str(tmp_path / "nowhere")).connect("tcp://127.0.0.1:5")


# --- the allow-list ---------------------------------------------------------------------------


def test_an_authorised_client_is_served_and_known_by_its_key(keys):
    with echo(tcp(curve=str(keys))) as (address, seen):
        channel = tcp(curve=str(keys)).connect(address)
        try:
            ping(channel)
        finally:
            channel.close()
    public, _ = zmq.auth.load_certificate(str(keys / "client.key"))
    assert seen[0].key == public.decode()


def test_a_client_without_an_authorised_key_cannot_say_hello(keys, tmp_path):
    stranger = tmp_path / "stranger"
    assert keys_cli(str(stranger)).returncode == 0  # a whole other set: its own client key
    shutil.copy(keys / "server.key", stranger / "server.key")  # it knows the real server
    with echo(tcp(curve=str(keys))) as (address, seen):
        for options, words in [({"curve": str(stranger)}, "did not accept this client's key"),
                               ({}, "handshake failed")]:
            channel = tcp(connect_timeout_s=3, **options).connect(address)
            try:
                with pytest.raises(PeerDead) as exc:  # at once, not after the timeout
                    ping(channel, timeout=30.0)
                assert words in str(exc.value), str(exc.value)
            finally:
                channel.close()
        assert seen == []  # nothing it sent reached the server loop


def test_allow_remote_needs_curve_or_a_loud_insecure_option(keys, capfd):
    with pytest.raises(TransportError, match="allow_remote=true"):
        tcp().listen("tcp://0.0.0.0:0")
    with pytest.raises(TransportError, match="without CurveZMQ"):
        tcp(allow_remote=True).listen("tcp://0.0.0.0:0")
    tcp(allow_remote=True, curve=str(keys)).listen("tcp://0.0.0.0:0").close()
    assert "WARNING" not in capfd.readouterr().err
    tcp(allow_remote=True, insecure_remote_plaintext=True).listen("tcp://0.0.0.0:0").close()
    assert "IN PLAINTEXT WITH NO AUTHENTICATION" in capfd.readouterr().err


# --- a second local user ----------------------------------------------------------------------

AS_NOBODY = """
import sys
from tsqp_core import codec
from tsqp_core.plugins import get_plugins
name, address = sys.argv[1], sys.argv[2]
options = {"curve": sys.argv[3]} if len(sys.argv) > 3 else {}
try:
    channel = get_plugins().transports.create(name, options).connect(address)
    channel.request(codec.encode(codec.Message({"id": 1, "m": "ping"})), 3)
    print("SERVED")
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


def _as_nobody(*args: str) -> str:
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", AS_NOBODY, *args], capture_output=True,
                         text=True, timeout=60, env=dict(ENV, HOME="/tmp"))
    return res.stdout + res.stderr


@pytest.mark.slow
def test_a_second_local_user_cannot_use_the_server(keys, tmp_path):
    """shm checks the peer's uid; tcp with Curve needs a key the other user cannot read
    (nor replace with one of its own). Plain tcp on loopback is open to every local user:
    the README says so."""
    with echo(get_plugins().transports.create("shm")) as (address, _):
        out = _as_nobody("shm", address)
        assert "REFUSED" in out and "SERVED" not in out, out
    with echo(tcp(curve=str(keys))) as (address, seen):
        out = _as_nobody("tcp", address, str(keys))  # the root-owned keys: unreadable
        assert "REFUSED TransportError" in out and "Permission denied" in out, out
        home = Path(tempfile.mkdtemp(prefix="tsqp-other-user-"))  # outside pytest's 0700 dirs
        try:
            os.chmod(home, 0o755)
            theirs = home / "keys"  # the other user makes keys of its own
            assert keys_cli(str(theirs)).returncode == 0
            shutil.copy(keys / "server.key", theirs / "server.key")
            for f in [theirs, *theirs.rglob("*")]:
                shutil.chown(f, 65534, 65534)
            out = _as_nobody("tcp", address, str(theirs))
            assert "REFUSED PeerDead" in out and "did not accept this client's key" in out, out
        finally:
            shutil.rmtree(home)
        assert seen == []


# --- two hosts: the GPU side in another network namespace -----------------------------------


@contextmanager
def netns():
    """A network namespace joined to this one by a veth pair; yields (name, its address)."""
    if os.getuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a second network namespace")
    pid = os.getpid()
    name, here, there = f"tsqp{pid}", f"tsqpa{pid}"[:15], f"tsqpb{pid}"[:15]
    net = f"10.{200 + (pid >> 14) % 50}.{(pid >> 6) % 256}.{(pid % 64) * 4}"
    a, b = net[: net.rfind(".") + 1] + str(int(net.rsplit(".", 1)[1]) + 1), \
        net[: net.rfind(".") + 1] + str(int(net.rsplit(".", 1)[1]) + 2)

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError:
        pytest.skip("this machine does not allow network namespaces")
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", name)
        ip("addr", "add", f"{a}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{b}/30", "dev", there)
        ip("netns", "exec", name, "ip", "link", "set", there, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, b
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.mark.slow
def test_a_gpu_side_on_another_host_over_curve(keys, tmp_path):
    """``serve`` in its own network namespace, bound to its non-loopback address; ``run``
    here reaches it over CurveZMQ. Without Curve the remote bind is refused; a client
    without an authorised key is refused within the connect timeout."""
    with netns() as (ns, address):
        def serve(*args: str) -> subprocess.Popen:
            return subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "tsqp_core", "serve",
                 "model=tiny", "threads.gpu=1", f"transport.options.bind=tcp://{address}:0",
                 "transport.options.allow_remote=true", *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

        bare = serve()
        _, err = bare.communicate(timeout=120)
        assert bare.returncode == 2 and "without CurveZMQ" in err, err
        server = serve(f"transport.options.curve={keys}")
        try:
            line = server.stdout.readline()
            assert f"listening at tcp://{address}:" in line, line + server.stderr.read()
            where = json.loads(server.stdout.readline())["address"]

            def run(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run(
                    [sys.executable, "-m", "tsqp_core", "run", "model=tiny", "threads.tee=1",
                     "workload=generate", "workload.prompt_tokens=8", "workload.new_tokens=4",
                     f"server.address={where}", "transport.options.connect_timeout_s=3",
                     f"hydra.run.dir={tmp_path}", *args],
                    capture_output=True, text=True, env=ENV, timeout=300)

            res = run(f"transport.options.curve={keys}", "reference=true")
            assert res.returncode == 0, res.stderr
            result = json.loads((tmp_path / "results.json").read_text())
            assert result["reference"]["tokens_match"] is True
            res = run()  # no keys: plaintext against a Curve server
            assert res.returncode == 1 and "handshake failed" in res.stderr, res.stderr
            assert server.poll() is None
        finally:
            server.terminate()
            server.communicate(timeout=30)

"""The Hydra applications behind ``run`` and ``serve``, and ``plugins``."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: Errors that are the user's to fix: printed as one clear message, exit code 2.
def _user_errors() -> tuple[type[BaseException], ...]:
    from tsqp_core.config import ConfigError
    from tsqp_core.launch import ServerStartError
    from tsqp_core.models.source import ModelError
    from tsqp_core.plugins import PluginError
    from tsqp_core.run import InputError

    return (ConfigError, PluginError, ModelError, InputError, ServerStartError)


def _runtime_errors() -> tuple[type[BaseException], ...]:
    from tsqp_core.protection import IntegrityError
    from tsqp_core.tee.client import RemoteError
    from tsqp_core.transport import TransportError

    return (RemoteError, TransportError, IntegrityError)


#: Exit codes of ``run``: 0 done; 1 the run failed (GPU side gone, refused, timed out);
#: 2 bad input (fix the command line); 3 the GPU side's reply failed an integrity check;
#: 130 interrupted (Ctrl-C), after the GPU side it started has been stopped.
EXIT_FAILED, EXIT_USAGE, EXIT_INTEGRITY, EXIT_INTERRUPTED = 1, 2, 3, 130
#: ... and 143 terminated (SIGTERM), likewise after stopping the GPU side.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be: the same unwinding stops the GPU side."""


def on_sigterm() -> None:
    """Make SIGTERM end ``run`` as Ctrl-C does (cleanly, one line), not mid-air."""
    import signal

    def _raise(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, _raise)


def interrupted(exc: BaseException) -> tuple[int, str]:
    """Exit code and the one line for a Ctrl-C or a SIGTERM."""
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED, "tsqp: terminated"
    return EXIT_INTERRUPTED, "tsqp: interrupted"


def check_args(args: list[str], prog: str) -> str | None:
    """A reason to refuse the command line before Hydra parses it: an argument that is not
    valid UTF-8 (the shell handed us bytes; Python keeps them as surrogates)."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = arg[exc.start].encode("utf-8", "surrogateescape")
            key = arg.split("=", 1)[0] if "=" in arg else f"argument {args.index(arg) + 1}"
            return (f"{prog}: error: {key}: not valid UTF-8 (byte 0x{bad.hex()} at character "
                    f"{exc.start}); pass text in UTF-8")
    return None


def _exit_code(exc: BaseException) -> tuple[int, str]:
    from tsqp_core.protection import IntegrityError

    if isinstance(exc, _user_errors()):
        return EXIT_USAGE, "error"
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY, "integrity check failed, run aborted"
    return EXIT_FAILED, "run failed"


def run_app(args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    status = {"code": 0}

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        from tsqp_core.config import parse
        from tsqp_core.run import run, summary

        try:
            config = parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            result = run(config, Path(HydraConfig.get().runtime.output_dir))
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            # the GPU side was stopped on the way out (connect's context managers)
            if HydraConfig.get().mode.name == "MULTIRUN":
                raise  # the sweep ends; main() prints the one line
            status["code"], line = interrupted(exc)
            print(line, file=sys.stderr)
            return
        except (*_user_errors(), *_runtime_errors()) as exc:
            code, what = _exit_code(exc)
            print(f"tsqp: {what}: {exc}", file=sys.stderr)
            status["code"] = code
            if HydraConfig.get().mode.name == "MULTIRUN":
                raise  # the sweep must see the job fail
            return
        print(summary(result))

    refused = check_args(args, "tsqp")
    if refused:
        print(refused, file=sys.stderr)
        return EXIT_USAGE
    on_sigterm()
    saved = sys.argv
    sys.argv = ["python -m tsqp_core run", *launcher_defaults(args)]
    try:
        _run()
    finally:
        sys.argv = saved
    return status["code"]


def launcher_defaults(args: list[str]) -> list[str]:
    """tsqp's default for the joblib launcher is one job at a time (the plugin's is one per
    CPU): jobs are timings, and each already runs threads.tee + threads.gpu threads; side by
    side they share cores and measure each other. ``hydra.launcher.n_jobs=N`` still wins."""
    if "hydra/launcher=joblib" in args and not any(
            a.lstrip("+").startswith("hydra.launcher.n_jobs=") for a in args):
        return [*args, "hydra.launcher.n_jobs=1"]
    return args


def serve_app(args: list[str]) -> int:
    """``serve``: compose the same config, then run only the GPU side, in this process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tsqp_core.config import parse
    from tsqp_core.launch import ServerSpec, build_server
    from tsqp_core.models.source import resolve
    from tsqp_core.gpu.server import serve_forever

    from hydra.errors import HydraException

    from tsqp_core.transport import TransportError

    refused = check_args(args, "tsqp serve")
    if refused:
        print(refused, file=sys.stderr)
        return EXIT_USAGE
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=args)
        config = parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        import torch

        from tsqp_core.plugins import get_plugins

        if get_plugins().transports.get(config.transport.name).in_process:
            raise TransportError(f"transport {config.transport.name} serves only clients in "
                                 "its own process: nobody could reach this server; use tcp "
                                 "or shm")
        torch.set_num_threads(config.threads.gpu)
        spec = ServerSpec(transport=config.transport.model_dump(), address=config.server.address,
                          model_dir=str(resolve(config.model)), executor=config.executor.model_dump(),
                          dtype=config.dtype, device=config.device, threads=config.threads.gpu,
                          max_sessions=config.server.max_sessions,
                          max_clients=config.server.max_clients, idle_s=config.server.idle_s)
        server, channel = build_server(spec)
    except (*_user_errors(), HydraException, TransportError) as exc:
        print(f"tsqp serve: error: {exc}", file=sys.stderr)
        return 2

    def ready(address: str) -> None:
        print(f"tsqp serve: {config.model.name} ({config.dtype}, executor {config.executor.name}) "
              f"on {server.device}, listening at {address}", flush=True)
        print(json.dumps({"address": address}), flush=True)

    signum = serve_forever(server, channel, ready)
    if signum == signal.SIGINT:
        print("tsqp serve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def list_plugins() -> int:
    from tsqp_core.plugins import get_plugins

    rows = [(e.family, e.name, e.package, e.version) for e in get_plugins().all_entries()]
    widths = [max(len(r[i]) for r in rows + [("family", "name", "package", "version")])
              for i in range(4)]
    for row in [("family", "name", "package", "version"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0

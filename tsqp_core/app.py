"""The Hydra applications behind ``run`` and ``serve``, and ``plugins``."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tsqp_core.configs import CONF_DIR

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


#: Exit codes of ``run`` (README, "Exit codes"):
#:
#: * 0 -- done (with ``reference=true``: logits and greedy tokens agree with transformers);
#: * 1 -- the run failed: GPU side gone, refused, timed out;
#: * 2 -- bad input: fix the command line (nothing was started);
#: * 3 -- a reply from the GPU side failed an integrity check: the run was aborted;
#: * 4 -- the reference check failed: max |dlogit| beyond ``reference_tolerance`` for the
#:   dtype, or other greedy tokens than transformers; results.json was written all the same;
#: * 130 -- interrupted (Ctrl-C), 143 -- terminated (SIGTERM): one line, after the GPU side
#:   the run started has been stopped.
#:
#: A sweep (``-m``) runs every job, writes its summary (failed jobs listed) and exits with
#: its failed jobs' code when they agree, else 1.
EXIT_FAILED, EXIT_USAGE, EXIT_INTEGRITY, EXIT_REFERENCE = 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


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

    from tsqp_core import callbacks
    from tsqp_core.configs import install, normalize_overrides

    install()
    status = {"code": 0}

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        """One job. In a sweep a failed job does not stop the others: it says why on stderr
        and in ``failed.json`` in its directory, and the sweep summary lists it."""
        import traceback

        from tsqp_core.config import parse
        from tsqp_core.report import write_failure
        from tsqp_core.run import reference_failure, run, summary

        outdir = Path(HydraConfig.get().runtime.output_dir)
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        try:
            config = parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            result = run(config, outdir)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            # the GPU side was stopped on the way out (connect's context managers)
            if multirun:
                raise  # the sweep ends; main() prints the one line
            status["code"], line = interrupted(exc)
            print(line, file=sys.stderr)
            return
        except (*_user_errors(), *_runtime_errors()) as exc:
            code, what = _exit_code(exc)
            message = f"{what}: {exc}"
        except Exception as exc:  # a bug: a single run shows the traceback as it is
            if not multirun:
                raise
            traceback.print_exc()
            code, message = EXIT_FAILED, f"run failed: {type(exc).__name__}: {exc}"
        else:
            print(summary(result))
            failure = reference_failure(result)
            if failure is None:
                return
            code, message = EXIT_REFERENCE, f"{failure}; results in {outdir / 'results.json'}"
        print(f"tsqp: {message}", file=sys.stderr)
        status["code"] = code
        if multirun:
            write_failure(outdir, code, message)

    refused = check_args(args, "tsqp")
    if refused:
        print(refused, file=sys.stderr)
        return EXIT_USAGE
    on_sigterm()
    saved = sys.argv
    sys.argv = ["python -m tsqp_core run", *launcher_defaults(normalize_overrides(args))]
    callbacks.last_sweep = None
    try:
        _run()
    finally:
        sys.argv = saved
    if callbacks.last_sweep is not None:  # a sweep: its jobs may have run elsewhere
        return callbacks.last_sweep.exit_code
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
    from omegaconf import OmegaConf

    from tsqp_core.config import parse
    from tsqp_core.configs import compose
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
        cfg = compose(args)
        config = parse(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        import torch

        from tsqp_core.plugins import get_plugins

        if get_plugins().transports.get(config.transport.name).in_process:
            raise TransportError(f"transport {config.transport.name} serves only clients in "
                                 "its own process: nobody could reach this server; use tcp "
                                 "or shm")
        torch.set_num_threads(config.threads.gpu)
        # machine-dependent transport options (shm's spin) settled as a run would settle them
        from tsqp_core.run.prepare import thread_budget

        transport = get_plugins().transports.create(config.transport.name,
                                                    config.transport.options)
        transport.fit(thread_budget(config.threads.tee, config.threads.gpu))
        spec = ServerSpec(transport={"name": config.transport.name,
                                     "options": transport.options.model_dump()},
                          address=config.server.address,
                          model_dir=str(resolve(config.model)), executor=config.executor.model_dump(),
                          dtype=config.dtype, device=config.device, threads=config.threads.gpu,
                          max_sessions=config.server.max_sessions,
                          max_clients=config.server.max_clients, idle_s=config.server.idle_s,
                          pin_memory=config.server.pin_memory)
        server, channel = build_server(spec)
    except (*_user_errors(), HydraException, TransportError) as exc:
        print(f"tsqp serve: error: {exc}", file=sys.stderr)
        return 2

    def ready(address: str) -> None:
        print(f"tsqp serve: {config.model.path or config.model.name} ({config.dtype}, "
              f"executor {config.executor.name}) on {server.device}, listening at {address}",
              flush=True)
        print(json.dumps({"address": address}), flush=True)

    signum = serve_forever(server, channel, ready)
    if signum == signal.SIGINT:
        print("tsqp serve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def list_plugins() -> int:
    """``plugins``: every installed implementation, where it comes from, and its options with
    their defaults (what ``GROUP=NAME`` starts from; ``GROUP.options.KEY=VALUE`` changes one)."""
    from tsqp_core.plugins import get_plugins

    plugins = get_plugins()
    head = ("family", "name", "package", "version", "options (defaults)")
    rows = [(e.family, e.name, e.package, e.version, _options_text(e))
            for e in plugins.all_entries()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for row in [head, *rows]:
        print("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[4]]).rstrip())
    for name, package, error in plugins.broken:
        print(f"broken: {name} from {package}: {error}")
    return 0


def _options_text(entry) -> str:
    from tsqp_core.configs import effective_options

    defaults = effective_options(entry.family, entry.name, entry.cls)
    fields = [*entry.cls.Options.model_fields, *(k for k in defaults
                                                  if k not in entry.cls.Options.model_fields)]
    parts = [f"{k}={json.dumps(defaults[k], separators=(',', ':'))}" if k in defaults
             else f"{k}=<required>" for k in fields]
    return " ".join(parts) or "-"

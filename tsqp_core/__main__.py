"""Command line: ``python -m tsqp_core {run,serve,bench,attack,plugins,report,contract,new-plugin}``.

``run`` and ``serve`` take Hydra overrides (``transport=shm executor=fused``, ``-m`` for sweeps,
``--help`` for the config groups)."""

from __future__ import annotations

import os

# Two torch processes share the cores: idle OpenMP threads must sleep, not spin. This has to
# happen before torch is imported anywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch's CPU allocator asks for transparent huge pages for buffers of 2 MB and more: a fresh
# 262 MB buffer (the 1B shape's logits at 1024 tokens) then takes 131 page faults to fill, not
# 64000 (a copy into it: 22 against 58 ms here). Set for both processes and the monolithic
# reference alike; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import sys  # noqa: E402


def _signals_unblocked() -> None:
    """Take SIGINT and SIGTERM out of the inherited signal mask. A parent that starts us from
    a thread with them blocked (seen: runs started from a test runner's worker threads) would
    otherwise leave Ctrl-C and SIGTERM pending forever, and the run going."""
    import signal

    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr: a run (or a GPU side)
    that seems stuck says where it is, and goes on."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)

USAGE = """usage: python -m tsqp_core COMMAND [ARGS]

commands:
  run [OVERRIDES]     split inference, as configured by Hydra overrides, e.g.
                      run stage=stage0 model=tiny workload=prefill reference=true
                      (run --help lists the config groups; -m sweeps)
  serve [OVERRIDES]   run the GPU side alone (binds loopback unless transport.options
                      says otherwise); point a run at it with server.address=ADDRESS
  bench WHAT [ARGS]   benchmarks; WHAT is one of: transport (bench WHAT --help)
  attack [--mutant NAME] [OVERRIDES]
                      record a run's GPU side in process, attack it with the public
                      weights against a blind baseline, check the masks (exit 1 if a
                      check fails); --mutant runs a deliberately broken scheme
  keys DIR            make CurveZMQ key files for transport=tcp (server, client,
                      authorized/): then transport.options.curve=DIR on both hosts
  fuzz [ARGS]         a structure-aware, seeded fuzz campaign against the GPU side:
                      messages sent, crashes, hangs, memory growth (fuzz --help)
  soak [ARGS]         100,000+ calls through each transport: memory and file
                      descriptors of both sides (soak --help)
  plugins             list installed plugins: family, name, package, version, and
                      their options with defaults
  report DIR          rebuild summary.csv, summary.md and breakdown.png in DIR from the
                      results.json files under it (a sweep writes them itself)
  contract FAMILY NAME [PYTEST ARGS]
                      run FAMILY's contract suite against the installed plugin NAME
                      (needs pip install 'tsqp-core[test]')
  new-plugin KIND NAME [--dir DIR]
                      write a working plugin package to start from: entry point, config
                      file, options model and its contract tests
"""

#: ``bench`` subcommands: name -> module with ``main(argv) -> int``.
BENCHES = {"transport": "tsqp_core.bench_transport"}
#: Commands that are a module with ``main(argv) -> int``.
TOOLS = {"fuzz": "tsqp_core.fuzz", "soak": "tsqp_core.soak"}


def main(argv: list[str] | None = None) -> int:
    """Run a command; Ctrl-C anywhere ends it with one line and exit code 130 (a SIGTERM
    during ``run``: 143)."""
    _signals_unblocked()
    _stacks_on_sigusr1()
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt as exc:
        from tsqp_core.app import interrupted

        code, line = interrupted(exc)
        print(line, file=sys.stderr)
        return code


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from tsqp_core.app import run_app

        return run_app(rest)
    if command == "serve":
        from tsqp_core.app import serve_app

        return serve_app(rest)
    if command == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: python -m tsqp_core bench {{{','.join(BENCHES)}}} [ARGS]",
                  file=sys.stderr)
            return 2
        import importlib

        return importlib.import_module(BENCHES[rest[0]]).main(rest[1:])
    if command == "attack":
        from tsqp_core.attack.command import main as attack_main

        return attack_main(rest)
    if command == "keys":
        try:
            from tsqp_transport_tcp.curve import main as keys_main
        except ImportError:
            print("tsqp: error: keys needs the tcp transport (pip install -e plugins/"
                  "transport_tcp)", file=sys.stderr)
            return 2
        return keys_main(rest)
    if command in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[command]).main(rest)
    if command == "plugins":
        from tsqp_core.app import list_plugins

        return list_plugins()
    if command == "report":
        from tsqp_core.report import main as report_main

        return report_main(rest)
    if command == "contract":
        from tsqp_core.testing import main as contract_main

        return contract_main(rest)
    if command == "new-plugin":
        from tsqp_core.template import main as template_main

        return template_main(rest)
    if command == "_child":
        from tsqp_core.launch import child_main

        return child_main(rest[0])
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

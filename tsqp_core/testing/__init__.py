"""The contract suites a plugin must pass, shipped with the core so that a plugin author
needs no clone of the repository (``pip install 'tsqp-core[test]'`` brings pytest).

* :mod:`~tsqp_core.testing.transport_contract` -- every transport: round trips of every
  dtype and shape, malformed messages, a message too large, timeouts, peer death, restarts,
  ``kill -9`` of either side;
* :mod:`~tsqp_core.testing.parity` -- every executor, partition and TEE-op library: the
  split model agrees with transformers on the same weights (fp32 and bf16, prefill, greedy
  decode, chunked prefill) and with the ``unfused`` executor, the oracle;
* :mod:`~tsqp_core.testing.protection_contract` -- every protection scheme on every
  partition: the unprotected logits within its tolerance (or a refusal naming the ops), an
  exposure report true of what crossed, fresh randomness per call.

One command runs a suite against one installed plugin::

    python -m tsqp_core contract transport unix     # FAMILY NAME [extra pytest arguments]

It runs pytest on the suite's module with ``TSQP_<FAMILY>_NAMES=NAME`` set; without that
variable a suite runs against every registered implementation of its family (what the
repository's own tests do: ``tests/test_transport_contract.py`` imports the suite). A
plugin package can wire the same suite into its own tests with two lines (the template
``python -m tsqp_core new-plugin`` writes them)::

    os.environ.setdefault("TSQP_TRANSPORT_NAMES", "unix")
    from tsqp_core.testing.transport_contract import *  # noqa: F401,F403
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Family -> the suite module that holds it to its contract.
SUITES = {
    "transport": "transport_contract",
    "executor": "parity",
    "partition": "parity",
    "tee_ops": "parity",
    "protection": "protection_contract",
}


def env_var(family: str) -> str:
    """``TSQP_TRANSPORT_NAMES`` and so on: the implementations a suite runs against."""
    return f"TSQP_{family.upper()}_NAMES"


def names(family: str, default: list[str] | None = None) -> list[str]:
    """The implementations of ``family`` a suite runs against: those named in
    :func:`env_var`, else ``default``, else every registered one."""
    from tsqp_core.plugins import get_plugins

    chosen = os.environ.get(env_var(family), "").strip()
    if chosen:
        return [n.strip() for n in chosen.split(",") if n.strip()]
    if default is not None:
        return default
    return get_plugins().registry(family).names()


def compose(*overrides: str) -> Any:
    """The validated :class:`~tsqp_core.config.RunConfig` that ``python -m tsqp_core run
    OVERRIDES`` would use."""
    from omegaconf import OmegaConf

    from tsqp_core.config import parse
    from tsqp_core.configs import compose as hydra_compose

    return parse(OmegaConf.to_container(hydra_compose(overrides), resolve=True))  # type: ignore[arg-type]


def run_config(outdir: Path, *overrides: str) -> dict[str, Any]:
    """Run ``OVERRIDES`` in this process; returns results.json as a dict."""
    from tsqp_core.run import run

    return run(compose(*overrides), outdir)


def suite_path(family: str) -> Path:
    """The file of the suite that checks ``family``."""
    try:
        module = SUITES[family]
    except KeyError:
        raise ValueError(f"no contract suite for {family!r}; families: "
                         f"{', '.join(SUITES)}") from None
    return Path(__file__).resolve().parent / f"{module}.py"


def main(argv: list[str]) -> int:
    """``python -m tsqp_core contract FAMILY NAME [PYTEST ARGS...]``."""
    import importlib.util
    import sys

    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m tsqp_core contract FAMILY NAME [PYTEST ARGS...]\n\n"
              "Run the contract suite of FAMILY against the installed implementation NAME.\n"
              f"families: {', '.join(SUITES)}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    family, name, extra = argv[0], argv[1], argv[2:]
    if family not in SUITES:
        print(f"tsqp contract: unknown family {family!r}; choose one of: "
              f"{', '.join(SUITES)}", file=sys.stderr)
        return 2
    missing = [m for m in ("pytest", "pytest_timeout") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"tsqp contract: needs {', '.join(missing)}: pip install 'tsqp-core[test]'",
              file=sys.stderr)
        return 2
    from tsqp_core.plugins import PluginError, get_plugins

    try:
        get_plugins().registry(family).get(name)
    except PluginError as exc:
        print(f"tsqp contract: {exc}", file=sys.stderr)
        return 2
    import pytest

    os.environ[env_var(family)] = name
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ini = Path(__file__).resolve().parent / "pytest.ini"
    return int(pytest.main(["-c", str(ini), "-p", "no:cacheprovider", "-q",
                            str(suite_path(family)), *extra]))


_SHM_NAME_PID = r"(?:sem\.)?tsqp-(\d+)-"


def shm_names() -> set[str]:
    """tsqp's names in /dev/shm, except those of *another live* process: a server elsewhere
    on this machine (another test run) names semaphores for the millisecond of each
    handshake. A name whose process is dead, or is this one, always counts: that is a
    leftover."""
    import re

    try:
        entries = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    out = set()
    for name in entries:
        if not name.startswith(("tsqp", "sem.tsqp")):
            continue
        m = re.match(_SHM_NAME_PID, name)
        if m and int(m.group(1)) != os.getpid():
            try:
                os.kill(int(m.group(1)), 0)
                continue  # alive, and not us
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        out.add(name)
    return out

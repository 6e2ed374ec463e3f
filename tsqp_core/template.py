"""``python -m tsqp_core new-plugin KIND NAME``: write a working plugin package to start from.

The package has everything a plugin needs and nothing else: its implementation with an
``Options`` model, the ``tsqp_register_*`` hook and the entry point that finds it, its config
group file (``conf/KIND/NAME.yaml``, package data, so ``KIND=NAME`` selects it once
installed) and its contract suite wired in ``tests/``. The files come from the templates in
``tsqp_core/template/``; each kind's implementation is small and works as generated (a Unix
socket transport, an executor on the reference ops, the seed's partition with an option, the
reference TEE ops, a plaintext scheme that rejects non-finite replies).
"""

from __future__ import annotations

import argparse
import re
import string
import sys
from pathlib import Path

from tsqp_core.testing import SUITES, env_var

TEMPLATES = Path(__file__).resolve().parent / "template"
KINDS = tuple(SUITES)
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
#: Kind -> (base class, where it lives, the register hook).
BASES = {
    "transport": ("Transport", "tsqp_core.transport", "tsqp_register_transports"),
    "executor": ("Executor", "tsqp_core.executor", "tsqp_register_executors"),
    "partition": ("Partition", "tsqp_core.partition", "tsqp_register_partitions"),
    "tee_ops": ("TeeOps", "tsqp_core.tee_ops", "tsqp_register_tee_ops"),
    "protection": ("Protection", "tsqp_core.protection.base", "tsqp_register_protections"),
}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def names_for(kind: str, name: str) -> dict[str, str]:
    """Every name the templates use for plugin ``name`` of family ``kind``."""
    cls = _camel(name) + _camel(kind)
    package = f"tsqp_{kind}_{name}"
    return {"kind": kind, "name": name, "package": package, "dist": package.replace("_", "-"),
            "cls": cls, "base": BASES[kind][0], "hook": BASES[kind][2],
            "options_class": f"{cls}Options", "server_class": f"{cls}Server",
            "client_class": f"{cls}Client", "backend_class": f"{cls}Backend",
            "env": env_var(kind), "suite": SUITES[kind]}


def render(kind: str, name: str) -> dict[str, str]:
    """Relative path -> contents of the package for plugin ``name`` of family ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if not NAME.fullmatch(name):
        raise ValueError(f"bad name {name!r}: lower case letters, digits and _, starting with "
                         "a letter (it becomes a Python package name)")
    n = names_for(kind, name)

    def fill(template: str) -> str:
        return string.Template((TEMPLATES / template).read_text()).substitute(n)

    pkg = n["package"]
    return {
        "pyproject.toml": fill("pyproject.toml.tmpl"),
        "README.md": fill("README.md.tmpl"),
        f"{pkg}/__init__.py": fill(f"plugin_{kind}.py.tmpl"),
        f"{pkg}/conf/{kind}/{name}.yaml": fill(f"config_{kind}.yaml.tmpl"),
        "tests/test_contract.py": fill("test_contract.py.tmpl"),
    }


def generate(kind: str, name: str, where: Path) -> Path:
    """Write the package into ``where/<distribution name>`` (which must not exist)."""
    files = render(kind, name)
    root = Path(where) / names_for(kind, name)["dist"]
    if root.exists():
        raise FileExistsError(f"{root} exists; choose another --dir or name")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsqp_core new-plugin",
        description="Write a working tsqp plugin package to start from: its implementation "
                    "and Options model, entry point, config group file and contract tests.")
    parser.add_argument("kind", choices=KINDS, help="the plugin family")
    parser.add_argument("name", help="what users select it by: KIND=NAME")
    parser.add_argument("--dir", type=Path, default=Path.cwd(),
                        help="where to create the package directory (default: here)")
    ns = parser.parse_args(argv)
    try:
        root = generate(ns.kind, ns.name, ns.dir)
    except (ValueError, FileExistsError) as exc:
        print(f"tsqp new-plugin: error: {exc}", file=sys.stderr)
        return 2
    n = names_for(ns.kind, ns.name)
    print(f"tsqp new-plugin: wrote {root}\n"
          f"  cd {root} && pip install -e '.[test]'\n"
          f"  python -m tsqp_core plugins\n"
          f"  python -m tsqp_core contract {ns.kind} {ns.name}\n"
          f"  python -m tsqp_core run {ns.kind}={ns.name} model=tiny workload=prefill "
          f"reference=true\n"
          f"(see {root / 'README.md'}; the implementation is {n['package']}/__init__.py)")
    return 0

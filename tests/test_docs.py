"""The README stays true: its commands compose and validate, its sample output is what a run
prints, its exit codes are the app's, its plugin layout is what the template writes; and no
docstring, comment or document cites a file the repository does not have."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

#: Placeholders the README uses in commands, and what stands in for them here.
PLACEHOLDERS = {"N": "50", "PORT": "5555", "ADDRESS": "tcp://127.0.0.1:5555"}


def fenced(lang: str = "") -> list[str]:
    """The contents of the README's fenced blocks opened with ```lang."""
    blocks, current, opened = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if opened is None:
                opened, current = line[3:].strip(), []
            else:
                if opened == lang:
                    blocks.append("\n".join(current) + "\n")
                opened = None
        elif opened is not None:
            current.append(line)
    return blocks


def command_lines(verb: str) -> list[list[str]]:
    """The arguments of every ``python -m tsqp_core VERB ...`` line of the README's bash
    blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(f"python -m tsqp_core {verb}"):
                out.append(shlex.split(line)[4:])
    return out


def first_of_sweep(arg: str) -> str | None:
    """A sweep override reduced to its first value (``stage=glob(*)`` -> ``stage=stage0``);
    ``None`` for what a composition does not take (launcher and Hydra settings)."""
    if arg in ("-m", "--multirun") or arg.startswith(("hydra", "+hydra", "--")):
        return None
    key, _, value = arg.partition("=")
    if value == "glob(*)":
        return f"{key}=stage0"
    if "," in value and not value.startswith(("[", "{")) and not key.startswith("prompt"):
        value = value.split(",")[0]
    return f"{key}={PLACEHOLDERS.get(value, value)}"


#: The plugin the README's plugin section generates: not installed here.
EXAMPLE_PLUGIN = "transport=unix"
RUNS = [args for args in command_lines("run") if "--help" not in args
        and EXAMPLE_PLUGIN not in args]


@pytest.mark.parametrize("args", RUNS, ids=[" ".join(a)[:60] for a in RUNS])
def test_every_run_command_in_the_readme_composes_and_validates(args):
    from conftest import compose

    overrides = [o for o in map(first_of_sweep, args) if o is not None]
    cfg = compose(*overrides)
    from tsqp_core.plugins import get_plugins

    for family in ("transport", "executor", "partition", "protection", "tee_ops"):
        choice = getattr(cfg, family)
        if choice.name in get_plugins().registry(family).names():
            get_plugins().registry(family).options(choice.name, choice.options)


def test_the_readme_sample_output_is_what_a_run_prints(tmp_path):
    """The sample under "A run prints a summary": the same lines, the same words; numbers
    may differ, and ``...`` stands for any text."""
    from conftest import run_config
    from tsqp_core.run import summary

    (sample,) = [b for b in fenced() if b.startswith("tsqp stage0:")]
    command = re.search(r"python -m tsqp_core run (stage=stage0 model=tiny workload=prefill "
                        r"workload\.prompt_tokens=128 reference=true)", README)
    assert command, "the sample's command is quoted in the Using-it block"
    printed = summary(run_config(tmp_path, *command.group(1).split(), "threads.tee=1",
                                 "threads.gpu=1")).splitlines()
    lines = sample.rstrip("\n").splitlines()
    assert len(lines) == len(printed), "\n".join(printed)
    for want, got in zip(lines, printed):
        pattern = re.escape(want).replace(re.escape("..."), ".*")
        pattern = re.sub(r"\d+(?:\\\.\d+)?(?:e-?\d+)?", r"[0-9.e+-]+", pattern)
        assert re.fullmatch(pattern, got), f"README: {want}\nprinted: {got}"


def test_the_readme_exit_codes_are_the_apps():
    from tsqp_core import app

    table = dict(re.findall(r"^\| (\d) \| (.+?) \|$", README, flags=re.M))
    assert table.keys() == {"0", "1", "2", "3", "4"}
    assert (app.EXIT_FAILED, app.EXIT_USAGE, app.EXIT_INTEGRITY, app.EXIT_REFERENCE) == (1, 2, 3, 4)
    assert "reference check failed" in table["4"] and "integrity" in table["3"]


def test_the_readme_plugin_layout_is_what_new_plugin_writes():
    from tsqp_core.template import render

    files = render("transport", "unix")
    block = next(b for b in fenced() if b.startswith("tsqp-transport-unix/"))
    listed = {line.split()[0] for line in block.splitlines()[1:] if line.strip()}
    assert listed == set(files)
    assert "class UnixTransport(Transport):" in files["tsqp_transport_unix/__init__.py"]
    assert 'name = "unix"' in files["tsqp_transport_unix/__init__.py"]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


#: A path-like reference: a repository directory, then a file name with an extension.
REFERENCE = re.compile(r"(?<![\w/.-])((?:tsqp_core|tests|plugins|scripts|docs|conf|tee|gpu|"
                       r"run|models|protection|attack)/[\w./-]+\.(?:py|md|yaml|sh|png|toml|ini))")
#: Documents by name: an upper-case name ending in .md.
DOCUMENT = re.compile(r"\b([A-Z][A-Z0-9_]+\.md)\b")


def test_no_file_cites_a_file_the_repository_does_not_have():
    from tsqp_core.template import render

    tracked = tracked_files()
    files = tracked + list(render("transport", "unix"))  # and what new-plugin writes
    names = {Path(f).name for f in files}
    texts = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml", ".sh", ".tmpl",
                                              ".ini")) or f == "Makefile"]
    missing = []
    for f in texts:
        text = (REPO / f).read_text(errors="replace")
        for ref in REFERENCE.findall(text):
            if re.search(r"\b[A-Z]{2,}\b", ref):  # placeholders: conf/KIND/NAME.yaml
                continue
            if not any(t == ref or t.endswith("/" + ref) for t in files):
                missing.append(f"{f}: {ref}")
        for doc in DOCUMENT.findall(text):
            if doc not in names:
                missing.append(f"{f}: {doc}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(sorted(set(missing)))

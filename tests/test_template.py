"""The plugin author's kit: ``new-plugin`` writes a working package for every family, and the
contract suites run against a named plugin with one command.

Here the generated packages are made importable the cheap way (a ``*.dist-info`` with their
entry point beside a link to the package, on ``PYTHONPATH``: what ``pip install`` leaves,
less the copy); ``test_packaging.py`` builds one as a wheel and installs it for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tsqp_core.template import KINDS, generate, names_for, render

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")


def fake_install(package_root: Path, site: Path) -> None:
    """What ``pip install`` leaves that matters to discovery: the package, importable, and
    its distribution's metadata with the ``tsqp`` entry point."""
    toml = (package_root / "pyproject.toml").read_text()
    dist = package_root.name
    module = dist.replace("-", "_")
    assert f'{module} = "{module}"' in toml  # the entry point the template declares
    site.mkdir(parents=True, exist_ok=True)
    (site / module).symlink_to(package_root / module)
    info = site / f"{module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[tsqp]\n{module} = {module}\n")


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory) -> Path:
    """One generated plugin of every family, named ``demo``, importable from the returned
    directory."""
    root = tmp_path_factory.mktemp("plugins")
    site = tmp_path_factory.mktemp("site")
    for kind in KINDS:
        fake_install(generate(kind, "demo", root), site)
    return site


def cli(site: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(ENV, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "tsqp_core", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("kind", KINDS)
def test_the_template_writes_a_complete_package(kind, tmp_path):
    n = names_for(kind, "my_thing")
    files = render(kind, "my_thing")
    pkg = n["package"]
    assert set(files) == {"pyproject.toml", "README.md", f"{pkg}/__init__.py",
                          f"{pkg}/conf/{kind}/my_thing.yaml", "tests/test_contract.py"}
    config = yaml.safe_load(files[f"{pkg}/conf/{kind}/my_thing.yaml"])
    assert config["name"] == "my_thing" and isinstance(config["options"], dict)
    code = files[f"{pkg}/__init__.py"]
    compile(code, f"{pkg}/__init__.py", "exec")
    assert f"class {n['options_class']}(PluginOptions)" in code and "@hookimpl" in code
    assert f"def {n['hook']}(register)" in code
    assert f'[project.entry-points.tsqp]\n{pkg} = "{pkg}"' in files["pyproject.toml"]
    assert f"from tsqp_core.testing.{n['suite']} import *" in files["tests/test_contract.py"]
    assert f"python -m tsqp_core contract {kind} my_thing" in files["README.md"]


def test_new_plugin_refuses_bad_names_and_existing_directories(tmp_path):
    from tsqp_core.template import main

    assert main(["transport", "Not-A-Name", "--dir", str(tmp_path)]) == 2
    assert main(["transport", "pigeon", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "tsqp-transport-pigeon" / "tsqp_transport_pigeon" / "__init__.py").is_file()
    assert main(["transport", "pigeon", "--dir", str(tmp_path)]) == 2


def test_generated_plugins_show_in_plugins_with_their_options(demo_site):
    out = cli(demo_site, "plugins")
    assert out.returncode == 0, out.stderr
    rows = {tuple(r.split()[:2]): r.split() for r in out.stdout.splitlines()[1:]}
    assert rows["transport", "demo"][2:] == ["tsqp-transport-demo", "0.1.0", "path=null",
                                             "max_message_bytes=4294967296"]
    assert rows["executor", "demo"][4:] == ["check_finite=false"]
    assert rows["partition", "demo"][4:] == ["lm_head_on_gpu=true"]
    assert rows["tee_ops", "demo"][4:] == ["check_finite=false"]
    assert rows["protection", "demo"][4:] == ["reject_non_finite=true"]


def test_generated_plugins_are_selected_by_group_name_and_match_transformers(demo_site, tmp_path):
    out = cli(demo_site, "run", "model=tiny", "transport=demo", "executor=demo",
              "partition=demo", "tee_ops=demo", "protection=demo", "partition.options.lm_head_on_gpu=false",
              "workload=generate", "workload.prompt_tokens=12", "workload.new_tokens=3",
              "reference=true", "threads.tee=1", "threads.gpu=1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert {k: res["config"][k] for k in ("transport", "executor", "partition", "tee_ops",
                                           "protection")} == dict.fromkeys(
        ("transport", "executor", "partition", "tee_ops", "protection"), "demo")
    assert res["reference"]["passed"] is True and res["reference"]["tokens_match"] is True
    assert res["rpc"]["calls_per_forward"] == 1 + 6 * 16  # the seed's, less lm_head
    assert "logits" not in {e["value"] for e in res["exposure"]}  # the option took effect


def test_the_contract_command_runs_a_suite_against_one_named_plugin(demo_site):
    out = cli(demo_site, "contract", "transport", "demo", "-k",
              "round_trip_keeps or too_large or malformed or close_is")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and "failed" not in out.stdout
    bad = cli(demo_site, "contract", "transport", "owl")
    assert bad.returncode == 2 and "unknown transport 'owl'" in bad.stderr

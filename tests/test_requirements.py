"""Each command first checks the installed libraries against the bounds the installed package declares
(`requirements.py`): an environment changed after `pip install` gets one line naming what to upgrade."""

from __future__ import annotations

import importlib.metadata
import os
import random

from seedselect_cli import requirements
from seedselect_cli.cli import main
from seedselect_cli.requirements import check_requirements, installed_version, unmet_requirements


def test_unmet_requirements_are_those_below_their_bound_or_missing_and_extras_are_skipped():
    rng = random.Random()
    minor = rng.randint(2, 40)
    requires = [f"transformers>=5.{minor}", "pillow>=10.1", f'pytest>=7.{minor}; extra == "test"', "torch>=2.5",
                "packaging>=20", 'tomli>=1; python_version < "3.0"']
    found = {"transformers": f"5.{minor - 1}.{rng.randint(0, 9)}", "pillow": "10.0.0", "pytest": "1.0",
             "torch": f"2.{rng.randint(5, 30)}.0+cpu"}  # a local build meets its release's bound
    unmet = unmet_requirements(requires, found.get)
    assert [(str(r), version) for r, version in unmet] == [(f"transformers>=5.{minor}", found["transformers"]),
                                                          ("pillow>=10.1", "10.0.0"), ("packaging>=20", None)]
    # a pre-release or nightly of a later version meets the bound, one of an earlier does not
    assert not unmet_requirements(["torch>=2.5"], {"torch": "2.14.0.dev20261201+cu130"}.get)
    assert unmet_requirements(["torch>=2.5"], {"torch": "2.4.0rc1"}.get)


def test_the_installed_package_declares_bounds_that_this_environment_meets():
    """The metadata the check reads is there (CI and the README install the package) and names the libraries whose
    old versions loaded the toy world wrong; this environment, the one the tests pass in, meets every bound."""
    requires = importlib.metadata.requires("seedselect")
    assert requires and {"transformers", "diffusers", "torch"} <= {line.split(">")[0] for line in requires}
    assert installed_version("no-such-distribution-" + os.urandom(4).hex()) is None
    check_requirements()


def test_a_command_in_an_environment_below_the_bounds_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """transformers 5.0 read the toy world's text encoder as random weights and ran the demo to a loss of 0.36
    instead of 0.13 without a word: the command stops before anything loads, and says what to install."""
    real = requirements.installed_version
    old = {"transformers": "5.0.0", "pillow": "10.0.0"}
    monkeypatch.setattr(requirements, "installed_version", lambda name: old.get(name) or real(name))
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "runtime.progress=false", "hydra.run.dir=run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: seedselect needs transformers>=5.18 (found 5.0.0), pillow>=10.1 (found 10.0.0): ")
    assert line.endswith("pip install 'transformers>=5.18' 'pillow>=10.1'"), line
    assert not os.listdir(tmp_path)
    assert main(["--version"]) == 0  # --help and --version still answer

"""kdlib.requirements: what the notebooks' install cell installs after kdlib itself (none on Colab)."""

from __future__ import annotations

import builtins
import re
from importlib import metadata
from pathlib import Path

import pytest

from kdlib import requirements
from kdlib.requirements import _at_least, missing


CASES = [("2.6.0+cu124", "2.6", True), ("2.5.1", "2.6", False), ("4.53.0.dev0", "4.53", False),
         ("4.53.1.dev0", "4.53", True), ("0.19.1rc1", "0.19", True), ("0.19.0rc1", "0.19", False),
         ("1.26.4", "1.24", True), ("2.0", "2.0.0", True), ("1.10.post1", "1.10", True), ("10.0", "9.9", True)]


@pytest.mark.parametrize("installed, minimum, ok", CASES)
def test_version_rule_is_pips_with_and_without_packaging(installed, minimum, ok, monkeypatch):
    assert _at_least(installed, minimum) is ok
    real_import = builtins.__import__

    def no_packaging(name, *args, **kwargs):
        if name.startswith("packaging"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_packaging)
    assert _at_least(installed, minimum) is ok  # the fallback agrees


def test_missing_names_absent_and_too_old_requirements_as_written(monkeypatch):
    reqs = ["torch>=2.6", "numpy>=1.24", "nosuchpkg>=1.0", "other[x]>=2,<3", 'pytest>=7; extra == "test"']
    versions = {"torch": "2.6.0+cu124", "numpy": "1.21.0"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(requirements.metadata, "requires", lambda dist: reqs)
    monkeypatch.setattr(requirements.metadata, "version", version)
    assert missing() == ["numpy>=1.24", "nosuchpkg>=1.0", "other[x]>=2,<3"]  # extras' requirements: not needed


def test_this_environment_has_every_requirement():
    assert missing() == []  # what CI installs: the install cell would install nothing more


def test_the_requirements_are_pyprojects_one_list():
    # What the install cell installs is read from the installed metadata: it must be pyproject's list.
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    listed = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
    assert listed and [spec for _, _, spec in requirements.requirements()] == listed


def test_requirements_txt_points_at_pyproject_and_lists_nothing_itself():
    lines = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if line.strip() and not line.startswith("#")] == ["-e ."]

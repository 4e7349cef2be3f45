"""Fixtures and helpers of the plan tests (test_plan, test_speed).

A test module takes a fixture by importing it from here (``own_folder`` applies to every test of it)."""

from __future__ import annotations

import json

import pytest

from kdlib.cli import main as cli_main


@pytest.fixture(autouse=True)
def own_folder(tmp_path, monkeypatch):
    """Every test in its own working folder, with no peak override from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDLIB_PEAK_TFLOPS", raising=False)
    return tmp_path


@pytest.fixture
def no_gpu(monkeypatch):
    """The plan as on a machine without a GPU (CI): device "auto" estimates for the preset's GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def plan_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli_main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)

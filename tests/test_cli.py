"""kdlib.cli: every command of the design contract is there, runs its body, and --preset has one default."""

from __future__ import annotations

import argparse

from kdlib.cli import DEFAULT_PRESET, build_parser
from kdlib.commands import COMMANDS

CONTRACT = ("grid", "prep", "cache", "train", "sweep", "check", "eval", "report", "storage", "bench", "badges",
            "demo", "plan", "sample")


def subparsers() -> dict:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_is_there_and_runs_its_body():
    parsers = subparsers()
    assert set(CONTRACT) == set(parsers) == set(COMMANDS)
    for name, parser in parsers.items():
        assert parser.get_default("func") is COMMANDS[name]


def test_every_preset_option_has_the_one_default():
    defaults = {name: p.get_default("preset") for name, p in subparsers().items()
                if any("--preset" in a.option_strings for a in p._actions)}
    assert set(defaults) == {"grid", "check", "prep", "cache", "train", "sweep", "plan"}
    assert set(defaults.values()) == {DEFAULT_PRESET}


def test_train_takes_the_contracts_options():
    args = build_parser().parse_args(["train", "--preset", "study", "--exp", "kl", "--seed", "3", "--runs", "r"])
    assert (args.preset, args.exp, args.seed, args.runs) == ("study", "kl", 3, "r")

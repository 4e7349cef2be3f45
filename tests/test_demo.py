"""kdlib.demo: the sensitivity stage's runs (the grid's demo itself runs in CI with --quick)."""

from kdlib import commands, demo
from kdlib.cli import build_parser
from kdlib.config import preset
from kdlib.optim import schedule
from kdlib.plan import sweep_configs
from kdlib.runs import run_name


def _sensitivity_configs():
    return [cfg for exps, axes, _ in demo.SENSITIVITY
            for cfg in sweep_configs(preset("demo"), exps, [0], "online", log=lambda *_: None, sweep=axes)]


def test_the_sensitivity_sweeps_are_distinct_runs_with_their_values_set():
    cfgs = _sensitivity_configs()
    names = [run_name(cfg) for cfg in cfgs]
    assert len(set(names)) == len(names) == 14
    assert {"ce-seed0", "ce@kl-seed0", "kl-seed0", "layerwise-kl+w_feat=5-seed0", "layerwise-js+temperature=4-seed0",
            "layerwise-js+w_div=0.25-seed0", "layerwise-kl-cos+w_cos=0.5-seed0"} <= set(names)
    for cfg in cfgs:
        for key, value in cfg.sweep.items():  # set in the config, and in the loss the run trains with
            assert getattr(cfg.loss, key.split(".")[1]) == value
            assert getattr(cfg.loss_terms, key.split(".")[1]) == value
    tokens = {cfg.exp: schedule(cfg, 114_000).tokens for cfg in cfgs if not cfg.sweep}
    assert tokens["ce@kl"] > 1.5 * tokens["ce"] and tokens["kl"] == tokens["ce"]


def test_demo_sensitivity_runs_the_sensitivity_stage_instead_of_the_grid(monkeypatch):
    called = []
    monkeypatch.setattr(demo, "run_sensitivity", lambda root, quick: called.append(("sensitivity", root, quick)))
    monkeypatch.setattr(demo, "run_demo", lambda root, quick: called.append(("grid", root, quick)))
    for argv in (["demo", "--dir", "d", "--sensitivity", "--quick"], ["demo", "--dir", "d"]):
        assert commands.COMMANDS["demo"](build_parser().parse_args(argv)) == 0
    assert called == [("sensitivity", "d", True), ("grid", "d", False)]

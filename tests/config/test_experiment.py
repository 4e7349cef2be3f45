"""kdlib.config.experiment: one run's config, its experiment named once, JSON save and load."""

from __future__ import annotations

import pytest

from kdlib.config import ExperimentConfig, preset
from kdlib.errors import KdlibError
from kdlib.grid import parse


def test_with_experiment_is_idempotent_and_keeps_overrides():
    cfg = preset("study")
    a = cfg.with_experiment("kl").with_experiment("js").with_experiment("kl")
    assert a == cfg.with_experiment("kl")
    assert a.loss.overrides == cfg.loss.overrides
    assert a.with_experiment("js").loss_terms.label_smoothing == 0.0


def test_with_experiment_canonicalises_the_name():
    assert preset("smoke", "KL-layerwise").exp == "layerwise-kl"


def test_spec_is_parsed_again_when_the_name_or_feature_changes():
    cfg = preset("smoke", "layerwise-kl")
    assert cfg.spec is cfg.spec and cfg.spec.needs_hidden_states
    cfg.loss.feature = "attention"
    assert cfg.spec.needs_attentions and not cfg.spec.needs_hidden_states
    cfg.exp = "kl"
    assert cfg.spec == parse("kl", feature="attention")


def test_a_config_names_its_experiment_once():
    d = preset("study", "layerwise-kl-cos").to_dict()
    assert not {"divergence", "divergence_param", "feature_map", "cosine"} & set(d["loss"])
    assert d["exp"] == "layerwise-kl-cos"


def test_an_older_config_json_with_components_in_loss_loads():
    cfg = preset("study", "last2all-gjsd0.3-cos")
    d = cfg.to_dict()
    d["loss"].update(divergence="gjsd", divergence_param=0.3, feature_map="last2all", cosine=True)
    assert ExperimentConfig.from_dict(d) == cfg
    assert "divergence" in d["loss"]  # the caller's dict is left as it was


def test_components_that_contradict_the_experiment_name_are_refused():
    d = preset("smoke", "kl").to_dict()
    d["loss"]["divergence"] = "js"
    with pytest.raises(KdlibError, match="with_experiment"):
        ExperimentConfig.from_dict(d)


def test_unreadable_config_file_says_which_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"preset": "smoke", ')
    with pytest.raises(KdlibError, match="config.json"):
        ExperimentConfig.load(bad)
    with pytest.raises(KdlibError, match="cannot read"):
        ExperimentConfig.load(tmp_path / "missing.json")

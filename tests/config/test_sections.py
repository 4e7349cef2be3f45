"""kdlib.config.sections: each section's defaults and range checks; LossConfig.resolve."""

from __future__ import annotations

import dataclasses

import pytest

from kdlib.config import DataConfig, ExperimentConfig, LossConfig, TinyGPTConfig, TrainConfig, preset
from kdlib.errors import KdlibError
from kdlib.grid import parse


@pytest.mark.parametrize("patch, fragment", [
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"precision": "fp8"}}, "fp32"),
    ({"loss": {"temperature": 0.0}}, "loss.temperature"),
    ({"loss": {"divergence": "gjsd", "divergence_param": 1.5}}, "divergence_param"),
    ({"model": {"n_head": 5}}, "divisible"),
    ({"model": {"positions": "rotary"}}, "sinusoidal"),
    ({"loss": {"overrides": {"xx": {}}}}, "keys are divergences"),
    ({"loss": {"overrides": {"kl": {"feature": "hidden"}}}}, "it can set"),
    ({"loss": {"overrides": {"kl": {"temperature": -2}}}}, "temperature"),
    ({"exp": "not-a-thing"}, "unknown part"),
    ({"exp": "gjsd1.5"}, r"\[0, 1\]"),
    ({"model": {"block_size": 16}}, "exceeds"),
])
def test_out_of_range_values_are_refused_with_the_field_named(patch, fragment):
    d = preset("smoke").to_dict()
    for key, value in patch.items():
        if isinstance(value, dict):
            d[key].update(value)
        else:
            d[key] = value
    with pytest.raises(KdlibError, match=fragment):
        ExperimentConfig.from_dict(d)


def test_resolve_sets_the_components_from_the_experiment_and_the_values_from_the_loss():
    base = LossConfig(temperature=3.0, w_ce=0.7)
    terms = base.resolve(parse("last2all-gjsd0.3-cos", feature="attention"))
    spec = terms.spec
    assert (spec.divergence, spec.divergence_param, spec.feature_map, spec.feature, spec.cosine) == \
        ("gjsd", 0.3, "last2all", "attention", True)
    assert (terms.temperature, terms.w_ce) == (3.0, 0.7)
    terms.validate()
    ce = base.resolve(parse("ce")).spec
    assert (ce.divergence, ce.divergence_param, ce.feature_map, ce.cosine) == (None, None, None, False)


def test_every_dataclass_field_has_a_default():
    for cls in (TinyGPTConfig, LossConfig, DataConfig, TrainConfig, ExperimentConfig):
        cls()  # constructible with defaults
        assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                   for f in dataclasses.fields(cls))

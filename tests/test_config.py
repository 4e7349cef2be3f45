import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from kdlib.config import (PRESETS, DataConfig, ExperimentConfig, LossConfig, TinyGPTConfig,
                          TrainConfig, preset)
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS, parse

# preset/experiment/feature -> the resolved loss of c6be9a8 (preset(p).with_experiment(e, feature=f).loss.effective())
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "resolved_losses.json").read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips_through_json(name, tmp_path):
    cfg = preset(name, "layerwise-js-cos")
    assert cfg.preset == name and cfg.exp == "layerwise-js-cos"
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = ExperimentConfig.load(path)
    assert again == cfg
    assert isinstance(again.train.betas, tuple)
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_study_preset_has_the_original_study_values():
    cfg = preset("study")
    m = cfg.model
    assert (m.vocab_size, m.n_layer, m.n_head, m.n_embd, m.d_ff) == (50257, 8, 8, 512, 2048)
    assert (m.positions, m.block_size, m.dropout, m.bias, m.tie_embeddings, m.init_std) == \
        ("sinusoidal", 256, 0.2, True, True, 0.02)
    t = cfg.train
    assert (t.lr, t.betas, t.weight_decay, t.batch_size, t.epochs) == (4e-4, (0.9, 0.95), 0.01, 64, 50)
    assert (t.warmup_frac, t.min_lr_ratio, t.grad_clip, t.precision, t.patience) == (0.05, 0.1, 1.0, "fp32", 6)
    assert cfg.seed == 42 and cfg.data.block_size == 128
    kl = cfg.with_experiment("kl").loss_terms
    assert (kl.temperature, kl.w_div, kl.w_ce, kl.label_smoothing) == (2.0, 0.5, 0.5, 0.1)
    js = cfg.with_experiment("last2all-js-cos").loss_terms
    assert (js.w_div, js.w_ce, js.label_smoothing, js.w_cos, js.w_feat) == (0.5, 0.5, 0.0, 0.05, 0.05)
    assert (js.spec.feature, js.layer_map_name) == ("attention", "last2all")
    assert cfg.with_experiment("layerwise-kl").loss_terms.layer_map_name == "study"
    assert cfg.with_experiment("ce").loss_terms.w_ce == 1.0


def test_with_experiment_is_idempotent_and_keeps_overrides():
    cfg = preset("study")
    a = cfg.with_experiment("kl").with_experiment("js").with_experiment("kl")
    assert a == cfg.with_experiment("kl")
    assert a.loss.overrides == cfg.loss.overrides
    assert a.with_experiment("js").loss_terms.label_smoothing == 0.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_setting_an_experiment_forgets_the_one_before(name):
    for a, b in itertools.product(EXPERIMENTS + ("gjsd0.3", "last2all-tvd-cos"), repeat=2):
        again, once = preset(name).with_experiment(a).with_experiment(b), preset(name).with_experiment(b)
        assert again == once and again.loss_terms == once.loss_terms, (a, b)
        assert preset(name, a).with_experiment(b) == preset(name, b), (a, b)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_experiment_resolves_to_the_loss_it_had_before(name):
    rows = {k: v for k, v in BEFORE.items() if k.startswith(name + "/")}
    assert len(rows) == 40
    for key, row in rows.items():
        _, exp, feature = key.split("/")
        cfg = preset(name).with_experiment(exp, feature=feature)
        terms = cfg.loss_terms
        got = {"exp": cfg.exp, "layer_map_name": terms.layer_map_name, **terms.to_dict(),
               **{k: getattr(cfg.spec, k) for k in ("needs_teacher", "needs_hidden_states", "needs_attentions",
                                                    "output_only")}}
        assert got == row, key
        assert terms.spec is cfg.spec  # parsed once


def test_spec_is_parsed_again_when_the_name_or_feature_changes():
    cfg = preset("smoke", "layerwise-kl")
    assert cfg.spec is cfg.spec and cfg.spec.needs_hidden_states
    cfg.loss.feature = "attention"
    assert cfg.spec.needs_attentions and not cfg.spec.needs_hidden_states
    cfg.exp = "kl"
    assert cfg.spec == parse("kl", feature="attention")


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


def test_with_experiment_canonicalises_the_name():
    assert preset("smoke", "KL-layerwise").exp == "layerwise-kl"


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


def test_components_that_contradict_the_experiment_name_are_refused():
    d = preset("smoke", "kl").to_dict()
    d["loss"]["divergence"] = "js"
    with pytest.raises(KdlibError, match="with_experiment"):
        ExperimentConfig.from_dict(d)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["model"].update(n_layr=3), "valid keys"),
    (lambda d: d["model"].update(n_layer="8"), "model.n_layer must be of type int"),
    (lambda d: d["model"].update(n_layer=2.5), "type int"),
    (lambda d: d["model"].update(bias=1), "type bool"),
    (lambda d: d.update(train=[1, 2]), "JSON object"),
    (lambda d: d["loss"].update(cosine=None), "type bool"),
])
def test_strict_loading_names_the_bad_key(mutate, fragment):
    d = preset("smoke").to_dict()
    mutate(d)
    with pytest.raises(KdlibError, match=fragment):
        ExperimentConfig.from_dict(d)


def test_unreadable_config_file_says_which_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"preset": "smoke", ')
    with pytest.raises(KdlibError, match="config.json"):
        ExperimentConfig.load(bad)
    with pytest.raises(KdlibError, match="cannot read"):
        ExperimentConfig.load(tmp_path / "missing.json")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(KdlibError, match="smoke, demo, study, colab-a100, colab-t4"):
        preset("colab")


def test_presets_are_fresh_copies():
    a = preset("study")
    a.train.lr = 1.0
    a.loss.overrides["kl"]["label_smoothing"] = 0.5
    b = preset("study")
    assert b.train.lr == 4e-4 and b.loss.overrides["kl"]["label_smoothing"] == 0.1


def test_int_is_accepted_where_a_float_is_expected():
    d = preset("smoke").to_dict()
    d["train"]["lr"] = 1
    assert ExperimentConfig.from_dict(d).train.lr == 1.0 and isinstance(ExperimentConfig.from_dict(d).train.lr, float)


def test_every_dataclass_field_has_a_default():
    for cls in (TinyGPTConfig, LossConfig, DataConfig, TrainConfig, ExperimentConfig):
        cls()  # constructible with defaults
        assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                   for f in dataclasses.fields(cls))

"""kdlib.config.presets: the five presets, fresh copies, and each experiment's loss under each."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kdlib.config import PRESETS, ExperimentConfig, preset
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS

# preset/experiment/feature -> the resolved loss of c6be9a8 (preset(p).with_experiment(e, feature=f).loss.effective())
BEFORE = json.loads((Path(__file__).parents[1] / "fixtures" / "resolved_losses.json").read_text())


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
        assert got == {**row, "compute_of": None}, key  # compute_of: new since, None for every name before
        assert terms.spec is cfg.spec  # parsed once


def test_unknown_preset_lists_the_presets():
    with pytest.raises(KdlibError, match="smoke, demo, study, colab-a100, colab-t4"):
        preset("colab")


def test_presets_are_fresh_copies():
    a = preset("study")
    a.train.lr = 1.0
    a.loss.overrides["kl"]["label_smoothing"] = 0.5
    b = preset("study")
    assert b.train.lr == 4e-4 and b.loss.overrides["kl"]["label_smoothing"] == 0.1

"""kdlib.compute: the FLOPs model per run and the equal-compute budget of ``ce@EXP``.

The expected FLOPs come from ``helpers.student_flops`` / ``teacher_forward_flops``: parameter
counts of the models themselves with the textbook formulas, not kdlib's own FLOPs code.
"""

from __future__ import annotations

import pytest
from helpers import student_flops, teacher_forward_flops

from kdlib import speed
from kdlib.compute import cache_build_flops, compute_ratio, flops, teacher_dims, train_flops_per_token
from kdlib.config import preset
from kdlib.optim import schedule

TRAIN_TOKENS = 3_000_000  # a training split's size for the epochs budgets (the study's)


@pytest.mark.parametrize("name", ["smoke", "colab-a100", "study"])
def test_ce_at_kl_spends_the_flops_of_kl_within_2_percent(name):
    ce, kl, equal = preset(name, "ce"), preset(name, "kl"), preset(name, "ce@kl")
    f_ce = student_flops(ce)
    f_kl = f_ce + teacher_forward_flops(kl)
    kl_steps, equal_steps = schedule(kl, TRAIN_TOKENS).steps, schedule(equal, TRAIN_TOKENS).steps
    assert schedule(ce, TRAIN_TOKENS).steps == kl_steps  # every other run: the preset's budget
    per_step = schedule(ce, TRAIN_TOKENS).tokens_per_step
    assert schedule(equal, TRAIN_TOKENS).tokens == equal_steps * per_step
    assert equal_steps * f_ce == pytest.approx(kl_steps * f_kl, rel=0.02)
    assert equal_steps == round(kl_steps * f_kl / f_ce)  # whole steps, the nearest
    assert compute_ratio(equal) == pytest.approx(f_kl / f_ce, rel=1e-9)
    assert (compute_ratio(ce), compute_ratio(kl)) == (1.0, 1.0)
    assert train_flops_per_token(equal) == pytest.approx(f_ce, rel=1e-9)
    assert train_flops_per_token(kl) == pytest.approx(f_kl, rel=1e-9)


def test_at_the_study_shapes_the_student_alone_trains_about_1_8x_the_tokens():
    ratio = (student_flops(preset("study")) + teacher_forward_flops(preset("study"))) / student_flops(preset("study"))
    assert 1.75 < ratio < 1.85
    assert schedule(preset("study", "ce@kl"), TRAIN_TOKENS).tokens / schedule(preset("study"), TRAIN_TOKENS).tokens \
        == pytest.approx(ratio, rel=1e-4)


def test_a_step_cap_is_scaled_like_the_token_budget():
    cfg = preset("smoke", "ce@kl")
    cfg.train.max_steps = 7
    f_ce = student_flops(cfg)
    assert schedule(cfg, TRAIN_TOKENS).steps == round(7 * (f_ce + teacher_forward_flops(cfg)) / f_ce)


def test_ce_at_a_feature_experiment_counts_its_projectors():
    """last2all-kl on hidden states also trains one Linear(student width -> teacher width) per student
    block (6 FLOPs per parameter per token): ce@last2all-kl pays for them too."""
    equal = preset("smoke", "ce@last2all-kl")
    equal.loss.feature = "hidden"
    m, r = equal.model, equal.teacher.random_init
    projectors = m.n_layer * (m.n_embd * r["n_embd"] + r["n_embd"])
    f_ce = student_flops(equal)
    assert compute_ratio(equal) == pytest.approx((f_ce + teacher_forward_flops(equal) + 6 * projectors) / f_ce,
                                                 rel=1e-9)
    assert compute_ratio(equal) > compute_ratio(preset("smoke", "ce@kl"))


def test_cached_runs_pay_no_teacher_per_token_and_the_cache_once():
    kl = preset("smoke", "kl")
    kl.train.teacher_source = "cache"
    assert train_flops_per_token(kl) == pytest.approx(student_flops(kl), rel=1e-9)
    block = kl.data.block_size
    windows = (10_000 - 1) // block  # non-overlapping windows with their next token
    assert cache_build_flops(kl, 10_000) == pytest.approx(teacher_forward_flops(kl) * windows * block, rel=1e-9)


def test_speed_still_exports_the_flops_model():
    assert speed.flops is flops and speed.teacher_dims is teacher_dims

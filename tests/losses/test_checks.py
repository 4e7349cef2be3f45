"""kdlib.losses.checks: bad arguments are refused with a message that says what to do.

Each check is reached once per entry point that calls it on its own path
(the named divergences all go through ``divergence``); the chunk-size check is
in test_chunked.py, the cache's and ``output_losses``' own checks in
test_sparse.py and test_fused.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from kdlib import losses as L
from kdlib.errors import KdlibError
from loss_helpers import logits

S5, T5 = logits((2, 3, 5), seed=1), logits((2, 3, 5), seed=2)
LABELS5 = torch.zeros(2, 3, dtype=torch.long)
BAD_TEMPERATURES = [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")]

# Every function that checks a temperature on its own path (the named divergences call
# ``divergence``), called with temperature τ.
TEMPERATURE_ENTRIES = {
    "divergence": lambda tau: L.divergence("kl", S5, T5, tau),
    "sparse_divergence": lambda tau: L.sparse_kl(S5, *L.teacher_top_k(T5, 2), temperature=tau),
    "output_losses": lambda tau: L.output_losses(S5, LABELS5, T5, divergence="js", temperature=tau),
    "teacher_top_k": lambda tau: L.teacher_top_k(T5, 2, tau),
}


def test_kdlib_error_is_a_value_error():
    assert issubclass(KdlibError, ValueError)


def test_unknown_divergence_names_the_choices():
    with pytest.raises(KdlibError, match=r"unknown divergence 'jsd'; choose one of: kl, rkl, js, tvd, gjsd, skl, srkl"):
        L.divergence("jsd", S5, T5)


@pytest.mark.parametrize("entry", TEMPERATURE_ENTRIES)
def test_bad_temperature(entry):
    for bad in BAD_TEMPERATURES:
        with pytest.raises(KdlibError, match=rf"temperature must be finite and > 0, got {re.escape(repr(bad))}"):
            TEMPERATURE_ENTRIES[entry](bad)


def test_temperature_must_be_a_number():
    for bad in ["2.0", True, None, torch.tensor(2.0)]:
        with pytest.raises(KdlibError, match=r"temperature must be a number > 0"):
            L.kl_divergence(S5, T5, bad)


def test_mixing_weight_outside_unit_interval():
    for name in L.PARAMETRIC:
        what = "beta" if name == "gjsd" else "alpha"
        for bad in [-0.1, 1.5, float("nan"), None, "0.5", True]:
            with pytest.raises(KdlibError, match=rf"{name} weight \({what}\) must be a number in \[0, 1\], "
                                                 rf"got {re.escape(repr(bad))}"):
                L.divergence(name, S5, T5, param=bad)
    with pytest.raises(KdlibError, match=re.escape("got 1.5")):
        L.generalized_jsd(S5, T5, beta=1.5)


def test_parameter_for_a_divergence_without_one():
    with pytest.raises(KdlibError, match=r"divergence 'kl' takes no parameter \(got 0.3\).*gjsd, skl, srkl"):
        L.divergence("kl", S5, T5, param=0.3)


@pytest.mark.parametrize("loss", [L.kl_divergence, L.cosine_loss], ids=["divergence", "cosine"])
def test_mask_of_the_wrong_shape(loss):
    for bad in (torch.ones(2, 4, dtype=torch.bool), torch.ones(6, dtype=torch.bool),
                torch.ones(2, 3, 5, dtype=torch.bool)):
        with pytest.raises(KdlibError, match=rf"mask shape {re.escape(str(tuple(bad.shape)))} .*\(2, 3\)"):
            loss(S5, T5, mask=bad)


@pytest.mark.parametrize("loss", [L.kl_divergence, L.cosine_loss], ids=["divergence", "cosine"])
def test_student_and_teacher_shapes_must_match(loss):
    with pytest.raises(KdlibError, match=r"\(2, 3, 5\).*\(2, 3, 6\).*tokenizer"):
        loss(S5, logits((2, 3, 6)))
    with pytest.raises(KdlibError, match=r"\(2, 3, 5\).*\(3, 2, 5\)"):
        loss(S5, logits((3, 2, 5)))


def test_label_smoothing_outside_unit_interval():
    for bad in [-0.1, 1.1, float("nan"), None]:
        with pytest.raises(KdlibError, match=rf"label_smoothing must be a number in \[0, 1\], "
                                             rf"got {re.escape(repr(bad))}"):
            L.cross_entropy(S5, LABELS5, label_smoothing=bad)


def test_cross_entropy_labels_of_the_wrong_shape():
    with pytest.raises(KdlibError, match=r"labels shape \(3, 2\).*\(2, 3\)"):
        L.cross_entropy(S5, torch.zeros(3, 2, dtype=torch.long))


def test_logits_without_a_vocabulary_dimension():
    with pytest.raises(KdlibError, match=r"vocabulary dimension, got shape \(\)"):
        L.kl_divergence(torch.tensor(1.0), torch.tensor(1.0))

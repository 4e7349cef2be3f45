"""kdlib.losses.features: layer maps, hidden-state MSE and attention-map MSE.

The layer maps against tables and their stated properties; the feature losses
by hand (state indices as Hugging Face numbers them, the layer norm, the
projectors, head averaging, masks), by gradcheck in float64, with
inference-mode teacher outputs, and their error messages.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kdlib import losses as L
from kdlib.errors import KdlibError
from loss_helpers import F64, random_mask

# (norm, projected): the layer norm with projectors, and raw states compared directly
FEATURE_PATHS = [("layer", True), ("none", False)]


def feature_path_id(path) -> str:
    norm, projected = path
    return f"{norm}-{'projector' if projected else 'identity'}"


def _t(x):
    return torch.tensor(x, dtype=F64)


# --------------------------------------------------------------------------
# 1. layer maps


def test_layerwise_map():
    table = [(4, 12, [2, 5, 8, 11]),
             (8, 12, [1, 2, 4, 5, 7, 8, 10, 11]),
             (12, 12, list(range(12))),
             (1, 12, [11]),
             (6, 12, [1, 3, 5, 7, 9, 11]),
             (12, 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])]
    for n_student, n_teacher, blocks in table:
        assert L.layer_pairs("layerwise", n_student, n_teacher) == list(enumerate(blocks))


def test_layerwise_map_is_monotone_and_ends_on_both_last_blocks():
    for ls in range(1, 17):
        for lt in range(1, 17):
            pairs = L.layer_pairs("layerwise", ls, lt)
            assert [i for i, _ in pairs] == list(range(ls))
            js = [j for _, j in pairs]
            assert js == sorted(js) and 0 <= js[0] and js[-1] == lt - 1, (ls, lt, pairs)
            assert all(j == math.ceil((i + 1) * lt / ls) - 1 for i, j in pairs)


def test_study_last2last_and_last2all_maps():
    assert L.layer_pairs("study", 8, 12) == list(enumerate([1, 3, 5, 7, 8, 9, 10, 11]))
    assert L.layer_pairs("last2last", 8, 12) == [(7, 11)]
    assert L.layer_pairs("last2last", 1, 1) == [(0, 0)]
    assert L.layer_pairs("last2all", 8, 12) == [(i, 11) for i in range(8)]
    assert L.layer_pairs("last2all", 3, 5) == [(0, 4), (1, 4), (2, 4)]


def test_layer_map_unknown_name():
    with pytest.raises(KdlibError, match=r"unknown layer map 'layer_wise'.*layerwise, last2last, last2all, study"):
        L.layer_pairs("layer_wise", 8, 12)


def test_study_map_rejects_other_shapes():
    for n_student, n_teacher in [(4, 12), (8, 24), (12, 8)]:
        with pytest.raises(KdlibError, match=rf"'study'.*{n_student} -> {n_teacher}.*layerwise"):
            L.layer_pairs("study", n_student, n_teacher)


def test_layer_map_rejects_non_positive_block_counts():
    # checked before the map is chosen: one path for every map
    for n_student, n_teacher, bad in [(0, 12, "n_student.*got 0"), (-1, 12, "n_student.*got -1"),
                                      (8, 0, "n_teacher.*got 0"), (8, -3, "n_teacher.*got -3"),
                                      (2.5, 12, "n_student.*got 2.5"), (True, 12, "n_student.*got True")]:
        with pytest.raises(KdlibError, match=bad):
            L.layer_pairs("layerwise", n_student, n_teacher)
    for name in L.LAYER_MAPS:
        with pytest.raises(KdlibError, match="n_student.*got 0"):
            L.layer_pairs(name, 0, 12)


# --------------------------------------------------------------------------
# 2. hidden_mse and attention_mse by hand


def _states_for_hand_check():
    """Student states [emb, block0, block1], teacher [emb, block0, block1, block2]: [1, 2, 2] each.

    The embeddings and teacher block 0 hold large decoy values, so a pair that
    reads the wrong index gives a very different loss.
    """
    decoy = _t([[[100.0, -100.0], [50.0, 7.0]]])
    hs = [decoy, _t([[[1.0, 2.0], [3.0, 4.0]]]), _t([[[0.0, 0.0], [0.0, 0.0]]])]
    ht = [decoy * 3, decoy * 2, _t([[[1.0, 1.0], [1.0, 1.0]]]), _t([[[1.0, -1.0], [2.0, 0.0]]])]
    return hs, ht


def test_hidden_mse_by_hand_uses_hf_state_indices():
    hs, ht = _states_for_hand_check()
    pairs = [(0, 1), (1, 2)]  # student block 0 ↔ teacher block 1, student block 1 ↔ teacher block 2
    # pair (0, 1): hs[1] − ht[2] = [[0, 1], [2, 3]] → (0 + 1 + 4 + 9) / 4 = 3.5
    # pair (1, 2): hs[2] − ht[3] = [[−1, 1], [−2, 0]] → (1 + 1 + 4 + 0) / 4 = 1.5
    assert_close(L.hidden_mse(hs, ht, pairs, None, norm="none"), _t((3.5 + 1.5) / 2))
    # masked to the first position: (0 + 1) / 2 = 0.5 and (1 + 1) / 2 = 1.0
    mask = torch.tensor([[True, False]])
    assert_close(L.hidden_mse(hs, ht, pairs, None, mask, norm="none"), _t(0.75))
    assert_close(L.hidden_mse(hs, ht, [(1, 2)], None, norm="none"), _t(1.5))


def test_hidden_mse_by_hand_with_layer_norm():
    eps = 1e-5  # F.layer_norm's default
    hs = [_t([[[9.0] * 4] * 2]), _t([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]]])]
    ht = [_t([[[7.0] * 4] * 2]), _t([[[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 2.0]]])]
    # position 0: ln([1,2,3,4]) = (x − 2.5)/√(1.25 + eps), the teacher's is its negative, so the
    # squared difference sums to 4 · Σ(x − 2.5)² / (1.25 + eps) = 20 / (1.25 + eps); position 1: 0
    want = 20 / (1.25 + eps) / 8
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None), _t(want))
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None, torch.tensor([[True, False]])), _t(20 / (1.25 + eps) / 4))
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None, torch.tensor([[False, True]])), _t(0.0))
    # without the norm the raw values count: (9 + 1 + 1 + 9) / 8
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None, norm="none"), _t(20 / 8))


def test_hidden_mse_layer_norm_ignores_the_teachers_scale():
    torch.manual_seed(9)
    hs = [torch.randn(2, 3, 8) for _ in range(2)]
    ht = [torch.randn(2, 3, 8) for _ in range(2)]
    ht_scaled = [h * 300.0 + 5.0 for h in ht]  # a residual stream with huge dimensions
    base = L.hidden_mse(hs, ht, [(0, 0)])
    assert_close(L.hidden_mse(hs, ht_scaled, [(0, 0)]), base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(L.hidden_mse(hs, ht_scaled, [(0, 0)], norm="none"),
                              L.hidden_mse(hs, ht, [(0, 0)], norm="none"))


def test_hidden_mse_by_hand_with_projector():
    pairs = [(0, 0)]
    proj = L.make_projectors(pairs, 2, 3)
    with torch.no_grad():
        proj[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        proj[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    hs = [torch.zeros(1, 1, 2), torch.tensor([[[1.0, 2.0]]])]  # projected: [1, 2, 4]
    ht = [torch.zeros(1, 1, 3), torch.tensor([[[1.0, 2.0, 3.0]]])]
    assert_close(L.hidden_mse(hs, ht, pairs, proj, norm="none"), torch.tensor(1.0 / 3))


def _attention_for_hand_check():
    """Student maps: 2 blocks × [1, 2 heads, 2, 2]; teacher: 2 blocks × [1, 3 heads, 2, 2]."""
    s1 = _t([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])  # head mean [[.5, .5], [.5, .5]]
    t1 = _t([[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]],
              [[1.0, 0.0], [0.2, 0.8]]]])  # head mean [[1, 0], [.4, .6]]
    decoy_s, decoy_t = torch.zeros(1, 2, 2, 2, dtype=F64), torch.ones(1, 3, 2, 2, dtype=F64) * 5
    return [s1, decoy_s], [decoy_t, t1]


def test_attention_mse_by_hand_with_head_averaging():
    a_s, a_t = _attention_for_hand_check()
    # diff of head means: row 0 [−.5, .5] → .5; row 1 [.1, −.1] → .02; mean over 4 entries
    assert_close(L.attention_mse(a_s, a_t, [(0, 1)]), _t(0.52 / 4))
    # the mask selects query rows: row 1 only → .02 / 2, row 0 only → .5 / 2
    assert_close(L.attention_mse(a_s, a_t, [(0, 1)], torch.tensor([[False, True]])), _t(0.01))
    assert_close(L.attention_mse(a_s, a_t, [(0, 1)], torch.tensor([[True, False]])), _t(0.25))
    # averaged over pairs: (1, 0) compares zeros with fives: 25
    assert_close(L.attention_mse(a_s, a_t, [(0, 1), (1, 0)]), _t((0.13 + 25.0) / 2))


# --------------------------------------------------------------------------
# 3. gradients and inference-mode teacher outputs


class TensorLinear(nn.Module):
    """A projector whose weight and bias are given tensors, so gradcheck can perturb them."""

    def __init__(self, weight, bias):
        super().__init__()
        self.w, self.b = weight, bias

    def forward(self, x):
        return F.linear(x, self.w, self.b)


@pytest.mark.parametrize("path", FEATURE_PATHS, ids=feature_path_id)
def test_gradcheck_hidden_mse(path):
    norm, projected = path
    Ds, Dt = 3, (4 if projected else 3)
    g = torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    hs1, hs2, ht2, ht3 = rnd(2, 3, Ds), rnd(2, 3, Ds), rnd(2, 3, Dt), rnd(2, 3, Dt)
    w0, b0, w1, b1 = rnd(Dt, Ds), rnd(Dt), rnd(Dt, Ds), rnd(Dt)
    decoy_s, decoy_t = torch.zeros(2, 3, Ds, dtype=F64), torch.zeros(2, 3, Dt, dtype=F64)
    mask = torch.tensor([[True, True, False], [False, True, True]])

    def f(hs1, hs2, ht2, ht3, w0, b0, w1, b1):
        proj = [TensorLinear(w0, b0), TensorLinear(w1, b1)] if projected else None
        return L.hidden_mse([decoy_s, hs1, hs2], [decoy_t, decoy_t, ht2, ht3], [(0, 1), (1, 2)],
                            proj, mask, norm=norm)

    assert torch.autograd.gradcheck(f, (hs1, hs2, ht2, ht3, w0, b0, w1, b1))


def test_hidden_mse_trains_make_projectors():
    pairs = L.layer_pairs("layerwise", 2, 4)
    proj = L.make_projectors(pairs, 3, 5)
    assert len(proj) == 2 and all(p.in_features == 3 and p.out_features == 5 for p in proj)
    hs = [torch.randn(2, 4, 3, requires_grad=True) for _ in range(3)]
    ht = [torch.randn(2, 4, 5) for _ in range(5)]
    L.hidden_mse(hs, ht, pairs, proj).backward()
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert hs[0].grad is None  # the embeddings (states[0]) are no pair's input
    assert all(h.grad.abs().sum() > 0 for h in hs[1:])


def test_gradcheck_attention_mse():
    g = torch.Generator().manual_seed(6)
    a_s0, a_s1 = (torch.rand(2, 2, 3, 3, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    a_t0, a_t1, a_t2 = (torch.rand(2, 3, 3, 3, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e: L.attention_mse([a, b], [c, d, e], [(0, 1), (1, 2)], mask),
        (a_s0, a_s1, a_t0, a_t1, a_t2))


@pytest.mark.parametrize("path", FEATURE_PATHS, ids=feature_path_id)
def test_hidden_mse_with_inference_mode_teacher_states(path):
    norm, projected = path
    Ds, Dt = 4, (6 if projected else 4)
    torch.manual_seed(8)
    teacher_blocks = nn.ModuleList(nn.Linear(Dt, Dt) for _ in range(3))
    x = torch.randn(2, 5, Dt)
    with torch.inference_mode():
        ht_inf = [x * 1] + [blk(x) for blk in teacher_blocks]
    assert all(h.is_inference() for h in ht_inf)
    ht_ref = [h.clone() for h in ht_inf]  # normal tensors with the same values
    assert not ht_ref[1].is_inference()
    pairs = [(0, 1), (1, 2)]
    mask = random_mask((2, 5))
    hs_base = [torch.randn(2, 5, Ds) for _ in range(3)]
    proj = L.make_projectors(pairs, Ds, Dt) if projected else None
    results = []
    for ht in (ht_inf, ht_ref):
        hs = [h.clone().requires_grad_() for h in hs_base]
        if proj is not None:
            proj.zero_grad()
        v = L.hidden_mse(hs, ht, pairs, proj, mask, norm=norm)
        v.backward()
        results.append((v, [h.grad for h in hs[1:]],
                        [p.grad.clone() for p in proj.parameters()] if proj is not None else []))
    (v1, g1, p1), (v2, g2, p2) = results
    assert_close(v1, v2)
    assert_close(g1, g2)
    assert_close(p1, p2)


def test_attention_mse_with_inference_mode_teacher_maps():
    a_s = [torch.softmax(torch.randn(2, 2, 4, 4), -1).requires_grad_() for _ in range(2)]
    base = torch.randn(3, 2, 3, 4, 4)
    with torch.inference_mode():
        a_t = [torch.softmax(b, -1) for b in base]
    assert a_t[0].is_inference()
    v = L.attention_mse(a_s, a_t, [(0, 1), (1, 2)], random_mask((2, 4)))
    v.backward()
    assert torch.isfinite(v) and all(a.grad.abs().sum() > 0 for a in a_s)


# --------------------------------------------------------------------------
# 4. bad input


def test_hidden_mse_rejects_a_teacher_block_that_does_not_exist():
    hs, ht = _states_for_hand_check()  # teacher: 3 blocks (0..2)
    with pytest.raises(KdlibError, match=r"teacher block 3.*3 blocks \(0\.\.2\)"):
        L.hidden_mse(hs, ht, [(0, 3)], None, norm="none")
    with pytest.raises(KdlibError, match=r"student block 2.*2 blocks \(0\.\.1\)"):
        L.hidden_mse(hs, ht, [(2, 0)], None, norm="none")
    # the 4 → 12 layerwise map against a 6-block teacher asks for blocks up to 11
    hs6 = [torch.zeros(1, 2, 3)] * 5
    ht6 = [torch.zeros(1, 2, 3)] * 7
    with pytest.raises(KdlibError, match=r"teacher block 8"):
        L.hidden_mse(hs6, ht6, L.layer_pairs("layerwise", 4, 12))


def test_hidden_mse_rejects_width_mismatch_without_projectors():
    hs = [torch.zeros(1, 2, 3)] * 2
    ht = [torch.zeros(1, 2, 5)] * 2
    with pytest.raises(KdlibError, match=r"\(1, 2, 3\).*\(1, 2, 5\).*projectors"):
        L.hidden_mse(hs, ht, [(0, 0)])


def test_hidden_mse_rejects_wrong_number_of_projectors():
    pairs = [(0, 0), (1, 1)]
    hs, ht = [torch.zeros(1, 2, 3)] * 3, [torch.zeros(1, 2, 5)] * 3
    with pytest.raises(KdlibError, match=r"1 projectors for 2 layer pairs.*make_projectors"):
        L.hidden_mse(hs, ht, pairs, L.make_projectors(pairs[:1], 3, 5))


def test_hidden_mse_rejects_unknown_norm_and_empty_pairs():
    hs = [torch.zeros(1, 2, 3)] * 2
    with pytest.raises(KdlibError, match=r"unknown feature norm 'rms'.*layer, none"):
        L.hidden_mse(hs, hs, [(0, 0)], norm="rms")
    with pytest.raises(KdlibError, match="at least one layer pair"):
        L.hidden_mse(hs, hs, [])
    with pytest.raises(KdlibError, match="at least one layer pair"):
        L.attention_mse(hs, hs, [])


def test_attention_mse_rejects_missing_blocks_and_shape_mismatch():
    a_s, a_t = _attention_for_hand_check()
    with pytest.raises(KdlibError, match=r"teacher block 2.*2 blocks"):
        L.attention_mse(a_s, a_t, [(0, 2)])
    with pytest.raises(KdlibError, match=r"differ in batch or sequence length"):
        L.attention_mse([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 2, 2)], [(0, 0)])


def test_feature_mask_of_the_wrong_shape():
    hs, ht = _states_for_hand_check()
    with pytest.raises(KdlibError, match=r"mask shape \(2, 1\) must be \[batch, time\] = \(1, 2\)"):
        L.hidden_mse(hs, ht, [(0, 1)], None, torch.ones(2, 1, dtype=torch.bool), norm="none")

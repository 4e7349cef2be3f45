"""DistillationLoss: the composed objective of each experiment, end to end on tiny models."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import kdlib.config
from kdlib import losses
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS
from kdlib.models import TinyGPT, load_teacher, teacher_forward
from kdlib.objective import DistillationLoss

from conftest import TEACHER_VOCAB, build_teacher, build_tiny_config

B, T = 2, 8


def _batch(seed: int = 0, vocab: int = TEACHER_VOCAB):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, vocab, (B, T + 1), generator=g)
    ids, labels = full[:, :-1].clone(), full[:, 1:].clone()
    labels[0, :3] = -100
    labels[1, -1] = -100
    return ids, labels


def _smoke(name: str, feature: str = "hidden"):
    cfg = kdlib.config.preset("smoke").with_experiment(name, feature=feature)
    assert cfg.exp == name and cfg.loss.feature == feature
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=TEACHER_VOCAB))


def _expected_parts(spec) -> set:
    parts = {"ce"}
    if spec.divergence is not None:
        parts.add(spec.divergence)
    if spec.cosine:
        parts.add("cos")
    if spec.feature_map is not None:
        parts.add("feat")
    return parts


def _weighted(parts: dict, eff) -> torch.Tensor:
    w = {"ce": eff.w_ce, "cos": eff.w_cos, "feat": eff.w_feat}
    return sum(w.get(k, eff.w_div) * v for k, v in parts.items())


def _run(loss: DistillationLoss, student, teacher, ids, labels):
    spec = loss.spec
    s_out = student(ids, output_hidden_states=spec.needs_hidden_states, output_attentions=spec.needs_attentions)
    t_out = None
    if spec.needs_teacher:
        t_out = teacher_forward(teacher, ids, hidden_states=spec.needs_hidden_states, attentions=spec.needs_attentions)
    return loss(s_out, t_out, labels), s_out, t_out


# --------------------------------------------------------------------------
# every experiment of the grid, both feature kinds


@pytest.mark.parametrize("feature", ["hidden", "attention"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_student_and_projectors(name, feature):
    cfg = _smoke(name, feature)
    torch.manual_seed(0)
    student = TinyGPT(cfg.model)
    teacher = load_teacher(build_teacher(n_layer=4, n_embd=24), need_attentions=(feature == "attention"))
    assert cfg.model.n_embd != 24  # projectors are needed for hidden-state MSE
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    has_map = cfg.spec.feature_map is not None
    assert loss.spec == cfg.spec
    assert loss.spec.needs_teacher == (name != "ce")
    assert loss.spec.needs_hidden_states == (has_map and feature == "hidden")
    assert loss.spec.needs_attentions == (has_map and feature == "attention")
    if loss.spec.needs_hidden_states:
        n_pairs = {"layerwise": 2, "last2last": 1, "last2all": 2}[cfg.spec.feature_map]
        assert len(loss.projectors) == len(loss.pairs) == n_pairs
        assert all(p.in_features == 32 and p.out_features == 24 for p in loss.projectors)
    else:
        assert loss.projectors is None
        assert list(loss.parameters()) == []

    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids, labels = _batch()
    out, s_out, t_out = _run(loss, student, teacher, ids, labels)

    assert out.total.dim() == 0 and torch.isfinite(out.total) and out.total.requires_grad
    assert set(out.parts) == _expected_parts(cfg.spec)
    for k, v in out.parts.items():
        assert v.dim() == 0 and torch.isfinite(v) and not v.requires_grad, k
    assert_close(out.total.detach(), _weighted(out.parts, cfg.loss_terms))

    out.total.backward()
    params = [*student.parameters(), *loss.parameters()]
    names = [f"student.{n}" for n, _ in student.named_parameters()] + \
            [f"loss.{n}" for n, _ in loss.named_parameters()]
    for n, p in zip(names, params):
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in teacher.parameters())

    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0).step()
    for n, p, b in zip(names, params, before):
        assert not torch.equal(p.detach(), b), f"{n} did not move"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def _only(cfg, component: str):
    """cfg with every loss weight 0 except ``component``'s (1)."""
    w = {k: 0.0 for k in ("w_ce", "w_div", "w_cos", "w_feat")}
    w[component] = 1.0
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **w))


def _grad_map(loss, student):
    grads = {f"student.{n}": p.grad for n, p in student.named_parameters()}
    grads.update({f"loss.{n}": p.grad for n, p in loss.named_parameters()})
    return {n: g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0)
            for n, g in grads.items()}


# The last student block's attention probabilities depend on its ln_1 and
# c_attn, not on what comes after them in the block (or on ln_f).
_AFTER_LAST_ATTENTION = ("student.h.1.attn.c_proj.", "student.h.1.ln_2.", "student.h.1.mlp.", "student.ln_f.")


@pytest.mark.parametrize("feature", ["hidden", "attention"])
@pytest.mark.parametrize("fmap", ["layerwise", "last2last", "last2all"])
def test_feature_loss_alone_trains_what_it_should(fmap, feature):
    cfg = _only(_smoke(f"{fmap}-kl", feature), "w_feat")
    torch.manual_seed(11)
    student = TinyGPT(cfg.model)
    teacher = load_teacher(build_teacher(), need_attentions=(feature == "attention"))
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    out, _, _ = _run(loss, student, teacher, *_batch(11))
    assert out.parts["feat"] > 0
    assert_close(out.total.detach(), out.parts["feat"])
    out.total.backward()
    got = _grad_map(loss, student)
    if feature == "hidden":
        expected = {n: True for n in got}  # every block feeds a compared state; wte is the tied head
        assert any(n.startswith("loss.projectors") for n in got)
    else:
        expected = {n: not n.startswith(_AFTER_LAST_ATTENTION) for n in got}
    assert got == expected


@pytest.mark.parametrize("name, component", [("kl", "w_div"), ("js", "w_div"), ("rkl", "w_div"),
                                             ("kl-cos", "w_cos"), ("ce", "w_ce")])
def test_output_loss_alone_trains_every_student_parameter(name, component):
    cfg = _only(_smoke(name), component)
    torch.manual_seed(12)
    student = TinyGPT(cfg.model)
    teacher = load_teacher(build_teacher())
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    out, _, _ = _run(loss, student, teacher, *_batch(12))
    out.total.backward()
    got = _grad_map(loss, student)
    assert got and all(got.values()), [n for n, ok in got.items() if not ok]


def test_weighted_total_layerwise_kl_cos():
    cfg = _smoke("layerwise-kl-cos")
    cfg.loss.w_ce, cfg.loss.w_div, cfg.loss.w_cos, cfg.loss.w_feat = 0.3, 0.7, 0.2, 0.4
    torch.manual_seed(1)
    student = TinyGPT(cfg.model)
    teacher = load_teacher(build_teacher())
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    out, _, _ = _run(loss, student, teacher, *_batch(1))
    p = out.parts
    assert set(p) == {"ce", "kl", "cos", "feat"}
    assert all(v > 0 for v in p.values())
    eff = cfg.loss_terms
    assert_close(out.total.detach(), eff.w_ce * p["ce"] + eff.w_div * p["kl"] + eff.w_cos * p["cos"]
                 + eff.w_feat * p["feat"])
    assert_close(out.total.detach(), 0.3 * p["ce"] + 0.7 * p["kl"] + 0.2 * p["cos"] + 0.4 * p["feat"])


def test_parts_match_reference_formulas_hidden():
    cfg = _smoke("last2last-kl-cos")
    torch.manual_seed(2)
    student = TinyGPT(cfg.model)
    teacher = load_teacher(build_teacher())
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    assert loss.pairs == [(1, 3)]
    ids, labels = _batch(2)
    out, s_out, t_out = _run(loss, student, teacher, ids, labels)
    mask = labels != -100
    s, t = s_out.logits.detach(), t_out.logits.clone()
    Tk = cfg.loss.temperature
    assert_close(out.parts["ce"], F.cross_entropy(s.reshape(-1, TEACHER_VOCAB), labels.reshape(-1)))
    log_p, log_q = F.log_softmax(t / Tk, -1), F.log_softmax(s / Tk, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean() * Tk**2
    assert_close(out.parts["kl"], kl)
    cos = (1 - F.cosine_similarity(s, t, dim=-1))[mask].mean()
    assert_close(out.parts["cos"], cos)
    with torch.no_grad():
        h_s = loss.projectors[0](s_out.hidden_states[2])  # student block 1 = its last: after ln_f
        h_t = t_out.hidden_states[4].clone()  # teacher block 3 = its last
        diff = F.layer_norm(h_s, (24,)) - F.layer_norm(h_t, (24,))
        assert_close(out.parts["feat"], diff[mask].pow(2).mean())


def test_layerwise_spread_pairs_and_attention_feature_reference():
    cfg = _smoke("layerwise-js", feature="attention")
    torch.manual_seed(3)
    student = TinyGPT(cfg.model)
    teacher = load_teacher(build_teacher(), need_attentions=True)
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    assert loss.pairs == [(0, 1), (1, 3)]
    ids, labels = _batch(3)
    out, s_out, t_out = _run(loss, student, teacher, ids, labels)
    mask = labels != -100
    ref = torch.stack([(s_out.attentions[i].detach().mean(1) - t_out.attentions[j].mean(1))[mask]
                       .pow(2).mean() for i, j in [(0, 1), (1, 3)]]).mean()
    assert_close(out.parts["feat"], ref)
    assert set(out.parts) == {"ce", "js", "feat"}


# --------------------------------------------------------------------------
# the study preset


def test_study_preset_loss_values():
    loss = kdlib.config.preset("study").loss
    assert loss.temperature == 2.0
    assert (loss.w_div, loss.w_ce, loss.w_cos, loss.w_feat) == (0.5, 0.5, 0.05, 0.05)
    assert loss.feature == "attention"
    assert loss.layer_map == "study"
    assert kdlib.config.preset("study", "kl").loss_terms.label_smoothing == 0.1
    assert kdlib.config.preset("study", "kl").loss_terms.w_ce == 0.5
    assert kdlib.config.preset("study", "js").loss_terms.label_smoothing == 0.0
    assert kdlib.config.preset("study", "ce").loss_terms.w_ce == 1.0
    assert kdlib.config.preset("study", "ce").loss_terms.label_smoothing == 0.0
    assert kdlib.config.preset("study", "layerwise-kl").loss_terms.layer_map_name == "study"
    assert kdlib.config.preset("study", "last2all-kl").loss_terms.layer_map_name == "last2all"


def test_study_overrides_reach_the_loss():
    model_cfg = build_tiny_config()
    torch.manual_seed(4)
    student = TinyGPT(model_cfg)
    teacher = load_teacher(build_teacher())
    ids, labels = _batch(4)
    flat_s = lambda o: o.logits.detach().reshape(-1, TEACHER_VOCAB)  # noqa: E731

    kl = DistillationLoss(kdlib.config.preset("study", "kl").loss_terms, model_cfg, teacher)
    out, s_out, _ = _run(kl, student, teacher, ids, labels)
    smoothed = F.cross_entropy(flat_s(s_out), labels.reshape(-1), label_smoothing=0.1)
    assert_close(out.parts["ce"], smoothed)
    assert not torch.allclose(smoothed, F.cross_entropy(flat_s(s_out), labels.reshape(-1)))
    assert_close(out.total.detach(), 0.5 * out.parts["ce"] + 0.5 * out.parts["kl"])

    js = DistillationLoss(kdlib.config.preset("study", "js").loss_terms, model_cfg, teacher)
    out, s_out, _ = _run(js, student, teacher, ids, labels)
    assert_close(out.parts["ce"], F.cross_entropy(flat_s(s_out), labels.reshape(-1)))

    ce = DistillationLoss(kdlib.config.preset("study", "ce").loss_terms, model_cfg, None)
    out, s_out, _ = _run(ce, student, teacher, ids, labels)
    assert set(out.parts) == {"ce"}
    assert_close(out.total.detach(), out.parts["ce"])
    assert_close(out.parts["ce"], F.cross_entropy(flat_s(s_out), labels.reshape(-1)))


def test_study_layer_map_8_to_12():
    cfg = kdlib.config.preset("study", "layerwise-kl")
    model_cfg = build_tiny_config(n_layer=8)
    torch.manual_seed(5)
    student = TinyGPT(model_cfg)
    teacher = load_teacher(build_teacher(n_layer=12, n_embd=20), need_attentions=True)
    loss = DistillationLoss(cfg.loss_terms, model_cfg, teacher)
    pairs = [(0, 1), (1, 3), (2, 5), (3, 7), (4, 8), (5, 9), (6, 10), (7, 11)]
    assert loss.pairs == pairs
    assert loss.spec.needs_attentions and not loss.spec.needs_hidden_states
    ids, labels = _batch(5)
    out, s_out, t_out = _run(loss, student, teacher, ids, labels)
    assert set(out.parts) == {"ce", "kl", "feat"}
    mask = labels != -100
    ref = torch.stack([(s_out.attentions[i].detach().mean(1) - t_out.attentions[j].mean(1))[mask]
                       .pow(2).mean() for i, j in pairs]).mean()
    assert_close(out.parts["feat"], ref)
    assert torch.isfinite(out.total)


def test_study_layer_map_with_a_smaller_teacher_raises():
    cfg = kdlib.config.preset("study", "layerwise-kl")
    model_cfg = build_tiny_config(n_layer=8)
    teacher = load_teacher(build_teacher(n_layer=4), need_attentions=True)
    with pytest.raises(KdlibError, match="study"):
        DistillationLoss(cfg.loss_terms, model_cfg, teacher)
    with pytest.raises(KdlibError, match="study"):
        DistillationLoss(cfg.loss_terms, build_tiny_config(n_layer=2), (12, 768))


# --------------------------------------------------------------------------
# every preset x experiment: the loss the code before issue 14 computed

# preset/experiment/feature -> the resolved loss of c6be9a8 (preset(p).with_experiment(e, feature=f).loss.effective())
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "resolved_losses.json").read_text())


@pytest.mark.parametrize("preset_name", sorted(kdlib.config.PRESETS))
def test_every_experiment_computes_the_loss_it_did_before(preset_name, monkeypatch):
    """What reaches the loss functions (weights, temperature, smoothing, components, pairs) is unchanged."""
    calls = {}

    def output_losses(s, labels, target, **kw):
        calls["output"] = kw
        return torch.tensor(0.0, dtype=torch.float64), {"ce": torch.tensor(0.0)}

    def feature_loss(kind):
        def run(*args):
            calls[kind] = args
            return torch.tensor(1.0, dtype=torch.float64)  # the total is then w_feat exactly
        return run

    monkeypatch.setattr(losses, "output_losses", output_losses)
    monkeypatch.setattr(losses, "hidden_mse", feature_loss("hidden"))
    monkeypatch.setattr(losses, "attention_mse", feature_loss("attention"))
    rows = {k: v for k, v in BEFORE.items() if k.startswith(preset_name + "/")}
    assert len(rows) == 40
    for key, row in rows.items():
        _, exp, feature = key.split("/")
        cfg = kdlib.config.preset(preset_name).with_experiment(exp, feature=feature)
        loss = DistillationLoss(cfg.loss_terms, cfg.model, (12, 768))
        calls.clear()
        states = SimpleNamespace(logits=torch.zeros(1, 2, 4), hidden_states=(None,), attentions=(None,))
        total = loss(states, states, torch.zeros(1, 2, dtype=torch.long)).total
        kw = calls["output"]
        assert (cfg.exp, kw["divergence"], kw["param"], kw["cosine"]) == \
            (row["exp"], row["divergence"], row["divergence_param"], row["cosine"]), key
        assert {k: kw[k] for k in ("w_ce", "w_div", "w_cos", "temperature", "label_smoothing")} == \
            {k: row[k] for k in ("w_ce", "w_div", "w_cos", "temperature", "label_smoothing")}, key
        assert ("hidden" in calls, "attention" in calls) == (row["needs_hidden_states"], row["needs_attentions"]), key
        if row["feature_map"] is not None:
            assert loss.pairs == losses.layer_pairs(row["layer_map_name"], cfg.model.n_layer, 12), key
            assert total.item() == row["w_feat"], key
        if "hidden" in calls:
            assert calls["hidden"][-1] == row["feature_norm"], key
        assert (loss.spec.needs_teacher, loss.spec.output_only) == (row["needs_teacher"], row["output_only"]), key


# --------------------------------------------------------------------------
# bad input


class _LogitsOnly(nn.Module):
    """A teacher whose forward takes ids only: it cannot return features."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, ids):
        return SimpleNamespace(logits=self.inner(ids).logits)


@pytest.mark.parametrize("feature, what", [("hidden", "hidden_states"), ("attention", "attentions")])
def test_teacher_without_feature_outputs_raises(feature, what):
    cfg = _smoke("layerwise-kl", feature)
    teacher = load_teacher(_LogitsOnly(build_teacher()))
    with pytest.raises(KdlibError, match=what):
        DistillationLoss(cfg.loss_terms, cfg.model, teacher)


def test_logits_only_teacher_serves_output_only_experiments():
    cfg = _smoke("kl")
    teacher = load_teacher(_LogitsOnly(build_teacher()))
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    torch.manual_seed(6)
    out, _, _ = _run(loss, TinyGPT(cfg.model), teacher, *_batch(6))
    assert set(out.parts) == {"ce", "kl"} and torch.isfinite(out.total)


def test_feature_map_without_teacher_raises():
    cfg = _smoke("last2all-kl")
    with pytest.raises(KdlibError, match="teacher"):
        DistillationLoss(cfg.loss_terms, cfg.model, None)
    DistillationLoss(_smoke("kl").loss_terms, cfg.model, None)  # output-only: the shape is not needed


@pytest.mark.parametrize("feature", ["hidden", "attention"])
def test_teacher_states_with_fewer_layers_than_the_map_raises(feature):
    cfg = _smoke("layerwise-kl", feature)
    loss = DistillationLoss(cfg.loss_terms, cfg.model, (4, 24))  # pairs (0, 1), (1, 3)
    assert loss.pairs == [(0, 1), (1, 3)]
    torch.manual_seed(7)
    student = TinyGPT(cfg.model)
    small = load_teacher(build_teacher(n_layer=2, n_embd=24), need_attentions=True)
    ids, labels = _batch(7)
    s_out = student(ids, output_hidden_states=True, output_attentions=True)
    t_out = teacher_forward(small, ids, hidden_states=True, attentions=True)
    with pytest.raises(KdlibError, match="teacher block 3"):
        loss(s_out, t_out, labels)


def test_missing_teacher_outputs_raise():
    cfg = _smoke("kl")
    loss = DistillationLoss(cfg.loss_terms, cfg.model, None)
    torch.manual_seed(8)
    student = TinyGPT(cfg.model)
    ids, labels = _batch(8)
    with pytest.raises(KdlibError, match="teacher"):
        loss(student(ids), None, labels)
    ce = DistillationLoss(_smoke("ce").loss_terms, cfg.model, None)
    assert torch.isfinite(ce(student(ids), None, labels).total)  # the baseline needs none


@pytest.mark.parametrize("feature, what", [("hidden", "hidden_states"), ("attention", "attentions")])
def test_missing_student_features_raise(feature, what):
    cfg = _smoke("last2last-js", feature)
    teacher = load_teacher(build_teacher(), need_attentions=True)
    loss = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    torch.manual_seed(9)
    student = TinyGPT(cfg.model)
    ids, labels = _batch(9)
    t_out = teacher_forward(teacher, ids, hidden_states=True, attentions=True)
    with pytest.raises(KdlibError, match=what):
        loss(student(ids), t_out, labels)


@pytest.mark.parametrize("name", ["kl", "js-cos", "cos", "gjsd0.3"])
def test_vocab_mismatch_in_loss_raises(name):
    cfg = _smoke(name)
    loss = DistillationLoss(cfg.loss_terms, cfg.model, None)
    torch.manual_seed(10)
    student = TinyGPT(cfg.model)
    ids, labels = _batch(10)
    teacher = load_teacher(build_teacher(vocab_size=TEACHER_VOCAB + 3))
    t_out = teacher_forward(teacher, ids)
    assert t_out.logits.shape[-1] == TEACHER_VOCAB + 3
    with pytest.raises(KdlibError, match="vocabulary"):
        loss(student(ids), t_out, labels)


def test_invalid_loss_config_raises():
    cfg = _smoke("kl")
    with pytest.raises(KdlibError, match="temperature"):
        DistillationLoss(dataclasses.replace(cfg.loss_terms, temperature=0.0), cfg.model, None)
    with pytest.raises(KdlibError, match="temperature"):
        DistillationLoss(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, temperature=0.0)).loss_terms,
                         cfg.model, None)
    with pytest.raises(KdlibError, match="'kld'"):
        DistillationLoss(dataclasses.replace(cfg, exp="kld").loss_terms, cfg.model, None)
    assert math.isclose(DistillationLoss(cfg.loss_terms, cfg.model, None).terms.temperature, 2.0)

"""TinyGPT (the student), its Hugging Face conventions, and the teacher helpers."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.testing import assert_close

import kdlib.config
from kdlib.config import TinyGPTConfig
from kdlib.errors import KdlibError
from kdlib.models import (CausalLMOutput, TinyGPT, load_teacher, sinusoidal_positions, teacher_forward,
                          teacher_shape)

from conftest import TEACHER_VOCAB


def _eval_model(cfg: TinyGPTConfig, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(cfg).eval()


# --------------------------------------------------------------------------
# size of the study's student


def test_study_student_has_50951680_parameters_and_tied_head():
    model = TinyGPT(kdlib.config.preset("study").model)
    assert model.num_parameters() == 50_951_680
    assert sum(p.numel() for p in model.parameters()) == 50_951_680
    assert model.lm_head.weight is model.wte.weight


def test_untied_student_counts_head_separately(tiny_config):
    cfg = tiny_config(tie_embeddings=False)
    model = TinyGPT(cfg)
    tied = TinyGPT(tiny_config())
    assert model.lm_head.weight is not model.wte.weight
    assert model.num_parameters() == tied.num_parameters() + cfg.vocab_size * cfg.n_embd


# --------------------------------------------------------------------------
# parity with Hugging Face GPT-2


def _hf_and_tiny_pair(make_teacher):
    """A randomised HF GPT-2 and a TinyGPT holding the same weights, both in eval mode."""
    hf = make_teacher(n_layer=3, n_embd=24, n_head=2, n_positions=32, activation_function="gelu_new",
                      layer_norm_epsilon=1e-5)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # GPT-2's init leaves LN at 1/0 and biases at 0: make every weight count
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    hf.set_attn_implementation("eager")
    hf.eval()

    cfg = TinyGPTConfig(vocab_size=TEACHER_VOCAB, block_size=32, n_layer=3, n_head=2, n_embd=24, d_ff=96,
                        dropout=0.0, bias=True, tie_embeddings=True, positions="learned",
                        activation="gelu_tanh", layer_norm_eps=1e-5)
    tiny = TinyGPT(cfg).eval()
    t = hf.transformer
    with torch.no_grad():
        tiny.wte.weight.copy_(t.wte.weight)
        tiny.wpe.weight.copy_(t.wpe.weight)
        for hb, tb in zip(t.h, tiny.h):
            for src, dst in ((hb.ln_1, tb.ln_1), (hb.ln_2, tb.ln_2)):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            for src, dst in ((hb.attn.c_attn, tb.attn.c_attn), (hb.attn.c_proj, tb.attn.c_proj),
                             (hb.mlp.c_fc, tb.mlp.c_fc), (hb.mlp.c_proj, tb.mlp.c_proj)):
                dst.weight.copy_(src.weight.t())  # Conv1D [in, out] -> Linear [out, in]
                dst.bias.copy_(src.bias)
        tiny.ln_f.weight.copy_(t.ln_f.weight)
        tiny.ln_f.bias.copy_(t.ln_f.bias)
    assert tiny.lm_head.weight is tiny.wte.weight
    return hf, tiny


def test_parity_with_huggingface_gpt2(make_teacher):
    hf, tiny = _hf_and_tiny_pair(make_teacher)
    ids = torch.randint(0, TEACHER_VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True, output_attentions=True)
        out = tiny(ids, output_hidden_states=True, output_attentions=True)
    tol = dict(atol=1e-5, rtol=1e-5)
    assert out.logits.shape == ref.logits.shape == (2, 11, TEACHER_VOCAB)
    assert ref.logits.abs().max() > 1.0  # the weights are not trivial
    assert_close(out.logits, ref.logits, **tol)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3 + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close(mine, theirs, **tol)
    assert len(out.attentions) == len(ref.attentions) == 3
    for mine, theirs in zip(out.attentions, ref.attentions):
        assert mine.shape == (2, 2, 11, 11)
        assert_close(mine, theirs, **tol)


def test_parity_with_huggingface_gpt2_sdpa_path(make_teacher):
    hf, tiny = _hf_and_tiny_pair(make_teacher)
    ids = torch.randint(0, TEACHER_VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids)
        out = tiny(ids)
    assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# output conventions


def test_outputs_off_by_default(tiny_config, ids):
    out = _eval_model(tiny_config())(ids)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (2, 8, TEACHER_VOCAB)
    assert out.hidden_states is None and out.attentions is None


@pytest.mark.parametrize("n_layer", [1, 3])
def test_hidden_state_convention(tiny_config, ids, n_layer):
    model = _eval_model(tiny_config(n_layer=n_layer))
    block_out, ln_f_in = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: block_out.append(o[0])) for b in model.h]
    hooks.append(model.ln_f.register_forward_hook(lambda m, i, o: ln_f_in.append(i[0])))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    hs = out.hidden_states
    assert len(hs) == n_layer + 1
    assert all(h.shape == (2, 8, 16) for h in hs)
    with torch.no_grad():
        emb = model.wte(ids) + model.wpe.weight[:8]
        assert_close(hs[0], emb)  # embeddings first
        for k in range(1, n_layer):  # states 1..L-1: outputs of blocks 0..L-2, as they are
            assert_close(hs[k], block_out[k - 1])
        assert len(ln_f_in) == 1
        assert_close(ln_f_in[0], block_out[-1])
        assert_close(hs[-1], model.ln_f(block_out[-1]))  # the last one after the final norm
        assert not torch.allclose(hs[-1], block_out[-1])
        assert_close(out.logits, model.lm_head(hs[-1]))


@pytest.mark.parametrize("attn", [False, True], ids=["sdpa", "explicit"])
def test_causal_masking(tiny_config, attn):
    model = _eval_model(tiny_config(n_layer=2))
    ids = torch.randint(0, TEACHER_VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids, output_attentions=attn).logits
        for k in (0, 4, 9):
            changed = ids.clone()
            changed[:, k] = (changed[:, k] + 1) % TEACHER_VOCAB
            new = model(changed, output_attentions=attn).logits
            assert_close(new[:, :k], base[:, :k], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(new[:, k], base[:, k])  # the change is seen from k on


def test_sdpa_path_equals_explicit_attention_path(tiny_config, ids):
    model = _eval_model(tiny_config(n_layer=3, n_head=4))
    with torch.no_grad():
        fast = model(ids, output_hidden_states=True)
        slow = model(ids, output_hidden_states=True, output_attentions=True)
    assert fast.attentions is None
    assert_close(slow.logits, fast.logits, atol=1e-5, rtol=1e-5)
    assert len(slow.hidden_states) == len(fast.hidden_states) == 4
    for a, b in zip(slow.hidden_states, fast.hidden_states):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(slow.attentions) == 3
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    for probs in slow.attentions:
        assert probs.shape == (2, 4, 8, 8)
        assert (probs >= 0).all()
        assert_close(probs.sum(-1), torch.ones(2, 4, 8))
        assert torch.all(probs[..., upper] == 0)
        assert_close(probs[..., 0, 0], torch.ones(2, 4))  # position 0 sees only itself


def test_gradients_reach_every_parameter_through_both_paths(tiny_config, ids):
    for attn in (False, True):
        model = _eval_model(tiny_config(n_layer=2))
        out = model(ids, output_attentions=attn)
        out.logits.square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------
# positions and dropout


def test_sinusoidal_positions_are_a_fixed_buffer(tiny_config, ids):
    cfg = tiny_config(positions="sinusoidal", n_embd=16)
    torch.manual_seed(0)
    a = TinyGPT(cfg)
    torch.manual_seed(1)
    b = TinyGPT(cfg)
    assert a.wpe is None
    names = [n for n, _ in a.named_parameters()]
    assert not any("pos" in n or "wpe" in n for n in names)
    assert "pos_table" not in a.state_dict()
    assert not any("pos" in k or "wpe" in k for k in a.state_dict())
    assert_close(a.pos_table, b.pos_table, atol=0, rtol=0)  # independent of the seed
    assert a.pos_table.shape == (cfg.block_size, cfg.n_embd)
    table = a.pos_table
    assert_close(table, sinusoidal_positions(cfg.block_size, cfg.n_embd), atol=0, rtol=0)
    p = torch.arange(cfg.block_size, dtype=torch.float32)
    assert_close(table[:, 0], torch.sin(p))
    assert_close(table[:, 1], torch.cos(p))
    i = 3  # dims 6, 7: frequency 10000^(-6/16)
    f = 10000.0 ** (-2 * i / cfg.n_embd)
    assert_close(table[:, 2 * i], torch.sin(p * f))
    assert_close(table[:, 2 * i + 1], torch.cos(p * f))
    # the table is used: the same weights give the same outputs, and it matters
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)
        hs = a(ids, output_hidden_states=True).hidden_states
        assert_close(hs[0], a.wte(ids) + table[:8])


def test_learned_positions_are_a_parameter(tiny_config):
    model = TinyGPT(tiny_config(positions="learned"))
    params = dict(model.named_parameters())
    assert "wpe.weight" in params and isinstance(params["wpe.weight"], nn.Parameter)
    assert params["wpe.weight"].shape == (32, 16)
    assert "wpe.weight" in model.state_dict()
    assert not hasattr(model, "pos_table")


@pytest.mark.parametrize("attn", [False, True], ids=["sdpa", "explicit"])
def test_dropout_train_vs_eval(tiny_config, ids, attn):
    torch.manual_seed(0)
    model = TinyGPT(tiny_config(dropout=0.3))
    model.train()
    with torch.no_grad():
        a, b = model(ids, output_attentions=attn).logits, model(ids, output_attentions=attn).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        c, d = model(ids, output_attentions=attn).logits, model(ids, output_attentions=attn).logits
    assert_close(c, d, atol=0, rtol=0)


def test_zero_dropout_train_mode_is_deterministic(tiny_config, ids):
    model = TinyGPT(tiny_config(dropout=0.0)).train()
    with torch.no_grad():
        assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


# --------------------------------------------------------------------------
# errors


def test_sequence_longer_than_block_size_raises(tiny_config):
    model = TinyGPT(tiny_config(block_size=16))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(KdlibError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(KdlibError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long), output_attentions=True)


@pytest.mark.parametrize("overrides, needle", [
    (dict(n_embd=25, n_head=2), "n_head"),
    (dict(positions="rotary"), "positions"),
    (dict(activation="relu"), "activation"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation_errors(tiny_config, overrides, needle):
    with pytest.raises(KdlibError, match=needle):
        TinyGPT(tiny_config(**overrides))


# --------------------------------------------------------------------------
# teacher


def test_load_teacher_freezes_model(make_teacher):
    model = make_teacher().double().train()
    assert any(p.requires_grad for p in model.parameters())
    teacher = load_teacher(model)
    assert teacher is model
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    params = list(teacher.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)


def test_load_teacher_need_attentions(make_teacher, ids):
    teacher = load_teacher(make_teacher(n_layer=4), need_attentions=True)
    out = teacher_forward(teacher, ids, hidden_states=True, attentions=True)
    assert len(out.attentions) == 4
    assert len(out.hidden_states) == 5
    for probs in out.attentions:
        assert probs.shape == (2, 2, 8, 8)
        assert_close(probs.sum(-1), torch.ones(2, 2, 8))
        assert torch.all(probs[..., torch.ones(8, 8, dtype=torch.bool).triu(1)] == 0)


def test_sdpa_teacher_cannot_return_attentions(make_teacher, ids):
    teacher = load_teacher(make_teacher(), need_attentions=False)
    out = teacher_forward(teacher, ids, hidden_states=True)  # hidden states work under sdpa
    assert len(out.hidden_states) == 5
    with pytest.raises(KdlibError, match="eager"):
        teacher_forward(teacher, ids, attentions=True)


def test_load_teacher_vocab_mismatch_names_both_sizes(make_teacher):
    with pytest.raises(KdlibError) as e:
        load_teacher(make_teacher(), student_vocab_size=100)
    assert "100" in str(e.value) and str(TEACHER_VOCAB) in str(e.value)
    assert load_teacher(make_teacher(), student_vocab_size=TEACHER_VOCAB) is not None


def test_load_teacher_missing_path_raises_kdlib_error(tmp_path):
    with pytest.raises(KdlibError, match="nope"):
        load_teacher(tmp_path / "nope")
    with pytest.raises(KdlibError, match="nope"):
        load_teacher(kdlib.config.TeacherConfig(name=str(tmp_path / "nope")))


@pytest.mark.parametrize("config_json", [None, "{}"], ids=["empty-folder", "config-without-model-type"])
def test_load_teacher_folder_without_model_raises_kdlib_error(tmp_path, config_json):
    # An existing folder that save_pretrained did not write is bad input like a missing one
    # (transformers raises a plain ValueError here, which the CLI would show as a traceback).
    if config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
    with pytest.raises(KdlibError, match="cannot load teacher"):
        load_teacher(tmp_path)


def test_load_teacher_from_saved_folder(make_teacher, tmp_path, ids):
    model = make_teacher(n_layer=2).eval()
    model.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher", need_attentions=True)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    out = teacher_forward(teacher, ids, attentions=True)
    assert len(out.attentions) == 2
    with torch.no_grad():
        assert_close(out.logits, model(ids).logits)


def test_teacher_forward_gives_inference_tensors_and_no_teacher_grads(make_teacher, tiny_config, ids):
    teacher = load_teacher(make_teacher(), need_attentions=True)
    out = teacher_forward(teacher, ids, hidden_states=True, attentions=True)
    tensors = [out.logits, *out.hidden_states, *out.attentions]
    assert all(t.is_inference() for t in tensors)
    assert all(not t.requires_grad for t in tensors)
    plain = teacher_forward(teacher, ids)
    assert plain.logits.is_inference()
    assert_close(plain.logits, out.logits)
    # a student loss built on the teacher's outputs trains the student only
    student = TinyGPT(tiny_config())
    s = student(ids).logits
    loss = (s.log_softmax(-1).exp() * (s.log_softmax(-1) - out.logits.log_softmax(-1))).sum(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_shape(make_teacher, tiny_config):
    assert teacher_shape(make_teacher(n_layer=4, n_embd=24)) == (4, 24)
    assert teacher_shape(make_teacher(n_layer=12, n_embd=20)) == (12, 20)
    assert teacher_shape(TinyGPT(tiny_config(n_layer=3, n_embd=16))) == (3, 16)

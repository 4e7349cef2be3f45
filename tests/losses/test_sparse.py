"""kdlib.losses.sparse: divergences on the teacher's top-k cache (design.md §7).

With k = V they are the dense divergences (values and gradients, every
divergence); with k < V merging the teacher's tail into one bucket can only
lose information, so the sparse KL and JS are lower bounds of the dense ones
(checked on random cases and as a hypothesis property), and the student's
tail bucket matches a float64 sum element by element. Then gradcheck in
float64, the chunked path against the dense one, the fp16 values the cache
stores, bad input, and the size of the gap on a small trained teacher: the
relative-error table (``pytest -s`` prints it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from kdlib import losses as L
from kdlib.config import TinyGPTConfig
from kdlib.errors import KdlibError
from kdlib.models import TinyGPT
from loss_helpers import DIV_CASES, F32, F64, case_id, logits, random_mask

TAU = 2.0


def dense_and_sparse(name, s, t, k, temperature, mask=None):
    param = 0.3 if name == "gjsd" else None
    dense = L.divergence(name, s, t, temperature, mask, param=param)
    sparse = L.sparse_divergence(name, s, *L.teacher_top_k(t, k, temperature), temperature=temperature, mask=mask,
                                 param=param)
    return dense, sparse


# --------------------------------------------------------------------------
# 1. k = V: the dense divergences


@pytest.mark.parametrize("case", DIV_CASES, ids=case_id)
def test_k_equal_v_is_the_dense_divergence(case):
    name, param = case
    shape, V = (3, 5), 23
    t = logits((*shape, V), seed=2)
    lp, ids, tail = L.teacher_top_k(t, V, TAU)
    assert tail is None and lp.dtype == F32 and ids.shape == (*shape, V)
    for mask in (None, random_mask(shape, 3)):
        s = logits((*shape, V), seed=1).requires_grad_(True)
        got = L.sparse_divergence(name, s, lp, ids, tail, TAU, mask, param=param)
        want = L.divergence(name, s, t, TAU, mask, param=param)
        assert want.item() > 1e-3
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_got, = torch.autograd.grad(got, s)
        g_want, = torch.autograd.grad(want, s)
        assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
        if mask is not None:  # positions outside the mask get no gradient
            assert (g_got[~mask] == 0).all()


def test_named_sparse_divergences():
    s, t, mask = logits((3, 5, 23), seed=1), logits((3, 5, 23), seed=2), random_mask((3, 5), 3)
    cache = L.teacher_top_k(t, 6, TAU)
    pairs = [(L.sparse_kl(s, *cache, TAU, mask), L.sparse_divergence("kl", s, *cache, TAU, mask)),
             (L.sparse_js(s, *cache, TAU, mask), L.sparse_divergence("js", s, *cache, TAU, mask)),
             (L.sparse_generalized_jsd(s, *cache, 0.3, TAU, mask),
              L.sparse_divergence("gjsd", s, *cache, TAU, mask, param=0.3))]
    for named, by_name in pairs:
        assert_close(named, by_name, rtol=0, atol=0)


def test_k_equal_v_ignores_a_given_tail():
    s, t = logits((4, 9), seed=1), logits((4, 9), seed=2)
    lp, ids, _ = L.teacher_top_k(t, 9)
    assert_close(L.sparse_kl(s, lp, ids, torch.zeros(4)), L.kl_divergence(s, t))


def test_teacher_top_k():
    t = logits((2, 3, 17), seed=5)
    for temperature in (1.0, 2.0):
        lp, ids, tail = L.teacher_top_k(t, 4, temperature)
        full = torch.log_softmax(t / temperature, -1)
        assert_close(lp, full.topk(4, -1).values)
        assert torch.equal(lp, full.gather(-1, ids))
        assert (lp.diff(dim=-1) <= 0).all()
        rest = full.scatter(-1, ids, float("-inf")).exp().sum(-1)
        assert_close(tail.exp(), rest)
        assert_close(torch.logaddexp(lp.logsumexp(-1), tail), torch.zeros(2, 3), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------
# 2. k < V: lower bounds, and the student's tail bucket


@pytest.mark.parametrize("name", ["kl", "js", "gjsd"])
def test_sparse_is_a_lower_bound_for_k_below_v(name):
    for case in range(40):
        V = 5 + case % 37
        k = 1 + (case * 7) % (V - 1)
        temperature = (0.5, 1.0, 2.0, 4.0)[case % 4]
        s = logits((3, V), seed=100 + case, scale=0.5 + case % 5)
        t = logits((3, V), seed=200 + case, scale=0.5 + (case * 3) % 7)
        dense, sparse = dense_and_sparse(name, s, t, k, temperature, random_mask((3,), case))
        assert sparse.item() >= 0, (case, sparse)
        assert sparse.item() <= dense.item() * (1 + 1e-6) + 1e-7, (case, V, k, temperature, sparse, dense)


def _bucketed_reference(s, t, k, temperature):
    """KL(p‖q) and JS over the k+1 buckets, float64, the student's tail summed element by element."""
    log_p = torch.log_softmax(t.double() / temperature, -1)
    log_q = torch.log_softmax(s.double() / temperature, -1)
    top, ids = log_p.topk(k, -1)
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, ids, True)
    p = torch.cat([top.exp(), (log_p.exp() * ~in_top).sum(-1, keepdim=True)], -1)
    q = torch.cat([log_q.gather(-1, ids).exp(), (log_q.exp() * ~in_top).sum(-1, keepdim=True)], -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    m = (p + q) / 2
    js = 0.5 * ((p * (p.log() - m.log())).sum(-1) + (q * (q.log() - m.log())).sum(-1)).mean()
    return {"kl": kl * temperature**2, "js": js * temperature**2}


@pytest.mark.parametrize("name", ["kl", "js"])
@pytest.mark.parametrize("temperature, scale", [(2.0, 3.0), (1.0, 3.0),
                                                # a confident student: its mass outside the teacher's
                                                # top-k is 1e-8..1e-5, where 1 − Σ_k q_k would cancel
                                                (1.0, 12.0)])
def test_student_tail_mass_matches_an_elementwise_float64_sum(name, temperature, scale):
    # The student's tail bucket must be its mass outside the teacher's top-k to float precision,
    # also when that mass is tiny. Values and gradients against a float64 reference.
    V, k, n = 2000, 32, 24
    t = logits((n, V), F64, seed=1, scale=3.0)
    s = (t + 0.5 * logits((n, V), F64, seed=2, scale=1.0)) * (scale / 3.0)
    lp, ids, tail = L.teacher_top_k(t, k, temperature)
    for dtype, tol in ((F64, 1e-10), (F32, 1e-5)):
        x = s.detach().to(dtype).clone().requires_grad_(True)
        got = L.sparse_divergence(name, x, lp.to(dtype), ids, tail.to(dtype), temperature)
        y = s.detach().clone().requires_grad_(True)
        want = _bucketed_reference(y, t, k, temperature)[name]
        assert_close(got.double(), want, rtol=tol, atol=1e-12)
        got.backward()
        want.backward()
        assert_close(x.grad.double(), y.grad, rtol=max(tol, 1e-10) * 10, atol=1e-8 if dtype == F32 else 1e-14)


def test_sparse_kl_grows_with_k():
    # k refines the buckets of every smaller k: the sparse KL cannot decrease
    s, t = logits((6, 40), seed=1), logits((6, 40), seed=2, scale=4.0)
    values = [dense_and_sparse("kl", s, t, k, TAU)[1].item() for k in (1, 2, 4, 8, 16, 32, 39, 40)]
    assert all(a <= b * (1 + 1e-6) for a, b in zip(values, values[1:])), values
    assert values[0] < values[-1]


def test_sparse_is_zero_when_student_equals_teacher():
    t = logits((4, 30), seed=7)
    for name in ("kl", "js", "gjsd"):
        _, sparse = dense_and_sparse(name, t.clone(), t, 5, TAU)
        assert abs(sparse.item()) < 1e-6


@settings(max_examples=60, deadline=None)
@given(V=st.integers(2, 48), k_frac=st.floats(0.0, 0.999), rows=st.integers(1, 4),
       s_scale=st.floats(0.01, 20.0), t_scale=st.floats(0.01, 20.0),
       temperature=st.sampled_from([0.5, 1.0, 2.0, 5.0]), seed=st.integers(0, 2**31 - 1))
def test_sparse_lower_bound_property(V, k_frac, rows, s_scale, t_scale, temperature, seed):
    k = 1 + int(k_frac * (V - 1))  # 1 .. V-1
    s = logits((rows, V), F64, seed, s_scale)  # float64: the bound, not float32 rounding, is tested
    t = logits((rows, V), F64, seed + 1, t_scale)
    for name in ("kl", "js"):
        dense, sparse = dense_and_sparse(name, s, t, k, temperature)
        assert torch.isfinite(sparse)
        assert sparse.item() >= -1e-12
        assert sparse.item() <= dense.item() * (1 + 1e-9) + 1e-12
    if k == V - 1:  # one token in the tail bucket: its own bucket, so nothing is merged
        dense, sparse = dense_and_sparse("kl", s, t, k, temperature)
        assert_close(sparse, dense, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------
# 3. gradients and the chunked path


@pytest.mark.parametrize("name,param,k", [("kl", None, 3), ("js", None, 3), ("gjsd", 0.3, 3), ("kl", None, 7)],
                         ids=["kl-k3", "js-k3", "gjsd0.3-k3", "kl-k=V"])
def test_gradcheck(name, param, k):
    V = 7
    s = logits((2, 3, V), F64, seed=11, scale=1.5).requires_grad_(True)
    lp, ids, tail = L.teacher_top_k(logits((2, 3, V), F64, seed=12, scale=2.0), k, TAU)
    assert lp.dtype == F64
    mask = random_mask((2, 3), 13)

    def f(x):
        return L.sparse_divergence(name, x, lp, ids, tail, temperature=TAU, mask=mask, param=param, chunk_size=2)

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [5, 29], ids=["k<V", "k=V"])
def test_chunked_equals_dense(k):
    V = 29
    lp, ids, tail = L.teacher_top_k(logits((3, 7, V), seed=22), k, TAU)
    mask = random_mask((3, 7), 23)
    for name, param in [("kl", None), ("js", None), ("gjsd", 0.3), ("rkl", None), ("tvd", None)]:
        s = logits((3, 7, V), seed=21).requires_grad_(True)
        out = {}
        for chunk in (None, 1, 4, "auto"):
            value = L.sparse_divergence(name, s, lp, ids, tail, TAU, mask, param=param, chunk_size=chunk)
            out[chunk] = (value, *torch.autograd.grad(value, s))
        for chunk in (1, 4, "auto"):
            assert_close(out[chunk][0], out[None][0], rtol=1e-6, atol=1e-7, msg=f"{name} {chunk}")
            assert_close(out[chunk][1], out[None][1], rtol=1e-6, atol=1e-9, msg=f"{name} {chunk}")


def test_cache_tensors_from_inference_mode():
    # the cache is read (or the teacher run) under inference mode
    s = logits((4, 6, 31), seed=1).requires_grad_(True)
    with torch.inference_mode():
        lp, ids, tail = L.teacher_top_k(logits((4, 6, 31), seed=2), 8, TAU)
    loss = L.sparse_js(s, lp, ids, tail, TAU)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------
# 4. what the cache stores: fp16 log-probs, a tail of -inf


@pytest.mark.parametrize("name,param", [("kl", None), ("js", None), ("gjsd", 0.3)], ids=["kl", "js", "gjsd0.3"])
def test_fp16_top_k_and_zero_tail_mass_stay_finite(name, param):
    V, k = 50, 8
    t = logits((3, 4, V), seed=31, scale=5.0)
    t[0, :, 3:] = float("-inf")  # teacher puts all its mass on 3 tokens: tail -inf, and -inf inside top-k
    t[1] = t[1] * 1e3  # near one-hot: tail mass underflows
    lp, ids, tail = L.teacher_top_k(t, k, TAU)
    assert torch.isneginf(tail[0]).all() and torch.isneginf(lp[0, :, 3:]).all()
    lp16 = lp.to(torch.float16)  # what the cache files hold
    assert torch.isneginf(lp16).any() and (lp16[torch.isfinite(lp16)] < -20).any()
    for student_dtype in (F32, torch.bfloat16, torch.float16):
        s = logits((3, 4, V), student_dtype, seed=32, scale=4.0).requires_grad_(True)
        for chunk in (None, "auto"):
            value = L.sparse_divergence(name, s, lp16, ids, tail, TAU, param=param, chunk_size=chunk)
            assert value.dtype == F32 and torch.isfinite(value) and value.item() > 0
            grad, = torch.autograd.grad(value, s)
            assert grad.dtype == student_dtype and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # fp16 storage moves the value by about its precision only
    s = logits((3, 4, V), seed=32, scale=4.0)
    exact = L.sparse_divergence(name, s, lp, ids, tail, TAU, param=param)
    stored = L.sparse_divergence(name, s, lp16, ids, tail, TAU, param=param)
    assert_close(stored, exact, rtol=5e-3, atol=1e-4)


def test_empty_mask_gives_zero():
    s = logits((2, 3, 11), seed=1).requires_grad_(True)
    lp, ids, tail = L.teacher_top_k(logits((2, 3, 11), seed=2), 4)
    value = L.sparse_kl(s, lp, ids, tail, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert (s.grad == 0).all()


# --------------------------------------------------------------------------
# 5. bad input


def test_bad_input():
    s = logits((2, 3, 11), seed=1)
    lp, ids, tail = L.teacher_top_k(logits((2, 3, 11), seed=2), 4)
    with pytest.raises(KdlibError, match="do not fit"):
        L.sparse_kl(s[:, :2], lp, ids, tail)  # fewer positions than the cache
    with pytest.raises(KdlibError, match="do not fit"):
        L.sparse_kl(s, lp[..., :3], ids, tail)  # log-probs and ids of different k
    with pytest.raises(KdlibError, match="do not fit"):
        L.sparse_kl(s, lp.reshape(6, 4), ids.reshape(6, 4), tail)
    big = torch.arange(12).expand(2, 3, 12)
    with pytest.raises(KdlibError, match="exceeds the student's vocabulary"):
        L.sparse_kl(s, torch.zeros(2, 3, 12), big, None)
    with pytest.raises(KdlibError, match="log tail mass"):
        L.sparse_kl(s, lp, ids, None)
    with pytest.raises(KdlibError, match="log tail mass"):
        L.sparse_kl(s, lp, ids, tail[:, :2])
    with pytest.raises(KdlibError, match="unknown divergence 'jsd'"):
        L.sparse_divergence("jsd", s, lp, ids, tail)
    with pytest.raises(KdlibError, match="mask shape"):
        L.sparse_kl(s, lp, ids, tail, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(KdlibError, match="beta"):
        L.sparse_generalized_jsd(s, lp, ids, tail, beta=1.5)
    with pytest.raises(KdlibError, match="takes no parameter"):
        L.sparse_divergence("kl", s, lp, ids, tail, param=0.5)
    with pytest.raises(KdlibError, match=r"top-k must be in \[1, V=11\], got 12"):
        L.teacher_top_k(logits((2, 3, 11), seed=2), 12)


# --------------------------------------------------------------------------
# 6. how much the tail bucket loses: a small trained teacher


def markov_tokens(V: int, n: int, seed: int = 0) -> torch.Tensor:
    """A token stream from a sparse random Markov chain: 4 likely successors per token, 5 % noise."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, V, (V, 4), generator=g)  # [V, 4]
    choice = torch.multinomial(torch.tensor([0.6, 0.2, 0.1, 0.05]).expand(n, 4), 1, generator=g)[:, 0]
    noise, rand = torch.rand(n, generator=g), torch.randint(0, V, (n,), generator=g)
    seq = [0]
    for i in range(1, n):
        seq.append(int(rand[i]) if noise[i] < 0.05 else int(succ[seq[-1], choice[i]]))
    return torch.tensor(seq)


@pytest.fixture(scope="module")
def trained_pair():
    """(teacher logits, student logits) [8, 32, 512]: a GPT-2 teacher trained 100 steps, a random TinyGPT."""
    from transformers import GPT2Config, GPT2LMHeadModel

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    V, block = 512, 32
    seq = markov_tokens(V, 20_000)
    g = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=block, n_embd=64, n_layer=2, n_head=2,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                             bos_token_id=0, eos_token_id=0))
        student = TinyGPT(TinyGPTConfig(vocab_size=V, block_size=block, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                                        dropout=0.0, positions="learned"))
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        starts = torch.randint(0, len(seq) - block - 1, (16,), generator=g)
        x = torch.stack([seq[a:a + block + 1] for a in starts])  # [16, T+1]
        loss = torch.nn.functional.cross_entropy(teacher(x[:, :-1]).logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 2.0  # it learned the chain: from ~ln 512 = 6.2 to ~2
    starts = torch.randint(0, len(seq) - block - 1, (8,), generator=g)
    x = torch.stack([seq[a:a + block] for a in starts])  # [8, T]
    with torch.no_grad():
        out = teacher.eval()(x).logits, student.eval()(x).logits
    torch.set_num_threads(before)
    return out


def test_relative_error_table(trained_pair):
    t, s = trained_pair
    ks = (8, 32, 128)
    lines = [f"relative error (dense - sparse) / dense, V = {t.shape[-1]}, {t.shape[0] * t.shape[1]} positions",
             f"{'tau':>4}{'k':>6}{'KL dense':>10}{'KL sparse':>11}{'KL rel.err':>12}"
             f"{'JS dense':>10}{'JS sparse':>11}{'JS rel.err':>12}{'tail mass':>11}"]
    for temperature in (1.0, 2.0):
        errors = {"kl": [], "js": []}
        for k in ks:
            lp, ids, tail = L.teacher_top_k(t, k, temperature)
            row = f"{temperature:>4g}{k:>6}"
            for name in ("kl", "js"):
                dense, sparse = dense_and_sparse(name, s, t, k, temperature)
                rel = (dense - sparse).item() / dense.item()
                assert rel >= -1e-6, (name, temperature, k, rel)
                errors[name].append(rel)
                row += f"{dense.item():>10.4f}{sparse.item():>11.4f}{rel:>12.2%}"
            lines.append(row + f"{tail.exp().mean().item():>11.3f}")
        for name, rel in errors.items():
            assert rel[0] > rel[1] > rel[2] >= -1e-6, (name, temperature, rel)
            assert rel[0] > 0.01  # k = 8 loses a measurable part of the divergence
    print("\n" + "\n".join(lines))

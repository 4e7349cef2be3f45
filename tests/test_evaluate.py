"""Perplexity under the sliding-window protocol (design.md §6), against a token-by-token reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from kdlib.errors import KdlibError
from kdlib.evaluate import perplexity, score, windows
from kdlib.models import TinyGPT



def _tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _tiny(cfg, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: logits far from uniform
        for p in model.parameters():
            p.mul_(5.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------
# the window plan


def _scored(plan) -> list[int]:
    return [t for _, end, n_scored in plan for t in range(end - n_scored, end)]


def test_windows_score_each_token_once_with_context():
    for n in range(2, 41):
        for block in range(2, 9):
            for stride in range(1, block + 1):
                plan = windows(n, block, stride)
                where = (n, block, stride)
                scored = _scored(plan)
                assert len(scored) == len(set(scored)), where
                if stride < block:
                    assert scored == list(range(1, n)), where
                else:
                    assert scored == [t for t in range(1, n) if t % block], where
                for i, (begin, end, n_scored) in enumerate(plan):
                    assert begin == i * stride, where  # windows advance by stride from the start
                    assert 0 <= begin < end <= n and end - begin <= block, where
                    assert 1 <= n_scored <= end - begin - 1, where  # the window's first token: context only
                    assert begin <= end - n_scored - 1, where
                    if end < n:
                        assert end - begin == block, where  # only the last window may be short
                # The plan reaches the end, unless all that is left is one token alone in its window.
                assert plan[-1][1] == n or (stride == block and plan[-1][1] == n - 1 == len(plan) * stride), where


def test_windows_examples():
    # The fast protocol: each window's first token unscored (the study's 127 of 128).
    assert windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert windows(9, 4, 4) == [(0, 4, 3), (4, 8, 3)]  # token 8 alone: no context, not scored
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(3, 8, 4) == [(0, 3, 2)]
    assert windows(2, 2, 1) == [(0, 2, 1)]
    assert sum(n for *_, n in windows(128 * 10, 128, 128)) == 127 * 10


@pytest.mark.parametrize("block, stride", [(1, 1), (0, 1), (-3, 1), (4, 0), (4, 5), (4, -1), (2, 3)])
def test_windows_bad_block_or_stride(block, stride):
    with pytest.raises(KdlibError, match="block_size|stride"):
        windows(10, block, stride)


# --------------------------------------------------------------------------
# score / perplexity against an independent reference


def _reference(model, ids: torch.Tensor, block: int, stride: int) -> tuple[float, int, list[int]]:
    """HF's sliding-window procedure, one token at a time.

    Each window starts at a multiple of ``stride`` and holds up to ``block``
    tokens; it scores the tokens no earlier window reached, except its own
    first one. A scored token's NLL comes from running the model on the
    window's tokens up to (not including) the token and reading the last
    position: no batching, no shifting of a full window's logits.
    """
    n = len(ids)
    total, count, scored = 0.0, 0, []
    prev_end, begin = 0, 0
    with torch.no_grad():
        while True:
            end = min(begin + block, n)
            for t in range(max(prev_end, begin + 1), end):
                context = ids[begin:t]
                logits = model(context[None]).logits[0, -1].double()
                total -= torch.log_softmax(logits, dim=-1)[ids[t]].item()
                count += 1
                scored.append(t)
            prev_end = end
            if end == n:
                return total, count, scored
            begin += stride


@pytest.mark.parametrize("n", [37, 40, 8, 5, 2])
def test_score_matches_token_by_token_reference_for_every_stride_and_batch(tiny_config, n):
    block = 8
    cfg = tiny_config(block_size=block)
    model = _tiny(cfg)
    ids = _tokens(n, cfg.vocab_size, seed=n)
    for stride in range(1, block + 1):
        ref_total, ref_count, ref_scored = _reference(model, ids, block, stride)
        expected_count = n - 1 if stride < block else len([t for t in range(1, n) if t % block])
        assert ref_count == expected_count == len(set(ref_scored))
        for batch_size in (1, 3, 8):
            total, count = score(model, ids, block, stride=stride, batch_size=batch_size)
            assert count == ref_count, (stride, batch_size)
            assert_close(total, ref_total, rtol=2e-6, atol=1e-5, msg=f"stride {stride}, batch {batch_size}")
            ppl = perplexity(model, ids, block, stride=stride, batch_size=batch_size)
            assert_close(ppl, math.exp(ref_total / ref_count), rtol=2e-6, atol=0)


def test_score_with_eval_block_shorter_than_the_model(tiny_config):
    cfg = tiny_config(block_size=32, positions="sinusoidal")
    model = _tiny(cfg, seed=1)
    ids = _tokens(50, cfg.vocab_size, seed=3)
    for block, stride in [(5, 2), (5, 5), (12, 7), (32, 16)]:
        ref_total, ref_count, _ = _reference(model, ids, block, stride)
        total, count = score(model, ids, block, stride=stride, batch_size=4)
        assert count == ref_count
        assert_close(total, ref_total, rtol=2e-6, atol=1e-5)


def test_sliding_window_is_not_the_same_as_non_overlapping(tiny_config):
    # Sanity of the reference itself: the protocols score different contexts.
    model = _tiny(tiny_config(block_size=8))
    ids = _tokens(37, 97, seed=4)
    assert abs(perplexity(model, ids, 8, stride=8) - perplexity(model, ids, 8, stride=4)) > 1e-3


def test_default_stride_is_half_the_block(tiny_config):
    model = _tiny(tiny_config(block_size=8))
    ids = _tokens(37, 97, seed=5)
    assert perplexity(model, ids, 8) == perplexity(model, ids, 8, stride=4)
    assert score(model, ids, 8) == score(model, ids, 8, stride=4)
    assert score(model, ids, 3) == score(model, ids, 3, stride=1)


def test_ids_as_list_array_or_tensor(tiny_config):
    model = _tiny(tiny_config(block_size=8))
    ids = _tokens(23, 97, seed=6)
    want = score(model, ids, 8, stride=3)
    assert score(model, ids.tolist(), 8, stride=3) == want
    assert score(model, ids.numpy().astype(np.int32), 8, stride=3) == want
    total, count = want
    assert perplexity(model, ids, 8, stride=3) == pytest.approx(math.exp(total / count), rel=1e-12)


def test_hugging_face_model_matches_reference(make_teacher):
    model = make_teacher(n_layer=2, n_embd=24, n_head=2, n_positions=64).eval()
    ids = _tokens(45, model.config.vocab_size, seed=7)
    block = 16
    for stride in (1, 5, 8, 16):
        ref_total, ref_count, _ = _reference(model, ids, block, stride)
        for batch_size in (1, 8):
            total, count = score(model, ids, block, stride=stride, batch_size=batch_size)
            assert count == ref_count
            assert_close(total, ref_total, rtol=1e-5, atol=1e-5, msg=f"stride {stride}, batch {batch_size}")
        if stride == 8:
            assert_close(perplexity(model, ids, block, stride=8), math.exp(ref_total / ref_count),
                         rtol=1e-5, atol=0)


# --------------------------------------------------------------------------
# side effects


def test_perplexity_restores_training_mode_and_keeps_weights(tiny_config):
    cfg = tiny_config(block_size=8, dropout=0.5)
    model = _tiny(cfg)
    ids = _tokens(30, cfg.vocab_size, seed=8)
    before = copy.deepcopy(model.state_dict())
    ref_total, ref_count, _ = _reference(model.eval(), ids, 8, 4)  # eval mode: dropout off

    model.train()
    first = perplexity(model, ids, 8, stride=4)
    assert model.training and all(m.training for m in model.modules())
    second = perplexity(model, ids, 8, stride=4)  # deterministic: dropout was off while scoring
    assert first == second
    assert_close(first, math.exp(ref_total / ref_count), rtol=2e-6, atol=0)

    model.eval()
    perplexity(model, ids, 8, stride=4)
    assert not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert all(p.grad is None for p in model.parameters())


def test_training_mode_restored_when_the_model_raises(tiny_config):
    model = _tiny(tiny_config(block_size=8)).train()
    with pytest.raises(KdlibError, match="block_size"):
        perplexity(model, _tokens(30, 97), 16, stride=8)  # windows longer than the model takes
    assert model.training


def test_uniform_logits_give_perplexity_equal_to_vocab_size(tiny_config):
    for vocab in (97, 13):
        cfg = tiny_config(vocab_size=vocab, tie_embeddings=False, block_size=8)
        model = _tiny(cfg)
        with torch.no_grad():
            model.lm_head.weight.zero_()
        assert model.lm_head.bias is None
        ids = _tokens(41, vocab, seed=9)
        for stride in (1, 4, 8):
            ppl = perplexity(model, ids, 8, stride=stride, batch_size=3)
            assert_close(ppl, float(vocab), rtol=1e-4, atol=0)
            total, count = score(model, ids, 8, stride=stride)
            assert_close(total, count * math.log(vocab), rtol=1e-5, atol=0)


def test_a_model_that_knows_the_sequence_has_perplexity_near_one(tiny_config):
    # Next token = current token + 1 (mod V), hard-wired: lm_head reads the token embedding
    # and maps token v to v + 1 with a large margin.
    vocab = 11
    cfg = tiny_config(vocab_size=vocab, tie_embeddings=False, block_size=8, n_embd=vocab + 1, n_head=1,
                      bias=False)
    model = _tiny(cfg)
    with torch.no_grad():
        for block in model.h:  # blocks contribute nothing
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.wpe.weight.zero_()
        model.wte.weight.copy_(torch.eye(vocab, cfg.n_embd) * 10)
        model.ln_f.weight.fill_(1.0)
        model.lm_head.weight.copy_(torch.roll(torch.eye(vocab, cfg.n_embd), 1, dims=0) * 50)
    ids = torch.arange(60) % vocab
    assert perplexity(model, ids, 8, stride=4) < 1.001
    shuffled = ids[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    assert perplexity(model, shuffled, 8, stride=4) > 10


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("ids", [[], [5], torch.tensor([3])])
def test_fewer_than_two_tokens(tiny_config, ids):
    model = _tiny(tiny_config(block_size=8))
    with pytest.raises(KdlibError, match="at least 2 tokens"):
        perplexity(model, ids, 8)


def test_two_dimensional_ids_refused(tiny_config):
    model = _tiny(tiny_config(block_size=8))
    with pytest.raises(KdlibError, match="flat sequence"):
        perplexity(model, _tokens(20, 97).reshape(2, 10), 8)
    with pytest.raises(KdlibError, match="flat sequence"):
        score(model, np.zeros((1, 10), dtype=np.int64), 8)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(tiny_config, batch_size):
    model = _tiny(tiny_config(block_size=8)).train()
    with pytest.raises(KdlibError, match="batch_size"):
        perplexity(model, _tokens(20, 97), 8, batch_size=batch_size)
    assert model.training


@pytest.mark.parametrize("block, stride", [(1, None), (8, 0), (8, 9)])
def test_bad_block_or_stride_in_perplexity(tiny_config, block, stride):
    model = _tiny(tiny_config(block_size=8)).train()
    with pytest.raises(KdlibError, match="block_size|stride"):
        perplexity(model, _tokens(20, 97), block, stride=stride)
    assert model.training

"""Seeded top-p (nucleus) sampling from TinyGPT or any Hugging Face causal LM.

A few sampled continuations of fixed prompts make a table of perplexities concrete
(``python -m kdlib sample``, the analysis notebook). The draws come from a CPU
``torch.Generator`` over float32 probabilities moved to the CPU, so the same model,
prompt, seed and device give the same ids; another device computes the logits with
other rounding, and a near tie can then go the other way.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import KdlibError
from .evaluate import _context, _vocab

# Prompts that both corpora continue sensibly: the demo's (Python's documentation) and the
# study's (WikiText-103 articles).
DEFAULT_PROMPTS = ("The history of the", "In the first half of the", "The function returns", "For example,")


def _check_top_p(top_p) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise KdlibError(f"top_p {top_p!r} is not a probability mass to keep: give a number in (0, 1] "
                         "(1 = sample from the whole distribution; near 0 = always the most likely token) "
                         "(sample --top-p)")


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``logits`` [..., V] with every token outside the nucleus set to -inf.

    The nucleus of a row is the smallest set of its most likely tokens whose probability reaches
    ``top_p`` (Holtzman et al., 2020); the most likely token is always in it, so a tiny ``top_p``
    is greedy decoding. Ties are broken by the lower id, as ``argmax`` does.
    """
    _check_top_p(top_p)
    if top_p >= 1:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)  # [..., V]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [..., V] each
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [..., V]: mass of the likelier tokens
    drop_sorted = before >= top_p  # [..., V]
    # The first token has 0 before it; kept explicitly, since a top_p below float32's smallest
    # number compares as 0 (and 0 >= 0 would drop the whole row).
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [..., V] back in id order
    return logits.masked_fill(drop, -math.inf)


def _check_request(prompt_ids, n_tokens, temperature, vocab_size, model, seed) -> list[int]:
    """The prompt as a list of ids, after refusing what ``generate`` cannot do."""
    ids = [int(i) for i in (prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else prompt_ids)]
    if not ids:
        raise KdlibError("the prompt has no tokens: give at least one (a prompt of only spaces encodes to none)")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise KdlibError(f"n_tokens {n_tokens!r} is not a number of tokens to generate: give a whole number >= 1 "
                         "(sample --tokens)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise KdlibError(f"temperature {temperature!r} must be a finite number > 0 (1 = the model's own "
                         "distribution; lower is closer to greedy)")
    model_vocab = _vocab(model)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or not 1 <= vocab_size <= (model_vocab or vocab_size)):
        raise KdlibError(f"vocab_size {vocab_size!r} must be a whole number from 1 to the model's "
                         f"{model_vocab} outputs (the tokenizer's size, where the model's vocabulary is padded)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise KdlibError(f"seed {seed!r} must be a whole number from -2**63 to 2**64 - 1 (what torch's "
                         "generator takes) (sample --seed)")
    if min(ids) < 0 or (model_vocab is not None and max(ids) >= model_vocab):
        raise KdlibError(f"the prompt's token ids range from {min(ids)} to {max(ids)}, but the model has "
                         f"embeddings for {model_vocab} tokens: encode it with the tokenizer the model was "
                         "trained with")
    return ids


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Sequence[int], n_tokens: int, *, top_p: float = 0.9,
             temperature: float = 1.0, seed: int = 0, vocab_size: Optional[int] = None) -> list[int]:
    """``n_tokens`` new ids continuing ``prompt_ids``, sampled one at a time from the top-p nucleus.

    Arguments:
        model: TinyGPT or a Hugging Face causal LM (``model(x).logits``), on any device; it sees
            at most its longest input (TinyGPT's ``block_size``, GPT-2's ``n_positions``): the
            earliest tokens are cropped from a longer context.
        top_p: the nucleus's probability mass (``top_p_filter``); 1 = plain sampling.
        temperature: divides the logits before the nucleus is taken.
        seed: seeds the CPU generator of the draws: same model, prompt, seed and device, same ids.
        vocab_size: sample only ids below it (a teacher's vocabulary can be padded past its
            tokenizer's, and the padding ids decode to nothing).
    """
    _check_top_p(top_p)
    ids = _check_request(prompt_ids, n_tokens, temperature, vocab_size, model, seed)
    context, _ = _context(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        for _ in range(n_tokens):
            window = ids[-context:] if context is not None else ids
            x = torch.tensor([window], dtype=torch.long, device=device)  # [1, L]
            logits = model(x).logits[0, -1].float().cpu()  # [V]: the next token's
            if vocab_size is not None:
                logits[vocab_size:] = -math.inf
            probs = torch.softmax(top_p_filter(logits / temperature, top_p), dim=-1)  # [V]
            token = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return new

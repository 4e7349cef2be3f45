"""Perplexity under the sliding-window protocol (design.md §6).

Windows of ``block_size`` tokens advance by ``stride``; each window scores
only the tokens no earlier window scored, and a token needs at least one
token of context inside its window. With ``stride < block_size`` every token
but the split's first is scored exactly once; ``stride == block_size`` is the
fast non-overlapping protocol, where each window's first token goes unscored
(the original study's 127 of 128). ``stride = block_size // 2`` is the default
for reported numbers. Works for TinyGPT and any Hugging Face causal LM.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import KdlibError


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: tokens ``end - n_scored .. end - 1`` are scored."""
    if block_size < 2:
        raise KdlibError(f"block_size must be >= 2 to predict anything, got {block_size}")
    if not 1 <= stride <= block_size:
        raise KdlibError(f"stride must be in [1, block_size={block_size}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        # The window's first token has no context inside it: never scored.
        first_scorable = max(prev_end, begin + 1)
        if end > first_scorable:
            out.append((begin, end, end - first_scorable))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def score(model: nn.Module, ids: Union[Tensor, np.ndarray, Sequence[int]], block_size: int,
          stride: Optional[int] = None, batch_size: int = 8) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of ``ids`` under the sliding-window protocol."""
    stride = block_size // 2 if stride is None else stride
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if ids.dim() != 1:
        raise KdlibError(f"perplexity takes a flat sequence of token ids, got shape {tuple(ids.shape)}")
    if len(ids) < 2:
        raise KdlibError(f"need at least 2 tokens to score, got {len(ids)}; is the split empty?")
    if batch_size < 1:
        raise KdlibError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        plan = windows(len(ids), block_size, stride)
        # Equal-length windows batch together; only the last one can be shorter.
        for i in range(0, len(plan), batch_size):
            group = plan[i:i + batch_size]
            by_len: dict[int, list] = {}
            for w in group:
                by_len.setdefault(w[1] - w[0], []).append(w)
            for length, ws in by_len.items():
                x = torch.stack([ids[b:e] for b, e, _ in ws]).to(device)  # [b, L]
                logits = model(x).logits[:, :-1].float()  # [b, L-1, V]: position j predicts j+1
                targets = x[:, 1:]  # [b, L-1]
                nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [b, L-1]
                scored = torch.tensor([n for _, _, n in ws], device=nll.device)  # [b]
                keep = torch.arange(length - 1, device=nll.device) >= (length - 1 - scored)[:, None]  # [b, L-1]
                total += float(torch.where(keep, nll, 0.0).sum())  # one host sync per batch
                count += int(sum(n for _, _, n in ws))
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, ids, block_size: int, stride: Optional[int] = None,
               batch_size: int = 8) -> float:
    """exp(total NLL / scored tokens); stride defaults to block_size // 2."""
    total, count = score(model, ids, block_size, stride, batch_size)
    return math.exp(total / count) if total / count < 700 else math.inf  # exp overflows past ~709

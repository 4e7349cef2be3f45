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
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import KdlibError


def _whole(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_protocol(block_size, stride) -> None:
    """Refuse a window length or step that is not a whole number of tokens in range (``True`` is not 1,
    ``64.0`` not a step), naming the value and its limits: the CLI's ``--block-size`` and ``--stride``."""
    if not _whole(block_size) or block_size < 2:
        raise KdlibError(f"block_size {block_size!r} is not a window length: give a whole number of tokens, "
                         "at least 2 (one token of context and one to predict) (eval --block-size)")
    if not _whole(stride) or not 1 <= stride <= block_size:
        raise KdlibError(f"stride {stride!r} is not a window step: give a whole number of tokens from 1 to the "
                         f"block size {block_size} (eval --stride; without it, block_size // 2 = "
                         f"{block_size // 2}). A step of 0 would never move; one past the block would skip tokens")


def _context(model: nn.Module) -> tuple[Optional[int], str]:
    """(the longest input ``model`` takes, where it says so): TinyGPT's model.block_size, a Hugging Face
    model's positions; (None, "") when it does not say."""
    cfg = getattr(model, "config", None)
    for key in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if _whole(value):
            return int(value), ("model." if key == "block_size" else "config.") + key
    return None, ""


def _vocab(model: nn.Module) -> Optional[int]:
    """How many token ids ``model`` has embeddings for (its output head's rows where it has one)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(value) if _whole(value) else None


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: tokens ``end - n_scored .. end - 1`` are scored."""
    check_protocol(block_size, stride)
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


def checked_ids(model: nn.Module, ids, block_size: int, stride: Optional[int], batch_size: int
                ) -> tuple[Tensor, int]:
    """(``ids`` as a flat int64 tensor, the stride) once the protocol, the ids and the batch size are
    checked against ``model``: every refusal names the value and what to give instead."""
    if _whole(block_size) and block_size >= 2:
        stride = block_size // 2 if stride is None else stride
    check_protocol(block_size, stride)
    context, where = _context(model)
    if context is not None and block_size > context:  # else the model would blame the split's length
        raise KdlibError(f"block size {block_size} is longer than the model's context of {context} tokens "
                         f"(its {where}): give a block size of at most {context} (eval --block-size)")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if ids.dim() != 1:
        raise KdlibError(f"perplexity takes a flat sequence of token ids, got shape {tuple(ids.shape)}")
    if len(ids) < 2:
        raise KdlibError(f"need at least 2 tokens to score, got {len(ids)}; is the split empty?")
    if not _whole(batch_size) or batch_size < 1:
        raise KdlibError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    # An id out of range would die in the embedding (IndexError; on a GPU a device-side assert).
    vocab = _vocab(model)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        limit = f"ids 0..{vocab - 1} ({vocab} tokens)" if vocab is not None else "ids from 0"
        raise KdlibError(f"the token ids to score range from {low} to {high}, but the model has embeddings for "
                         f"{limit}: the data was made with another tokenizer; score data prepared for this "
                         "model (data.checked_split)")
    return ids, stride


def scored_batches(ids: Tensor, block_size: int, stride: int, batch_size: int, device
                   ) -> Iterator[tuple[Tensor, Tensor]]:
    """(windows ``x`` [b, L] on ``device``, ``keep`` [b, L-1]: which of each window's next-token
    predictions the protocol scores) per batch of ``batch_size`` windows. Position j of a window
    predicts token j + 1; equal-length windows batch together, only the last one can be shorter."""
    plan = windows(len(ids), block_size, stride)
    for i in range(0, len(plan), batch_size):
        by_len: dict[int, list] = {}
        for w in plan[i:i + batch_size]:
            by_len.setdefault(w[1] - w[0], []).append(w)
        for length, ws in by_len.items():
            x = torch.stack([ids[b:e] for b, e, _ in ws]).to(device)  # [b, L]
            scored = torch.tensor([n for _, _, n in ws], device=x.device)  # [b]
            keep = torch.arange(length - 1, device=x.device) >= (length - 1 - scored)[:, None]  # [b, L-1]
            yield x, keep


@torch.no_grad()
def score(model: nn.Module, ids: Union[Tensor, np.ndarray, Sequence[int]], block_size: int,
          stride: Optional[int] = None, batch_size: int = 8) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of ``ids`` under the sliding-window protocol."""
    ids, stride = checked_ids(model, ids, block_size, stride, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # per batch a float32 sum, added in float64
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for x, keep in scored_batches(ids, block_size, stride, batch_size, device):
            logits = model(x).logits[:, :-1].float()  # [b, L-1, V]: position j predicts j+1
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [b, L-1]
            total += torch.where(keep, nll, 0.0).sum().double()
            count += keep.sum()
    finally:
        model.train(was_training)
    return float(total), int(count)  # one host sync


def perplexity(model: nn.Module, ids, block_size: int, stride: Optional[int] = None,
               batch_size: int = 8) -> float:
    """exp(total NLL / scored tokens); stride defaults to block_size // 2."""
    total, count = score(model, ids, block_size, stride, batch_size)
    return math.exp(total / count) if total / count < 700 else math.inf  # exp overflows past ~709

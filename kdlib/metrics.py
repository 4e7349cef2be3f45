"""What a student's test score means beside perplexity: fidelity to the teacher, calibration, and
where in the vocabulary the perplexity comes from (docs/losses.md, "Test metrics").

All of them are measured on exactly the tokens the sliding-window protocol scores
(``evaluate.scored_batches``: block and stride as for test perplexity), in one pass that runs the
student and, when given, the teacher on the same windows:

- **fidelity** (Stanton et al. 2021, "Does Knowledge Distillation Really Work?"): top-1 agreement
  (the student's most likely next token is the teacher's) and KL(teacher ‖ student) at
  temperature 1, in nats per token;
- **calibration**: the expected calibration error of the next-token distribution (Guo et al.
  2017): confidence = the top token's probability, correct = the top token is the next token, 15
  equal-width bins ``((m-1)/15, m/15]``, ECE = sum over bins of (tokens in bin / tokens) x
  |accuracy - mean confidence|; the bins' counts, confidences and accuracies are kept for the
  reliability diagram;
- **perplexity by frequency bucket**: the scored tokens grouped by how often the token to predict
  occurs in the training split (``frequency_buckets``), a perplexity per group.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import KdlibError
from .evaluate import checked_ids, scored_batches

ECE_BINS = 15
FREQUENCY_BUCKETS = 5


def frequency_buckets(train_ids, vocab_size: int, n_buckets: int = FREQUENCY_BUCKETS) -> dict:
    """Token types grouped by their frequency in the training split, most frequent first, so that
    each bucket holds about 1/``n_buckets`` of the training tokens.

    Types are ranked by training count (ties by id); a type goes to bucket ``floor(n x share of
    the training tokens of the types ranked before it) + 1``: bucket 1 always holds the most
    frequent type, a type that straddles a boundary goes to the bucket it starts in, and types that
    never occur in training go to the last bucket. Returns ``{"bucket_of": int array [vocab_size]
    (0-based), "types", "min_count", "max_count", "train_share"}`` (per bucket; a bucket with no type
    has counts None), the boundaries a report states.
    """
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool) or n_buckets < 1:
        raise KdlibError(f"n_buckets must be a whole number >= 1, got {n_buckets!r}")
    ids = np.asarray(train_ids)
    if ids.size == 0:
        raise KdlibError("the training split has no tokens: frequency buckets need its counts")
    counts = np.bincount(ids.astype(np.int64, copy=False), minlength=vocab_size)[:vocab_size]  # [V]
    order = np.lexsort((np.arange(vocab_size), -counts))  # most frequent first, ties by id
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]]) / counts.sum()  # [V] share ranked before
    bucket_of = np.empty(vocab_size, dtype=np.int64)
    bucket_of[order] = np.minimum((before * n_buckets).astype(np.int64), n_buckets - 1)
    bucket_of[counts == 0] = n_buckets - 1
    out = {"bucket_of": bucket_of, "types": [], "min_count": [], "max_count": [], "train_share": []}
    for k in range(n_buckets):
        members = counts[bucket_of == k]
        out["types"].append(int(members.size))
        out["min_count"].append(int(members.min()) if members.size else None)
        out["max_count"].append(int(members.max()) if members.size else None)
        out["train_share"].append(float(members.sum() / counts.sum()))
    return out


def ece(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of (confidence, correct) pairs in ``n_bins`` equal-width bins
    ``((m-1)/n, m/n]`` (a confidence of 0 counts in the first)."""
    return _ece_of(reliability(confidence, correct, n_bins))


def reliability(confidence, correct, n_bins: int = ECE_BINS) -> dict:
    """Per bin: tokens, mean confidence and accuracy (None where a bin is empty): a reliability
    diagram's points."""
    conf = torch.as_tensor(np.asarray(confidence, dtype=np.float64))
    hits = torch.as_tensor(np.asarray(correct, dtype=np.float64))
    sums = _BinSums(n_bins, torch.device("cpu"))
    sums.add(conf, hits)
    return sums.result()


def _ece_of(bins: dict) -> float:
    total = sum(bins["count"])
    if total == 0:
        return math.nan
    return sum(n / total * abs(acc - conf) for n, conf, acc in zip(bins["count"], bins["confidence"],
                                                                   bins["accuracy"]) if n)


class _BinSums:
    """Running per-bin token counts, confidence sums and hit sums (float64, on the model's device)."""

    def __init__(self, n_bins: int, device):
        self.n_bins = n_bins
        self.sums = torch.zeros(3, n_bins, dtype=torch.float64, device=device)  # [count, conf, hits]

    def add(self, confidence: Tensor, hits: Tensor) -> None:
        conf = confidence.double()  # [n]
        index = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)  # [n]
        values = torch.stack([torch.ones_like(conf), conf, hits.double()])  # [3, n]
        self.sums.index_add_(1, index, values)

    def result(self) -> dict:
        count, conf, hits = self.sums.cpu().tolist()
        return {"count": [int(n) for n in count],
                "confidence": [c / n if n else None for c, n in zip(conf, count)],
                "accuracy": [h / n if n else None for h, n in zip(hits, count)]}


class _Sums:
    """One model's running sums over the scored tokens (and, for a student, its fidelity sums)."""

    def __init__(self, n_buckets: int, device):
        self.bins = _BinSums(ECE_BINS, device)
        self.bucket_nll = torch.zeros(n_buckets, dtype=torch.float64, device=device)  # [K]
        self.bucket_tokens = torch.zeros(n_buckets, dtype=torch.float64, device=device)  # [K]
        self.agree = torch.zeros((), dtype=torch.float64, device=device)
        self.kl = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, log_probs: Tensor, targets: Tensor, buckets: Tensor) -> Tensor:
        """Add ``log_probs`` [n, V] (float32) of ``targets`` [n] (their buckets [n]); returns the top ids."""
        nll = -log_probs.gather(1, targets[:, None])[:, 0]  # [n]
        top_log_prob, top = log_probs.max(dim=1)  # [n], [n]: first index among ties
        self.bins.add(top_log_prob.exp(), (top == targets).double())
        self.bucket_nll.index_add_(0, buckets, nll.double())
        self.bucket_tokens.index_add_(0, buckets, torch.ones_like(nll, dtype=torch.float64))
        return top

    def result(self) -> dict:
        bins = self.bins.result()
        nll, tokens = self.bucket_nll.cpu().tolist(), self.bucket_tokens.cpu().tolist()
        n = sum(tokens)
        return {"ppl": _ppl(sum(nll), n), "ece": _ece_of(bins), "tokens": int(n),
                "bucket_ppl": [_ppl(s, t) if t else None for s, t in zip(nll, tokens)],
                "bucket_tokens": [int(t) for t in tokens], "reliability": bins}


def _ppl(total_nll: float, n: float) -> float:
    mean = total_nll / n
    return math.exp(mean) if mean < 700 else math.inf


def _checked_buckets(bucket_of, n_buckets: Optional[int], highest_id: int) -> tuple[Tensor, int]:
    """(``bucket_of`` as an int64 tensor, the number of buckets), refused unless it covers every id
    to score with buckets 0..n_buckets-1; None: every id in one bucket."""
    bucket_of = torch.zeros(highest_id + 1, dtype=torch.int64) if bucket_of is None \
        else torch.as_tensor(np.asarray(bucket_of, dtype=np.int64))
    if len(bucket_of) <= highest_id:
        raise KdlibError(f"bucket_of covers ids 0..{len(bucket_of) - 1}, but the ids to score reach "
                         f"{highest_id}: build the buckets with the model's vocabulary size")
    highest = int(bucket_of.max())
    n_buckets = highest + 1 if n_buckets is None else n_buckets
    if highest >= n_buckets or int(bucket_of.min()) < 0:
        raise KdlibError(f"bucket_of holds buckets {int(bucket_of.min())}..{highest}, not 0..{n_buckets - 1}: "
                         "give the n_buckets it was built with (frequency_buckets)")
    return bucket_of, n_buckets


@torch.no_grad()
def test_metrics(student: nn.Module, ids, block_size: int, stride: Optional[int] = None, *,
                 teacher: Optional[nn.Module] = None, bucket_of=None, n_buckets: Optional[int] = None,
                 batch_size: int = 8) -> dict:
    """The student's (and the teacher's) metrics on ``ids`` under the sliding-window protocol.

    ``bucket_of``: each token id's frequency bucket (``frequency_buckets(...)["bucket_of"]``;
    None: one bucket), of ``n_buckets`` (default: the highest in ``bucket_of``, + 1; give it, so
    that a last bucket with no type still has its entry). Returns ``{"student": {...}, "teacher":
    {...} or None}``, each with ``ppl``, ``ece``, ``tokens``, ``bucket_ppl``, ``bucket_tokens`` and
    ``reliability``; the student's also
    ``agreement`` and ``kl_teacher`` when a teacher is given. The teacher runs on the student's
    device, in its own dtype; its logits are scored in float32 like the student's.
    """
    ids, stride = checked_ids(student, ids, block_size, stride, batch_size)
    if teacher is not None:
        checked_ids(teacher, ids, block_size, stride, batch_size)
    device = next(student.parameters()).device
    bucket_of, n_buckets = _checked_buckets(bucket_of, n_buckets, int(ids.max()))
    bucket_of = bucket_of.to(device)
    models = [m for m in (student, teacher) if m is not None]
    modes = [m.training for m in models]
    sums = [_Sums(n_buckets, device) for _ in models]
    try:
        for m in models:
            m.eval()
        for x, keep in scored_batches(ids, block_size, stride, batch_size, device):
            targets = x[:, 1:][keep]  # [n]
            buckets = bucket_of[targets]  # [n]
            log_p = F.log_softmax(student(x).logits[:, :-1][keep].float(), dim=-1)  # [n, V]
            top = sums[0].add(log_p, targets, buckets)
            if teacher is not None:
                log_q = F.log_softmax(teacher(x).logits[:, :-1][keep].float(), dim=-1)  # [n, V]
                if log_q.shape != log_p.shape:
                    raise KdlibError(f"the teacher scores {log_q.shape[1]} token ids but the student "
                                     f"{log_p.shape[1]}: fidelity compares their distributions token by "
                                     "token; give a teacher with the student's vocabulary")
                sums[1].add(log_q, targets, buckets)
                sums[0].agree += (top == log_q.argmax(dim=1)).sum()
                q = log_q.exp()
                sums[0].kl += torch.where(q > 0, q * (log_q - log_p), 0.0).sum().double()  # KL(q || p)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    out = {"student": sums[0].result(), "teacher": sums[1].result() if teacher is not None else None}
    if teacher is not None:
        n = out["student"]["tokens"]
        out["student"].update(agreement=float(sums[0].agree) / n, kl_teacher=float(sums[0].kl) / n)
    return out

"""A run's test metrics beside perplexity (``summary["test_metrics"]``): fidelity to the teacher,
calibration and perplexity by frequency bucket (``kdlib.metrics``), for its best student and the
teacher, on the test split under the test-perplexity protocol.

One extra pass over the test split per run: the student and the teacher on the same windows
(every run needs the teacher's outputs for fidelity, the no-KD run too, so a run whose teacher did
not run online loads it here). The teacher's own numbers are stored once per data folder
(``teacher_metrics.json`` beside the split, keyed like ``teacher_ppl.json``), so every run of a
data folder reports the same teacher. Training calls ``run_metrics`` at the end of a run;
``python -m kdlib eval RUN --metrics`` computes them for a run trained before they existed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Optional

from torch import nn

from .config import ExperimentConfig
from .errors import KdlibError
from .fileio import read_json, store_derived
from .metrics import ECE_BINS, FREQUENCY_BUCKETS, frequency_buckets, test_metrics
from .models import load_teacher, resolve_teacher_dtype

BUCKETS_BY = "frequency in the training split of the token to predict; bucket 1 the most frequent"


def run_metrics(cfg: ExperimentConfig, student: nn.Module, splits: dict, teacher: Optional[nn.Module] = None
                ) -> dict:
    """``summary["test_metrics"]`` of ``student`` (on its device): ``splits`` holds the data folder's
    ``train`` (for the buckets) and ``test`` splits; ``teacher`` the run's online teacher, or None to
    load ``cfg.teacher`` in the dtype it runs in on the student's device."""
    start = time.perf_counter()
    device = next(student.parameters()).device
    if teacher is None:
        teacher = load_teacher(cfg.teacher, device=device, dtype=resolve_teacher_dtype(cfg.teacher.dtype, device),
                               student_vocab_size=cfg.model.vocab_size)
    buckets = frequency_buckets(splits["train"].tokens(), cfg.model.vocab_size)
    block, stride = cfg.data.block_size, cfg.data.block_size // 2
    test = splits["test"]
    scores = test_metrics(student, test.tokens(), block, stride, teacher=teacher, bucket_of=buckets["bucket_of"],
                          n_buckets=FREQUENCY_BUCKETS, batch_size=cfg.train.eval_batch_size)
    dtype = str(next(teacher.parameters()).dtype).replace("torch.", "")
    key = {"teacher": asdict(cfg.teacher), "dtype": dtype, "split": test.manifest["split"],
           "data_sha256": test.manifest["sha256"], "train_sha256": splits["train"].manifest["sha256"],
           "block_size": block, "stride": stride, "ece_bins": ECE_BINS, "buckets": FREQUENCY_BUCKETS}
    bounds = {k: v for k, v in buckets.items() if k != "bucket_of"}
    return {"split": "test", "block_size": block, "stride": stride, "ece_bins": ECE_BINS,
            "buckets": {"by": BUCKETS_BY, "n": FREQUENCY_BUCKETS, **bounds},
            "student": scores["student"], "teacher": _teacher_scores(test, key, scores["teacher"]),
            "teacher_dtype": dtype, "wall_s": time.perf_counter() - start}


def _teacher_scores(split, key: dict, measured: dict) -> dict:
    """The teacher's numbers for ``key`` as first stored in the data folder (``measured`` is stored
    when there are none yet)."""
    path = split.path.parent / "teacher_metrics.json"
    try:
        entries = read_json(path, "teacher metrics file")["entries"] if path.is_file() else []
        stored = [e["metrics"] for e in entries if e["key"] == key]
        if stored and _like(stored[0], measured):
            return stored[0]
        if stored:
            raise ValueError("not the teacher's numbers")
    except (KdlibError, KeyError, TypeError, ValueError):
        # Not what kdlib writes (edited, cut short, another tool's): a derived file, written afresh
        # from this run's measurement rather than ending the run on it.
        entries = []
    # A read-only data folder must not end a finished run (its summary is written after this).
    store_derived(path, {"entries": entries + [{"key": key, "metrics": measured}]}, "the teacher's test metrics")
    return measured


def _like(stored, measured) -> bool:
    """``stored`` has ``measured``'s structure: the same keys, lists of the same lengths, a number or
    None where it has a number or None; every number finite and >= 0, as every measured one is (a
    NaN read back would be every later run's teacher, and the report refuses it)."""
    if isinstance(measured, dict):
        return isinstance(stored, dict) and stored.keys() == measured.keys() \
            and all(_like(stored[k], measured[k]) for k in measured)
    if isinstance(measured, list):
        return isinstance(stored, list) and len(stored) == len(measured) \
            and all(_like(a, b) for a, b in zip(stored, measured))
    return stored is None or (isinstance(stored, (int, float)) and not isinstance(stored, bool)
                              and math.isfinite(stored) and stored >= 0)

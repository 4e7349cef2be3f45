"""Run folders as kdlib.train writes them, for the tests of results, stats, analysis and plots."""

import json

from kdlib.config import preset
from kdlib.metrics import ECE_BINS


def make_run(root, exp, seed, val, test=None, finished=True, wall=10.0, preset_name="smoke", cache=False,
             test_metrics=None, **train):
    """A run folder as kdlib.train writes it, with validation perplexities ``val`` every 10 steps.

    ``preset_name``: the preset (and so the protocol) of the run; ``cache``: its teacher outputs
    come from the top-k cache (folder ``EXP-topK-seedN``); ``test_metrics``: the summary's
    ``test_metrics`` (``metrics_summary``; None: a summary from before they existed); ``train``:
    train-config fields to set (another budget is another protocol).
    """
    cfg = preset(preset_name, exp)
    cfg.seed = seed
    cfg.train.teacher_source = "cache" if cache else "online"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    folder = root / f"{exp}{f'-top{cfg.cache.top_k}' if cache else ''}-seed{seed}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json())
    rows = [{"step": 10 * (i + 1), "epoch": i + 1.0, "tokens": 1000 * (i + 1), "loss": 1.0, "val_ppl": v}
            for i, v in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        block = cfg.data.block_size
        source = "none" if exp == "ce" else "cache" if cache else "online"
        (folder / "summary.json").write_text(json.dumps({
            "test_ppl": test, "train_wall_s": wall, "tokens_per_s": 100.0, "teacher_source": source,
            "cache_top_k": cfg.cache.top_k if cache else None, "eval_block_size": block,
            "eval_stride": block // 2, "in_training_eval_stride": block,
            **({"test_metrics": test_metrics} if test_metrics is not None else {})}))
    return folder


def _scores(ppl, ece, bucket_ppl) -> dict:
    """One model's part of ``test_metrics``: 100 tokens, 20 per bucket, all in confidence bin 5."""
    count = [0] * ECE_BINS
    count[4] = 100
    return {"ppl": ppl, "ece": ece, "tokens": 100, "bucket_ppl": list(bucket_ppl), "bucket_tokens": [20] * 5,
            "reliability": {"count": count, "confidence": [0.3 if n else None for n in count],
                            "accuracy": [0.3 - ece if n else None for n in count]}}


def metrics_summary(agreement=0.5, kl_teacher=0.4, ece=0.05, bucket_ppl=(10.0, 20.0, 40.0, 80.0, 160.0),
                    ppl=50.0, teacher_ppl=30.0, teacher_ece=0.02) -> dict:
    """A summary's ``test_metrics`` as kdlib.scoring.run_metrics writes it; the teacher's buckets are
    the student's halved."""
    student = {**_scores(ppl, ece, bucket_ppl), "agreement": agreement, "kl_teacher": kl_teacher}
    teacher = _scores(teacher_ppl, teacher_ece, [None if b is None else b / 2 for b in bucket_ppl])
    return {"split": "test", "block_size": 32, "stride": 16, "ece_bins": ECE_BINS,
            "buckets": {"by": "frequency", "n": 5, "types": [1, 2, 4, 8, 497], "min_count": [900, 300, 100, 30, 0],
                        "max_count": [900, 400, 200, 90, 29], "train_share": [0.2] * 5},
            "student": student, "teacher": teacher,
            "teacher_dtype": "float32", "wall_s": 0.5}


def budget_of(cfg) -> int:
    """Tokens per run of a config with a max_tokens budget: whole steps of it."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    return cfg.train.max_tokens // per_step * per_step

"""Run folders as kdlib.train writes them, for the tests of results, stats, analysis and plots."""

import json

from kdlib.config import preset


def make_run(root, exp, seed, val, test=None, finished=True, wall=10.0, preset_name="smoke", cache=False,
             **train):
    """A run folder as kdlib.train writes it, with validation perplexities ``val`` every 10 steps.

    ``preset_name``: the preset (and so the protocol) of the run; ``cache``: its teacher outputs
    come from the top-k cache (folder ``EXP-topK-seedN``); ``train``: train-config fields to set
    (another budget is another protocol).
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
            "eval_stride": block // 2, "in_training_eval_stride": block}))
    return folder


def budget_of(cfg) -> int:
    """Tokens per run of a config with a max_tokens budget: whole steps of it."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    return cfg.train.max_tokens // per_step * per_step

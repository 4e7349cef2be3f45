"""Small helpers shared by the tests."""

import json
from pathlib import Path

TIMING_KEYS = ("tokens_per_s", "peak_mem_mib", "mfu")  # wall-clock and RSS: differ between any two runs


def quiet(*_):
    pass


def run(cfg, run_dir, data_dir, **kw) -> dict:
    """``kdlib.train.train`` without a progress bar or log lines."""
    from kdlib.train import train

    return train(cfg, run_dir, data_dir, progress=False, log=quiet, **kw)


def metric_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without the timing fields (they differ between any two runs)."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

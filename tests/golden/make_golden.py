"""Regenerate ``smoke_kl_curve.json``, the golden loss curve of ``tests/test_train.py``.

    python tests/golden/make_golden.py

Run it only when a change to the numerics is intended (and say so in the
commit): the test compares against the checked-in file and never rewrites it.
It prepares the smoke data in a temporary folder, trains the smoke preset's
``kl`` experiment on the CPU with one intra-op thread, and records, per
metrics.jsonl row, the step, tokens, learning rate, loss, its parts and the
validation perplexity (at evaluations), plus how the file was made.

``tests/test_train.py`` imports ``SETTINGS``, ``golden_config``, ``curve``
and ``data_checksums`` from here, so the test and the file are made the same way.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).with_name("smoke_kl_curve.json")
SETTINGS = {"preset": "smoke", "exp": "kl", "seed": 0, "max_steps": 20, "eval_every": 5, "log_every": 1,
            "torch_threads": 1, "device": "cpu"}
CURVE_KEYS = ("step", "tokens", "lr", "loss", "loss_ce", "loss_kl", "val_ppl")


def golden_config():
    """The ExperimentConfig of the golden run."""
    from kdlib.config import preset

    cfg = preset(SETTINGS["preset"], SETTINGS["exp"])
    cfg.seed = SETTINGS["seed"]
    cfg.train.max_steps = SETTINGS["max_steps"]
    cfg.train.eval_every = SETTINGS["eval_every"]
    cfg.train.log_every = SETTINGS["log_every"]
    return cfg.validate()


def curve(metrics_path) -> list[dict]:
    """The rows of a metrics.jsonl reduced to the keys the golden file records."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines()]
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in rows]


def data_checksums(data_dir) -> dict:
    """SHA-256 of each prepared split's tokens (from its manifest): the smoke text is this
    Python's pydoc_data topics, so another Python version can give other data."""
    return {s: json.loads((Path(data_dir) / f"{s}.json").read_text())["sha256"]
            for s in ("train", "validation", "test")}


def main() -> int:
    import torch

    import kdlib
    from kdlib.config import preset
    from kdlib.prep import prepare
    from kdlib.train import train

    torch.set_num_threads(SETTINGS["torch_threads"])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(preset(SETTINGS["preset"]), data, log=lambda *_: None)
        summary = train(golden_config(), Path(tmp) / "run", data, progress=False, log=lambda *_: None)
        rows = curve(Path(tmp) / "run" / "metrics.jsonl")
        data_sha256 = data_checksums(data)
    golden = {
        "made_with": {
            "command": "python tests/golden/make_golden.py",
            "torch": torch.__version__,
            "kdlib": kdlib.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "note": "CPU, float32, torch.set_num_threads(1); the data is the smoke preset's, prepared "
                    "offline from Python's pydoc_data topics",
        },
        "settings": SETTINGS,
        "data_sha256": data_sha256,
        "summary": {k: summary[k] for k in ("best_val_ppl", "final_val_ppl", "test_ppl", "steps", "tokens")},
        "rows": rows,
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: {len(rows)} rows, best val ppl {summary['best_val_ppl']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

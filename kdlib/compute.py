"""What a run costs in FLOPs by kdlib's model, and the budget of an equal-compute baseline.

kdlib's FLOPs model (``kdlib.perf.flops_per_token``): a trained token costs
the student's forward and backward pass (6N + 12·L·d·T) plus, when the
teacher runs online, the teacher's forward pass (2N + 4·L·d·T); a top-k cache
moves that teacher pass into a one-off build over the training windows.

``ce@EXP`` (``kdlib.grid``) is the no-KD student trained for the FLOPs of the
KD experiment ``EXP``: ``equal_compute_steps`` gives it ``ratio`` times
``EXP``'s steps, so its tokens x its FLOPs per token match ``EXP``'s. It sits
first in the training layer so that the schedule (``optim``), the plan and the
report all use this one model.
"""

from __future__ import annotations

from pathlib import Path

from .config import ExperimentConfig


def teacher_dims(cfg: ExperimentConfig) -> dict:
    """GPT-2-architecture dimensions of the configured teacher (GPT-2 small's for a hub name; the
    demo's own teacher, which it trains first, for the demo preset). Its vocabulary is the student's."""
    from .models import DEMO_TEACHER_SHAPE

    r = cfg.teacher.random_init
    if r is None and cfg.preset == "demo" and cfg.teacher.name == "gpt2":
        r = {**DEMO_TEACHER_SHAPE, "vocab_size": cfg.model.vocab_size, "n_positions": cfg.model.block_size}
    if r is not None:
        return {"n_layer": r["n_layer"], "n_embd": r["n_embd"], "n_head": r["n_head"],
                "vocab_size": r["vocab_size"], "n_positions": r["n_positions"], "n_inner": r.get("n_inner")}
    config = Path(cfg.teacher.name) / "config.json"
    if config.is_file():
        from .fileio import read_json

        c = read_json(config, "teacher config")
        return {"n_layer": c.get("n_layer", 12), "n_embd": c.get("n_embd", 768), "n_head": c.get("n_head", 12),
                "vocab_size": c.get("vocab_size", 50257), "n_positions": c.get("n_positions", 1024),
                "n_inner": c.get("n_inner")}
    return {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": cfg.model.vocab_size, "n_positions": 1024,
            "n_inner": None}


def flops(cfg: ExperimentConfig, source: str) -> tuple[float, float, float]:
    """(training FLOPs per token, student forward FLOPs per token, teacher forward FLOPs per token)."""
    from .perf import flops_per_token
    from .storage import projector_parameters, student_parameters

    m, block = cfg.model, cfg.data.block_size
    n_student = student_parameters(cfg) - (m.block_size * m.n_embd if m.positions == "learned" else 0)
    teacher = teacher_dims(cfg)
    d_ff = teacher["n_inner"] or 4 * teacher["n_embd"]
    n_teacher = teacher["vocab_size"] * teacher["n_embd"] + teacher["n_layer"] * (
        4 * teacher["n_embd"] ** 2 + 2 * teacher["n_embd"] * d_ff + 9 * teacher["n_embd"] + d_ff) + 2 * teacher["n_embd"]
    student_fwd = 2 * n_student + 4 * m.n_layer * m.n_embd * block
    teacher_fwd = 2 * n_teacher + 4 * teacher["n_layer"] * teacher["n_embd"] * block
    train = flops_per_token(n_student, m.n_layer, m.n_embd, block,
                            *((n_teacher, teacher["n_layer"], teacher["n_embd"]) if source == "online" else ()))
    train += 6 * projector_parameters(cfg, (teacher["n_layer"], teacher["n_embd"]))
    return float(train), float(student_fwd), float(teacher_fwd)


def teacher_source_of(cfg: ExperimentConfig) -> str:
    """Where this run's teacher outputs come from: "none" (no KD term), "online" or "cache"."""
    if not cfg.spec.needs_teacher:
        return "none"
    return cfg.train.teacher_source


def train_flops_per_token(cfg: ExperimentConfig) -> float:
    """A run's training FLOPs per token: the student's forward and backward, and the teacher's
    forward when it runs online (a cached run's teacher pass is the cache's one-off build)."""
    return flops(cfg, teacher_source_of(cfg))[0]


def compute_ratio(cfg: ExperimentConfig) -> float:
    """How many times the tokens of ``ce@EXP``'s named KD experiment it trains: EXP's FLOPs per token
    with its teacher online (what a KD step costs) over the no-KD student's; 1 for any other run."""
    target = cfg.spec.compute_of
    if target is None:
        return 1.0
    return flops(cfg.with_experiment(target), "online")[0] / flops(cfg, "none")[0]


def equal_compute_steps(cfg: ExperimentConfig, steps: int) -> int:
    """The optimizer steps of ``cfg`` when the budget's rules (tokens, epochs, a step cap) give ``steps``:
    ``steps`` for any run, and for ``ce@EXP`` the whole steps nearest to ``steps`` x ``compute_ratio``,
    so its FLOPs match those ``EXP`` spends on ``steps`` steps of the same batch."""
    if cfg.spec.compute_of is None:
        return steps
    return max(1, round(steps * compute_ratio(cfg)))


def cache_build_flops(cfg: ExperimentConfig, train_tokens: int) -> float:
    """The top-k cache's one-off cost: one teacher forward pass over every training window of a split
    of ``train_tokens`` tokens (shared by all the runs that read the cache)."""
    from .data import n_windows

    return flops(cfg, "cache")[2] * n_windows(train_tokens, cfg.data.block_size) * cfg.data.block_size

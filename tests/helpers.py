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


def student_flops(cfg) -> float:
    """Training FLOPs per token of ``cfg``'s student, independently of kdlib's FLOPs code: 6N + 12·L·d·T,
    N the parameters of TinyGPT built on the meta device, learned position embeddings not counted."""
    import torch

    from kdlib.models import TinyGPT

    m, block = cfg.model, cfg.data.block_size
    with torch.device("meta"):
        model = TinyGPT(m)
    n = sum(p.numel() for p in model.parameters()) - (m.block_size * m.n_embd if m.positions == "learned" else 0)
    return 6 * n + 12 * m.n_layer * m.n_embd * block


def teacher_forward_flops(cfg) -> float:
    """Forward FLOPs per token of ``cfg``'s teacher (GPT-2 small unless it is a random one): 2N + 4·L·d·T, N
    the parameters of transformers' GPT2LMHeadModel on the meta device (tied head once, no position table)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    r = cfg.teacher.random_init or {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}
    config = GPT2Config(n_layer=r["n_layer"], n_embd=r["n_embd"], n_head=r["n_head"],
                        n_positions=r["n_positions"], vocab_size=cfg.model.vocab_size, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        teacher = GPT2LMHeadModel(config)
    n = sum(p.numel() for p in teacher.parameters()) - r["n_positions"] * r["n_embd"]
    return 2 * n + 4 * r["n_layer"] * r["n_embd"] * cfg.data.block_size


def metric_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without the timing fields (they differ between any two runs)."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


ROOT = Path(__file__).resolve().parents[1]


def git(*args, cwd):
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def fake_github(folder: Path, repo: str = "alice/kdlib", tag: str = "v-a") -> Path:
    """A local stand-in for ``github.com/REPO``: this checkout's package files (committed or not), as
    one commit tagged ``tag``. Returns a gitconfig whose ``url.<base>.insteadOf`` sends
    ``https://github.com/`` there: set ``GIT_CONFIG_GLOBAL`` to it and git (and pip's git) go there."""
    import shutil
    import subprocess

    remote = folder / "github" / repo
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "kdlib", "pyproject.toml", "README.md"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (remote / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, remote / f)
    git("init", "-q", "-b", "main", cwd=remote)
    git("add", "-A", cwd=remote)
    git("commit", "-q", "-m", "a", cwd=remote)
    git("tag", "-a", tag, "-m", tag, cwd=remote)  # annotated: the install must take the commit, not the tag object
    gitconfig = folder / "gitconfig"
    gitconfig.write_text(f'[url "file://{folder}/github/"]\n\tinsteadOf = https://github.com/\n'
                         '[protocol "file"]\n\tallow = always\n')
    return gitconfig


def trained_smoke_run(smoke_data, tmp_path_factory, name: str, steps: int = 4, exp: str = "kl"):
    """(results folder, run folder, data folder): a ``steps``-step smoke run of ``exp`` in its own copy
    of the prepared smoke data, for a module's tests to share read-only."""
    import shutil

    import kdlib.train
    from kdlib.config import preset

    base = tmp_path_factory.mktemp(name)
    data = shutil.copytree(smoke_data[0], base / "data")
    cfg = preset("smoke", exp)
    cfg.train.max_steps = steps
    folder = kdlib.train.run_dir(base / "runs", cfg)
    run(cfg, folder, data)
    return base / "runs", folder, data

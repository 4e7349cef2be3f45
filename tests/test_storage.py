"""The storage budget of a results folder, delete_weights and ``python -m kdlib storage``, and the
run-size estimate the budget is checked against before a run trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kdlib.config
from kdlib.checkpoint import model_parameters, save_resume, save_student, student_metadata
from kdlib.cli import main as cli_main
from kdlib.config import PRESETS, preset
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS
from kdlib.losses import layer_pairs
from kdlib.models import TinyGPT
from kdlib.objective import DistillationLoss
from kdlib.optim import param_groups
from kdlib.step import Trainee
from kdlib.storage import (MiB, StorageBudget, delete_weights, estimate_run_bytes, projector_parameters,
                           student_parameters, teacher_shape_hint)


def _model(cfg, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(cfg).eval()
    # Non-trivial biases and norms, so a mix-up between parameters shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _temp_files(folder: Path) -> list:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def _snapshot(root: Path) -> dict:
    """{relative path: bytes} of every file under root (folders included as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


# --------------------------------------------------------------------------
# storage budget


def _fill(root: Path, layout: dict) -> None:
    for rel, size in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([len(rel) % 251]) * size)


def test_budget_usage_per_top_level_entry(tmp_path):
    root = tmp_path / "runs"
    assert StorageBudget(root).usage() == {} and StorageBudget(root).used() == 0
    _fill(root, {"a/student.safetensors": 1000, "a/deep/er/x.bin": 500, "b/config.json": 300,
                 "notes.txt": 50, "c/metrics.jsonl": 2000})
    (root / "empty").mkdir()
    budget = StorageBudget(root)
    usage = budget.usage()
    assert usage == {"c": 2000, "a": 1500, "b": 300, "notes.txt": 50, "empty": 0}
    assert list(usage) == ["c", "a", "b", "notes.txt", "empty"]  # largest first
    assert budget.used() == 3850
    assert budget.limit_bytes == 100 * MiB


def test_budget_usage_per_run_in_the_preset_layout(tmp_path):
    # RESULTS/PRESET/RUN (the CLI's layout): runs are listed inside their preset's folder; a
    # folder that is not named like a preset, or is itself a run, stays one entry.
    root = tmp_path / "runs"
    _fill(root, {"smoke/kl-seed0/metrics.jsonl": 700, "smoke/ce-seed0/metrics.jsonl": 200,
                 "colab-t4/kl-seed0/summary.json": 100, "other/x/y.bin": 50, "study/config.json": 10})
    assert StorageBudget(root).usage() == {"smoke/kl-seed0": 700, "smoke/ce-seed0": 200,
                                           "colab-t4/kl-seed0": 100, "other": 50, "study": 10}


def test_budget_refuses_a_write_over_the_limit_and_writes_nothing(tmp_path):
    root = tmp_path / "runs"
    _fill(root, {"alpha/student.safetensors": MiB // 2, "beta/student.safetensors": MiB // 4})
    budget = StorageBudget(root, MiB)
    before = _snapshot(root)
    target = root / "gamma" / "student.safetensors"
    with pytest.raises(KdlibError) as e:
        budget.write_bytes(target, b"x" * (400 * 1024))  # 0.39 MiB: total 1.14 MiB > 1 MiB
    msg = str(e.value)
    assert "student.safetensors (0.4 MiB)" in msg
    assert "1.1 MiB" in msg and "budget of 1.0 MiB" in msg and "nothing was written" in msg
    assert re.search(r"^alpha\s+0\.50 MiB$", msg, re.M), msg
    assert re.search(r"^beta\s+0\.25 MiB$", msg, re.M), msg
    assert re.search(r"^total\s+0\.75 MiB of 1\.00 MiB \(75%\)$", msg, re.M), msg
    assert msg.index("alpha") < msg.index("beta")
    assert budget.report() in msg
    assert not target.exists() and not (root / "gamma").exists()
    assert _snapshot(root) == before and not _temp_files(tmp_path)
    # Exactly at the limit is allowed.
    budget.write_bytes(target, b"x" * (MiB // 4))
    assert budget.used() == MiB


def test_budget_replacing_a_file_counts_only_the_growth(tmp_path):
    root = tmp_path / "runs"
    _fill(root, {"a/student.safetensors": 3000, "b/student.safetensors": 1000})
    budget = StorageBudget(root, 4000)  # full
    target = root / "a" / "student.safetensors"
    budget.write_bytes(target, b"n" * 3000)  # same size: fine
    assert target.read_bytes() == b"n" * 3000
    with pytest.raises(KdlibError, match="over its budget"):
        budget.write_bytes(target, b"m" * 3001)
    assert target.read_bytes() == b"n" * 3000
    with pytest.raises(KdlibError):
        budget.write_bytes(root / "b" / "new.json", b"{}")
    assert not (root / "b" / "new.json").exists()
    budget.write_bytes(target, b"s" * 10)  # shrinking frees space...
    budget.write_bytes(root / "b" / "new.json", b"k" * 2990)  # ...that can then be used
    assert budget.used() == 4000 and not _temp_files(root)
    budget.check(target, 10)  # check alone writes nothing
    with pytest.raises(KdlibError):
        budget.check(target, 11)


def test_budget_refuses_writes_outside_its_root(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    budget = StorageBudget(root, 10 * MiB)
    outside = tmp_path / "elsewhere" / "x.bin"
    for path in (outside, root / ".." / "elsewhere" / "x.bin", tmp_path / "runs2" / "x.bin"):
        with pytest.raises(KdlibError, match="outside the results folder"):
            budget.write_bytes(path, b"data")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "runs2").exists()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(KdlibError, match="outside the results folder"):
        budget.write_bytes(root / "link" / "x.bin", b"data")
    assert not (tmp_path / "elsewhere" / "x.bin").exists()
    budget.write_bytes(root / "run" / "ok.bin", b"data")
    assert (root / "run" / "ok.bin").read_bytes() == b"data"


@pytest.mark.parametrize("limit", [0, -1, -MiB, True, False, 1.5, "100", None])
def test_budget_invalid_limits(tmp_path, limit):
    with pytest.raises(KdlibError, match="storage limit"):
        StorageBudget(tmp_path, limit)


def test_save_student_and_resume_respect_the_budget(tmp_path, tiny_config):
    root = tmp_path / "runs"
    model = _model(tiny_config())
    probe = save_student(model, tmp_path / "probe.safetensors", step=1)  # same header as below
    _fill(root, {"old/config.json": 100})
    budget = StorageBudget(root, probe + 100)
    path = root / "exp" / "student.safetensors"
    assert save_student(model, path, budget=budget, step=1) == probe
    assert budget.used() == probe + 100
    # Full: a second student elsewhere is refused, nothing touched.
    (root / "exp" / "config.json").write_bytes(b"{}")  # 2 bytes over now: even the overwrite grows
    before = _snapshot(root)
    with pytest.raises(KdlibError, match="over its budget") as e:
        save_student(model, root / "exp2" / "student.safetensors", budget=budget)
    assert re.search(r"^exp\s+0\.01 MiB$", str(e.value), re.M), str(e.value)
    with pytest.raises(KdlibError, match="over its budget"):
        save_student(_model(tiny_config(), seed=1), path, budget=budget, step=2)
    with pytest.raises(KdlibError, match="over its budget"):
        save_resume(root / "exp" / "resume.safetensors", {"w": torch.zeros(1000)}, budget=budget)
    assert _snapshot(root) == before
    assert not (root / "exp2").exists() and not _temp_files(root)
    assert student_metadata(path)["meta"] == {"step": 1}
    # With room again, a same-size overwrite of the student goes through.
    (root / "exp" / "config.json").unlink()
    save_student(_model(tiny_config(), seed=1), path, budget=budget, step=2)
    assert student_metadata(path)["meta"] == {"step": 2}


# --------------------------------------------------------------------------
# delete_weights and `python -m kdlib storage`


def _results(tmp_path) -> Path:
    root = tmp_path / "results"
    _fill(root, {"runA/student.safetensors": 300_000, "runA/resume.safetensors": 100_000,
                 "runA/ckpt/step100.safetensors": 50_000, "runA/config.json": 1000,
                 "runA/metrics.jsonl": 2000, "runA/summary.json": 500,
                 "runB/student.safetensors": 200_000, "runB/config.json": 1000, "runB/metrics.jsonl": 700})
    return root


def test_cli_storage_prints_usage_per_run_and_total(tmp_path, capsys):
    root = _results(tmp_path)
    assert cli_main(["storage", str(root), "--limit-mib", "1"]) == 0
    out = capsys.readouterr().out
    a, b = 453_500 / MiB, 201_700 / MiB
    assert re.search(rf"^runA\s+{a:.2f} MiB$", out, re.M), out
    assert re.search(rf"^runB\s+{b:.2f} MiB$", out, re.M), out
    assert re.search(rf"^total\s+{a + b:.2f} MiB of 1\.00 MiB \({100 * (a + b):.0f}%\)$", out, re.M), out
    assert out.index("runA") < out.index("runB")


def test_cli_delete_weights_deletes_only_that_runs_safetensors(tmp_path, capsys):
    root = _results(tmp_path)
    before = _snapshot(root)
    assert cli_main(["storage", str(root), "--limit-mib", "1", "--delete-weights", "runA"]) == 0
    out = capsys.readouterr().out
    assert f"deleted the weights of runA: {450_000 / MiB:.2f} MiB freed" in out
    assert re.search(rf"^runA\s+{3500 / MiB:.2f} MiB$", out, re.M), out
    after = _snapshot(root)
    gone = {k for k in before if k not in after}
    assert gone == {"runA/student.safetensors", "runA/resume.safetensors", "runA/ckpt/step100.safetensors"}
    for k, v in after.items():
        assert before[k] == v, k  # config, metrics, summary and runB untouched


def test_delete_weights_returns_bytes_freed(tmp_path):
    root = _results(tmp_path)
    budget = StorageBudget(root, MiB)
    assert delete_weights(budget, "runB") == 200_000
    assert delete_weights(budget, "runB") == 0  # nothing left to delete
    assert sorted(p.name for p in (root / "runB").iterdir()) == ["config.json", "metrics.jsonl"]
    assert (root / "runA" / "student.safetensors").exists()


@pytest.mark.parametrize("run", ["runA/ckpt", "../results/runA", "..", ".", "", "nope", "runA/",
                                 "config.json", "/runA"])
def test_cli_delete_weights_bad_run_names(tmp_path, capsys, run):
    root = _results(tmp_path)
    _fill(root, {"config.json": 10})
    before = _snapshot(root)
    assert cli_main(["storage", str(root), "--delete-weights", run]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") >= 1
    assert "deleted" not in captured.out
    assert _snapshot(root) == before
    with pytest.raises(KdlibError):
        delete_weights(StorageBudget(root), run)
    assert _snapshot(root) == before


def test_cli_delete_weights_absolute_path_and_nonexistent_run_messages(tmp_path, capsys):
    root = _results(tmp_path)
    before = _snapshot(root)
    assert cli_main(["storage", str(root), "--delete-weights", str(root / "runA")]) == 2
    assert "error: " in capsys.readouterr().err
    assert cli_main(["storage", str(root), "--delete-weights", "runC"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "runA" in err and "runB" in err  # lists the runs there
    assert _snapshot(root) == before


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_cli_storage_invalid_limit(tmp_path, capsys, limit):
    root = _results(tmp_path)
    assert cli_main(["storage", str(root), "--limit-mib", limit]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_delete_weights_checks_every_name_before_deleting_anything(tmp_path, capsys):
    root = tmp_path / "runs"
    (root / "runA").mkdir(parents=True)
    weights = root / "runA" / "student.safetensors"
    weights.write_bytes(b"x" * 100)
    assert cli_main(["storage", str(root), "--delete-weights", "runA", "typo"]) == 2
    assert "nothing was deleted" in capsys.readouterr().err
    assert weights.exists()


def test_delete_weights_refuses_a_run_folder_that_links_outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "student.safetensors").write_bytes(b"x" * 10)
    root = tmp_path / "runs"
    root.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(KdlibError, match="leads outside"):
        delete_weights(StorageBudget(root), ["linked"])
    assert (outside / "student.safetensors").exists()


# --------------------------------------------------------------------------
# the run-size estimate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_device_counts_match_the_closed_form(name):
    """The estimate counts parameters on models built on the meta device; against the closed forms
    (``checkpoint.model_parameters``; one Linear(n_embd, d_teacher) with bias per layer pair) for
    every preset and experiment, so the estimate's numbers are the ones the formulas gave."""
    for exp in EXPERIMENTS:
        cfg = preset(name, exp)
        assert student_parameters(cfg) == model_parameters(cfg.model), exp
        for shape in (None, (12, 768)):
            n_teacher, d_teacher = shape or teacher_shape_hint(cfg)
            pairs = layer_pairs(cfg.loss_terms.layer_map_name, cfg.model.n_layer, n_teacher) \
                if cfg.spec.needs_hidden_states else []
            assert projector_parameters(cfg, shape) == len(pairs) * (cfg.model.n_embd * d_teacher + d_teacher), exp


def test_budget_estimate_covers_the_resume_state_of_a_feature_experiment(tmp_path):
    """check_budget refuses 'before training, not after hours': its estimate must cover what the
    run writes. A demo-sized student (1.07 M parameters) distilled from a GPT-2-small-shaped
    teacher (12 layers, width 768) with layerwise hidden-state MSE: the projectors train with
    the student and are part of the resume state (weights and both AdamW moments)."""
    cfg = preset("smoke", "layerwise-kl")
    cfg.model = kdlib.config.TinyGPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128,
                                           d_ff=512, dropout=0.0, positions="learned")
    cfg.data.block_size = 64
    cfg.validate()
    trainee = Trainee(TinyGPT(cfg.model), DistillationLoss(cfg.loss_terms, cfg.model, (12, 768)))
    optimizer = torch.optim.AdamW(param_groups(trainee, 0.01, True), lr=1e-3)
    for p in trainee.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates both moments
    # A lower bound of the real resume state (which adds scheduler, sampler, RNG and counters).
    resume_bytes = save_resume(tmp_path / "resume.safetensors",
                               {"model": trainee.state_dict(), "optimizer": optimizer.state_dict()})
    student_bytes = save_student(trainee.student, tmp_path / "student.safetensors")
    estimate = estimate_run_bytes(cfg, with_resume=True, teacher_shape=(12, 768))
    assert student_bytes + resume_bytes <= estimate, (
        f"a run writes at least {(student_bytes + resume_bytes) / MiB:.2f} MiB, "
        f"estimated {estimate / MiB:.2f} MiB")

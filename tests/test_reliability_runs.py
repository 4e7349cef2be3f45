"""Issue 13, run folders and their state: a symlinked run folder, a shared resume_dir, stale locks
crafted resume states, sizes from untrusted files, and Ctrl-C during training.

Every case trains the smoke preset for a few steps on the CPU (or calls the unit directly); each
says what the user sees, and that nothing outside the folders the user named was touched.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kdlib.checkpoint
import kdlib.faults
import kdlib.train
from kdlib.checkpoint import STUDENT_FORMAT, MiB, load_resume, load_student, save_resume
from kdlib.storage import StorageBudget, delete_weights
from kdlib.cli import main as cli_main
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.runs import RunPaths, keep_best_student
from kdlib.train import run_name, train
from helpers import metric_rows, quiet, run, snapshot


def small_cfg(exp: str = "kl", max_steps: int = 8, eval_every=4, **train_kw):
    cfg = preset("smoke", exp)
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = max_steps, eval_every, 1
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


def system_folder(tmp_path: Path) -> Path:
    """A stand-in for a folder kdlib must never touch (/etc, a user's home): another program's
    temporary file (what train's cleanup of ``.*.tmp`` would delete) and other files."""
    system = tmp_path / "system"
    (system / "sub").mkdir(parents=True)
    (system / ".x.tmp").write_text("a temporary file of another program\n")
    (system / "notes.txt").write_text("the user's notes\n")
    (system / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return system


def tree(folder: Path) -> tuple:
    """Files with their bytes and every folder: creations and deletions both show."""
    return snapshot(folder), sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------
# 1. a run folder that is a symbolic link (or has one inside the results folder)


@pytest.mark.parametrize("with_budget", [True, False])
def test_a_symlinked_run_folder_is_refused_and_its_target_untouched(tmp_path, data_dir, with_budget):
    system = system_folder(tmp_path)
    before = tree(system)
    runs = tmp_path / "runs"
    (runs / "smoke").mkdir(parents=True)
    link = runs / "smoke" / "kl-seed0"
    link.symlink_to(system, target_is_directory=True)
    budget = StorageBudget(runs) if with_budget else None
    with pytest.raises(KdlibError, match=r"kl-seed0 is a symbolic link .*nothing was changed"):
        run(small_cfg(), link, data_dir, budget=budget)
    assert tree(system) == before  # the .x.tmp is still there, no .lock, config or metrics written
    assert link.is_symlink() and sorted(p.name for p in (runs / "smoke").iterdir()) == ["kl-seed0"]


def test_a_symlinked_preset_folder_inside_the_results_folder_is_refused(tmp_path, data_dir, capsys):
    system = system_folder(tmp_path)
    before = tree(system)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "smoke").symlink_to(system, target_is_directory=True)
    cfg = small_cfg()
    with pytest.raises(KdlibError, match=r"runs/smoke is a symbolic link"):
        run(cfg, runs / "smoke" / run_name(cfg), data_dir, budget=StorageBudget(runs))
    # The CLI: the same refusal, exit 2, before anything is written.
    assert cli_main(["train", "--preset", "smoke", "--exp", "kl", "--runs", str(runs), "--data-dir",
                     str(data_dir), "--max-steps", "2"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert tree(system) == before


def test_a_run_folder_that_is_a_file_or_outside_its_results_folder_is_refused(tmp_path, data_dir):
    runs = tmp_path / "runs"
    (runs / "smoke").mkdir(parents=True)
    (runs / "smoke" / "kl-seed0").write_text("my notes\n")
    with pytest.raises(KdlibError, match="is a file, not a folder"):
        run(small_cfg(), runs / "smoke" / "kl-seed0", data_dir, budget=StorageBudget(runs))
    assert (runs / "smoke" / "kl-seed0").read_text() == "my notes\n"
    for outside in (tmp_path / "elsewhere" / "kl-seed0", runs / ".." / "elsewhere" / "kl-seed0"):
        with pytest.raises(KdlibError, match="is not a folder inside its results folder"):
            run(small_cfg(), outside, data_dir, budget=StorageBudget(runs))
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "summary.json", "student.safetensors", ".lock",
                                  ".run-id", "resume.safetensors"])
def test_a_symlinked_file_in_the_run_folder_is_refused(tmp_path, data_dir, name):
    system = system_folder(tmp_path)
    (system / "victim").write_text("the user's file\n")
    before = tree(system)
    run_dir = tmp_path / "runs" / "smoke" / "kl-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / name).symlink_to(system / "victim")
    with pytest.raises(KdlibError, match=rf"{name} is a symbolic link"):
        run(small_cfg(), run_dir, data_dir)
    assert tree(system) == before
    assert [p.name for p in run_dir.iterdir()] == [name]


def test_eval_and_delete_weights_refuse_a_symlinked_run_folder(tmp_path, data_dir, capsys):
    runs = tmp_path / "runs"
    cfg = small_cfg(max_steps=2, eval_every=2)
    real = tmp_path / "outside" / "kl-seed0"
    run(cfg, real, data_dir)
    before = tree(real.parent)
    (runs / "smoke").mkdir(parents=True)
    (runs / "smoke" / "kl-seed0").symlink_to(real, target_is_directory=True)
    assert cli_main(["eval", str(runs / "smoke" / "kl-seed0"), "--data-dir", str(data_dir)]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    with pytest.raises(KdlibError, match="leads outside the results folder"):
        delete_weights(StorageBudget(runs), ["smoke/kl-seed0"])
    assert tree(real.parent) == before


def test_keep_best_student_never_copies_into_or_deletes_from_a_linked_run_folder(tmp_path, data_dir):
    weights = tmp_path / "w"
    cfg = small_cfg("ce", max_steps=2, eval_every=2, weights="best", weights_dir=str(weights))
    folder = tmp_path / "runs" / "smoke"
    run(cfg, folder / "ce-seed0", data_dir)
    # Another finished run, outside, linked into the preset folder, with the better perplexity.
    outside = tmp_path / "outside" / "zz-seed0"
    shutil.copytree(folder / "ce-seed0", outside)
    summary = json.loads((outside / "summary.json").read_text())
    (outside / "summary.json").write_text(json.dumps({**summary, "best_val_ppl": 1.0}))
    (outside / ".run-id").write_text("0123456789\n")
    (folder / "zz-seed0").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    assert keep_best_student(folder, None, log=quiet) == "ce-seed0"
    assert tree(outside) == before and (folder / "ce-seed0" / "student.safetensors").is_file()


# --------------------------------------------------------------------------
# 2. two results folders sharing one train.resume_dir


def test_two_results_folders_share_a_resume_dir_without_mixing_their_states(tmp_path, data_dir):
    shared = tmp_path / "resume"
    fast = small_cfg(max_steps=8, eval_every=4, resume_dir=str(shared), lr=0.005)
    default = small_cfg(max_steps=8, eval_every=4, resume_dir=str(shared))
    assert fast.train.lr != default.train.lr
    ref_fast, ref_default = tmp_path / "ref-a" / "smoke" / "kl-seed0", tmp_path / "ref-b" / "smoke" / "kl-seed0"
    run(fast, ref_fast, data_dir)
    run(default, ref_default, data_dir)
    a, b = tmp_path / "a" / "smoke" / "kl-seed0", tmp_path / "b" / "smoke" / "kl-seed0"
    assert run(fast, a, data_dir, stop_after=3) == {"stopped_at": 3}
    assert run(default, b, data_dir, stop_after=5) == {"stopped_at": 5}
    assert len(list(shared.glob("*.resume.safetensors"))) == 2  # one each, under its own run id
    logs = []
    train(fast, a, data_dir, progress=False, log=logs.append)
    assert "resuming kl-seed0 at step 3" in logs
    assert len(list(shared.glob("*.resume.safetensors"))) == 1, "a finished run deletes its own state only"
    logs.clear()
    train(default, b, data_dir, progress=False, log=logs.append)
    assert "resuming kl-seed0 at step 5" in logs
    assert not list(shared.glob("*"))
    assert metric_rows(a) == metric_rows(ref_fast) and metric_rows(b) == metric_rows(ref_default)
    assert metric_rows(a) != metric_rows(b)


# --------------------------------------------------------------------------
# 4. crafted resume states


@pytest.fixture
def stopped_run(tmp_path, data_dir):
    """(cfg, run folder) of a run stopped after 5 of its 8 steps (a student from step 4)."""
    cfg = small_cfg(max_steps=8, eval_every=4)
    run_dir = tmp_path / "runs" / "smoke" / "kl-seed0"
    assert run(cfg, run_dir, data_dir, stop_after=5) == {"stopped_at": 5}
    return cfg, run_dir


def _edit_resume(path: Path, edit) -> None:
    state = load_resume(path)
    edit(state)
    save_resume(path, state)


@pytest.mark.parametrize("case, message", [
    ("step past the budget", r"step 1000000000 is not a whole number in 0\.\.8"),
    ("step not a number", r"step 'abc' is not a whole number"),
    ("no optimizer", r"optimizer missing"),
    ("tokens not the steps'", r"tokens 7 is not step 5 x"),
    ("model of another shape", r"its model does not fit this run"),
    ("moments of another shape", r"its optimizer does not fit this run"),
    ("scheduler ahead", r"its schedule is at step 6, its counters at step 5"),
])
def test_a_crafted_resume_state_is_refused_and_the_run_kept(stopped_run, data_dir, case, message):
    cfg, run_dir = stopped_run
    resume = run_dir / "resume.safetensors"

    def edit(s):
        if case == "step past the budget":
            s["state"]["step"] = 10**9
        elif case == "step not a number":
            s["state"]["step"] = "abc"
        elif case == "no optimizer":
            del s["optimizer"]
        elif case == "tokens not the steps'":
            s["state"]["tokens"] = 7
        elif case == "model of another shape":
            s["model"]["student.ln_f.weight"] = torch.zeros(3)
        elif case == "moments of another shape":
            first = next(iter(s["optimizer"]["state"].values()))
            first["exp_avg"] = torch.zeros(2, 2)
        elif case == "scheduler ahead":
            s["scheduler"]["last_epoch"] = 6

    _edit_resume(resume, edit)
    before = snapshot(run_dir)
    with pytest.raises(KdlibError, match=message) as err:
        run(cfg, run_dir, data_dir)
    # The advice says what deleting it does, naming the file.
    assert f"delete {resume}: its metrics.jsonl starts over" in str(err.value)
    assert "is kept as" in str(err.value) and "student.previous.safetensors" in str(err.value)
    assert snapshot(run_dir) == before  # nothing written, nothing deleted: not marked finished either


def test_a_resume_state_of_another_configuration_is_refused(stopped_run, tmp_path, data_dir):
    cfg, run_dir = stopped_run
    other = small_cfg(max_steps=8, eval_every=4, lr=0.005)  # the same experiment and seed
    other_dir = tmp_path / "other" / "smoke" / "kl-seed0"
    assert run(other, other_dir, data_dir, stop_after=5) == {"stopped_at": 5}
    shutil.copyfile(other_dir / "resume.safetensors", run_dir / "resume.safetensors")
    before = snapshot(run_dir)
    with pytest.raises(KdlibError, match=r"saved by a run of another configuration"):
        run(cfg, run_dir, data_dir)
    assert snapshot(run_dir) == before


def test_a_resume_state_of_another_run_folder_is_refused(tmp_path, data_dir):
    shared = tmp_path / "resume"
    cfg = small_cfg(max_steps=8, eval_every=4, resume_dir=str(shared))
    a, b = tmp_path / "a" / "smoke" / "kl-seed0", tmp_path / "b" / "smoke" / "kl-seed0"
    assert run(cfg, a, data_dir, stop_after=3) == {"stopped_at": 3}
    assert run(cfg, b, data_dir, stop_after=5) == {"stopped_at": 5}
    state_a, state_b = (RunPaths.of(cfg, f).resume for f in (a, b))
    shutil.copyfile(state_a, state_b)  # b's name, a's state (same config)
    before = snapshot(b), snapshot(shared)
    with pytest.raises(KdlibError, match=r"saved by another run folder \(run id '[0-9a-f]{10}', .*\.run-id says"):
        run(cfg, b, data_dir)
    assert (snapshot(b), snapshot(shared)) == before


def test_deleting_a_resume_state_as_advised_keeps_the_best_student_aside(stopped_run, data_dir):
    cfg, run_dir = stopped_run
    student = (run_dir / "student.safetensors").read_bytes()
    (run_dir / "resume.safetensors").unlink()
    logs = []
    summary = train(cfg, run_dir, data_dir, progress=False, log=logs.append)
    assert summary["steps"] == 8
    assert (run_dir / "student.previous.safetensors").read_bytes() == student
    assert any("kept as" in line and "student.previous.safetensors" in line for line in logs)
    load_student(run_dir / "student.previous.safetensors", expect=cfg.model)
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, 9))


# --------------------------------------------------------------------------
# 5. sizes from untrusted files are checked before anything is allocated


@pytest.fixture
def no_model_building(monkeypatch):
    """TinyGPT may be built on the meta device only (which allocates nothing)."""
    real = kdlib.checkpoint.TinyGPT

    def guarded(config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError(f"a {config} TinyGPT was allocated")
        return real(config)

    monkeypatch.setattr(kdlib.checkpoint, "TinyGPT", guarded)


@pytest.mark.parametrize("claim, message", [
    # 10^6 x 10^6 embeddings: 4 TiB of float32, over the bound.
    ({"vocab_size": 1_000_000, "n_embd": 1_000_000, "n_head": 1, "d_ff": 4}, r"claims a student of [\d,]+ parameters"),
    # 0.3 B parameters, under the bound, whose tensors are not in the file.
    ({"vocab_size": 50_000, "n_embd": 4096, "n_head": 32, "d_ff": 4096, "n_layer": 1},
     r"does not match its own model config: missing"),
    # Ten million blocks: too many to list before comparing.
    ({"n_layer": 10_000_000, "n_embd": 2, "n_head": 1, "d_ff": 2}, r"claims 10,000,000 blocks but holds 1 tensors"),
])
def test_a_small_student_file_claiming_a_huge_model_is_refused_before_it_is_built(tmp_path, tiny_config, claim,
                                                                                  message, no_model_building):
    import dataclasses

    path = tmp_path / "student.safetensors"
    config = dataclasses.asdict(tiny_config(**claim))
    save_file({"wte.weight": torch.zeros(2, 2, dtype=torch.float16)}, str(path),
              metadata={"format": STUDENT_FORMAT, "model_config": json.dumps(config), "meta": "{}"})
    assert path.stat().st_size < 2048
    t0 = time.perf_counter()
    with pytest.raises(KdlibError, match=message):
        load_student(path)
    assert time.perf_counter() - t0 < 5


def test_a_student_file_of_another_dtype_is_refused(tmp_path, tiny_config):
    from kdlib.checkpoint import save_student
    from kdlib.models import TinyGPT

    path = tmp_path / "student.safetensors"
    from safetensors import safe_open

    save_student(TinyGPT(tiny_config()), path)

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v.to(torch.int16) if k == "ln_f.weight" else v for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(KdlibError, match=r"not float16 \['ln_f.weight'\]"):
        load_student(path)


def test_a_run_the_budget_refuses_builds_no_model(tmp_path, data_dir, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was built before the budget check")

    monkeypatch.setattr(kdlib.train, "TinyGPT", never)
    monkeypatch.setattr(kdlib.train, "load_teacher", never)
    runs = tmp_path / "runs"
    with pytest.raises(KdlibError, match=r"will need about .* MiB .*nothing was started"):
        run(small_cfg("layerwise-kl"), runs / "smoke" / "layerwise-kl-seed0", data_dir,
            budget=StorageBudget(runs, MiB // 4))
    assert not (runs / "smoke" / "layerwise-kl-seed0").exists()


# --------------------------------------------------------------------------
# 6. Ctrl-C during training


def test_ctrl_c_during_training_says_how_to_continue_and_resumes_to_the_same_result(tmp_path, data_dir,
                                                                                   monkeypatch):
    cfg = small_cfg(max_steps=12, eval_every=4)
    reference = run(cfg, tmp_path / "ref", data_dir)
    real, seen = kdlib.faults.point, {"step": 0}

    def ctrl_c_at_step_7(name):
        if name == "step":
            seen["step"] += 1
            if seen["step"] == 7:
                raise KeyboardInterrupt
        real(name)

    monkeypatch.setattr(kdlib.faults, "point", ctrl_c_at_step_7)
    run_dir = tmp_path / "run"
    logs = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir, data_dir, progress=False, log=logs.append)
    assert logs and logs[-1] == ("interrupted at step 6; run the same command again to continue (from step 4, its last "
                        "saved state)")
    assert not (run_dir / ".lock").exists() and not list(run_dir.glob(".*.tmp"))
    assert load_resume(run_dir / "resume.safetensors")["state"]["step"] == 4
    monkeypatch.undo()
    logs.clear()
    resumed = train(cfg, run_dir, data_dir, progress=False, log=logs.append)
    assert "resuming run at step 4" in logs
    assert metric_rows(run_dir) == metric_rows(tmp_path / "ref")
    for key in ("best_val_ppl", "best_step", "final_val_ppl", "test_ppl", "steps", "tokens"):
        assert resumed[key] == reference[key], key
    ta, tb = load_file(tmp_path / "ref" / "student.safetensors"), load_file(run_dir / "student.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

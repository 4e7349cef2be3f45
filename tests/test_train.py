"""kdlib.train: the training loop, its files, resuming, refusals, the sweep, eval and DDP.

Every run trains the smoke preset's tiny student for a handful of steps on
the CPU, in a private copy of the prepared smoke data (``kdlib.train`` writes
``teacher_ppl.json`` and a cache into the data folder). The golden loss curve
in ``tests/golden/smoke_kl_curve.json`` is made by
``tests/golden/make_golden.py``; this file only reads it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kdlib.config
import kdlib.losses
import kdlib.models
import kdlib.train
from kdlib.checkpoint import load_resume, load_student, student_metadata
from kdlib.cli import main as cli_main
from kdlib.config import ExperimentConfig, preset
from kdlib.data import WindowSampler, load_split
from kdlib.errors import KdlibError
from kdlib.evaluate import perplexity
from kdlib.models import TinyGPT, load_teacher
from kdlib.optim import schedule
from kdlib.storage import MiB, StorageBudget, estimate_run_bytes, small_files_bytes
from kdlib.train import run_name, train
from helpers import metric_rows, quiet, run

GOLDEN_DIR = Path(__file__).parent / "golden"


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()



def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def golden_run(smoke_data, tmp_path_factory):
    """(run folder, data folder, summary) of the golden run, trained once for this module."""
    root = tmp_path_factory.mktemp("golden_run")
    data = copy_data(smoke_data[0], root / "data")
    summary = train(make_golden.golden_config(), root / "run", data, progress=False, log=quiet)
    return root / "run", data, summary


def small_cfg(exp: str, max_steps: int = 6, eval_every=None, log_every: int = 1, **model) -> ExperimentConfig:
    cfg = preset("smoke", exp)
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = max_steps, eval_every, log_every
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg.validate()


def files_bytes(run_dir: Path, names) -> dict:
    return {n: (run_dir / n).read_bytes() for n in names}


# --------------------------------------------------------------------------
# 1. golden smoke run


def test_golden_smoke_loss_curve(golden_run):
    golden = json.loads((GOLDEN_DIR / "smoke_kl_curve.json").read_text())
    assert golden["settings"] == make_golden.SETTINGS, "make_golden.py changed: run it to regenerate the file"
    assert golden["made_with"]["command"] and golden["made_with"]["torch"]
    run_dir, data, summary = golden_run
    # The smoke text is this Python's pydoc_data topics: other data, another curve.
    assert make_golden.data_checksums(data) == golden["data_sha256"], (
        f"the smoke data differs from the golden run's (made with Python {golden['made_with']['python']}): "
        "regenerate with tests/golden/make_golden.py under this Python")
    actual = make_golden.curve(run_dir / "metrics.jsonl")
    expected = golden["rows"]
    assert [r["step"] for r in actual] == list(range(1, 21))  # log_every 1: one row per step
    assert [r["step"] for r in actual if "val_ppl" in r] == [5, 10, 15, 20]
    assert len(actual) == len(expected)
    # rtol 1e-4: CPU float32 results can differ in the last bits between CPU kernels
    # (AVX2 vs AVX-512 paths), thread counts and torch versions, which moves these
    # numbers by ~1e-7..1e-6 relative after 20 steps; any real change in the numerics
    # (loss formula, temperature, schedule, data order, init) moves them by far more.
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys(), f"step {e['step']}: keys {sorted(a)} != {sorted(e)}"
        assert a["step"] == e["step"] and a["tokens"] == e["tokens"]
        assert a == pytest.approx(e, rel=1e-4, abs=0), f"step {e['step']}"
    for key in ("best_val_ppl", "final_val_ppl", "test_ppl"):
        assert summary[key] == pytest.approx(golden["summary"][key], rel=1e-4, abs=0), key
    assert summary["steps"] == golden["summary"]["steps"] and summary["tokens"] == golden["summary"]["tokens"]


# --------------------------------------------------------------------------
# 2. exact resume


@pytest.mark.parametrize("case", ["online", "cache"])
def test_interrupted_run_resumes_bit_for_bit(case, tmp_path, request):
    if case == "online":
        data = request.getfixturevalue("data_dir")
        cfg = small_cfg("layerwise-kl-cos", max_steps=16, eval_every=4, dropout=0.1)
        kw = {}
    else:
        data = request.getfixturevalue("cached_data_dir")
        cfg = small_cfg("kl", max_steps=16, eval_every=4, dropout=0.1)
        kw = {"teacher_source": "cache"}
    a, b = tmp_path / "a", tmp_path / "b"
    sa = run(cfg, a, data, **kw)
    assert sa["teacher_source"] == case
    assert run(cfg, b, data, stop_after=5, **kw) == {"stopped_at": 5}
    assert not (b / "summary.json").exists() and (b / "resume.safetensors").is_file()
    assert [r["step"] for r in metric_rows(b)] == [1, 2, 3, 4, 5]
    assert run(cfg, b, data, stop_after=6, **kw) == {"stopped_at": 11}
    sb = run(cfg, b, data, **kw)

    assert metric_rows(a) == metric_rows(b)
    assert [r["step"] for r in metric_rows(b)] == list(range(1, 17))
    ta, tb = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for key in ("best_val_ppl", "best_step", "final_val_ppl", "test_ppl", "teacher_test_ppl", "steps",
                "tokens", "stopped_early", "teacher_source"):
        assert sa[key] == sb[key], key
    assert sa["steps"] == 16


# --------------------------------------------------------------------------
# 3. a NaN loss


@pytest.mark.parametrize("component, target", [("kl", "_divergence_rows"), ("ce", "_ce_rows")])
def test_nan_loss_stops_with_step_and_component_and_keeps_the_student(component, target, tmp_path, data_dir,
                                                                      monkeypatch):
    # The row formula of one term is poisoned at one step: the objective builds
    # each term's formula once per call, i.e. once per optimizer step here.
    real = getattr(kdlib.losses.fused, target)  # where output_losses looks the row formulas up
    calls = {"n": 0}
    bad_call = 8  # the 8th optimizer step (grad_accum 1: one call per step)

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        rows = real(*args, **kwargs)
        if calls["n"] == bad_call:
            return lambda *xs: rows(*xs) * float("nan")
        return rows

    monkeypatch.setattr(kdlib.losses.fused, target, poisoned)
    cfg = small_cfg("kl", max_steps=12, eval_every=3)
    run_dir = tmp_path / "run"
    with pytest.raises(KdlibError) as err:
        run(cfg, run_dir, data_dir)
    msg = str(err.value)
    assert f"component: {component}" in msg
    assert "not finite" in msg
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, bad_call))  # steps 1..7 logged, all finite
    assert all(math.isfinite(r["loss"]) for r in rows)
    # The student of the last improving evaluation (step 3 or 6) is still there and loads.
    student = load_student(run_dir / "student.safetensors", expect=cfg.model)
    meta = student_metadata(run_dir / "student.safetensors")["meta"]
    evals = {r["step"]: r["val_ppl"] for r in rows if "val_ppl" in r}
    assert list(evals) == [3, 6]
    assert meta["step"] == min(evals, key=evals.get) and meta["val_ppl"] == min(evals.values())
    assert isinstance(student, TinyGPT)
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / ".lock").exists()
    # The step named is the failing one, numbered as metrics.jsonl numbers steps
    # (row "step": k = after k optimizer steps): step 8, not step 7 (whose finite loss is logged).
    assert msg.startswith(f"step {bad_call}:"), msg


def test_nan_between_log_lines_is_reported_with_its_own_step_and_nothing_after_it_is_written(
        tmp_path, data_dir, monkeypatch):
    # The step checks finiteness on the device (no host sync); the check is read at the next
    # log line, evaluation or save. The step named is still the bad one, and nothing from it or
    # after it reaches metrics.jsonl, the student or the resume state.
    real = kdlib.losses.fused._divergence_rows
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        rows = real(*args, **kwargs)
        return (lambda *xs: rows(*xs) * float("inf")) if calls["n"] == 7 else rows

    monkeypatch.setattr(kdlib.losses.fused, "_divergence_rows", poisoned)
    cfg = small_cfg("kl", max_steps=12, eval_every=5, log_every=4)
    run_dir = tmp_path / "run"
    with pytest.raises(KdlibError, match=r"^step 7: the loss is not finite \(component: kl\)"):
        run(cfg, run_dir, data_dir)
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [4, 5]  # a log line at 4, an evaluation at 5; 8 never written
    assert student_metadata(run_dir / "student.safetensors")["meta"]["step"] == 5
    assert load_resume(run_dir / "resume.safetensors")["state"]["step"] == 5


def test_metrics_show_mfu_when_the_peak_is_known(tmp_path, data_dir, monkeypatch):
    from kdlib.perf import PEAK_ENV, flop_params, flops_per_token

    monkeypatch.setenv(PEAK_ENV, "0.001")  # a made-up 1 GFLOP/s CPU, so MFU is a readable number
    cfg = small_cfg("kl", max_steps=4, log_every=2)
    run(cfg, tmp_path / "run", data_dir)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    teacher = cfg.teacher.random_init
    n_student = flop_params(TinyGPT(cfg.model))
    n_teacher = flop_params(kdlib.models.random_teacher(teacher))
    assert n_student == sum(p.numel() for p in TinyGPT(cfg.model).parameters()) - 64 * 32  # less wpe
    flops = flops_per_token(n_student, cfg.model.n_layer, cfg.model.n_embd, cfg.data.block_size,
                            n_teacher, teacher["n_layer"], teacher["n_embd"])
    logged = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e9)
    monkeypatch.delenv(PEAK_ENV)
    run(small_cfg("kl", max_steps=2, log_every=1), tmp_path / "run2", data_dir)
    rows = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert all("mfu" not in r and r["tokens_per_s"] > 0 for r in rows)  # a CPU's peak is unknown


def test_compiled_student_trains_and_a_run_may_continue_without_compiling(tmp_path, data_dir):
    # torch.compile (inductor, on the CPU here) in place: parameter names, checkpoints and the
    # resume state are those of the plain model, so the flag may change between sessions.
    cfg = small_cfg("kl", max_steps=3)
    cfg.train.compile = True
    out = run(cfg, tmp_path / "run", data_dir, stop_after=2)
    assert out == {"stopped_at": 2}
    assert load_resume(tmp_path / "run" / "resume.safetensors")["state"]["step"] == 2
    cfg.train.compile = False
    summary = run(cfg, tmp_path / "run", data_dir)
    assert summary["steps"] == 3 and math.isfinite(summary["test_ppl"])
    assert ExperimentConfig.load(tmp_path / "run" / "config.json").train.compile is True  # as first written


# --------------------------------------------------------------------------
# 4. sweep


def sweep_args(runs, data, exps=("kl", "ce"), seeds=("0", "1")):
    return ["sweep", "--preset", "smoke", "--exps", *exps, "--seeds", *seeds, "--runs", str(runs),
            "--data-dir", str(data), "--max-steps", "6"]


def test_sweep_trains_skips_finished_and_resumes_interrupted(tmp_path, data_dir, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert cli_main(sweep_args(runs, data_dir)) == 0
    assert [p.name for p in runs.iterdir()] == ["smoke"]  # the default layout: RUNS/PRESET/RUN
    runs = runs / "smoke"
    names = ["kl-seed0", "ce-seed0", "kl-seed1", "ce-seed1"]
    assert sorted(p.name for p in runs.iterdir()) == sorted(names)
    summaries = {n: (runs / n / "summary.json").read_bytes() for n in names}
    for n in names:
        s = json.loads(summaries[n])
        assert s["steps"] == 6 and s["exp"] == n.split("-")[0] and s["seed"] == int(n[-1])
    out = capsys.readouterr().out
    assert "[4/4] ce-seed1" in out and "sweep done: 4 runs" in out

    # Again: every run is finished, nothing trains, nothing changes.
    def must_not_train(*a, **k):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as m:
        m.setattr(kdlib.train.Run, "setup", must_not_train)
        t0 = time.perf_counter()
        assert cli_main(sweep_args(runs.parent, data_dir)) == 0
        elapsed = time.perf_counter() - t0
    assert {n: (runs / n / "summary.json").read_bytes() for n in names} == summaries
    assert capsys.readouterr().out.count("is finished") == 4
    assert elapsed < 10, elapsed

    # An interrupted sweep: kl-seed0 stopped at step 3 (resume state, no summary).
    runs2 = tmp_path / "runs2"
    cfg = preset("smoke").with_experiment("kl")
    cfg.seed, cfg.train.max_steps = 0, 6
    assert run(cfg.validate(), runs2 / "smoke" / run_name(cfg), data_dir, stop_after=3) == {"stopped_at": 3}
    runs2 = runs2 / "smoke"
    assert (runs2 / "kl-seed0" / "resume.safetensors").is_file()
    assert not (runs2 / "kl-seed0" / "summary.json").exists()
    assert cli_main(sweep_args(runs2.parent, data_dir, seeds=("0",))) == 0
    assert "resuming kl-seed0 at step 3" in capsys.readouterr().out
    resumed = json.loads((runs2 / "kl-seed0" / "summary.json").read_text())
    straight = json.loads(summaries["kl-seed0"])
    for key in ("best_val_ppl", "final_val_ppl", "test_ppl", "steps", "tokens"):
        assert resumed[key] == straight[key], key
    assert metric_rows(runs2 / "kl-seed0") == metric_rows(runs / "kl-seed0")
    assert (runs2 / "ce-seed0" / "summary.json").is_file()


# --------------------------------------------------------------------------
# 5. the same data order for every experiment of a seed


def test_experiments_of_a_seed_read_the_same_windows(tmp_path, data_dir, monkeypatch):
    seen = []
    real = WindowSampler.next_batch

    def recording(self):
        idx, batch = real(self)
        seen.append(idx.copy())
        return idx, batch

    monkeypatch.setattr(WindowSampler, "next_batch", recording)
    by_exp = {}
    for exp in ("ce", "kl"):
        seen.clear()
        run(small_cfg(exp, max_steps=4), tmp_path / exp, data_dir)
        by_exp[exp] = np.stack(seen)
    assert by_exp["ce"].shape == (4, 8)
    np.testing.assert_array_equal(by_exp["ce"], by_exp["kl"])
    order = WindowSampler(load_split(data_dir, "train").tokens(), 32, 8, seed=0).order(0)
    np.testing.assert_array_equal(by_exp["kl"].ravel(), order[:32])


# --------------------------------------------------------------------------
# 6. bad input


def test_cli_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--preset", "nope", "--exp", "kl"])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(KdlibError, match="unknown preset 'nope'; choose one of: smoke, demo"):
        preset("nope")


def test_cli_unknown_experiment_is_a_clean_error(tmp_path, data_dir, capsys):
    runs = tmp_path / "runs"
    assert cli_main(["train", "--preset", "smoke", "--exp", "bogus", "--runs", str(runs),
                     "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown part 'bogus'" in err and "Traceback" not in err
    assert not runs.exists()


def test_run_folder_of_another_experiment_is_refused(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(small_cfg("kl").to_json() + "\n")
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(KdlibError, match=r"holds a run of another configuration .*'kl' seed 0"):
        run(small_cfg("js"), run_dir, data_dir)
    assert (run_dir / "config.json").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_cache_built_for_another_k_is_refused(tmp_path, cached_data_dir):
    cfg = small_cfg("kl")
    cfg.cache.top_k = 8  # the cache has k = 16
    with pytest.raises(KdlibError, match=r"built for another run: k: cache has 16, the run needs 8"):
        run(cfg, tmp_path / "run", cached_data_dir, teacher_source="cache")
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("exp", ["kl-cos", "layerwise-kl"])
def test_cache_source_for_cosine_or_features_is_refused(exp, tmp_path, cached_data_dir):
    with pytest.raises(KdlibError, match=rf"experiment '{exp}' needs the teacher online"):
        run(small_cfg(exp), tmp_path / "run", cached_data_dir, teacher_source="cache")
    assert not (tmp_path / "run" / "config.json").exists()


def test_missing_cache_and_unknown_teacher_source_are_refused(tmp_path, data_dir):
    with pytest.raises(KdlibError, match=r"no top-k cache in .*kdlib cache"):
        run(small_cfg("kl"), tmp_path / "a", data_dir, teacher_source="cache")
    with pytest.raises(KdlibError, match=r"unknown teacher source 'teacher'; choose one of: online, cache"):
        run(small_cfg("kl"), tmp_path / "b", data_dir, teacher_source="teacher")


def test_data_block_larger_than_model_context_is_refused(tmp_path, data_dir):
    cfg = small_cfg("kl")
    cfg.data.block_size = 128
    cfg.teacher.random_init["n_positions"] = 256  # the teacher's context fits: only the student's is short
    with pytest.raises(KdlibError, match=r"data.block_size \(128\) exceeds the model's block_size \(64\)"):
        run(cfg, tmp_path / "run", data_dir)
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_data_is_refused(tmp_path, data_dir):
    cfg = small_cfg("kl")
    cfg.train.batch_size = 4096
    n_windows = (load_split(data_dir, "train").n_tokens - 1) // 32
    with pytest.raises(KdlibError, match=rf"make {n_windows} windows of 32 tokens, fewer than one batch of 4096"):
        run(cfg, tmp_path / "run", data_dir)
    assert not (tmp_path / "run" / "student.safetensors").exists()
    assert not (tmp_path / "run" / ".lock").exists()


def test_refused_batch_size_can_be_fixed_in_the_same_folder(tmp_path, data_dir):
    """The refusal says 'use a smaller batch': doing so in the same run folder must work,
    so the refused run must not leave its config.json claiming the folder."""
    bad = small_cfg("kl", max_steps=2)
    bad.train.batch_size = 4096
    with pytest.raises(KdlibError, match="fewer than one batch"):
        run(bad, tmp_path / "run", data_dir)
    good = small_cfg("kl", max_steps=2)
    assert run(good, tmp_path / "run", data_dir)["steps"] == 2


# config_digest of these configs as kdlib wrote them before the experiment name became the one source
# of the loss components (computed by the code of c6be9a8): interrupted runs of then still continue.
DIGESTS_WITH_COMPONENTS_IN_LOSS = {
    ("smoke", "kl"): "e81f1224a4069af2155dacd9ce6d5cc554e5139b451344190c8de038600d961b",
    ("study", "layerwise-kl-cos"): "55337b47fc8c07d4315b0607bb5c2ed15cc0b94bd834c976439c202e83e1d758",
    ("colab-t4", "ce"): "7908943881ff49d3144ca80d0400a9154ec21d839a243f4577a8e326f16f30bd",
}


def test_a_resume_state_saved_before_the_config_format_changed_continues_its_run(tmp_path, data_dir,
                                                                                 monkeypatch):
    import kdlib.resume
    from kdlib.runs import config_digest

    for (name, exp), digest in DIGESTS_WITH_COMPONENTS_IN_LOSS.items():
        assert config_digest(preset(name, exp), components_in_loss=True) == digest
        assert config_digest(preset(name, exp)) != digest
    cfg = small_cfg("kl", max_steps=8, eval_every=4)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:  # the interrupted run stamps its state the old way
        m.setattr(kdlib.resume, "config_digest", lambda c: config_digest(c, components_in_loss=True))
        assert run(cfg, run_dir, data_dir, stop_after=5) == {"stopped_at": 5}
    assert run(cfg, run_dir, data_dir)["steps"] == 8
    edited = small_cfg("kl", max_steps=8, eval_every=4)
    edited.loss.w_div = 0.25  # another configuration is still refused, in either format
    with monkeypatch.context() as m:
        m.setattr(kdlib.resume, "config_digest", lambda c: config_digest(c, components_in_loss=True))
        assert run(cfg, tmp_path / "other", data_dir, stop_after=5) == {"stopped_at": 5}
    (tmp_path / "other" / "config.json").write_text(edited.to_json())
    with pytest.raises(KdlibError, match="another configuration"):
        run(edited, tmp_path / "other", data_dir)


def test_corrupt_resume_state_is_a_clear_error_and_keeps_the_run(tmp_path, data_dir):
    cfg = small_cfg("kl", max_steps=8, eval_every=4)
    run_dir = tmp_path / "run"
    assert run(cfg, run_dir, data_dir, stop_after=5) == {"stopped_at": 5}
    keep = files_bytes(run_dir, ["metrics.jsonl", "student.safetensors", "config.json"])
    resume = run_dir / "resume.safetensors"
    full = resume.read_bytes()
    for cut in (len(full) // 2, 16):
        resume.write_bytes(full[:cut])
        with pytest.raises(KdlibError, match=r"resume\.safetensors .*(truncated|corrupt)"):
            run(cfg, run_dir, data_dir)
        assert files_bytes(run_dir, keep) == keep, f"cut at {cut}"
        assert resume.read_bytes() == full[:cut]
        assert not (run_dir / "summary.json").exists() and not (run_dir / ".lock").exists()
    load_student(run_dir / "student.safetensors", expect=cfg.model)


def test_storage_budget_too_small_is_refused_before_training(tmp_path, data_dir):
    cfg = small_cfg("kl")
    runs = tmp_path / "runs"
    budget = StorageBudget(runs, MiB // 4)
    sched = schedule(cfg, load_split(data_dir, "train").n_tokens)
    # The student, the resume state and the small files as the plan counts them.
    need = estimate_run_bytes(cfg, with_resume=True, small_bytes=small_files_bytes(cfg, sched))
    assert need > MiB // 4
    with pytest.raises(KdlibError) as err:
        run(cfg, runs / "kl-seed0", data_dir, budget=budget)
    msg = str(err.value)
    assert f"will need about {need / MiB:.1f} MiB (with its resume state)" in msg
    assert "0.2 MiB left of its 0.25 MiB budget; nothing was started" in msg
    assert not (runs / "kl-seed0").exists()  # a refused run leaves no folder behind
    # A budget the estimate fits: the run completes, and its files fit the estimate.
    summary = run(cfg, runs / "kl-seed0", data_dir, budget=StorageBudget(runs, 2 * MiB))
    assert summary["steps"] == 6 and budget.used() <= need


def test_run_locked_by_a_live_process_is_refused(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = os.getppid()  # alive while this test runs
    (run_dir / ".lock").write_text(str(pid))
    with pytest.raises(KdlibError, match=rf"is in use by process {pid}"):
        run(small_cfg("kl", max_steps=2), run_dir, data_dir)
    assert (run_dir / ".lock").read_text() == str(pid)
    assert not (run_dir / "config.json").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, data_dir):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its PID is gone
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(proc.pid))
    assert run(small_cfg("kl", max_steps=2), run_dir, data_dir)["steps"] == 2
    assert not (run_dir / ".lock").exists()


# --------------------------------------------------------------------------
# 7. eval CLI and 8. summary


def test_eval_cli_prints_the_summary_test_perplexity(golden_run, capsys):
    run_dir, data, summary = golden_run
    assert cli_main(["eval", str(run_dir), "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"run: test perplexity {summary['test_ppl']:.3f} (block 32, stride 16)"


def test_summary_contents(golden_run):
    run_dir, data, summary = golden_run
    cfg = make_golden.golden_config()
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    rows = metric_rows(run_dir)
    vals = [r["val_ppl"] for r in rows if "val_ppl" in r]
    assert summary["best_val_ppl"] == min(vals)
    assert summary["final_val_ppl"] == vals[-1]
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 8 * 32
    assert summary["eval_stride"] == cfg.data.block_size // 2 == 16
    assert summary["train_wall_s"] > 0 and isinstance(summary["device"], str) and summary["device"]
    assert summary["params_student"] == TinyGPT(cfg.model).num_parameters() == 35584
    teacher = load_teacher(cfg.teacher, student_vocab_size=cfg.model.vocab_size)
    assert summary["params_teacher"] == sum(p.numel() for p in teacher.parameters())
    test = load_split(data, "test").tokens()
    student = load_student(run_dir / "student.safetensors")
    assert summary["test_ppl"] == perplexity(student, test, 32, 16, cfg.train.eval_batch_size)
    assert summary["teacher_test_ppl"] == pytest.approx(perplexity(teacher, test, 32, 16), rel=1e-9)
    entries = json.loads((data / "teacher_ppl.json").read_text())["entries"]
    assert [e["ppl"] for e in entries if e["key"]["split"] == "test"] == [summary["teacher_test_ppl"]]
    for key in ("best_val_ppl", "final_val_ppl", "test_ppl", "teacher_test_ppl"):
        assert 1 < summary[key] < cfg.model.vocab_size * 2, key


def test_ce_at_kl_trains_the_flops_of_kl_from_the_cli_and_resumes_to_the_same_budget(golden_run, tmp_path,
                                                                                     data_dir, capsys):
    """``train --exp ce@kl``: the golden kl run's config, more tokens than ce's 20 steps, the same training
    FLOPs as kl within 2% (student 6N + 12·L·d·T, teacher forward 2N + 4·L·d·T, from the models' own
    parameter counts); and a run stopped halfway continues to the same budget and numbers."""
    _, _, kl = golden_run
    runs = tmp_path / "runs"
    argv = ["train", "--preset", "smoke", "--exp", "ce@kl", "--seed", "0", "--max-steps", "20", "--runs", str(runs),
            "--data-dir", str(data_dir)]
    assert cli_main(argv) == 0
    assert "ce@kl-seed0" in capsys.readouterr().out  # the plan's table names it
    folder = runs / "smoke" / "ce@kl-seed0"
    done = json.loads((folder / "summary.json").read_text())
    cfg = ExperimentConfig.load(folder / "config.json")
    assert cfg.exp == "ce@kl" and done["exp"] == "ce@kl" and done["teacher_source"] == "none"
    teacher = load_teacher(preset("smoke").teacher, student_vocab_size=cfg.model.vocab_size)
    block, m, r = cfg.data.block_size, cfg.model, cfg.teacher.random_init
    n_student = done["params_student"] - (m.block_size * m.n_embd if m.positions == "learned" else 0)
    n_teacher = sum(p.numel() for p in teacher.parameters()) - r["n_positions"] * r["n_embd"]
    f_ce = 6 * n_student + 12 * m.n_layer * m.n_embd * block
    f_kl = f_ce + 2 * n_teacher + 4 * r["n_layer"] * r["n_embd"] * block
    assert done["steps"] == done["budget_steps"] == round(20 * f_kl / f_ce) > 20
    assert done["tokens"] > 20 * 8 * block == kl["tokens"]
    assert done["flops_per_token"] == pytest.approx(f_ce, rel=1e-9)
    assert kl["flops_per_token"] == pytest.approx(f_kl, rel=1e-9)
    assert done["train_flops"] == pytest.approx(done["tokens"] * f_ce, rel=1e-9)
    assert done["train_flops"] == pytest.approx(kl["train_flops"], rel=0.02)
    # stopped after 10 steps, then continued: the budget is kept, and so are the numbers
    again = tmp_path / "again" / "ce@kl-seed0"
    assert run(cfg, again, data_dir, stop_after=10) == {"stopped_at": 10}
    resumed = run(cfg, again, data_dir)
    for key in ("steps", "budget_steps", "tokens", "train_flops", "best_val_ppl", "test_ppl"):
        assert resumed[key] == done[key], key


# --------------------------------------------------------------------------
# 9. two-process DDP on the CPU


DDP_MAIN = """\
# Runs `python -m kdlib ARGS` (kdlib.cli.main) with the smoke preset logging every step,
# and records the world this process saw.
import json, os, sys
import kdlib.config

_smoke = kdlib.config.PRESETS["smoke"]


def smoke_every_step():
    cfg = _smoke()
    cfg.train.log_every = 1
    return cfg


kdlib.config.PRESETS["smoke"] = smoke_every_step
from kdlib.cli import main

rc = main(sys.argv[1:])
from accelerate import PartialState

s = PartialState()
with open(os.path.join(os.environ["KDLIB_TEST_RECORD"], f"rank{s.process_index}.json"), "w") as f:
    json.dump({"num_processes": s.num_processes, "distributed_type": str(s.distributed_type)}, f)
sys.exit(rc)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_every_step(_orig=kdlib.config.PRESETS["smoke"]):
    cfg = _orig()
    cfg.train.log_every = 1
    return cfg


def launch_ddp(tmp_path: Path, argv: list, timeout: int = 180, script_text: str = None, expect_ok: bool = True):
    """`accelerate launch` of kdlib.cli.main(argv) on 2 CPU processes; (process, seconds, [rank records]).

    Launched with --multi_gpu: without CUDA (CUDA_VISIBLE_DEVICES="") accelerate then runs
    MULTI_CPU with gloo through torchrun; `--cpu --num_processes 2` would start a single
    process (accelerate's simple launcher). A small wrapper calls kdlib.cli.main exactly as
    `python -m kdlib` does, with log_every 1 so the whole curve is compared, and records the
    world each process saw.
    """
    script = tmp_path / "ddp_main.py"
    script.write_text(script_text or DDP_MAIN)
    record = tmp_path / f"record-{time.monotonic_ns()}"
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "KDLIB_TEST_RECORD": str(record),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    print(f"two-process launch: {elapsed:.1f} s")
    if not expect_ok:
        return proc, elapsed
    assert proc.returncode == 0, f"exit {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-6000:]
    seen = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["num_processes"] == 2 and s["distributed_type"].endswith("MULTI_CPU") for s in seen), seen
    return proc, elapsed


DDP_ARGS = ["train", "--preset", "smoke", "--exp", "kl", "--max-steps", "6"]


def test_two_process_ddp_matches_one_process(tmp_path, data_dir, monkeypatch):
    """2 CPU processes (gloo, 4 windows each) vs one process, the same global batch of 8."""
    args = [*DDP_ARGS, "--data-dir", str(data_dir)]
    launch_ddp(tmp_path, [*args, "--runs", str(tmp_path / "ddp")])
    monkeypatch.setitem(kdlib.config.PRESETS, "smoke", smoke_every_step)
    assert cli_main([*args, "--runs", str(tmp_path / "one")]) == 0  # the same entry point, one process
    one, ddp = metric_rows(tmp_path / "one" / "smoke" / "kl-seed0"), metric_rows(tmp_path / "ddp" / "smoke" / "kl-seed0")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
    # The schedule is a function of the optimizer step alone: the same in both.
    assert [r["lr"] for r in ddp] == pytest.approx([r["lr"] for r in one], rel=1e-12)
    # The losses are averaged over the same 8 windows either way (4 per process, then
    # the mean of the two means); only the order of the reductions differs.
    for a, b in zip(ddp, one):
        assert a.keys() == b.keys()
        assert {k: a[k] for k in ("loss", "loss_ce", "loss_kl")} == pytest.approx(
            {k: b[k] for k in ("loss", "loss_ce", "loss_kl")}, rel=1e-3), f"step {a['step']}"
    assert ddp[-1]["val_ppl"] == pytest.approx(one[-1]["val_ppl"], rel=1e-3)
    s_ddp = json.loads((tmp_path / "ddp" / "smoke" / "kl-seed0" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "smoke" / "kl-seed0" / "summary.json").read_text())
    assert s_ddp["steps"] == s_one["steps"] == 6 and s_ddp["tokens"] == s_one["tokens"]
    assert s_ddp["test_ppl"] == pytest.approx(s_one["test_ppl"], rel=1e-3)


DDP_NAN_MAIN = DDP_MAIN.replace("from kdlib.cli import main\n", """from kdlib.cli import main
import kdlib.losses

if os.environ.get("RANK") == "1":  # the divergence of rank 1 only turns NaN at its 3rd step
    _real, _calls = kdlib.losses.fused._divergence_rows, {"n": 0}

    def _poisoned(*a, **k):
        _calls["n"] += 1
        rows = _real(*a, **k)
        return (lambda *xs: rows(*xs) * float("nan")) if _calls["n"] == 3 else rows

    kdlib.losses.fused._divergence_rows = _poisoned
""").replace("rc = main(sys.argv[1:])\n", """rc = main(sys.argv[1:])
with open(os.path.join(os.environ["KDLIB_TEST_RECORD"], f"rc{os.environ['RANK']}"), "w") as f:
    f.write(str(rc))
""")


def test_a_nan_on_one_process_stops_every_process(tmp_path, data_dir):
    # The step checks finiteness without a host sync; at the next log line every process learns
    # whether any one saw a non-finite loss, so none is left waiting in a collective.
    args = [*DDP_ARGS, "--data-dir", str(data_dir), "--runs", str(tmp_path / "runs")]
    proc, elapsed = launch_ddp(tmp_path, args, timeout=180, script_text=DDP_NAN_MAIN, expect_ok=False)
    assert proc.returncode != 0
    records = sorted(tmp_path.glob("record-*"))[-1]
    assert [(records / f"rc{r}").read_text() for r in (0, 1)] == ["2", "2"]  # both stopped with an error
    err = proc.stdout + proc.stderr
    assert "step 3: the loss is not finite (component: kl)" in err
    assert "another process saw a non-finite loss" in err
    rows = metric_rows(tmp_path / "runs" / "smoke" / "kl-seed0")
    assert [r["step"] for r in rows] == [1, 2]


def test_two_process_launch_on_a_finished_run_skips_it(tmp_path, data_dir, monkeypatch):
    """A finished run is not trained again (what a sweep relies on), under DDP too: every
    process must skip it, not only the main one."""
    args = [*DDP_ARGS, "--data-dir", str(data_dir), "--runs", str(tmp_path / "runs")]
    monkeypatch.setitem(kdlib.config.PRESETS, "smoke", smoke_every_step)
    assert cli_main(args) == 0
    run_dir = tmp_path / "runs" / "smoke" / "kl-seed0"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    proc, _ = launch_ddp(tmp_path, args)
    assert "is finished" in proc.stdout
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

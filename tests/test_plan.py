"""kdlib.plan and `python -m kdlib plan`: tokens, steps, evaluations, time and bytes of a sweep,
checked against the presets' targets and, for bytes, against a real smoke sweep.

Without a GPU (CI), the GPU presets are estimated for the GPU they are sized for (colab-a100 and
study: A100, colab-t4: T4) from the FLOPs model at a stated MFU; smoke and demo are measured on the
CPU, or estimated here with ``--device`` where only the schedule matters. Every test works in its
own folder (``monkeypatch.chdir``): the CLI's defaults (runs/, data/PRESET) land there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import student_flops, teacher_forward_flops
from plan_helpers import plan_json
from plan_helpers import no_gpu, own_folder  # noqa: F401 (fixtures)

import kdlib.notebook
import kdlib.plan
import kdlib.train
from kdlib.checkpoint import MiB
from kdlib.cli import main as cli_main
from kdlib.config import PRESETS, SEEDS, preset, preset_seeds
from kdlib.grid import EXPERIMENTS

STUDY_EPOCH_TOKENS = 1_650_000  # what the original study trained on per epoch (data.train_tokens)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def run_folders(runs: Path) -> list[str]:
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*-seed*") if p.is_dir()) if runs.exists() else []


# --------------------------------------------------------------------------
# 1. the presets' plans meet their targets


def test_colab_a100_plan_fits_its_targets(capsys, no_gpu):
    p = plan_json(capsys, "--preset", "colab-a100", "--seeds", "0", "1", "2")
    runs = p["runs"]
    assert len(runs) == 42 == p["n_runs"]
    assert {(r["exp"], r["seed"]) for r in runs} == {(e, s) for e in EXPERIMENTS for s in (0, 1, 2)}
    assert len({r["tokens"] for r in runs}) == 1, "every experiment of a preset gets the same token budget"
    assert p["tokens_per_run"] == [runs[0]["tokens"]]
    assert p["device"] == "A100" and "A100" in p["time_source"] and "estimate" in p["time_source"]
    assert p["total_hours"] == pytest.approx(sum(r["hours"] for r in runs))
    assert 0 < p["total_hours"] <= 8, "14 x 3 runs must fit 8 A100-hours"
    assert max(r["hours"] for r in runs) <= 0.25, "a run must fit 15 minutes on an A100"
    assert p["results_bytes"] <= 100 * MiB and p["peak_results_bytes"] <= 100 * MiB
    assert p["budget_bytes"] == 100 * MiB and p["fits"] is True
    # Students outside the results folder; it keeps the best one's copy only.
    assert p["weights"] == "best" and p["kept_student_bytes"] > 90 * MiB
    assert all(r["other_bytes"] > 90 * MiB and r["results_bytes"] < MiB for r in runs)
    assert max(r["epochs"] for r in runs) <= 1, "no window of WikiText-103's train split is seen twice"
    assert min(r["evals"] for r in runs) >= 20


def test_the_plan_shows_the_equal_compute_run_with_the_tokens_of_kls_flops(capsys, no_gpu):
    """colab-a100's ce@kl: kl's token budget x kl's FLOPs per token over the student's (from parameter
    counts), whole steps; about kl's time at the same FLOP rate; the number docs/protocol.md states."""
    p = plan_json(capsys, "--preset", "colab-a100", "--exps", "ce", "ce@kl", "kl", "--seeds", "0")
    runs = {r["exp"]: r for r in p["runs"]}
    cfg = preset("colab-a100")
    f_ce = student_flops(cfg)
    ratio = (f_ce + teacher_forward_flops(cfg)) / f_ce
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    assert runs["ce"]["tokens"] == runs["kl"]["tokens"]
    assert runs["ce@kl"]["steps"] == round(runs["kl"]["steps"] * ratio)
    assert runs["ce@kl"]["tokens"] == runs["ce@kl"]["steps"] * per_step
    assert runs["ce@kl"]["hours"] == pytest.approx(runs["kl"]["hours"], rel=0.05)
    assert not any("budgets differ" in n for n in p["notes"])
    assert any(n.startswith(f"ce@kl is the no-KD student at the compute of kl: {ratio:.2f}x") for n in p["notes"])
    protocol = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    assert f"ce@kl: {runs['ce@kl']['tokens']:,} tokens" in protocol
    assert cli_main(["plan", "--preset", "colab-a100", "--exps", "ce@kl", "--seeds", "0"]) == 0
    assert f"ce@kl-seed0{runs['ce@kl']['tokens']:>{44 - len('ce@kl-seed0')},}" in capsys.readouterr().out


def test_colab_t4_plan_fits_its_targets(capsys, no_gpu):
    p = plan_json(capsys, "--preset", "colab-t4", "--seeds", "0")
    runs = p["runs"]
    assert len(runs) == 14 and {r["seed"] for r in runs} == {0}
    assert len({r["tokens"] for r in runs}) == 1
    assert p["device"] == "T4"
    assert 0 < p["total_hours"] <= 6, "14 runs must fit 6 T4-hours"
    assert max(r["hours"] for r in runs) <= 0.5, "a run must fit 30 minutes on a T4"
    assert p["results_bytes"] <= 100 * MiB and p["fits"] is True
    assert max(r["epochs"] for r in runs) <= 1
    assert min(r["evals"] for r in runs) >= 20


def test_study_plan_is_50_epochs_of_the_study_subset(capsys, no_gpu):
    p = plan_json(capsys, "--preset", "study")
    runs = p["runs"]
    assert len(runs) == 14 and {r["seed"] for r in runs} == {42}
    assert len({r["tokens"] for r in runs}) == 1
    for r in runs:
        assert r["epochs"] == pytest.approx(50, abs=0.01)
        assert r["evals"] >= 20
        assert r["tokens"] == pytest.approx(STUDY_EPOCH_TOKENS * 50, rel=0.03)
    assert p["device"] == "A100" and p["fits"] is True


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_draws_a_validation_curve(capsys, name):
    # The number of evaluations does not depend on the device: a named GPU avoids measuring.
    p = plan_json(capsys, "--preset", name, "--device", "A100")
    assert len(p["runs"]) == 14 * len(preset_seeds(name))
    least = min(r["evals"] for r in p["runs"])
    assert least >= (15 if name == "demo" else 20), f"{name}: {least} evaluations a run"
    assert len({r["tokens"] for r in p["runs"]}) == 1


# --------------------------------------------------------------------------
# 3. the budget


def test_plan_with_a_tiny_budget_does_not_fit(capsys, no_gpu):
    p = plan_json(capsys, "--preset", "colab-a100", "--budget-mib", "1")
    assert p["budget_bytes"] == MiB and p["fits"] is False
    assert p["peak_results_bytes"] > MiB


def test_sweep_that_does_not_fit_is_refused_before_any_run(capsys, data_dir, own_folder):
    runs = own_folder / "runs"
    args = ["--preset", "smoke", "--exps", "ce", "kl", "--max-steps", "2", "--weights", "run",
            "--budget-mib", "0.05", "--runs", str(runs), "--data-dir", str(data_dir)]
    assert plan_json(capsys, *args)["fits"] is False
    assert cli_main(["sweep", *args]) == 2
    err = capsys.readouterr().err
    assert "51.2 KiB budget" in err and "nothing was started" in err  # 0.05 MiB
    assert "DOES NOT FIT" in err
    assert run_folders(runs) == [] and not (runs / "smoke").exists()


# --------------------------------------------------------------------------
# 4. the plan's bytes against a real sweep


def test_plan_results_bytes_bound_a_real_sweep(capsys, data_dir, own_folder, monkeypatch):
    runs = own_folder / "runs"
    args = ["--preset", "smoke", "--exps", "ce", "kl", "--max-steps", "4", "--runs", str(runs),
            "--data-dir", str(data_dir)]
    p = plan_json(capsys, *args)
    assert p["weights"] == "run" and p["existing_bytes"] == 0 and p["fits"] is True
    resume_sizes = []
    real_save = kdlib.train.save_resume

    def spy(path, *a, **kw):
        out = real_save(path, *a, **kw)
        resume_sizes.append(Path(path).stat().st_size)
        return out

    monkeypatch.setattr(kdlib.train, "save_resume", spy)
    assert cli_main(["sweep", *args]) == 0
    assert run_folders(runs) == ["smoke/ce-seed0", "smoke/kl-seed0"]
    actual = folder_bytes(runs / "smoke")
    # What the plan counts per run: config, metrics and summary at their longest, and the fp16
    # student with a 16 KiB header allowance (the real header is a few KiB): an upper bound,
    # within 2x for a student of smoke's size (where that allowance weighs most).
    assert actual <= p["results_bytes"] <= 2 * actual
    for r in p["runs"]:
        folder = runs / "smoke" / r["name"]
        assert folder_bytes(folder) <= r["results_bytes"], r["name"]
    # The resume state while a run trains (in the run folder here): the plan's peak covers it.
    assert resume_sizes and max(resume_sizes) <= max(r["resume_bytes"] for r in p["runs"])
    assert p["peak_results_bytes"] >= p["results_bytes"] + max(resume_sizes)
    # Planned again afterwards, the finished runs are this plan's own: not counted twice.
    again = plan_json(capsys, *args)
    assert again["existing_bytes"] == 0 and again["results_bytes"] == p["results_bytes"]


# --------------------------------------------------------------------------
# 5. the seed convention


def test_preset_seeds_are_the_sweeps_and_the_first_is_the_configs():
    assert set(SEEDS) == set(PRESETS)
    assert SEEDS == {"smoke": (0,), "demo": (0,), "study": (42,), "colab-a100": (0, 1, 2),
                     "colab-t4": (0, 1, 2)}
    for name in PRESETS:
        assert preset(name).seed == preset_seeds(name)[0]
    with pytest.raises(Exception, match="unknown preset"):
        preset_seeds("nope")


def test_plan_without_seeds_uses_the_presets(capsys, no_gpu):
    p = plan_json(capsys, "--preset", "colab-t4")
    assert {r["seed"] for r in p["runs"]} == {0, 1, 2} and len(p["runs"]) == 42
    p = plan_json(capsys, "--preset", "study", "--exps", "kl")
    assert [r["name"] for r in p["runs"]] == ["kl-seed42"]


def test_ui_config_takes_the_presets_first_seed():
    assert kdlib.notebook.run_config("study").seed == 42
    assert kdlib.notebook.run_config("colab-t4").seed == 0
    assert kdlib.notebook.run_config("study", seed=7).seed == 7


def test_train_without_seed_goes_to_runs_preset_run(capsys, data_dir, own_folder):
    runs = own_folder / "runs"
    assert cli_main(["train", "--preset", "smoke", "--exp", "kl", "--max-steps", "2", "--runs", str(runs),
                     "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: preset smoke")  # the plan first
    run = runs / "smoke" / "kl-seed0"
    assert run_folders(runs) == ["smoke/kl-seed0"]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["seed"], summary["steps"], summary["preset"]) == (0, 2, "smoke")
    cfg = preset("smoke", "kl")
    assert kdlib.train.run_dir(runs, cfg) == run
    assert not math.isnan(summary["test_ppl"])

"""kdlib's own step as `python -m kdlib bench` and `kdlib.plan` measure it: it is training's step
(`kdlib.step.TrainStep`), it never syncs with the host, the cached path serves the teacher's
top-k, and the command writes its report.

Speed itself is measured by the benchmark, not asserted here (docs/benchmarks.md). The comparison
with the original method (benchmarks/): tests/test_benchmarks_reference.py, test_benchmarks_harness.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdlib
from kdlib import bench, losses
from kdlib.cli import main
from kdlib.errors import KdlibError
from kdlib.perf import PEAK_ENV, flop_params, flops_per_token

SMOKE = bench.get_shapes("smoke")
CPU = torch.device("cpu")


def smoke_step(exp: str, windows, cached: bool = False) -> bench.KdlibStep:
    return bench.KdlibStep(bench.config_at_shapes(SMOKE, exp), CPU, cached=cached, windows=windows)


# --------------------------------------------------------------------------
# the kdlib path is training's step


def test_kdlib_step_trains_the_student_and_leaves_the_teacher_alone():
    windows = bench.token_windows(SMOKE, n_batches=1)
    step = smoke_step("layerwise-kl-cos", windows)
    student = step.trainee.student
    before = [p.detach().clone() for p in student.parameters()]
    step(np.arange(SMOKE.batch_size), windows)
    step.finish()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert step.n_teacher > 0 and step.teacher_shape == (SMOKE.teacher["n_layer"], SMOKE.teacher["n_embd"])
    assert (step.exp, step.path) == ("layerwise-kl-cos", "kdlib")


def test_cached_path_serves_the_teachers_top_k_and_refuses_other_experiments():
    from kdlib.models import teacher_forward

    windows = bench.token_windows(SMOKE, n_batches=1)
    step = smoke_step("kl", windows, cached=True)
    assert step.n_teacher == 0 and step.path == "cached"  # no teacher FLOPs counted: it does not run
    idx = np.array([2, 0])
    got = step.teacher_out_fn(idx, None)
    teacher = bench.frozen_teacher(SMOKE.teacher, CPU, need_attentions=False)
    logits = teacher_forward(teacher, torch.from_numpy(windows[idx, :-1])).logits
    lp, ids, tail = losses.teacher_top_k(logits, step.cfg.cache.top_k, step.cfg.loss_terms.temperature)
    assert step.cfg.cache.top_k == 32
    torch.testing.assert_close(got.log_probs, lp.half().float())
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.log_tail, tail)
    with pytest.raises(KdlibError, match="output-only"):
        smoke_step("kl-cos", windows, cached=True)


def test_the_training_step_never_syncs_with_the_host(monkeypatch):
    # A host sync is a tensor read back: .item(), float(), int(), bool(), .tolist(), .numpy().
    # The shared step (kdlib.step.TrainStep) must do none, so a GPU never waits on Python.
    windows = bench.token_windows(SMOKE, n_batches=1)
    steps = [smoke_step(exp, windows) for exp in ("layerwise-kl-cos", "js")]
    steps.append(smoke_step("kl", windows, cached=True))

    # Reads made by kdlib's own code are refused; torch's CPU optimizer reads its CPU step counter
    # (no device involved), which fused AdamW on a GPU keeps on the device.
    kdlib_dir = str(Path(kdlib.__file__).parent)

    def refusing(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(kdlib_dir):
                raise AssertionError(f"host sync in the training step: Tensor.{name} from {caller}")
            return real(self, *a, **k)

        return read

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refusing(name))
    for step in steps:
        step(np.arange(SMOKE.batch_size), windows)
    monkeypatch.undo()
    for step in steps:
        step.finish()


# --------------------------------------------------------------------------
# measuring


@pytest.mark.parametrize("path", bench.PATHS)
def test_measure_reports_speed_memory_and_flops(path):
    from kdlib.config import TinyGPTConfig
    from kdlib.models import TinyGPT, random_teacher

    report = bench.start_report(SMOKE, peak=1.0)
    r = bench.measure(report, "kl", path)
    assert (r.exp, r.path) == ("kl", path)
    assert r.tokens_per_s > 0 and r.step_ms > 0 and r.peak_mem_mib > 0
    assert r.tokens_per_s == pytest.approx(SMOKE.batch_size * SMOKE.block_size / (r.step_ms / 1e3))
    assert r.mfu == pytest.approx(r.tokens_per_s * r.flops_per_token / 1e12)
    # the online path counts the teacher's forward; the cached one does not run it
    teacher = (flop_params(random_teacher(SMOKE.teacher)), SMOKE.teacher["n_layer"], SMOKE.teacher["n_embd"])
    assert r.flops_per_token == flops_per_token(flop_params(TinyGPT(TinyGPTConfig(**SMOKE.student))),
                                                SMOKE.student["n_layer"], SMOKE.student["n_embd"],
                                                SMOKE.block_size, *(teacher if path == "kdlib" else ()))


def test_measure_refuses_the_reference_path_and_names_where_it_went():
    report = bench.start_report(SMOKE)
    with pytest.raises(KdlibError, match="unknown benchmark path"):
        bench.measure(report, "kl", "fast")
    with pytest.raises(KdlibError, match="benchmarks/bench.py"):
        bench.run_bench(report, exps=["kl"], paths=["reference"])


# --------------------------------------------------------------------------
# `python -m kdlib bench` and its report


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--shapes", "smoke", "--exps", "kl", "ce", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["command"] == f"python -m kdlib bench --shapes smoke --exps kl ce --out {out}"
    assert {"cpu", "cores", "python", "torch", "transformers", "kdlib"} <= set(report["machine"])
    assert [(r["exp"], r["path"]) for r in report["train"]] == [("kl", "kdlib"), ("kl", "cached"), ("ce", "kdlib")]
    md = (out / "bench.md").read_text()
    assert "| kl | cached |" in md and "Command: `python -m kdlib bench" in md
    ratio = next(x for x in md.splitlines() if x.startswith("| kl | cached |")).rstrip(" |").split("|")[-1]
    assert float(ratio) == pytest.approx(report["train"][1]["tokens_per_s"] / report["train"][0]["tokens_per_s"],
                                         abs=0.01)
    assert "| kl | cached |" in capsys.readouterr().out


def test_cli_bad_experiment_is_a_clean_error(tmp_path, capsys):
    assert main(["bench", "--shapes", "smoke", "--exps", "klx", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "klx" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_peak_can_be_measured_for_mfu_on_a_cpu(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "--shapes", "smoke", "--exps", "kl", "--paths", "kdlib", "--peak-tflops", "measure",
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["peak_source"].startswith("measured") and report["peak_tflops"] > 0
    r = report["train"][0]
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / (report["peak_tflops"] * 1e12))
    assert "measured" in (out / "bench.md").read_text()


@pytest.mark.parametrize("bad", ["0", "-3", "fast"])
def test_bad_peak_is_an_argument_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--shapes", "smoke", "--peak-tflops", bad])
    assert e.value.code == 2
    assert "--peak-tflops" in capsys.readouterr().err


def test_machine_names_the_processor():
    info = bench.machine()
    assert info["cpu"] and info["cpu"] not in ("", "x86_64") or not Path("/proc/cpuinfo").exists()


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    real, calls = bench.measure, {"n": 0}

    def measure_then_die(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the session's time ran out
        return real(*a, **k)

    monkeypatch.setattr(bench, "measure", measure_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(bench.start_report(SMOKE), exps=["kl", "ce"], out_dir=tmp_path, log=lambda *_: None)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["exp"], r["path"]) for r in report["train"]] == [("kl", "kdlib"), ("kl", "cached")]
    assert "| kl | cached |" in (tmp_path / "bench.md").read_text()


def test_peak_source_is_reported(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "0.5")
    r = bench.start_report(SMOKE)
    assert (r["peak_tflops"], r["peak_source"]) == (0.5, "$KDLIB_PEAK_TFLOPS")
    r = bench.start_report(SMOKE, peak=2.0)
    assert (r["peak_tflops"], r["peak_source"]) == (2.0, "given")
    monkeypatch.delenv(PEAK_ENV)
    r = bench.run_bench(bench.start_report(SMOKE), exps=["ce"], paths=["kdlib"], log=lambda *_: None)
    assert (r["peak_tflops"], r["peak_source"]) == (None, None)
    assert "unknown" in bench.to_markdown(r)

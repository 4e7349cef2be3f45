"""The benchmark: its reference is the original method, its kdlib path is training's own step, its
accounting (FLOPs, MFU, grid hours) is right, and `python -m kdlib bench` writes its report.

Speed itself is measured by the benchmark, not asserted here (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdlib
from kdlib.config import preset
from kdlib import bench, losses
from kdlib.cli import main
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS, parse
from kdlib.models import CausalLMOutput
from kdlib.objective import DistillationLoss
from kdlib.perf import PEAK_ENV, flops_per_token, mfu, peak_tflops

SMOKE = bench.get_shapes("smoke")


# --------------------------------------------------------------------------
# the reference computes the original study's objective


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_reference_loss_is_the_study_objective_under_attention_features(exp):
    # The study preset with attention-map features is the notebook's objective: the reference's
    # hand-written dense formulas (with + eps in the logs) must give the same number.
    torch.manual_seed(0)
    cfg = bench.experiment_config(SMOKE, exp, feature="attention")
    B, T, V = 3, 16, SMOKE.vocab_size
    n_s, n_t = SMOKE.student["n_layer"], SMOKE.teacher["n_layer"]
    s = torch.randn(B, T, V, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T))
    attn = lambda n, h: tuple(torch.softmax(torch.randn(B, h, T, T, dtype=torch.float64), -1) for _ in range(n))
    s_attn, t_attn = attn(n_s, 2), attn(n_t, 2)
    spec = parse(exp)
    pairs = losses.layer_pairs(cfg.loss.layer_map_name, n_s, n_t) if spec.feature_map else []
    ref = bench.reference_loss(spec, s, t, labels, s_attn, t_attn, pairs, eps=0.0)
    objective = DistillationLoss(cfg.loss, cfg.model, (n_t, SMOKE.teacher["n_embd"]))
    ours = objective(CausalLMOutput(s, attentions=s_attn), CausalLMOutput(t, attentions=t_attn), labels).total
    torch.testing.assert_close(ref, ours, rtol=1e-10, atol=1e-12)
    # and the notebook's eps changes it only in the noise
    with_eps = bench.reference_loss(spec, s, t, labels, s_attn, t_attn, pairs)
    torch.testing.assert_close(with_eps, ours, rtol=1e-5, atol=1e-6)


def test_reference_rejects_divergences_the_study_did_not_run():
    s = torch.randn(2, 4, 8)
    with pytest.raises(KdlibError, match="kl, js"):
        bench.reference_loss(parse("rkl"), s, s, torch.zeros(2, 4, dtype=torch.long))


def test_reference_step_backpropagates_through_the_teacher_and_trains_the_student():
    step = bench.ReferenceStep(SMOKE, "layerwise-kl-cos", torch.device("cpu"))
    assert step.teacher.training is False and all(p.requires_grad for p in step.teacher.parameters())
    assert step.teacher.config._attn_implementation == "eager"
    before = [p.detach().clone() for p in step.student.parameters()]
    windows = bench.token_windows(SMOKE, n_batches=1)
    loss = step(np.arange(SMOKE.batch_size), windows)
    assert math.isfinite(loss)
    # the original's mistake, reproduced: backward ran through the teacher
    assert all(p.grad is not None for p in step.teacher.parameters() if p.dim() >= 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.student.parameters()))


# --------------------------------------------------------------------------
# the kdlib path is training's step


def test_kdlib_step_trains_the_student_and_leaves_the_teacher_alone():
    windows = bench.token_windows(SMOKE, n_batches=1)
    step = bench.KdlibStep(SMOKE, "layerwise-kl-cos", torch.device("cpu"), windows=windows)
    student = step.trainee.student
    before = [p.detach().clone() for p in student.parameters()]
    step(np.arange(SMOKE.batch_size), windows)
    step.finish()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert step.n_teacher > 0 and step.teacher_shape == (SMOKE.teacher["n_layer"], SMOKE.teacher["n_embd"])


def test_cached_path_serves_the_teachers_top_k_and_refuses_other_experiments():
    from kdlib.models import teacher_forward

    windows = bench.token_windows(SMOKE, n_batches=1)
    step = bench.KdlibStep(SMOKE, "kl", torch.device("cpu"), cached=True, windows=windows)
    assert step.n_teacher == 0  # no teacher FLOPs counted: it does not run
    idx = np.array([2, 0])
    got = step.teacher_out_fn(idx, None)
    teacher = bench._teacher(SMOKE, torch.device("cpu"), reference=False, need_attentions=False)
    logits = teacher_forward(teacher, torch.from_numpy(windows[idx, :-1])).logits
    lp, ids, tail = losses.teacher_top_k(logits, 32, step.cfg.loss.effective().temperature)
    torch.testing.assert_close(got.log_probs, lp.half().float())
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.log_tail, tail)
    with pytest.raises(KdlibError, match="output-only"):
        bench.KdlibStep(SMOKE, "kl-cos", torch.device("cpu"), cached=True, windows=windows)


def test_the_training_step_never_syncs_with_the_host(monkeypatch):
    # A host sync is a tensor read back: .item(), float(), int(), bool(), .tolist(), .numpy().
    # The shared step (kdlib.step.TrainStep) must do none, so a GPU never waits on Python.
    windows = bench.token_windows(SMOKE, n_batches=1)
    steps = [bench.KdlibStep(SMOKE, exp, torch.device("cpu"), windows=windows)
             for exp in ("layerwise-kl-cos", "js")]
    steps.append(bench.KdlibStep(SMOKE, "kl", torch.device("cpu"), cached=True, windows=windows))

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
# accounting


def test_flops_per_token_of_the_study_shapes():
    student = 6 * 50_951_680 + 12 * 8 * 512 * 128
    teacher = 2 * 124_439_808 + 4 * 12 * 768 * 128
    assert flops_per_token(50_951_680, 8, 512, 128) == student
    assert flops_per_token(50_951_680, 8, 512, 128, 124_439_808, 12, 768) == student + teacher


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-40GB", 312.0), ("Tesla T4", 65.0),
                                        ("NVIDIA L4", 121.0), ("NVIDIA H200", 989.0), ("NVIDIA L40S", 362.0),
                                        ("NVIDIA L40", 181.0), ("NVIDIA H100 NVL", 835.0),
                                        ("Tesla V100-SXM2-16GB", 125.0), ("Some GPU", None), ("x86_64", None),
                                        ("cpu", None)])
def test_peak_by_device_name(name, peak, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(name) == peak


def test_peak_override_and_environment(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "100")
    assert peak_tflops("Tesla T4") == 100.0
    assert peak_tflops("Tesla T4", override=50) == 50.0
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(KdlibError, match="TFLOP/s"):
        peak_tflops("x")
    with pytest.raises(KdlibError, match="> 0"):
        peak_tflops("x", override=0)
    assert mfu(1000.0, 1e9, 10.0) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def test_grid_estimate_uses_measured_speeds_and_the_cache_where_it_serves():
    results = []
    for exp in EXPERIMENTS:
        results.append(bench.Result(exp, "reference", 1000.0, 1, 1, 1))
        results.append(bench.Result(exp, "kdlib", 10000.0, 1, 1, 1))
        if parse(exp).output_only:
            results.append(bench.Result(exp, "cached", 20000.0, 1, 1, 1))
    hours = bench.grid_estimate(results)
    # The colab-a100 sweep, as `kdlib plan` counts it: 14 experiments x 3 seeds of 100M tokens, plus
    # its evaluations at the same achieved FLOP/s (a few percent on top).
    train_hours = 42 * preset(bench.GRID_PRESET).train.max_tokens / 3600
    assert train_hours / 1000 < hours["reference"] < 1.1 * train_hours / 1000
    assert train_hours / 10000 < hours["kdlib"] < 1.1 * train_hours / 10000
    assert hours["kdlib"] == pytest.approx(hours["reference"] / 10)
    n_cached = sum(parse(e).output_only for e in EXPERIMENTS)
    best = ((14 - n_cached) / 10000 + n_cached / 20000) * train_hours / 14
    assert best < hours["best"] < 1.1 * best and hours["cached"] == pytest.approx(hours["best"])
    assert "reference" not in bench.grid_estimate(results[2:])  # an experiment unmeasured: no total


# --------------------------------------------------------------------------
# the sections


def test_measure_reports_speed_memory_and_flops():
    for path in ("reference", "kdlib", "cached"):
        r = bench.measure(SMOKE, "kl", path)
        assert r.tokens_per_s > 0 and r.step_ms > 0 and r.peak_mem_mib > 0
        assert r.tokens_per_s == pytest.approx(SMOKE.batch_size * SMOKE.block_size / (r.step_ms / 1e3))
        assert r.mfu is None  # no peak known for a CPU
    online, cached = bench.measure(SMOKE, "kl", "kdlib", peak=1.0), bench.measure(SMOKE, "kl", "cached")
    assert cached.flops_per_token < online.flops_per_token
    assert online.mfu == pytest.approx(online.tokens_per_s * online.flops_per_token / 1e12)
    with pytest.raises(KdlibError, match="unknown benchmark path"):
        bench.measure(SMOKE, "kl", "fast")


def test_divergence_bench_chunked_holds_a_fraction_of_the_dense_memory():
    rows = bench.divergence_bench(4096, 8192, repeats=1)  # 8 chunks of 512 rows
    assert {(r["divergence"], r["impl"]) for r in rows} == {("kl", "chunked"), ("kl", "dense"),
                                                           ("js", "chunked"), ("js", "dense")}
    for r in rows:
        assert r["ms"] > 0 and r["peak_mib"] > 0
        if r["impl"] == "chunked":
            # the gradient plus at most ~10 chunk-sized temporaries (JS), each 512/4096 of [N, V]
            assert r["x_nv_f32"] < 1 + 10 * 512 / 4096
            assert r["mem_vs_dense"] < 0.4
        else:
            assert r["mem_vs_dense"] == 1.0


def test_prep_bench_extrapolates_from_measured_speed():
    from kdlib.data import train_bpe

    text = bench.prep_text(0.2)
    assert len(text) == 200_000
    tok = train_bpe([text], 512, str(__import__("tempfile").mkdtemp()))
    r = bench.prep_bench(0.2, tokenizer=tok)
    assert r["chars"] == 200_000 and r["tokens"] > 20_000
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["wikitext103_minutes"] == pytest.approx(540e6 / (r["chars"] / r["seconds"]) / 60)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--shapes", "smoke", "--exps", "kl", "ce", "--sections", "train", "divergence",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["command"] == ("python -m kdlib bench --shapes smoke --exps kl ce --sections train "
                                 f"divergence --out {out}")
    assert {"cpu", "cores", "python", "torch", "transformers", "kdlib"} <= set(report["machine"])
    assert [(r["exp"], r["path"]) for r in report["train"]] == [
        ("kl", "reference"), ("kl", "kdlib"), ("kl", "cached"), ("ce", "reference"), ("ce", "kdlib")]
    md = (out / "bench.md").read_text()
    assert "| kl | cached |" in md and "| kl | dense |" in md and "Command: `python -m kdlib bench" in md
    assert "prep" not in report
    assert "| kl | cached |" in capsys.readouterr().out


def test_cli_bad_experiment_is_a_clean_error(tmp_path, capsys):
    assert main(["bench", "--shapes", "smoke", "--exps", "klx", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "klx" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_reference_in_its_own_process_reports_back():
    # On a GPU the reference runs in a subprocess with CUDA_LAUNCH_BLOCKING=1; the plumbing is
    # the same on the CPU.
    r = bench.measure_reference_isolated(SMOKE, "kl", None)
    assert r.exp == "kl" and r.path == "reference" and r.tokens_per_s > 0


def test_peak_can_be_measured_for_mfu_on_a_cpu(tmp_path):
    from kdlib.perf import measured_peak_tflops

    assert 0 < measured_peak_tflops(n=256, repeats=2) < 1e4
    out = tmp_path / "b"
    assert main(["bench", "--shapes", "smoke", "--exps", "kl", "--paths", "kdlib", "--sections", "train",
                 "--peak-tflops", "measure", "--out", str(out)]) == 0
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
        bench.run_bench(SMOKE, exps=["kl"], sections=["train"], out_dir=tmp_path, log=lambda *_: None)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["exp"], r["path"]) for r in report["train"]] == [("kl", "reference"), ("kl", "kdlib")]
    assert "| kl | kdlib |" in (tmp_path / "bench.md").read_text()


def test_peak_source_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv(PEAK_ENV, "0.5")
    r = bench.run_bench(SMOKE, exps=["ce"], paths=["kdlib"], sections=["train"], log=lambda *_: None)
    assert (r["peak_tflops"], r["peak_source"]) == (0.5, "$KDLIB_PEAK_TFLOPS")
    r = bench.run_bench(SMOKE, exps=["ce"], paths=["kdlib"], sections=["train"], peak=2.0, log=lambda *_: None)
    assert (r["peak_tflops"], r["peak_source"]) == (2.0, "given")
    monkeypatch.delenv(PEAK_ENV)
    r = bench.run_bench(SMOKE, exps=["ce"], paths=["kdlib"], sections=["train"], log=lambda *_: None)
    assert (r["peak_tflops"], r["peak_source"]) == (None, None)
    assert "unknown" in bench.to_markdown(r)


def test_reports_of_separate_runs_merge_into_one_table(tmp_path, capsys):
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert main(["bench", "--shapes", "smoke", "--exps", "kl", "ce", "--paths", "reference", "--sections",
                 "train", "--out", str(a)]) == 0
    assert main(["bench", "--shapes", "smoke", "--exps", "kl", "--paths", "kdlib", "cached", "--sections",
                 "train", "divergence", "--out", str(b)]) == 0
    assert main(["bench", "--merge", str(a / "bench.json"), str(b / "bench.json"), "--out", str(m)]) == 0
    report = json.loads((m / "bench.json").read_text())
    assert [(r["exp"], r["path"]) for r in report["train"]] == [
        ("ce", "reference"), ("kl", "reference"), ("kl", "kdlib"), ("kl", "cached")]
    assert "divergence" in report and len(report["merged_from"]) == 2
    md = (m / "bench.md").read_text()
    ratio_row = next(x for x in md.splitlines() if x.startswith("| kl | cached |"))
    assert ratio_row.rstrip(" |").split("|")[-2].strip()  # x reference, now computable
    # reports of other shapes are refused, naming why
    c = tmp_path / "c"
    report["shapes"]["name"] = "cpu"
    c.mkdir()
    (c / "bench.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["bench", "--merge", str(a / "bench.json"), str(c / "bench.json")]) == 2
    assert "different shapes" in capsys.readouterr().err

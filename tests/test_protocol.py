"""The training protocol: token budget and schedule, teacher source (never switched silently),
weights="best", the resume state's save cadence, the study's document subset, the teacher's dtype
and the presets the notebooks offer.

Runs train the smoke preset's tiny student for a few steps on the CPU, in private copies of the
prepared smoke data (training writes teacher_ppl.json into the data folder).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import kdlib.faults
import kdlib.runs
import kdlib.train
import kdlib.colab
from kdlib.checkpoint import MiB, load_resume
from kdlib.cli import main as cli_main
from kdlib.config import COLAB_TOKENS, preset
from kdlib.corpus import documents, load_texts, train_subset
from kdlib.data import load_split
from kdlib.errors import KdlibError
from kdlib.models import resolve_teacher_dtype
from kdlib.optim import lr_factor, schedule
from kdlib.prep import prepare
from kdlib.tokenizer import encode_pieces, load_tokenizer
from kdlib.train import run_name, train
from helpers import metric_rows, quiet, run

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
WIKITEXT103_TRAIN_TOKENS = 119_000_000


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def small_cfg(exp: str, max_steps: int = 6, eval_every=None, log_every: int = 1, **train_kw):
    cfg = preset("smoke", exp)
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = max_steps, eval_every, log_every
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def summary_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "summary.json").read_text())


def sweep(runs, data, *args) -> int:
    return cli_main(["sweep", "--preset", "smoke", "--runs", str(runs), "--data-dir", str(data), *args])


# --------------------------------------------------------------------------
# 6. the schedule: one token budget for every experiment


@pytest.mark.parametrize("name", ["colab-a100", "colab-t4"])
def test_max_tokens_gives_every_experiment_the_same_schedule(name):
    scheds = {exp: schedule(preset(name, exp), WIKITEXT103_TRAIN_TOKENS) for exp in ("ce", "kl", "layerwise-kl-cos")}
    assert len(set(scheds.values())) == 1, scheds
    s = scheds["kl"]
    t = preset(name).train
    per_step = t.batch_size * t.grad_accum * preset(name).data.block_size
    assert s.tokens_per_step == per_step
    assert s.steps == COLAB_TOKENS[name.split("-")[1]] // per_step == t.max_tokens // per_step
    assert s.tokens <= t.max_tokens < s.tokens + per_step
    assert s.epochs < 1
    assert s.warmup == int(t.warmup_frac * s.steps)
    # ~20 evaluations on the whole validation split, the last at the last step.
    assert 20 <= s.evals <= 21
    assert s.eval_every == round(t.eval_every_tokens / per_step)
    assert s.evals == -(-s.steps // s.eval_every)


def test_schedule_budget_cut_and_eval_cadence():
    cfg = preset("smoke", "kl")  # max_tokens = 20 steps of 8 x 32, an evaluation every 256 tokens
    s = schedule(cfg, 45_000)
    assert (s.tokens_per_step, s.steps, s.tokens, s.eval_every, s.evals, s.warmup) == (256, 20, 5120, 1, 20, 2)
    assert s.steps_per_epoch == (45_000 - 1) // 32 // 8 and s.epochs == pytest.approx(20 / s.steps_per_epoch)
    cfg.train.max_steps = 7  # cuts the budget: the schedule is laid over the 7 steps
    s = schedule(cfg, 45_000)
    assert (s.steps, s.tokens, s.warmup) == (7, 7 * 256, 1)
    cfg.train.max_steps, cfg.train.eval_every = None, 6  # steps win over tokens; the last step counts
    s = schedule(cfg, 45_000)
    assert (s.eval_every, s.evals) == (6, 4)  # 6, 12, 18 and 20
    cfg.train.eval_every, cfg.train.eval_every_tokens = None, None  # once per epoch
    cfg.train.max_tokens, cfg.train.epochs = None, 2  # epochs when there is no token budget
    s = schedule(cfg, 45_000)
    assert s.steps == 2 * s.steps_per_epoch and s.eval_every == s.steps_per_epoch and s.evals == 2
    cfg.train.max_tokens = 100  # less than one step
    with pytest.raises(KdlibError, match="less than one step"):
        schedule(cfg, 45_000)


@pytest.fixture(scope="module")
def smoke_run(smoke_data, tmp_path_factory):
    """(config, run folder, data folder, summary) of one smoke kl run of 8 steps, a log line each."""
    root = tmp_path_factory.mktemp("smoke_run")
    data = copy_data(smoke_data[0], root / "data")
    cfg = small_cfg("kl", max_steps=8)
    summary = run(cfg, root / "run", data)
    return cfg, root / "run", data, summary


def test_lr_schedule_is_laid_over_the_runs_steps(smoke_run):
    cfg, run_dir, _, summary = smoke_run
    t = cfg.train
    s = schedule(cfg, load_split(smoke_run[2], "train").n_tokens)
    assert (s.steps, s.warmup) == (8, 1) and summary["budget_steps"] == 8 and summary["steps"] == 8
    assert summary["budget_tokens"] == s.tokens == summary["tokens"]
    rows = [r for r in metric_rows(run_dir) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:  # the rate step k trains with: the schedule's value after k - 1 steps
        assert r["lr"] == pytest.approx(t.lr * lr_factor(r["step"] - 1, s.steps, s.warmup, t.min_lr_ratio),
                                        rel=1e-12)
    lrs = [r["lr"] for r in rows]
    # One warmup step (to the full rate), the cosine from the full rate after it.
    assert lrs[0] == lrs[1] == pytest.approx(t.lr) and all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    # The cosine ends at min_lr_ratio x lr with the last step: the last step's rate is the last
    # one above the floor, and the schedule sits on the floor once the run's steps are done.
    assert lr_factor(s.steps, s.steps, s.warmup, t.min_lr_ratio) == pytest.approx(t.min_lr_ratio)
    assert t.min_lr_ratio * t.lr < lrs[-1] < (t.min_lr_ratio + 0.1) * t.lr


# --------------------------------------------------------------------------
# 7. the teacher source: the cache only when asked for


def test_sweep_uses_the_cache_only_when_asked(cached_data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert (cached_data_dir / "cache" / "train.cache.json").is_file()  # a matching cache is there
    assert sweep(runs, cached_data_dir, "--exps", "kl", "--max-steps", "2") == 0
    online = summary_of(runs / "smoke" / "kl-seed0")
    assert online["teacher_source"] == "online" and online["cache_top_k"] is None
    assert sorted(p.name for p in (runs / "smoke").iterdir()) == ["kl-seed0"]
    before = snapshot(runs / "smoke" / "kl-seed0")
    capsys.readouterr()

    assert sweep(runs, cached_data_dir, "--exps", "kl", "layerwise-kl", "--max-steps", "2",
                 "--teacher-source", "cache") == 0
    captured = capsys.readouterr()
    assert "layerwise-kl need the teacher's full outputs" in captured.err
    assert sorted(p.name for p in (runs / "smoke").iterdir()) == ["kl-seed0", "kl-top16-seed0",
                                                                  "layerwise-kl-seed0"]
    cached = summary_of(runs / "smoke" / "kl-top16-seed0")
    assert (cached["teacher_source"], cached["cache_top_k"], cached["exp"]) == ("cache", 16, "kl")
    assert json.loads((runs / "smoke" / "kl-top16-seed0" / "config.json").read_text())["train"][
        "teacher_source"] == "cache"
    feature = summary_of(runs / "smoke" / "layerwise-kl-seed0")
    assert feature["teacher_source"] == "online" and feature["cache_top_k"] is None
    assert snapshot(runs / "smoke" / "kl-seed0") == before  # the online run is its own, untouched


def test_cache_is_refused_for_experiments_that_need_the_full_teacher(data_dir, tmp_path):
    cfg = preset("smoke", "layerwise-kl")
    cfg.train.teacher_source = "cache"
    with pytest.raises(KdlibError, match="needs the teacher online"):
        cfg.validate()
    cfg = preset("smoke", "kl-cos")
    cfg.train.teacher_source = "cache"
    with pytest.raises(KdlibError, match="needs the teacher online"):
        cfg.validate()
    kl = preset("smoke", "kl")
    kl.train.teacher_source = "cache"
    assert run_name(kl.validate()) == "kl-top16-seed0"
    with pytest.raises(KdlibError, match="unknown teacher source"):
        run(small_cfg("kl", max_steps=2), tmp_path / "x", data_dir, teacher_source="auto")
    # Asked for, and there is no cache: refused, never a silent switch to online.
    with pytest.raises(KdlibError, match="no top-k cache"):
        run(small_cfg("kl", max_steps=2), tmp_path / "y", data_dir, teacher_source="cache")
    assert not (tmp_path / "y" / "config.json").exists()


# --------------------------------------------------------------------------
# 8. a resumed run keeps its source


def test_resume_never_switches_the_teacher_source(cached_data_dir, tmp_path, monkeypatch):
    cfg = small_cfg("kl", max_steps=6, eval_every=2)
    run_dir = tmp_path / "run"
    assert run(cfg, run_dir, cached_data_dir, stop_after=3) == {"stopped_at": 3}
    assert load_resume(run_dir / "resume.safetensors")["teacher_source"] == "online"
    before = snapshot(run_dir)
    assert "resume.safetensors" in before and "summary.json" not in before
    with pytest.raises(KdlibError, match="another configuration .*differs in: train"):
        run(cfg, run_dir, cached_data_dir, teacher_source="cache")
    assert snapshot(run_dir) == before
    # The resume state's own record refuses it too (a config check passed, e.g. a folder whose
    # config.json was replaced): with a message, before anything is written.
    monkeypatch.setattr(kdlib.train, "check_config", lambda paths, cfg: None)
    with pytest.raises(KdlibError, match=r"teacher source 'online', this run asks for 'cache'"):
        run(cfg, run_dir, cached_data_dir, teacher_source="cache")
    assert snapshot(run_dir) == before
    monkeypatch.undo()
    # With its own source it continues.
    assert run(cfg, run_dir, cached_data_dir)["teacher_source"] == "online"


def test_runs_of_one_name_never_share_a_resume_state(data_dir, tmp_path):
    """A shared resume_dir (the presets' kdlib-local/resume) holds runs of one name from several
    results folders or presets (RESULTS/PRESET/kl-seed0): each continues only its own."""
    cfg = small_cfg("kl", max_steps=6, eval_every=2, resume_dir=str(tmp_path / "resume"))
    a, b = tmp_path / "runs-a" / "smoke" / "kl-seed0", tmp_path / "runs-b" / "smoke" / "kl-seed0"
    assert run(cfg, a, data_dir, stop_after=3) == {"stopped_at": 3}
    resume_a = kdlib.runs.RunPaths.of(cfg, a).resume
    assert resume_a.is_file() and resume_a.parent == tmp_path / "resume"
    state_a = resume_a.read_bytes()
    sb = run(cfg, b, data_dir)  # a fresh run: from step 0, not from a's step 3
    assert [r["step"] for r in metric_rows(b)] == list(range(1, 7))
    assert resume_a.read_bytes() == state_a  # a's state untouched
    sa = run(cfg, a, data_dir)
    for key in ("best_val_ppl", "test_ppl", "steps", "tokens"):
        assert sa[key] == sb[key], key
    assert not resume_a.exists()


# --------------------------------------------------------------------------
# 9. weights = "best"


def test_weights_best_keeps_one_student_in_the_results_folder(data_dir, tmp_path, capsys):
    runs, weights, resume = tmp_path / "runs", tmp_path / "weights", tmp_path / "resume"
    exps = ["ce", "kl", "layerwise-kl"]
    common = ["--exps", *exps, "--max-steps", "3", "--resume-dir", str(resume), "--weights-dir", str(weights)]
    # The budget from the plan: the runs' small files and one and a half students.
    capsys.readouterr()
    assert cli_main(["plan", "--preset", "smoke", "--runs", str(runs), "--data-dir", str(data_dir), *common,
                     "--weights", "best", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    small = sum(r["results_bytes"] for r in p["runs"])
    budget = small + 1.5 * p["kept_student_bytes"]
    budget_mib = f"{budget / MiB:.6f}"

    # Every student in its run folder: refused before any run.
    assert sweep(runs, data_dir, *common, "--weights", "run", "--budget-mib", budget_mib) == 2
    assert "DOES NOT FIT" in capsys.readouterr().err
    assert not (runs / "smoke").exists() and not weights.exists()

    assert sweep(runs, data_dir, *common, "--weights", "best", "--budget-mib", budget_mib) == 0
    folders = sorted((runs / "smoke").iterdir())
    assert [f.name for f in folders] == ["ce-seed0", "kl-seed0", "layerwise-kl-seed0"]
    summaries = {f.name: summary_of(f) for f in folders}
    assert all(s["steps"] == 3 for s in summaries.values())
    students = sorted(weights.glob("*.safetensors"))
    assert len(students) == 3
    assert {s["student_path"] for s in summaries.values()} == {str(x) for x in students}
    kept = [f.name for f in folders if (f / "student.safetensors").is_file()]
    best = min(summaries, key=lambda n: summaries[n]["best_val_ppl"])
    assert kept == [best]
    copy = (runs / "smoke" / best / "student.safetensors").read_bytes()
    assert copy == Path(summaries[best]["student_path"]).read_bytes()
    assert not any(resume.glob("*")), "a finished run's resume state is deleted"
    # The budget held one student, not three.
    student_size = max(x.stat().st_size for x in students)
    used = sum(x.stat().st_size for x in runs.rglob("*") if x.is_file())
    assert used <= budget < used + 2 * student_size


def test_the_last_run_of_a_colab_sweep_passes_the_budget_check(tmp_path, monkeypatch):
    """colab-a100 at full size, without training: 41 finished runs' small files and the kept best
    student (97 MiB) in a 100 MiB results folder, as the plan counts them; the 42nd run is let in."""
    from kdlib.checkpoint import StorageBudget
    from kdlib.plan import plan
    from kdlib.runs import check_budget

    monkeypatch.chdir(tmp_path)  # the preset's kdlib-local/ folders, outside the results folder
    runs = tmp_path / "runs"
    p = plan("colab-a100", results_dir=runs)
    assert len(p.runs) == 42 and p.fits
    cfgs = kdlib.plan.sweep_configs(preset("colab-a100"), log=quiet)
    for r in p.runs[:-1]:  # finished runs: their small files at the plan's (upper) estimate
        (runs / "colab-a100" / r.name).mkdir(parents=True)
        with open(runs / "colab-a100" / r.name / "metrics.jsonl", "wb") as f:
            f.truncate(r.results_bytes)  # sparse: the size counts, not the disk
    with open(runs / "colab-a100" / p.runs[0].name / "student.safetensors", "wb") as f:
        f.truncate(p.kept_student_bytes)
    budget = StorageBudget(runs, 100 * MiB)
    assert budget.used() + p.runs[-1].results_bytes == p.results_bytes <= 100 * MiB
    last = cfgs[-1]
    assert run_name(last) == p.runs[-1].name
    sched = schedule(last, 119_000_000)
    check_budget(last, runs / "colab-a100" / run_name(last), budget, None, sched)  # let in
    with pytest.raises(KdlibError, match="nothing was started"):  # and a folder that is full is not
        check_budget(last, runs / "colab-a100" / run_name(last), StorageBudget(runs, budget.used()), None, sched)


# --------------------------------------------------------------------------
# 10. the resume state is saved on a clock too


class Crash(Exception):
    pass


def crash_at_step(monkeypatch, n: int):
    """The n-th optimizer step of this process raises (a kill between two evaluations)."""
    real, seen = kdlib.faults.point, {"step": 0}

    def point(name):
        if name == "step":
            seen["step"] += 1
            if seen["step"] == n:
                raise Crash(f"step {n}")
        real(name)

    monkeypatch.setattr(kdlib.faults, "point", point)


def test_save_every_s_keeps_a_resume_state_between_evaluations(data_dir, tmp_path, monkeypatch):
    # eval_every 1000: no evaluation before the last step, so no save at an evaluation either.
    straight = run(small_cfg("kl", max_steps=6, eval_every=1000), tmp_path / "straight", data_dir)

    with monkeypatch.context() as m:
        crash_at_step(m, 4)
        with pytest.raises(Crash):
            run(small_cfg("kl", max_steps=6, eval_every=1000, save_every_s=1e9), tmp_path / "rare", data_dir)
    assert not (tmp_path / "rare" / "resume.safetensors").exists()  # nothing saved before the crash

    cfg = small_cfg("kl", max_steps=6, eval_every=1000, save_every_s=1e-6)
    with monkeypatch.context() as m:
        crash_at_step(m, 4)
        with pytest.raises(Crash):
            run(cfg, tmp_path / "often", data_dir)
    resume = load_resume(tmp_path / "often" / "resume.safetensors")
    assert resume["state"]["step"] == 3  # the last step before the crash
    resumed = run(cfg, tmp_path / "often", data_dir)
    for key in ("best_val_ppl", "best_step", "final_val_ppl", "test_ppl", "steps", "tokens"):
        assert resumed[key] == straight[key], key
    assert metric_rows(tmp_path / "often") == metric_rows(tmp_path / "straight")
    # A stop_after also saves: the state is there after a stop between evaluations.
    cfg = small_cfg("kl", max_steps=6, eval_every=1000)
    assert run(cfg, tmp_path / "stopped", data_dir, stop_after=2) == {"stopped_at": 2}
    assert load_resume(tmp_path / "stopped" / "resume.safetensors")["state"]["step"] == 2
    again = run(cfg, tmp_path / "stopped", data_dir)
    assert (again["best_val_ppl"], again["test_ppl"]) == (straight["best_val_ppl"], straight["test_ppl"])


def test_save_every_s_sets_how_often_the_state_is_saved(data_dir, tmp_path, monkeypatch):
    calls = []
    real = kdlib.train.Run.save

    def spy(self):
        calls.append((self.cfg.train.save_every_s, self.state["step"]))
        return real(self)

    monkeypatch.setattr(kdlib.train.Run, "save", spy)
    for every in (1e-6, 1e9):
        run(small_cfg("kl", max_steps=6, eval_every=1000, save_every_s=every), tmp_path / f"run{every}", data_dir)
    often = [step for e, step in calls if e == 1e-6]
    rare = [step for e, step in calls if e == 1e9]
    assert often == [1, 2, 3, 4, 5, 6]  # after every step
    assert rare == [6]  # at the only evaluation, the last step
    # Also at every evaluation, whatever the clock.
    calls.clear()
    run(small_cfg("kl", max_steps=6, eval_every=2, save_every_s=1e9), tmp_path / "evals", data_dir)
    assert [step for _, step in calls] == [2, 4, 6]


# --------------------------------------------------------------------------
# 11. a seeded subset of whole documents


def subset_cfg(tokens, seed=0):
    cfg = preset("smoke")
    cfg.data.train_tokens, cfg.data.subset_seed = tokens, seed
    return cfg.validate()


def is_whole_documents(subset: list[str], docs: list[list[str]]) -> bool:
    """``subset`` is some of ``docs``, each whole, in corpus order."""
    i = 0
    for doc in docs:
        if subset[i:i + len(doc)] == doc:
            i += len(doc)
    return i == len(subset)


def test_train_subset_is_seeded_whole_documents(smoke_data, tmp_path):
    full_dir, full = smoke_data
    full_train = full["train"].manifest
    n = 10_000
    assert full_train["tokens"] > 2 * n
    a, b, c = (copy_data(full_dir, tmp_path / x) for x in "abc")
    out = prepare(subset_cfg(n), a, log=quiet)
    m = out["train"].manifest
    assert n <= m["tokens"] < full_train["tokens"]
    assert m["inputs"]["subset"] == {"tokens": n, "seed": 0}
    assert m["texts"] < full_train["texts"]
    # Validation and test are the whole splits, as before.
    for split in ("validation", "test"):
        assert out[split].manifest["sha256"] == full[split].manifest["sha256"]
    # The same documents as train_subset picks, each whole, in corpus order.
    texts, _ = load_texts(subset_cfg(n).data)
    tok = load_tokenizer(a / "tokenizer")
    subset, info = train_subset(tok, texts["train"], n, 0)
    assert m["texts"] == len(subset) and m["chars"] == sum(len(p) for p in subset)
    assert info["documents"] < info["of_documents"] == len(documents(texts["train"]))
    assert is_whole_documents(subset, documents(texts["train"]))
    # A few documents at most past the request (the last is taken whole).
    longest = max(sum(ids.size for ids in encode_pieces(tok, d)) for d in documents(texts["train"]))
    assert m["tokens"] < n + longest
    # Deterministic for a seed, another seed another subset.
    assert prepare(subset_cfg(n), b, log=quiet)["train"].manifest["sha256"] == m["sha256"]
    assert (b / "train.bin").read_bytes() == (a / "train.bin").read_bytes()
    other = prepare(subset_cfg(n, seed=1), c, log=quiet)["train"].manifest
    assert other["sha256"] != m["sha256"] and other["inputs"]["subset"] == {"tokens": n, "seed": 1}
    other_subset, _ = train_subset(tok, texts["train"], n, 1)
    assert other_subset != subset and is_whole_documents(other_subset, documents(texts["train"]))


def test_train_subset_larger_than_the_split_is_refused(smoke_data, tmp_path):
    folder = copy_data(smoke_data[0], tmp_path / "data")
    before = snapshot(folder)
    with pytest.raises(KdlibError, match=r"data\.train_tokens is 10,000,000 but the whole train split has"):
        prepare(subset_cfg(10_000_000), folder, log=quiet)
    assert snapshot(folder) == before
    with pytest.raises(KdlibError, match="train_tokens"):
        subset_cfg(0)


def test_documents_groups_wikitext_lines_into_articles():
    lines = [" = Alpha = \n", " \n", " Alpha text . \n", " = = History = = \n", " More alpha . \n",
             " = = = Detail = = = \n", " Deep . \n", " = Beta = \n", " \n", " Beta text . \n"]
    docs = documents(lines)
    assert docs == [lines[:7], lines[7:]]
    # A preamble before the first title is its own document; blank-only groups are dropped.
    assert documents([" intro \n", *lines[:3]]) == [[" intro \n"], lines[:3]]
    assert documents([" \n", "", *lines[:3]]) == [lines[:3]]
    # Plain lines: cut at blank lines. Other pieces (a documentation topic each): one each.
    plain = ["a one\n", "a two\n", "\n", "b one\n", "\n", "\n", "c one\n"]
    assert documents(plain) == [["a one\n", "a two\n", "\n"], ["b one\n", "\n", "\n"], ["c one\n"]]
    topics = ["Topic one.\nIts text.\n", "Topic two.\nMore.\n"]
    assert documents(topics) == [[topics[0]], [topics[1]]]


# --------------------------------------------------------------------------
# 12. the teacher's dtype


def test_resolve_teacher_dtype():
    assert resolve_teacher_dtype("auto", "cpu") == torch.float32
    assert resolve_teacher_dtype("auto", "cuda") == torch.float16
    assert resolve_teacher_dtype("fp16", "cpu") == torch.float16
    assert resolve_teacher_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_teacher_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(KdlibError, match="unknown teacher dtype 'int8'"):
        resolve_teacher_dtype("int8", "cpu")
    cfg = preset("smoke")
    cfg.teacher.dtype = "int8"
    with pytest.raises(KdlibError, match="teacher.dtype"):
        cfg.validate()


def test_teacher_dtype_is_in_the_summary_and_the_teacher_ppl_key(smoke_run):
    cfg, _, data, summary = smoke_run
    assert cfg.teacher.dtype == "auto"
    # "auto": float32 on the CPU (CI), float16 on a GPU.
    expected = "float16" if torch.cuda.is_available() else "float32"
    assert summary["teacher_dtype"] == expected
    entries = json.loads((data / "teacher_ppl.json").read_text())["entries"]
    mine = [e for e in entries if e["ppl"] == summary["teacher_test_ppl"]]
    assert len(mine) == 1 and mine[0]["key"]["dtype"] == expected
    assert mine[0]["key"]["teacher"]["dtype"] == "auto"  # the setting, and what it resolved to
    # The protocol fields of the summary.
    assert summary["teacher_source"] == "online" and summary["cache_top_k"] is None
    assert (summary["val_split"], summary["test_split"]) == ("validation", "test")
    assert (summary["eval_block_size"], summary["eval_stride"]) == (32, 16)
    assert summary["student_path"] == str(smoke_run[1] / "student.safetensors")


def test_teacher_in_another_dtype_has_its_own_teacher_ppl(smoke_run, tmp_path):
    data = copy_data(smoke_run[2], tmp_path / "data")  # holds the first run's entry
    cfg = small_cfg("kl", max_steps=2)
    cfg.teacher.dtype = "fp16" if not torch.cuda.is_available() else "fp32"
    summary = run(cfg.validate(), tmp_path / "run", data)
    other = "float16" if cfg.teacher.dtype == "fp16" else "float32"
    assert summary["teacher_dtype"] == other
    entries = json.loads((data / "teacher_ppl.json").read_text())["entries"]
    assert len(entries) == 2 and {e["key"]["dtype"] for e in entries} == {"float16", "float32"}
    mine = next(e for e in entries if e["key"]["dtype"] == other)
    assert mine["ppl"] == summary["teacher_test_ppl"]
    assert mine["ppl"] == pytest.approx(smoke_run[3]["teacher_test_ppl"], rel=0.05)  # the same teacher


# --------------------------------------------------------------------------
# 13. the presets the notebooks offer


def test_notebooks_and_panel_do_not_offer_demo():
    assert "demo" not in kdlib.colab.NOTEBOOK_PRESETS
    nb = json.loads((NOTEBOOKS / "03_train.ipynb").read_text())
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    params = [m.group(1) for s in sources for m in re.finditer(r'^preset = "[^"]*"\s*#@param (\[.*\])', s, re.M)]
    assert len(params) == 1, params
    options = json.loads(params[0])
    assert "demo" not in options
    assert options == list(kdlib.colab.NOTEBOOK_PRESETS)


# --------------------------------------------------------------------------
# what a hostile or unlucky user met (the QA pass)


def test_a_data_folder_of_another_subset_is_refused(smoke_data, tmp_path):
    # prep for the whole split, then a config that trains on a subset (study's data.train_tokens),
    # and the other way round: refused by train, and `plan` does not count that folder's tokens.
    from kdlib.plan import plan

    whole = copy_data(smoke_data[0], tmp_path / "whole")
    cfg = small_cfg("ce")
    cfg.data.train_tokens = 10_000
    with pytest.raises(KdlibError, match=r"holds the whole train split, but this run .* trains on a subset of "
                                         r"10,000 tokens \(seed 0\); prepare its data in its own folder"):
        run(cfg, tmp_path / "runs" / "smoke" / "ce-seed0", whole)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.json"))
    p = plan("smoke", cfgs=[cfg], data_dir=whole, device="A100")
    assert "does not serve this preset" in p.data_note
    sub = tmp_path / "sub"
    prepare(subset_cfg(10_000), sub, log=quiet)
    with pytest.raises(KdlibError, match=r"holds a subset of 10,000 tokens \(seed 0\), but this run .* trains on "
                                         r"the whole train split"):
        run(small_cfg("ce"), tmp_path / "runs2" / "ce-seed0", sub)


def test_a_resumed_run_whose_best_student_is_gone_is_refused(data_dir, tmp_path):
    # weights="best" with the weights folder lost while the run was interrupted (a recycled Colab
    # runtime): the resume state cannot finish the run; say so, write no summary.
    weights = tmp_path / "w"
    cfg = small_cfg("ce", max_steps=6, eval_every=2, weights="best", weights_dir=str(weights))
    folder = tmp_path / "runs" / "smoke" / "ce-seed0"
    assert run(cfg, folder, data_dir, stop_after=3) == {"stopped_at": 3}
    shutil.rmtree(weights)
    before = snapshot(folder)
    with pytest.raises(KdlibError, match=r"best student of ce-seed0 \(step 2, .*\) is missing from .*restore that "
                                         r"file.*or delete .*resume"):
        run(cfg, folder, data_dir)
    assert snapshot(folder) == before and not (folder / "summary.json").exists()


def test_keep_best_student_when_the_weights_folder_was_lost(data_dir, tmp_path, capsys):
    # The best run's copy in the results folder is then its only copy: it stays, and stays best.
    runs, weights = tmp_path / "runs", tmp_path / "w"
    common = ["--max-steps", "4", "--weights", "best", "--weights-dir", str(weights)]
    assert sweep(runs, data_dir, "--exps", "ce", "kl", "last2last-kl", *common) == 0
    folder = runs / "smoke"
    ppl = {f.name: summary_of(f)["best_val_ppl"] for f in folder.iterdir()}
    best = min(ppl, key=ppl.get)
    copy = (folder / best / "student.safetensors").read_bytes()
    shutil.rmtree(weights)
    # A worse run joins the folder; the earlier best keeps its copy and no second copy is made.
    cfg = preset("smoke").with_experiment("layerwise-kl-cos")
    cfg.train.max_steps, cfg.train.lr = 4, 1e-6  # barely trains: worse than the others
    cfg.train.weights, cfg.train.weights_dir = "best", str(weights)
    run(cfg.validate(), folder / run_name(cfg), data_dir)
    assert summary_of(folder / run_name(cfg))["best_val_ppl"] > ppl[best]
    kept = sorted(f.name for f in folder.iterdir() if (f / "student.safetensors").is_file())
    assert kept == [best] and (folder / best / "student.safetensors").read_bytes() == copy


def test_a_moved_results_folder_resumes_its_runs(data_dir, tmp_path):
    # The resume state and students outside the run folder are found by the run folder's id,
    # which moves with it.
    cfg = small_cfg("kl", max_steps=6, eval_every=2, resume_dir=str(tmp_path / "resume"), weights="best",
                    weights_dir=str(tmp_path / "w"))
    straight = run(cfg, tmp_path / "ref" / "smoke" / "kl-seed0", copy_data(data_dir, tmp_path / "d2"))
    assert run(cfg, tmp_path / "runs" / "smoke" / "kl-seed0", data_dir, stop_after=3) == {"stopped_at": 3}
    (tmp_path / "runs").rename(tmp_path / "moved")
    folder = tmp_path / "moved" / "smoke" / "kl-seed0"
    logs = []
    resumed = train(cfg, folder, data_dir, progress=False, log=logs.append)
    assert "resuming kl-seed0 at step 3" in logs
    for key in ("best_val_ppl", "test_ppl", "steps", "tokens"):
        assert resumed[key] == straight[key], key
    assert Path(resumed["student_path"]).is_absolute() and Path(resumed["student_path"]).is_file()


def test_a_sweep_at_exactly_the_plans_budget_finishes(data_dir, tmp_path, capsys):
    # Every student and the resume state in the run folders (weights="run"): the budget check of
    # each run counts what the plan counts, so no run is refused halfway.
    runs = tmp_path / "runs"
    args = ["--exps", "ce", "kl", "last2last-kl", "--max-steps", "3"]
    capsys.readouterr()
    assert cli_main(["plan", "--preset", "smoke", "--runs", str(runs), "--data-dir", str(data_dir), *args,
                     "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    budget = f"{p['peak_results_bytes'] / MiB:.6f}"
    assert sweep(runs, data_dir, *args, "--budget-mib", budget) == 0
    assert sorted(f.name for f in (runs / "smoke").iterdir() if (f / "summary.json").is_file()) == \
        ["ce-seed0", "kl-seed0", "last2last-kl-seed0"]


def test_a_results_folder_that_is_a_file_is_refused(data_dir, tmp_path, capsys):
    runs = tmp_path / "runsfile"
    runs.write_text("hi")
    assert sweep(runs, data_dir, "--exps", "kl", "--max-steps", "2") == 2
    assert "is a file, not a folder" in capsys.readouterr().err and runs.read_text() == "hi"


def test_a_changed_config_is_refused_naming_the_fields(data_dir, tmp_path):
    cfg = small_cfg("kl", max_steps=4)
    folder = tmp_path / "runs" / "smoke" / "kl-seed0"
    assert run(cfg, folder, data_dir, stop_after=2) == {"stopped_at": 2}
    other = small_cfg("kl", max_steps=4, lr=5e-3)
    with pytest.raises(KdlibError, match=r"differs in: train\.lr \(0\.001 there, 0\.005 now\)"):
        run(other, folder, data_dir)


def test_duplicate_experiments_and_seeds_are_planned_once(capsys):
    assert cli_main(["plan", "--preset", "colab-t4", "--exps", "kl", "KL", "kl", "--seeds", "0", "0", "1",
                     "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert [(r["exp"], r["seed"]) for r in p["runs"]] == [("kl", 0), ("kl", 1)]

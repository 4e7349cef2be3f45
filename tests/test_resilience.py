"""Resilience: a run interrupted at any moment continues where it stopped and ends with the same
results; no file kdlib writes is left half-written; nothing a user saved is deleted or overwritten.

Faults are injected with ``KDLIB_KILL_AT=point:n`` (kdlib/faults.py): the process SIGKILLs itself
the n-th time it reaches ``point``. Killed work runs in a subprocess (a small driver script written
into tmp_path); the rerun is the same command without the variable. Everything runs on the CPU,
where a resumed run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import kdlib.checkpoint
from kdlib.results import read_metrics
from kdlib.checkpoint import load_student
from kdlib.cli import main as cli_main
from kdlib.config import ExperimentConfig, preset
from kdlib.errors import KdlibError
from kdlib.train import train

SUMMARY_KEYS = ("best_val_ppl", "best_step", "test_ppl", "steps", "final_val_ppl", "tokens",
                "best_val_ppl_sliding", "stopped_early")
TIMING_KEYS = ("tokens_per_s", "peak_mem_mib")


def quiet(*_):
    pass


def _env(kill_at=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("KDLIB_KILL_AT", None)
    if kill_at:
        env["KDLIB_KILL_AT"] = kill_at
    return env


def _driver(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("import sys, torch\ntorch.set_num_threads(1)\n" + textwrap.dedent(body))
    return path


class _Argv:
    """Stands in for ``sys`` when a driver's text runs in this process (the reference runs)."""

    def __init__(self, *args):
        self.argv = ["driver", *map(str, args)]

    @staticmethod
    def exit(code):
        assert code == 0


def _run_py(script: Path, *args, kill_at=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=_env(kill_at),
                          capture_output=True, text=True, timeout=timeout)


def _summary_numbers(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: s.get(k) for k in SUMMARY_KEYS}


def _metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _assert_clean(run_dir: Path) -> None:
    assert not list(run_dir.glob(".*.tmp")), "temporary files left behind"
    assert not (run_dir / ".lock").exists(), "lock left behind"


def _assert_consistent_after_kill(run_dir: Path) -> None:
    """What a killed run leaves is readable: config, metrics (torn last line tolerated), student."""
    if (run_dir / "config.json").exists():
        ExperimentConfig.load(run_dir / "config.json")
    read_metrics(run_dir)
    if (run_dir / "student.safetensors").exists():
        load_student(run_dir / "student.safetensors")
    for f in run_dir.iterdir():  # every final (non-temporary) file is complete
        if f.suffix == ".json":
            json.loads(f.read_text())


# --------------------------------------------------------------------------
# 1. training killed at several points, then restarted


TRAIN_DRIVER = """
from kdlib.config import preset
from kdlib.train import train
cfg = preset("smoke", "kl")
cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = 12, 4, 1
cfg.model.dropout = 0.1  # so that the RNG state matters on resume
train(cfg.validate(), sys.argv[1], sys.argv[2], progress=False, log=lambda *_: None)
"""


@pytest.fixture(scope="module")
def train_reference(smoke_data, tmp_path_factory):
    """(driver script, reference run folder): the uninterrupted run, trained once for the module."""
    root = tmp_path_factory.mktemp("resilience_ref")
    script = _driver(root, "drive_train.py", TRAIN_DRIVER)
    data = shutil.copytree(smoke_data[0], root / "data")
    exec(compile(TRAIN_DRIVER, "drive_train", "exec"), {"sys": _Argv(root / "run", data)})  # in-process: faster
    return script, root / "run"


@pytest.mark.parametrize("kill_at", ["step:6", "eval:2", "write:3", "step:12"])
def test_killed_training_resumes_to_identical_results(train_reference, smoke_data, tmp_path, kill_at):
    script, ref = train_reference
    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    run_dir = tmp_path / "run"
    killed = _run_py(script, run_dir, data, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not (run_dir / "summary.json").exists()
    _assert_consistent_after_kill(run_dir)
    if kill_at == "write:3":  # killed between the complete temporary file and its rename
        assert list(run_dir.glob(".*.tmp")), "expected the killed write's temporary file"

    again = _run_py(script, run_dir, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary_numbers(run_dir) == _summary_numbers(ref)
    _assert_same_tensors(run_dir / "student.safetensors", ref / "student.safetensors")
    assert _metric_rows(run_dir) == _metric_rows(ref)
    assert not (run_dir / "resume.safetensors").exists()
    _assert_clean(run_dir)


# --------------------------------------------------------------------------
# 2. cache build killed, then finished


CACHE_DRIVER = """
from kdlib.cache import build_cache
from kdlib.config import preset
cfg = preset("smoke", "kl")
cfg.cache.chunk_windows, cfg.cache.batch_size = 4, 4
build_cache(cfg, sys.argv[1], sys.argv[2], split="validation", progress=False, log=lambda *_: None)
"""


def test_killed_cache_build_resumes_byte_identical(smoke_data, tmp_path):
    script = _driver(tmp_path, "drive_cache.py", CACHE_DRIVER)
    data = smoke_data[0]  # the cache goes to its own folder: the data is only read
    exec(compile(CACHE_DRIVER, "drive_cache", "exec"), {"sys": _Argv(data, tmp_path / "ref")})
    manifest = json.loads((tmp_path / "ref" / "validation.cache.json").read_text())
    assert manifest["windows"] > 8, "needs more than two chunks to kill in the middle"

    killed = _run_py(script, data, tmp_path / "cache", kill_at="cache:2")
    assert killed.returncode == -signal.SIGKILL
    partial = json.loads((tmp_path / "cache" / "validation.cache.json").read_text())
    assert partial["complete"] is False and partial["complete_windows"] == 4
    again = _run_py(script, data, tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cache").iterdir())
    for n in names:
        assert (tmp_path / "ref" / n).read_bytes() == (tmp_path / "cache" / n).read_bytes(), n


# --------------------------------------------------------------------------
# 3. a sweep killed in its second experiment (also the CLI's train path: sweep and train share _train_one)


SWEEP_DRIVER = """
from kdlib.cli import main
sys.exit(main(["sweep", "--preset", "smoke", "--exps", "ce", "kl", "--seeds", "0", "--runs", sys.argv[1],
               "--data-dir", sys.argv[2], "--max-steps", "6"]))
"""


def test_killed_sweep_skips_finished_and_resumes(smoke_data, tmp_path):
    script = _driver(tmp_path, "drive_sweep.py", SWEEP_DRIVER)
    data_a = shutil.copytree(smoke_data[0], tmp_path / "data_a")
    data_b = shutil.copytree(smoke_data[0], tmp_path / "data_b")
    exec(compile(SWEEP_DRIVER, "drive_sweep", "exec"), {"sys": _Argv(tmp_path / "ref", data_a)})

    runs = tmp_path / "runs"
    killed = _run_py(script, runs, data_b, kill_at="step:9")  # step 3 of the second run (kl)
    assert killed.returncode == -signal.SIGKILL
    first = runs / "smoke" / "ce-seed0" / "summary.json"
    assert first.is_file() and not (first.parent.parent / "kl-seed0" / "summary.json").exists()
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    ce_student = (first.parent / "student.safetensors").read_bytes()

    again = _run_py(script, runs, data_b)
    runs, ref = runs / "smoke", tmp_path / "ref" / "smoke"  # the sweep's layout: RUNS/PRESET/RUN
    assert again.returncode == 0, again.stderr
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # skipped, untouched
    assert (runs / "ce-seed0" / "student.safetensors").read_bytes() == ce_student
    for name in ("ce-seed0", "kl-seed0"):
        assert _summary_numbers(runs / name) == _summary_numbers(ref / name)
        _assert_same_tensors(runs / name / "student.safetensors", ref / name / "student.safetensors")
        _assert_clean(runs / name)


# --------------------------------------------------------------------------
# 4. two processes on one run folder


LOCK_HOLDER = """
import time
from pathlib import Path
from kdlib.lock import RunLock
with RunLock(Path(sys.argv[1]) / ".lock"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _tiny_cfg(exp="kl", max_steps=2):
    cfg = preset("smoke", exp)
    cfg.train.max_steps = max_steps
    return cfg.validate()


def test_second_process_refused_then_takes_over_after_kill(smoke_data, tmp_path):
    script = _driver(tmp_path, "hold_lock.py", LOCK_HOLDER)
    run_dir = tmp_path / "run"
    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    holder = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KdlibError, match=rf"in use by process {holder.pid}"):
            train(_tiny_cfg(), run_dir, data, progress=False, log=quiet)
        assert not (run_dir / "config.json").exists()  # the refused process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    assert (run_dir / ".lock").exists()  # stale: its process is gone
    summary = train(_tiny_cfg(), run_dir, data, progress=False, log=quiet)
    assert summary["steps"] == 2
    _assert_clean(run_dir)


# --------------------------------------------------------------------------
# 5. storage budget nearly full


def test_budget_full_refuses_before_training(smoke_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "old-run").mkdir(parents=True)
    big = runs / "old-run" / "student.safetensors"
    with open(big, "wb") as f:  # sparse: 99.5 MiB by size, nothing on disk
        f.truncate(int(99.5 * 2**20))
    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    code = cli_main(["train", "--preset", "smoke", "--exp", "kl", "--max-steps", "2", "--runs", str(runs),
                     "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert code == 2
    assert "MiB" in err and "nothing was started" in err
    import re
    numbers = re.findall(r"(\d+\.\d+) MiB", err)
    assert len(numbers) >= 2, err
    run_dir = runs / "kl-seed0"
    assert not (run_dir / "student.safetensors").exists() and not (run_dir / "config.json").exists()
    assert big.stat().st_size == int(99.5 * 2**20)  # the user's file is untouched


# --------------------------------------------------------------------------
# 6. fuzzing the config loader


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


def _paths_of(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths_of(v, prefix + (k,))


VALID = preset("smoke", "kl").to_dict()
KEY_PATHS = list(_paths_of(VALID))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def _from_dict_or_kdlib_error(d):
    try:
        cfg = ExperimentConfig.from_dict(d)
    except KdlibError:
        return
    assert isinstance(cfg, ExperimentConfig)
    cfg.validate()


@FUZZ
@given(json_values)
def test_fuzz_from_dict_arbitrary(value):
    _from_dict_or_kdlib_error(value)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(VALID)), json_values, max_size=5))
def test_fuzz_from_dict_top_level_keys(d):
    _from_dict_or_kdlib_error(d)


@FUZZ
@given(st.sampled_from(KEY_PATHS), json_values)
def test_fuzz_from_dict_mutated_preset(path, value):
    d = json.loads(json.dumps(VALID))
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _from_dict_or_kdlib_error(d)


@FUZZ
@given(st.text(max_size=60) | json_values.map(json.dumps))
def test_fuzz_from_json_arbitrary_text(text):
    try:
        ExperimentConfig.from_json(text)
    except KdlibError:
        pass


# --------------------------------------------------------------------------
# 7. hostile names and files


@pytest.mark.parametrize("exp", ["../x", "a/b", "../../etc/passwd", "kl/../../x", "/tmp/x"])
def test_hostile_experiment_names_refused(smoke_data, tmp_path, capsys, exp):
    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    runs = tmp_path / "box" / "runs"
    runs.mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = cli_main(["train", "--preset", "smoke", "--exp", exp, "--max-steps", "1", "--runs", str(runs),
                     "--data-dir", str(data)])
    assert code == 2
    assert "experiment name" in capsys.readouterr().err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_pickle_student_refused_without_unpickling(tmp_path, kind, no_unpickling):
    path = tmp_path / "student.safetensors"
    state = {"w": torch.zeros(3)}
    if kind == "torch-zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    data = path.read_bytes()
    with pytest.raises(KdlibError, match="pickle"):
        load_student(path)
    with pytest.raises(KdlibError):
        kdlib.checkpoint.load_resume(path)
    assert path.read_bytes() == data  # not deleted or rewritten


def test_saved_student_not_overwritten_by_other_config(smoke_data, tmp_path):
    """A run folder holding another configuration's run is refused and left as it was."""
    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    run_dir = tmp_path / "run"
    train(_tiny_cfg("kl", 2), run_dir, data, progress=False, log=quiet)
    snapshot = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    other = _tiny_cfg("kl", 3)
    with pytest.raises(KdlibError, match="another configuration"):
        train(other, run_dir, data, progress=False, log=quiet)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == snapshot


# --------------------------------------------------------------------------
# 8. reduced-precision autocast numerics on the CPU (bf16 standing in for fp16)


def test_bf16_autocast_layerwise_kl_cos_finite():
    from kdlib.models import TinyGPT, load_teacher, teacher_forward
    from kdlib.objective import DistillationLoss
    from kdlib.step import Trainee

    cfg = preset("smoke", "layerwise-kl-cos")
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher, device="cpu", student_vocab_size=cfg.model.vocab_size)
    objective = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    trainee = Trainee(TinyGPT(cfg.model), objective)
    opt = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        win = torch.randint(0, cfg.model.vocab_size, (4, cfg.data.block_size + 1), generator=g)
        ids, labels = win[:, :-1], win[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t_out = teacher_forward(teacher, ids, objective.spec.needs_hidden_states, objective.spec.needs_attentions)
            out = trainee(ids, labels, t_out)
        assert torch.isfinite(out.total), out.parts
        assert all(torch.isfinite(v) for v in out.parts.values()), out.parts
        assert {"ce", "kl", "cos", "feat"} <= set(out.parts), out.parts
        out.total.backward()
        grads = [p.grad for p in trainee.parameters() if p.requires_grad]
        assert any(gr is not None for gr in grads)
        assert all(torch.isfinite(gr).all() for gr in grads if gr is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)

"""The CLI's boundary and the faults behind it (issue 13): every expected fault ends in one line,
``error: what happened; what to do``, on stderr with its exit code (2 bad input, 3 the environment,
130 interrupted), and a bug keeps its traceback. Also: malformed run files in ``report``, hostile
config fields, pickle-only teachers, non-finite students, another tokenizer's data, and the smaller
messages. Faults are injected by monkeypatching; nothing here needs a GPU, and nothing skips.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import kdlib.analysis
import kdlib.data
import kdlib.evaluate
import kdlib.train
from kdlib.cli import main
from kdlib.config import preset
from kdlib.errors import KdlibError
from helpers import ROOT, trained_smoke_run

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON nesting, far past the parser's recursion limit


@pytest.fixture(scope="module")
def trained(smoke_data, tmp_path_factory):
    """(results folder, run folder, data folder): a 4-step smoke kl run, shared read-only."""
    return trained_smoke_run(smoke_data, tmp_path_factory, "trained")


def copy_run(trained, tmp_path: Path, name: str = "kl-seed0") -> Path:
    """A private copy of the trained run at RUNS/smoke/NAME under ``tmp_path``."""
    return Path(shutil.copytree(trained[1], tmp_path / "runs" / "smoke" / name))


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def one_error_line(err: str) -> str:
    """The CLI's stderr for a refusal: no traceback, and a line ``error: ...``."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------
# 1. one CLI boundary: exit codes and messages


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("0", "1", "2", "3", "130"):
        assert f"\n  {code} " in out, code


@pytest.mark.parametrize("code, says", [
    (errno.ENOSPC, "the disk holding {path} is full"),
    (errno.EACCES, "{path} is not writable"),
    (errno.EROFS, "{path} is not writable: it is on a read-only file system"),
    (errno.ENOTDIR, "{path}: a file stands where a folder is expected"),
    (errno.EISDIR, "{path} is a folder where a file is expected"),
    (errno.ENOENT, "{path} does not exist"),
])
def test_an_os_error_is_exit_3_naming_the_path(code, says, trained, tmp_path, monkeypatch, capsys):
    def fail(path, text):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(kdlib.analysis, "atomic_write_text", fail)
    figures = tmp_path / "fig"
    assert main(["report", str(trained[0]), "--figures", str(figures)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert says.format(path=figures / "results.csv") in line


def test_a_full_disk_during_a_write_names_the_file_being_written(trained, tmp_path, monkeypatch, capsys):
    # f.write/os.fsync raise ENOSPC without a file name; the message still names the file kdlib was writing
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    figures = tmp_path / "fig"
    assert main(["report", str(trained[0]), "--figures", str(figures)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert f"the disk holding {figures / 'results.csv'} is full" in line and "free space" in line


def test_a_folder_that_cannot_be_written_is_exit_3(trained, tmp_path, capsys, monkeypatch):
    # chmod does not stop root: the file system's refusal is injected where the folder is made
    import errno

    target = tmp_path / "ro" / "figures"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == target or target in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["report", str(trained[0]), "--figures", str(target)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert f"{target} is not writable" in line


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def run_main(argv):
    """main(argv), failing the test (not the whole session) if a KeyboardInterrupt escapes it."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")


def test_an_interrupted_train_exits_130_saying_its_state_is_kept(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kdlib.train, "train", interrupt)
    data = shutil.copytree(trained[2], tmp_path / "data")
    assert run_main(["train", "--preset", "smoke", "--exp", "kl", "--runs", str(tmp_path / "runs"),
                     "--data-dir", str(data), "--max-steps", "2"]) == 130
    line = one_error_line(capsys.readouterr().err)
    assert "interrupted; the run's state is saved" in line and "run the same command again" in line


def test_an_interrupted_report_just_says_interrupted(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kdlib.analysis, "report", interrupt)
    assert run_main(["report", str(trained[0]), "--figures", str(tmp_path / "fig")]) == 130
    assert one_error_line(capsys.readouterr().err) == "error: interrupted"


def test_a_json_decode_error_is_exit_2(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kdlib.analysis, "report", lambda *a, **k: json.loads("{not json"))
    assert main(["report", str(trained[0]), "--figures", str(tmp_path / "fig")]) == 2
    assert "is not valid JSON" in one_error_line(capsys.readouterr().err)


def test_a_bug_keeps_its_traceback(trained, tmp_path, monkeypatch):
    # a guard (passes before the fix too): the boundary must not swallow programming errors
    def bug(*a, **k):
        return 1 / 0

    monkeypatch.setattr(kdlib.analysis, "report", bug)
    with pytest.raises(ZeroDivisionError):
        main(["report", str(trained[0]), "--figures", str(tmp_path / "fig")])

    def recursion(*a, **k):
        return recursion()

    monkeypatch.setattr(kdlib.analysis, "report", recursion)
    with pytest.raises(RecursionError):  # a recursion of kdlib's own, not a file's: a bug
        main(["report", str(trained[0]), "--figures", str(tmp_path / "fig")])


# --------------------------------------------------------------------------
# 2. faults that ended in a traceback


@pytest.mark.parametrize("case", ["train --runs below a file", "train --data-dir a file",
                                  "prep --data-dir a file", "eval of a file", "storage of a file",
                                  "cache --cache-dir below a file"])
def test_a_file_where_a_folder_is_expected_is_refused(case, trained, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    data = str(trained[2])
    argv = {
        "train --runs below a file": ["train", "--preset", "smoke", "--exp", "kl", "--runs", f"{afile}/sub",
                                      "--data-dir", data, "--max-steps", "2"],
        "train --data-dir a file": ["train", "--preset", "smoke", "--exp", "kl", "--runs",
                                    str(tmp_path / "runs"), "--data-dir", str(afile), "--max-steps", "2"],
        "prep --data-dir a file": ["prep", "--preset", "smoke", "--data-dir", str(afile)],
        "eval of a file": ["eval", str(afile), "--data-dir", data],
        "storage of a file": ["storage", str(afile)],
        "cache --cache-dir below a file": ["cache", "--preset", "smoke", "--data-dir", data, "--cache-dir",
                                           f"{afile}/cache"],
    }[case]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(afile) in line and ("is a file, not a folder" in line or "which is a file, not a folder" in line)
    assert afile.read_text() == "mine" and not (tmp_path / "runs").exists()


def test_a_deeply_nested_config_is_exit_2_naming_it(trained, tmp_path):
    folder = copy_run(trained, tmp_path)
    (folder / "config.json").write_text(DEEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "kdlib", "eval", str(folder), "--data-dir", str(trained[2])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert f"{folder / 'config.json'} is nested too deeply" in line


def test_a_student_with_deeply_nested_metadata_is_exit_2_naming_it(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = copy_run(trained, tmp_path)
    student = folder / "student.safetensors"
    with safe_open(str(student), "pt") as f:
        meta = f.metadata()
    save_file(load_file(student), student, metadata={**meta, "model_config": DEEP})
    assert main(["eval", str(folder), "--data-dir", str(trained[2])]) == 2
    assert f"{student} is nested too deeply" in one_error_line(capsys.readouterr().err)


MALFORMED = {  # case: (file, how it is spoiled, what the reason says)
    "metrics nested too deeply": ("metrics.jsonl", "append", DEEP, "nested too deeply"),
    "metrics val_ppl text": ("metrics.jsonl", "append",
                             '{"step": 5, "epoch": 0.1, "tokens": 1280, "val_ppl": "abc"}',
                             "val_ppl is 'abc', not a number"),
    "metrics step null": ("metrics.jsonl", "append", '{"step": null, "epoch": 0.1, "tokens": 1280, "val_ppl": 3.0}',
                          "step is None, not a whole number"),
    "summary nested too deeply": ("summary.json", "write", DEEP, "unreadable summary.json (summary"),
    "summary test_ppl text": ("summary.json", "edit", {"test_ppl": "abc"}, "test_ppl is 'abc', not a number"),
    "config nested too deeply": ("config.json", "write", DEEP, "no readable kdlib config (run config"),
    "config seed text": ("config.json", "edit", {"seed": "zero"}, "seed is 'zero', not a whole number"),
    "config preset a list": ("config.json", "edit", {"preset": ["smoke"]}, "preset is ['smoke'], not a string"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_report_skips_a_malformed_run_with_its_reason_and_reports_the_rest(case, trained, tmp_path, capsys):
    copy_run(trained, tmp_path)
    bad = copy_run(trained, tmp_path, "bad-seed0")
    name, how, what, reason = MALFORMED[case]
    if how == "append":
        with open(bad / name, "a") as f:
            f.write(what + "\n")
    elif how == "write":
        (bad / name).write_text(what)
    else:
        edit_json(bad / name, **what)
    assert main(["report", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipped smoke/bad-seed0:")]
    assert len(skipped) == 1 and reason in skipped[0], out
    runs = pd.read_csv(tmp_path / "fig" / "runs.csv")
    expected = {"smoke/kl-seed0"} | ({"smoke/bad-seed0"} if name == "summary.json" else set())
    assert set(runs["run"]) == expected  # a bad summary: the run is reported from its metrics


def test_cuda_on_a_machine_without_a_gpu_is_refused(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, here or on a GPU one
    data = shutil.copytree(trained[2], tmp_path / "data")
    assert main(["cache", "--preset", "smoke", "--data-dir", str(data), "--device", "cuda"]) == 2
    assert "error: no CUDA GPU here" in one_error_line(capsys.readouterr().err)
    assert not (data / "cache").exists()
    from kdlib.models import load_teacher

    with pytest.raises(KdlibError, match="no CUDA GPU here"):
        load_teacher(preset("smoke").teacher, device="cuda:0")


@pytest.mark.parametrize("seed", [2**64, 2**63, -1, True, 1.5])
def test_a_seed_outside_what_torch_takes_is_refused_naming_it(seed):
    cfg = preset("smoke", "kl")
    cfg.seed = seed
    with pytest.raises(KdlibError, match=r"seed must be a whole number in \[0, 2\*\*63\), got " + repr(seed)):
        cfg.validate()
    cfg.seed = 2**63 - 1
    cfg.validate()


def test_the_cli_refuses_a_seed_of_2_to_the_64(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--exp", "kl", "--runs", str(tmp_path / "runs"),
                 "--seed", str(2**64), "--max-steps", "2"]) == 2
    assert str(2**64) in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------
# 3. config fields that become paths


def test_eval_refuses_a_preset_that_leads_outside_data(trained, tmp_path, monkeypatch, capsys):
    folder = copy_run(trained, tmp_path)
    edit_json(folder / "config.json", preset="../../../x")
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    shutil.copytree(trained[2], tmp_path / "a" / "x")  # where data/../../../x leads: token files it must not read
    monkeypatch.chdir(cwd)
    read = []
    monkeypatch.setattr(kdlib.data, "load_split", lambda *a, **k: read.append(a))
    assert main(["eval", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "preset must be a plain name" in line and "'../../../x'" in line  # refused as the config loads
    assert read == []


def test_report_keeps_a_hostile_preset_inside_the_figures_folder(trained, tmp_path, capsys):
    copy_run(trained, tmp_path)
    hostile = Path(shutil.copytree(trained[1], tmp_path / "runs" / "kl-seed0"))  # a flat run, another protocol
    edit_json(hostile / "config.json", preset="..")
    figures = tmp_path / "place" / "fig"
    assert main(["report", str(tmp_path / "runs"), "--figures", str(figures)]) == 0
    assert [p.name for p in (tmp_path / "place").iterdir()] == ["fig"]  # nothing written beside it


# --------------------------------------------------------------------------
# 4. the teacher is read from safetensors only


def test_a_teacher_with_only_pytorch_model_bin_is_refused_without_unpickling(make_teacher, tmp_path, monkeypatch):
    from kdlib.models import load_teacher

    folder = tmp_path / "teacher"
    teacher = make_teacher(n_layer=1, n_embd=16)
    teacher.save_pretrained(folder, safe_serialization=False)  # transformers 5 writes safetensors regardless
    for f in folder.glob("*.safetensors"):
        f.unlink()
    if not (folder / "pytorch_model.bin").is_file():
        torch.save(teacher.state_dict(), folder / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(KdlibError, match=r"has no safetensors weights \(only pytorch_model.bin, a pickle\); "
                                         r"kdlib never unpickles.*safe_serialization=True"):
        load_teacher(str(folder))


def test_a_safetensors_teacher_folder_still_loads(make_teacher, tmp_path, monkeypatch):
    # a guard (passes before the fix too)
    from kdlib.models import load_teacher

    make_teacher(n_layer=1, n_embd=16).save_pretrained(tmp_path / "teacher")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    assert load_teacher(str(tmp_path / "teacher")).config.n_layer == 1


# --------------------------------------------------------------------------
# 5. numbers that were silently wrong


def test_eval_refuses_a_student_with_non_finite_weights(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = copy_run(trained, tmp_path)
    student = folder / "student.safetensors"
    with safe_open(str(student), "pt") as f:
        meta = f.metadata()
    tensors = load_file(student)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], math.inf)
    save_file(tensors, student, metadata=meta)
    assert main(["eval", str(folder), "--data-dir", str(trained[2])]) == 2
    captured = capsys.readouterr()
    assert "perplexity" not in captured.out
    line = one_error_line(captured.err)
    assert f"student {student} has non-finite weights" in line and first in line


def test_eval_refuses_a_perplexity_that_is_not_finite(trained, monkeypatch, capsys):
    monkeypatch.setattr(kdlib.evaluate, "perplexity", lambda *a, **k: math.inf)
    assert main(["eval", str(trained[1]), "--data-dir", str(trained[2])]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the test perplexity of" in line and "is not finite (inf)" in line


def test_eval_refuses_data_of_another_tokenizer_the_run_records(trained, tmp_path, capsys):
    folder = copy_run(trained, tmp_path)
    edit_json(folder / "summary.json", tokenizer_hash="0" * 64)
    assert main(["eval", str(folder), "--data-dir", str(trained[2])]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was tokenized with another tokenizer" in line and "000000000000" in line


def test_eval_refuses_data_of_another_corpus(trained, tmp_path, capsys):
    data = Path(shutil.copytree(trained[2], tmp_path / "data"))
    manifest = json.loads((data / "test.json").read_text())
    manifest["inputs"]["source"] = {"kind": "files"}
    (data / "test.json").write_text(json.dumps(manifest))
    assert main(["eval", str(trained[1]), "--data-dir", str(data)]) == 2
    assert "text from local text files" in one_error_line(capsys.readouterr().err)


def test_eval_says_when_it_cannot_check_the_tokenizer(trained, tmp_path, capsys):
    assert "tokenizer_hash" in json.loads((trained[1] / "summary.json").read_text())  # runs record it now
    old = copy_run(trained, tmp_path)  # a run from before: its summary has no tokenizer hash
    summary = json.loads((old / "summary.json").read_text())
    summary.pop("tokenizer_hash")
    (old / "summary.json").write_text(json.dumps(summary))
    assert main(["eval", str(old), "--data-dir", str(trained[2])]) == 0
    captured = capsys.readouterr()
    assert "test perplexity" in captured.out and "records no tokenizer hash" in captured.err


@pytest.mark.parametrize("flag", ["--stride", "--block-size"])
def test_eval_refuses_a_zero_window(flag, trained, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: exit 2 with the usage
        main(["eval", str(trained[1]), "--data-dir", str(trained[2]), flag, "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------
# 6. smaller messages


def test_cache_for_ce_says_there_is_nothing_to_cache(trained, tmp_path, capsys):
    data = shutil.copytree(trained[2], tmp_path / "data")
    assert main(["cache", "--preset", "smoke", "--exp", "ce", "--data-dir", str(data)]) == 2
    assert "ce has no teacher term: nothing to cache" in one_error_line(capsys.readouterr().err)
    assert not (data / "cache").exists()


def test_cache_over_a_truncated_cache_names_the_files_to_delete(cached_data_dir, capsys):
    ids = cached_data_dir / "cache" / "train.topk_ids.bin"
    with open(ids, "r+b") as f:
        f.truncate(1000)
    assert main(["cache", "--preset", "smoke", "--exp", "kl", "--data-dir", str(cached_data_dir)]) == 2
    captured = capsys.readouterr()
    assert "reused" not in captured.out
    line = one_error_line(captured.err)
    assert f"cache file {ids} has 1000 bytes" in line and "manifest" not in line.split("Delete")[0]
    assert "Delete this split's cache files (train.topk_logp.bin, train.topk_ids.bin, train.log_tail.bin, " \
           "train.cache.json" in line


def test_storage_of_a_missing_folder_is_an_error(tmp_path, capsys):
    assert main(["storage", str(tmp_path / "nothing")]) == 2
    assert "no such results folder" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "nothing").exists()


def test_small_sizes_next_to_a_budget_keep_two_significant_digits(trained, tmp_path, capsys):
    from kdlib.checkpoint import MiB
    from kdlib.commands import mib_text

    assert mib_text(0.05 * MiB) == "0.05 MiB" and mib_text(0.0123 * MiB) == "0.012 MiB"
    assert mib_text(97.3 * MiB) == "97.30 MiB" and mib_text(0) == "0 MiB"
    folder = copy_run(trained, tmp_path)
    size = (folder / "student.safetensors").stat().st_size
    assert main(["storage", str(tmp_path / "runs"), "--delete-weights", "smoke/kl-seed0"]) == 0
    assert f"{mib_text(size)} freed" in capsys.readouterr().out


def test_report_help_shows_one_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert "95% CI" in out and "%%" not in out


def test_a_refused_run_leaves_nothing_that_report_lists(trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(trained[1], runs / "old-kl-seed0")  # a finished run, older flat layout
    data = shutil.copytree(trained[2], tmp_path / "data")
    assert main(["train", "--preset", "smoke", "--exp", "ce", "--runs", str(runs), "--data-dir", str(data),
                 "--max-steps", "2", "--budget-mib", "0.05"]) == 2
    assert "error: run ce-seed0 will need" in capsys.readouterr().err
    assert main(["report", str(runs), "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out.replace("0 skipped", ""), out


# --------------------------------------------------------------------------
# found by a hostile pass over the whole CLI, after the above


def test_cache_refuses_links_among_its_files_and_the_target_is_untouched(trained, tmp_path, capsys):
    data = shutil.copytree(trained[2], tmp_path / "data")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"the user's file")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "train.log_tail.bin").symlink_to(victim)
    assert main(["cache", "--preset", "smoke", "--data-dir", str(data), "--cache-dir", str(cache)]) == 2
    assert "is a symbolic link" in one_error_line(capsys.readouterr().err)
    assert victim.read_bytes() == b"the user's file" and sorted(p.name for p in cache.iterdir()) == ["train.log_tail.bin"]


def test_delete_weights_refuses_a_folder_that_is_not_a_run(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    mine = tmp_path / "runs" / "mybackup"
    mine.mkdir()
    (mine / "best-ever.safetensors").write_bytes(b"x")
    for name in ("smoke", "mybackup"):
        assert main(["storage", str(tmp_path / "runs"), "--delete-weights", name]) == 2
        assert "is not a run folder (it has no config.json)" in one_error_line(capsys.readouterr().err)
    assert (run / "student.safetensors").is_file() and (mine / "best-ever.safetensors").is_file()


def test_a_folder_in_place_of_a_finished_runs_summary_is_refused_not_retrained(trained, tmp_path, capsys):
    from helpers import snapshot

    run = copy_run(trained, tmp_path)
    (run / "summary.json").unlink()
    (run / "summary.json").mkdir()
    before = snapshot(run)
    assert main(["train", "--preset", "smoke", "--exp", "kl", "--runs", str(tmp_path / "runs"), "--data-dir",
                 str(trained[2]), "--max-steps", "4"]) == 2
    assert "summary.json is not a file" in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before


def test_a_hand_edited_metrics_step_is_a_clear_error_at_resume(trained, tmp_path):
    from kdlib.runs import metrics_until as _metrics_until

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": "abc"}\n{"step": 2, "val_ppl": 3.0}\n')
    with pytest.raises(KdlibError, match="step is 'abc', not a whole number"):
        _metrics_until(path, 4)
    path.write_text('{"step": 2, "val_ppl": 3.0}\n{"step": 6}\n')
    assert _metrics_until(path, 4) == [{"step": 2, "val_ppl": 3.0}]


@pytest.mark.parametrize("where, edit", [
    ("config", lambda c: c["train"].update(batch_size=0)),
    ("config", lambda c: c["data"].update(block_size=10**30)),
    ("summary", lambda s: s.update(budget_tokens=10**30)),
    ("summary", lambda s: s.update(test_ppl=float("inf"))),
])
def test_report_skips_runs_with_impossible_numbers(trained, tmp_path, capsys, where, edit):
    copy_run(trained, tmp_path)
    bad = copy_run(trained, tmp_path, "bad-seed0")
    path = bad / f"{where}.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    assert main(["report", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig")]) == 0
    assert "skipped smoke/bad-seed0:" in capsys.readouterr().out


def test_eval_refuses_another_runs_student(trained, tmp_path, capsys):
    from kdlib.checkpoint import load_student, save_student

    run = copy_run(trained, tmp_path)
    save_student(load_student(run / "student.safetensors"), run / "student.safetensors", exp="js", seed=0)
    assert main(["eval", str(run), "--data-dir", str(trained[2])]) == 2
    assert "is the student of js-seed0 (its metadata), not of this run" in one_error_line(capsys.readouterr().err)


def test_ctrl_c_while_the_arguments_are_read_is_exit_130(monkeypatch, capsys):
    import kdlib.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(kdlib.cli, "build_parser", interrupted)
    assert main(["report", "x"]) == 130 and "error: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_kdlib_does_not_run_on_is_refused(trained, tmp_path, capsys, device):
    data = shutil.copytree(trained[2], tmp_path / "data")
    assert main(["cache", "--preset", "smoke", "--data-dir", str(data), "--device", device]) == 2
    assert "is not one kdlib runs on" in one_error_line(capsys.readouterr().err)
    assert not (data / "cache").exists()


def test_a_stray_world_size_is_a_clear_error(trained, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "kdlib", "train", "--preset", "smoke", "--exp", "kl", "--runs",
                           str(tmp_path / "runs"), "--data-dir", str(trained[2]), "--max-steps", "2"],
                          env={**env, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "unset WORLD_SIZE" in done.stderr


def test_a_full_disk_while_the_tokenizer_is_saved_is_exit_3(tmp_path, capsys, monkeypatch):
    import transformers

    def full(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")  # what the Rust library raises

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", full)
    assert main(["prep", "--preset", "smoke", "--data-dir", str(tmp_path / "data")]) == 3
    assert "full" in one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "data").glob(".prep-*"))  # its staging folder is cleaned up


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(trained, tmp_path, capsys):
    import os

    run = copy_run(trained, tmp_path)
    (run / "config.json").unlink()
    os.mkfifo(run / "config.json")
    assert main(["eval", str(run), "--data-dir", str(trained[2])]) == 2
    assert "is not a regular file" in one_error_line(capsys.readouterr().err)
    data = shutil.copytree(trained[2], tmp_path / "data")
    (data / "test.json").unlink()
    os.mkfifo(data / "test.json")
    assert main(["eval", str(copy_run(trained, tmp_path, "kl2-seed0")), "--data-dir", str(data)]) == 2
    assert "is not a regular file" in one_error_line(capsys.readouterr().err)


def test_eval_metrics_refuses_an_unreadable_summary_before_any_work_and_keeps_it(trained, tmp_path, capsys):
    """--metrics writes into summary.json: a corrupt one is said at once (not after the pass), with
    advice that does not lose the run's results, and left as it was."""
    _, folder, data = trained
    run_dir = shutil.copytree(folder, tmp_path / folder.name)
    (run_dir / "summary.json").write_text("{cut short")
    assert main(["eval", str(run_dir), "--metrics", "--data-dir", str(data)]) == 2
    err = capsys.readouterr()
    assert "do not delete it" in err.err and "restore it" in err.err and "perplexity" not in err.out
    assert (run_dir / "summary.json").read_text() == "{cut short"

"""Reliability of the data path and the report's figures (issue 13, items 1-4).

1. Figures are written atomically: a full disk mid-write keeps the previous figure, no temp file.
2. prep writes only into its own data folders, and removes the staging folders of killed preps.
3. Token files are checked against their manifests (checksum, dtype, ids < vocabulary) before
   training and evaluation, once per file and process.
4. Evaluation's block size and stride are refused with the flag and its limit named.

Every bad input must end in ``KdlibError`` saying what was wrong and what to do, and leave the
user's files as they were.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import quiet, run, snapshot

from kdlib import cli
from kdlib.config import preset
from kdlib.data import SPLITS, load_split
from kdlib.errors import KdlibError
from kdlib.prep import prepare


def small_cfg(exp: str = "ce", max_steps: int = 2):
    cfg = preset("smoke", exp)
    cfg.train.max_steps, cfg.train.log_every = max_steps, 1
    return cfg.validate()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".prep-") or p.name.endswith(".tmp"))


# --------------------------------------------------------------------------
# 1. figures


def _figure(value: float):
    from kdlib.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, value, 2])
    return fig


class _DiskFullFile:
    """A file whose first write stores half of the bytes, then fails as a full disk does."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data)[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_figure_on_a_full_disk_keeps_the_previous_figure_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from kdlib.plots import save

    folder = tmp_path / "figures"
    save(_figure(1.5), folder, "curves")
    before = snapshot(folder)
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and isinstance(file, (str, os.PathLike)) and Path(file).parent == folder:
            return _DiskFullFile(f)
        return f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(KdlibError, match=r"cannot write figure .*curves\.png: No space left on device; the "
                                         r"previous curves\.png \(if any\) is kept.*Free space"):
        save(_figure(3.0), folder, "curves")
    monkeypatch.undo()
    assert snapshot(folder) == before  # byte-identical, and nothing else (no .curves.png.*.tmp)


def test_saved_figures_are_whole_files_and_no_temp_file(tmp_path):
    # (passes before the fix too: the ordinary path still writes complete PNG and PDF files)
    from kdlib.plots import save

    paths = save(_figure(2.0), tmp_path, "bars")
    assert [p.name for p in paths] == ["bars.png", "bars.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].read_bytes()[-8:-4] == b"IEND"
    assert paths[1].read_bytes().startswith(b"%PDF") and paths[1].read_bytes().rstrip().endswith(b"%%EOF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.pdf", "bars.png"]


# --------------------------------------------------------------------------
# 2. prep: only its own folders; staging of killed preps removed


def test_prep_refuses_a_folder_with_a_foreign_tokenizer_and_train_json(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "tokenizer.json").write_text('{"my": "own tokenizer"}')
    (folder / "train.json").write_text('[{"text": "my own training data"}]')
    before = snapshot(folder)
    with pytest.raises(KdlibError, match=r"is not a kdlib data folder: tokenizer/, train\.json are not kdlib's.*"
                                         r"nothing was changed.*new or empty folder"):
        prepare(preset("smoke"), folder, log=quiet)
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["tokenizer", "train.json"]
    # the command line says the same, exit code 2, nothing written
    assert cli.main(["prep", "--preset", "smoke", "--data-dir", str(folder)]) == 2
    assert "is not a kdlib data folder" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_prep_refuses_a_foreign_tokenizer_in_an_older_kdlib_folder(smoke_data, tmp_path):
    # An older kdlib's folder (no marker) of a preset with a named tokenizer: no tokenizer/ of its own.
    folder = shutil.copytree(smoke_data[0], tmp_path / "data")
    (folder / ".kdlib-data.json").unlink(missing_ok=True)
    (folder / "tokenizer.inputs.json").unlink()  # so tokenizer/ is not one prep trained
    before = snapshot(folder)
    with pytest.raises(KdlibError, match=r"tokenizer/ \(no tokenizer\.inputs\.json: not a tokenizer prep trained\)"):
        prepare(preset("smoke"), folder, log=quiet)
    assert snapshot(folder) == before


def test_prep_into_its_own_folders_still_works(smoke_data, tmp_path):
    # a kdlib folder is reused as before; one an older kdlib made (no marker) is recognised and gets it
    folder = shutil.copytree(smoke_data[0], tmp_path / "data")
    (folder / "cache").mkdir()  # what training and the cache put beside the token files is fine
    (folder / "teacher_ppl.json").write_text("{}")
    lines = []
    prepare(preset("smoke"), folder, log=lines.append)
    assert all(line.endswith("(reused)") for line in lines[1:])
    (folder / ".kdlib-data.json").unlink()
    prepare(preset("smoke"), folder, log=quiet)
    assert (folder / ".kdlib-data.json").is_file() and not leftovers(folder)


def _prep_cmd(folder: Path, kill_at=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("KDLIB_KILL_AT", None)
    if kill_at:
        env["KDLIB_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "kdlib", "prep", "--preset", "smoke", "--data-dir", str(folder)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kill_at", ["write:2"])  # after the data folder's marker, at the tokenizer's stamp: staging left behind
def test_killed_prep_then_a_rerun_leaves_no_staging_folder(smoke_data, tmp_path, kill_at):
    folder = tmp_path / "data"
    killed = _prep_cmd(folder, kill_at=kill_at)  # inside an atomic write: temporary file complete, not renamed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert any(p.name.startswith(".prep-") for p in folder.iterdir()), "the kill should leave a staging folder"
    again = _prep_cmd(folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removed .prep-" in again.stdout and "the staging folder of a killed prep" in again.stdout
    assert leftovers(folder) == []
    for split in SPLITS:  # and the data is the same as an uninterrupted prep's
        load_split(folder, split, verify=True)
        assert (folder / f"{split}.bin").read_bytes() == (smoke_data[0] / f"{split}.bin").read_bytes()


def _staging(folder: Path, name: str, **owner) -> Path:
    path = folder / name
    path.mkdir()
    (path / "train.bin").write_bytes(b"\0" * 4096)
    if owner:
        (path / "owner.json").write_text(json.dumps(owner))
    return path


def test_only_stale_staging_folders_that_kdlib_made_are_removed(tmp_path):
    from kdlib.prep import _boot_id, remove_stale_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host, boot = int(dead.stdout), socket.gethostname(), _boot_id()
    folder = tmp_path / "data"
    folder.mkdir()
    _staging(folder, ".prep-dead", pid=dead_pid, host=host, boot=boot)
    _staging(folder, ".prep-reboot", pid=os.getppid(), host=host, boot="another-boot")
    old = _staging(folder, ".prep-elsewhere-old", pid=1, host="another-vm", boot=None)
    for p in (old, *old.iterdir()):
        os.utime(p, (time.time() - 3 * 86400,) * 2)
    kept = {".prep-live": _staging(folder, ".prep-live", pid=os.getppid(), host=host, boot=boot),
            ".prep-elsewhere": _staging(folder, ".prep-elsewhere", pid=1, host="another-vm", boot=None),
            ".prep-no-owner": _staging(folder, ".prep-no-owner")}
    (folder / ".train.json.abc123.tmp").write_text("{}")  # kept: a live prep may be writing it
    lines = []
    remove_stale_staging(folder, lines.append)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, ".train.json.abc123.tmp"])
    text = "\n".join(lines)
    assert f"removed .prep-dead (0.0 MiB), the staging folder of a killed prep: its process {dead_pid} is gone" in text
    assert "removed .prep-reboot" in text and "restarted" in text
    assert "removed .prep-elsewhere-old" in text and "untouched for 72 hours" in text
    assert f"left .prep-live in {folder}: it is in use by process {os.getppid()}" in text
    assert "left .prep-elsewhere" in text and "another Colab session" in text
    assert "left .prep-no-owner" in text and "no readable owner file" in text
    for path in kept.values():
        shutil.rmtree(path)
    remove_stale_staging(folder, lines.append)  # no prep at work: its temporary files go too
    assert list(folder.iterdir()) == []


# --------------------------------------------------------------------------
# 3. token files checked at train and eval time


def _rewrite_manifest(folder: Path, name: str, **changes) -> dict:
    m = json.loads((folder / f"{name}.json").read_text())
    for k, v in changes.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    (folder / f"{name}.json").write_text(json.dumps(m))
    return m


def test_flipped_bytes_in_train_bin_are_refused_before_training(data_dir, tmp_path):
    path = data_dir / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # the size still fits: only the checksum can tell
    path.write_bytes(bytes(raw))
    with pytest.raises(KdlibError, match=r"train\.bin does not match the checksum \(SHA-256\) in its manifest "
                                         r"train\.json.*run `python -m kdlib prep` again"):
        run(small_cfg(), tmp_path / "run", data_dir)
    assert not (tmp_path / "run").exists()
    from kdlib.data import checked_split  # what eval calls

    with pytest.raises(KdlibError, match=r"train\.bin does not match the checksum"):
        checked_split(data_dir, "train", 512)


def test_a_manifest_that_lies_about_the_dtype_is_refused(data_dir, tmp_path):
    m = json.loads((data_dir / "train.json").read_text())
    _rewrite_manifest(data_dir, "train", dtype="uint32", tokens=m["tokens"] // 2)  # the size still fits
    with pytest.raises(KdlibError, match=r"train\.json is corrupt.*dtype is 'uint32', but prep stores the ids of "
                                         r"a 512-token tokenizer as uint16\); run prep again"):
        load_split(data_dir, "train")
    with pytest.raises(KdlibError, match="dtype is 'uint32'"):
        run(small_cfg(), tmp_path / "run", data_dir)
    assert not (tmp_path / "run").exists()


def test_an_id_outside_the_vocabulary_is_refused_naming_the_id_and_the_vocabulary(data_dir, tmp_path):
    path = data_dir / "train.bin"
    ids = np.fromfile(path, dtype=np.uint16)
    ids[100] = 600  # >= 512; and the manifest's checksum made to agree
    path.write_bytes(ids.tobytes())
    _rewrite_manifest(data_dir, "train", sha256=hashlib.sha256(ids.tobytes()).hexdigest())
    with pytest.raises(KdlibError, match=r"train\.bin holds token id 600, but the model's vocabulary has 512 "
                                         r"tokens \(ids 0\.\.511\)"):
        run(small_cfg(), tmp_path / "run", data_dir)
    assert not (tmp_path / "run").exists()
    from kdlib.data import checked_split  # what eval calls

    with pytest.raises(KdlibError, match="token id 600"):
        checked_split(data_dir, "train", 512)
    assert checked_split(data_dir, "train", 601).n_tokens == len(ids)  # a model with 601 tokens takes it


@pytest.mark.parametrize("key", ["dtype", "tokens", "sha256", "split", "texts", "chars"])
def test_a_manifest_missing_a_key_is_a_kdlib_error(data_dir, key):
    # dtype and tokens were caught before the fix; sha256 and split died with KeyError after training
    # (the teacher's perplexity, the cache), texts and chars with KeyError in prep's reuse
    from kdlib.runs import load_data as _load_data

    _rewrite_manifest(data_dir, "validation", **{key: None})
    with pytest.raises(KdlibError, match=rf"validation\.json is corrupt or from an older kdlib \(KeyError: "
                                         rf"'{key}' is missing\); run prep again"):
        _load_data(small_cfg(), data_dir, quiet)
    lines = []
    prepare(preset("smoke"), data_dir, log=lines.append)  # prep rebuilds it instead of reusing it
    assert [line.endswith("(reused)") for line in lines[1:]] == [True, False, True]
    _load_data(small_cfg(), data_dir, quiet)


def test_each_file_is_hashed_once_per_process_until_it_changes(data_dir, monkeypatch):
    import kdlib.data
    from kdlib.data import checked_split

    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(kdlib.data.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        checked_split(data_dir, "test", 512)
    assert len(calls) == 1
    path = data_dir / "test.bin"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(KdlibError, match="checksum"):
        checked_split(data_dir, "test", 512)
    assert len(calls) == 2


def test_perplexity_refuses_ids_outside_the_models_vocabulary(tiny_config):
    from kdlib.evaluate import perplexity
    from kdlib.models import TinyGPT

    model = TinyGPT(tiny_config())  # 97 tokens
    ids = np.arange(200) % 97
    ids[50] = 97
    with pytest.raises(KdlibError, match=r"range from 0 to 97, but the model has embeddings for ids 0\.\.96"):
        perplexity(model, ids, 32, 16)


# --------------------------------------------------------------------------
# 4. evaluation's block size and stride


def test_a_block_size_past_the_models_context_names_the_block_size(tiny_config):
    from kdlib.evaluate import perplexity
    from kdlib.models import TinyGPT

    model = TinyGPT(tiny_config())  # block_size 32
    with pytest.raises(KdlibError, match=r"block size 100000 is longer than the model's context of 32 tokens.*"
                                         r"at most 32 \(eval --block-size\)"):
        perplexity(model, np.arange(200) % 97, 100_000)


@pytest.mark.parametrize("stride", [0, -1, 33, True, 2.5, "8"])
def test_a_stride_that_is_not_a_step_is_refused(tiny_config, stride):
    from kdlib.evaluate import perplexity
    from kdlib.models import TinyGPT

    model = TinyGPT(tiny_config())
    with pytest.raises(KdlibError, match=rf"stride {stride!r} is not a window step: give a whole number of "
                                         r"tokens from 1 to the block size 32 \(eval --stride"):
        perplexity(model, np.arange(200) % 97, 32, stride)

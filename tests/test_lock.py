"""RunLock: one process per run folder. A lock left by another machine, another boot or an earlier
life of this PID is taken over with a log line; a live holder's is refused, naming the file.
(Two real processes on one run folder, one killed: test_resilience.py.)"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.lock import RunLock
from kdlib.train import train


def small_cfg(max_steps: int, eval_every: int):
    cfg = preset("smoke", "kl")
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = max_steps, eval_every, 1
    return cfg.validate()


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id():
    return BOOT_ID.read_text().strip() if BOOT_ID.is_file() else None


def _lock_json(**fields) -> str:
    base = {"pid": os.getppid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "started": "2026-01-01T00:00:00+0000"}
    return json.dumps({**base, **fields})


def _taken_over(capsys, lock: Path) -> str:
    """The one log line of a lock's takeover (RunLock logs with print by default)."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"taking over the lock {lock}: "), lines
    return lines[0]


def test_a_lock_records_pid_host_boot_and_start(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with RunLock(lock):
        held = json.loads(lock.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    assert held["boot_id"] == _boot_id()
    assert not lock.exists()


@pytest.mark.skipif(_boot_id() is None, reason="no boot id on this system")
def test_a_lock_of_another_boot_is_taken_over_though_its_pid_is_alive(tmp_path, capsys):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(_lock_json(boot_id="boot-before-the-restart"))  # its PID (our parent) is alive now
    with RunLock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "before this machine restarted" in _taken_over(capsys, lock)


def test_a_lock_of_another_host_is_taken_over(tmp_path, capsys):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(_lock_json(host="colab-vm-before-the-restart"))
    with RunLock(lock):
        pass
    line = _taken_over(capsys, lock)
    assert "another machine" in line and "colab-vm-before-the-restart" in line


def test_a_lock_of_a_live_process_on_this_boot_is_refused_naming_the_file(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    text = _lock_json()
    lock.write_text(text)
    with pytest.raises(KdlibError, match=rf"in use by process {os.getppid()} .*lock file {lock}.*If no process on "
                                         rf"any machine is training this run.*delete {lock}"):
        with RunLock(lock):
            pass
    assert lock.read_text() == text


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_a_lock_with_this_pid_that_this_process_does_not_hold_is_taken_over(tmp_path, data_dir, fmt):
    # The Colab case: the new kernel got the PID of the one that died with the old VM.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(os.getpid()) if fmt == "plain" else _lock_json(pid=os.getpid()))
    logs = []
    summary = train(small_cfg(max_steps=2, eval_every=2), run_dir, data_dir, progress=False, log=logs.append)
    assert summary["steps"] == 2 and not (run_dir / ".lock").exists()
    assert any("taking over the lock" in line and "earlier process" in line for line in logs)


def test_a_lock_this_process_holds_is_refused(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with RunLock(lock):
        held = lock.read_text()
        with pytest.raises(KdlibError, match=rf"in use by process {os.getpid()}"):
            with RunLock(lock):
                pass
        assert lock.read_text() == held  # the refused one left it alone
    assert not lock.exists()


def test_an_old_plain_pid_lock_of_a_live_process_is_refused_naming_the_file(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(str(os.getppid()))
    with pytest.raises(KdlibError, match=rf"in use by process {os.getppid()} .*lock file {lock}.*delete {lock}"):
        with RunLock(lock):
            pass
    assert lock.read_text() == str(os.getppid())


@pytest.mark.parametrize("garbage", ["", "not a pid", "-5", "0", "[1]", '{"pid": "12"}', '{"pid": true}',
                                     '{"host": "x"}', "\x00\xff", "99999999999999999999"])
def test_a_lock_with_garbage_is_taken_over(tmp_path, capsys, garbage):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_bytes(garbage.encode("latin-1"))
    with RunLock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    _taken_over(capsys, lock)

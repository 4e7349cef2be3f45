"""One process per run folder: ``RunLock``, a lock file that records its holder and is taken
over when that holder cannot be running (another boot, a gone process)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import KdlibError


class RunLock:
    """One process per run folder, across the machines that share it (Colab VMs on one Drive).

    The lock file records who holds it: ``{"pid", "host", "boot_id", "started"}`` (JSON). It is
    stale, and taken over with a log line, when its process cannot be running: the lock names
    another host or another boot of this one (a Colab runtime restarted: the old PID may now be
    any live process, even this kernel), or its PID is gone, or it is this process's PID but this
    process does not hold it (``_HELD``: a lock left by an earlier life of this PID). Plain-PID
    lock files of older versions and unreadable ones are read the same way (a PID alone; garbage
    is stale). The refusal names the lock file, which can be deleted by hand when no process on
    any machine is training the run. A lock of another host cannot be checked from here: it is
    taken over, so two machines must not train one run folder at the same time.
    """

    def __init__(self, path: Path, log: Callable[[str], None] = print):
        self.path, self.log, self.mine = Path(path), log, None

    def __enter__(self):
        # The folders this lock makes (the run's, and RESULTS/PRESET when new): a run refused before it
        # wrote anything leaves none of them behind.
        self.created = []
        folder = self.path.parent
        while not folder.exists():
            self.created.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_lock(self.path)
                why = _stale_because(holder, self.path)
                if why is None:
                    raise KdlibError(
                        f"run folder {self.path.parent} is in use by process {holder['pid']} "
                        f"({_describe(holder)}; lock file {self.path}); wait for it to finish, or stop it first. "
                        f"If no process on any machine is training this run (e.g. after a runtime restart), "
                        f"delete {self.path} and run again") from None
                self.log(f"taking over the lock {self.path}: {why}")
                self.path.unlink(missing_ok=True)
                continue
            self.mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            with os.fdopen(fd, "w") as f:
                f.write(self.mine + "\n")
            _HELD.add(_lock_key(self.path))
            return self
        raise KdlibError(f"cannot take the lock {self.path}; another process took it at the same moment: "
                         "run again")

    def __exit__(self, *exc):
        _HELD.discard(_lock_key(self.path))
        try:  # only our own lock: one taken over from us (wrongly judged stale) stays its holder's
            if self.path.read_text().strip() == self.mine:
                self.path.unlink()
        except OSError:
            pass
        for folder in getattr(self, "created", []):  # innermost first; a run refused early leaves none
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run's files


_HELD: set = set()  # the locks this process holds (RunLock), by real path


def _lock_key(path: Path) -> str:
    return os.path.realpath(path)


def _boot_id() -> Optional[str]:
    """This boot of this machine (Linux), or None where it cannot be read."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _read_lock(path: Path) -> Optional[dict]:
    """A lock file's holder: a dict with an int ``pid`` (and host, boot_id, started when recorded),
    from a JSON lock or an older plain-PID one; None when unreadable or not a lock."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, int) and not isinstance(obj, bool):
        obj = {"pid": obj}  # older kdlib: the PID alone
    if not isinstance(obj, dict) or isinstance(obj.get("pid"), bool) or not isinstance(obj.get("pid"), int) \
            or obj["pid"] <= 0:
        return None
    return {k: obj.get(k) for k in ("pid", "host", "boot_id", "started")}


def _stale_because(holder: Optional[dict], path: Path) -> Optional[str]:
    """Why a lock's holder cannot be running (the log line's reason), or None if it may be."""
    if holder is None:
        return "it is not a readable lock"
    pid, host, boot = holder["pid"], holder["host"], holder["boot_id"]
    if host is not None and host != socket.gethostname():
        return f"it was taken by process {pid} on another machine ({_describe(holder)})"
    if boot is not None and _boot_id() is not None and boot != _boot_id():
        return f"it was taken by process {pid} before this machine restarted ({_describe(holder)})"
    if pid == os.getpid():
        if _lock_key(path) in _HELD:
            return None
        return f"it holds this process's PID {pid}, from an earlier process (this one does not hold it)"
    if not _alive(pid):
        return f"its process {pid} is gone"
    return None


def _describe(holder: dict) -> str:
    if holder.get("host") is None:
        return "a lock of an older kdlib, without its machine"
    return f"host {holder['host']}, started {holder.get('started')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


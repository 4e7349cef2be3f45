"""Atomic file writes and small JSON helpers.

Every file kdlib writes goes through a temporary file in the same folder,
flushed and fsynced, then renamed over the target: a crash or a Colab
disconnect leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import sys
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from . import faults
from .errors import KdlibError

PathLike = Union[str, Path]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are ordinary files
        faults.point("write")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def store_derived(path: PathLike, obj, what: str) -> bool:
    """Write ``obj`` as JSON to ``path`` atomically, where it is a file kdlib derives and can measure
    again (the teacher's numbers beside a data folder's splits): a folder that refuses it (read-only)
    gives a note on stderr, not an error that would end the finished work it came from. True when
    written."""
    try:
        atomic_write_json(path, obj)
        return True
    except OSError as e:
        print(f"note: not stored: {what} in {path} ({e.strerror or e}); this run reports its own measurement, "
              "and the next one measures it again", file=sys.stderr)
        return False


def read_json(path: PathLike, what: str = "file") -> dict:
    """Read a JSON object, or raise ``KdlibError`` naming the file and what to do."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO or a device: a read could block
        raise KdlibError(f"{what} {path} is not a regular file; give the path of a file kdlib wrote")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdlibError(f"{what} {path} does not exist") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise KdlibError(f"{what} {path} cannot be read ({e.strerror}): give the path of a readable file") from None
    except RecursionError:
        raise KdlibError(f"{what} {path} is nested too deeply to be a kdlib file; it is not one of ours "
                         "(or is corrupt)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KdlibError(f"{what} {path} is unreadable or corrupt ({e}); delete it to rebuild") from None
    if not isinstance(obj, dict):
        raise KdlibError(f"{what} {path} is not a JSON object; delete it to rebuild")
    return obj


def read_jsonl(path: PathLike, warn: bool = True) -> list[dict]:
    """The JSON objects of a JSON-lines file (e.g. metrics.jsonl). A line that does not parse (the
    half-written last line of a killed run) is skipped, with a warning unless ``warn`` is False
    (a reader polling a file that is being written); the rest is returned."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip() and warn:
            warnings.warn(f"{path}: line {number} is not a JSON object (an interrupted write?); skipped",
                          stacklevel=2)
    return rows


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_run_folder(run_dir: PathLike, results_dir: PathLike | None = None) -> Path:
    """``run_dir`` as a run folder inside ``results_dir``, checked before anything touches it.

    kdlib writes, appends to and deletes files in a run folder (its config, metrics, student,
    lock, leftover ``.*.tmp`` files). Through a symbolic link that would happen in the link's
    target, anywhere on the machine, so the run folder and every folder between it and its
    results folder must be real folders (the results folder itself and the folders above it may be
    links: on Colab, Drive is one). Refused, with nothing created or deleted: a run folder outside
    its results folder (or with ``..`` in it), one that is a symbolic link or has one inside the
    results folder, and one that is a file. ``results_dir`` None: the folder the run folder is in.
    Returns ``run_dir`` as a ``Path``.
    """
    run = Path(run_dir)
    root = Path(results_dir) if results_dir is not None else run.absolute().parent
    try:
        rel = run.absolute().relative_to(root.absolute())
    except ValueError:
        rel = None
    if rel is None or not rel.parts or ".." in rel.parts:
        raise KdlibError(f"run folder {run} is not a folder inside its results folder {root}; give a run "
                         "folder inside it (without '..'); nothing was changed")
    here = root
    for part in rel.parts:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            break  # nothing deeper exists yet: kdlib creates real folders
        except OSError as e:
            raise KdlibError(f"cannot read {here} ({e}); nothing was changed") from None
        if stat.S_ISLNK(st.st_mode):
            raise KdlibError(f"{here} is a symbolic link (to {os.readlink(here)}); kdlib refuses it, since it "
                             f"leads outside the results folder {root} and kdlib would write and delete files "
                             "there. Use a real folder (move the run's files into one), or give the link's "
                             "target as the results folder; nothing was changed")
        if not stat.S_ISDIR(st.st_mode):
            raise KdlibError(f"{here} is a file, not a folder, so it cannot hold a run; move it away or use "
                             "another results folder; nothing was changed")
    return run


def refuse_links(paths, what: str = "run folder") -> None:
    """Refuse if any of ``paths`` is a symbolic link: kdlib writes, appends to or deletes these files,
    which through a link would change the link's target (a file anywhere on the machine)."""
    for p in paths:
        if Path(p).is_symlink():
            raise KdlibError(f"{p} is a symbolic link (to {os.readlink(p)}); kdlib writes and deletes this "
                             f"{what}'s files itself and refuses to follow a link out of it. Replace the link "
                             "with the file itself (or delete it); nothing was changed")

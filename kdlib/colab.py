"""Where a notebook runs and where its files go: Colab or not, Google Drive, the folders, the GPU.

On Colab the results and the data go to Google Drive (each notebook runs on its own machine: Drive is
how 01's data reaches 02 and 03), the top-k cache and the resume state to the runtime's own disk;
elsewhere the CLI's folders (``data/PRESET``, ``runs``, ``figures``). ``folders`` resolves one
notebook's parameters, mounting Drive once; ``check_runtime`` says what this runtime is and stops a
GPU preset on a runtime without one.

::

    f = kdlib.colab.folders("colab-t4", data_dir="", results_dir="")   # "" = the default
    kdlib.colab.check_runtime("colab-t4", needs_gpu=True)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .config import PRESETS, preset as make_preset
from .errors import KdlibError, choices
from .launch import BUDGET_MIB, RunFolders

PathLike = Union[str, Path]

# Colab's working folder, the runtime's own disk (KDLIB_COLAB_CONTENT moves it: the tests' simulated Colab).
CONTENT = Path(os.environ.get("KDLIB_COLAB_CONTENT", "/content"))
DRIVE = CONTENT / "drive"  # where Colab mounts Google Drive
# The runtime's disk for the resume state (several times the student) of presets that name none.
COLAB_RESUME_DIR = str(CONTENT / "kdlib-local" / "resume")
COLAB_CACHE_DIR = CONTENT / "kdlib-cache"  # the top-k cache: GBs, the runtime's disk, never Drive
# The presets the notebooks and the panel offer. Not "demo": it trains its own
# teacher first (`python -m kdlib demo`), which a notebook run does not.
NOTEBOOK_PRESETS = ("smoke", "colab-t4", "colab-a100", "study")
# The presets made for a GPU (a CPU would take days), and the GPU each was sized for.
GPU_PRESETS = {"colab-t4": "T4", "colab-a100": "A100", "study": "A100"}
CHANGE_RUNTIME = "Runtime -> Change runtime type -> Hardware accelerator"

# Where everything goes on Colab, with sizes: docs/colab.md and 01_data_prep show this table (one text).
DRIVE_LAYOUT = """\
| where | what | size |
|---|---|---|
| `MyDrive/kdlib/PRESET/RUN/` (Drive) | per run `config.json`, `metrics.jsonl`, `summary.json` | ~25-65 KiB a run |
| `MyDrive/kdlib/PRESET/RUN/student.safetensors` (Drive) | the best finished run's student only (fp16) | 97 MiB (study's TinyGPT) |
| `MyDrive/kdlib-data/PRESET/` (Drive) | token files of 01 | ~240 MB for WikiText-103 (colab presets), ~4 MB study, <1 MB smoke |
| `MyDrive/kdlib-figures/` (Drive) | 04's tables and figures (PNG + PDF) | a few MB |
| `/content/kdlib-local/` (runtime disk) | every student and the running run's resume state | ~100 MiB a student, ~610 MiB resume |
| `/content/kdlib-cache/PRESET/` (runtime disk) | 02's top-k cache (optional) | ~15 GB for WikiText-103 |

The results folder (`MyDrive/kdlib`) is held to 100 MiB (`plan` checks it before a run starts); the data
folder is outside that budget. The runtime's disk survives a closed browser tab, not a recycled runtime."""



# --------------------------------------------------------------------------
# where things live


def on_colab() -> bool:
    """True inside Google Colab (its ``google.colab`` module is loaded or importable)."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no ``google`` package at all
        return False


def _mount(fix: str) -> Path:
    """Mount Google Drive (once: Colab's mount is a no-op when mounted); ``fix`` says which of the
    notebook's parameters to set instead when the mount fails."""
    if (DRIVE / "MyDrive").is_dir():  # mounted already (a second mount would print, or prompt)
        return DRIVE / "MyDrive"
    try:
        from google.colab import drive

        drive.mount(str(DRIVE))
    except Exception as e:
        raise KdlibError(
            f"Google Drive could not be mounted at {DRIVE} ({type(e).__name__}: {e}). Re-run this cell and "
            "accept the authorisation prompt (choose your Google account and allow access to Google "
            f"Drive), or keep the files on this runtime's disk instead: {fix} (they are lost when the "
            "runtime is recycled).") from e
    return DRIVE / "MyDrive"


def drive_folder(name: str, fix: str = "give a local folder (e.g. results_dir = '/content/runs')") -> Path:
    """``MyDrive/name`` on Colab's Google Drive, mounting Drive first (created if missing)."""
    folder = _mount(fix) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def results_folder(name: str = "kdlib", local: PathLike = "runs") -> Path:
    """Where runs are kept: ``/content/drive/MyDrive/NAME`` on Colab (Drive mounted), else ``local``.

    On Colab a failed mount raises ``KdlibError`` saying how to fix it.
    """
    return drive_folder(name) if on_colab() else Path(local)


def data_folder(preset: str, data_dir: Optional[PathLike] = None, drive_name: str = "kdlib-data",
                create: bool = True) -> Path:
    """A preset's prepared-data folder: ``data_dir`` if given, else ``data/PRESET`` (the CLI's default)
    or, on Colab, ``MyDrive/kdlib-data/PRESET``: each Colab notebook runs on its own machine, so data
    that 01 prepares reaches 02 and 03 only through Drive. ``create=False``: name it, make nothing."""
    if preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {choices(PRESETS)}")
    if data_dir:
        return Path(data_dir)
    if not on_colab():
        return Path("data") / preset
    fix = f"set data_dir = '/content/kdlib-data/{preset}'"
    return drive_folder(f"{drive_name}/{preset}", fix) if create else _mount(fix) / drive_name / preset


def cache_folder(preset: str, data_dir: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """The top-k cache's folder: ``cache_dir`` if given; on Colab ``/content/kdlib-cache/PRESET`` (the
    runtime's disk: GBs that Drive cannot hold); elsewhere ``DATA_DIR/cache``, as the CLI."""
    if cache_dir:
        return Path(cache_dir)
    return COLAB_CACHE_DIR / preset if on_colab() else Path(data_dir) / "cache"


# The folders a notebook names: parameter -> (Drive folder, local folder; PRESET filled in).
_FOLDERS = {
    "data_dir": ("kdlib-data/{preset}", "data/{preset}", "/content/kdlib-data/{preset}"),
    "results_dir": ("kdlib", "runs", "/content/runs"),
    "figures_dir": ("kdlib-figures", "figures", "/content/figures"),
    "cache_dir": (None, None, "/content/kdlib-cache/{preset}"),  # never on Drive by default
}


@dataclass
class Folders:
    """The folders of one notebook, resolved (see ``folders``); ``None`` for those it does not use."""
    data_dir: Optional[Path] = None
    results_dir: Optional[Path] = None
    figures_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None

    def __str__(self) -> str:
        rows = []
        for name in ("data_dir", "results_dir", "figures_dir", "cache_dir"):
            path = getattr(self, name)
            if path is not None:
                rows.append(f"  {name:<12} {path}  ({medium(path)})")
        return "folders:\n" + "\n".join(rows)

    def run_folders(self, preset: str, budget_mib: float = BUDGET_MIB) -> RunFolders:
        """Where a run of ``preset`` reads and writes: these folders, with ``data_folder``'s and
        ``cache_folder``'s defaults for those this notebook does not name."""
        data_dir = data_folder(preset, self.data_dir)
        return RunFolders(self.results_dir, data_dir, cache_folder(preset, data_dir, self.cache_dir), budget_mib)


def medium(path: Path) -> str:
    """Where ``path`` lies, as a notebook says it: Google Drive, the runtime's disk, the local disk."""
    if _under(path, DRIVE):
        return "Google Drive"
    return "this runtime's disk: lost when it is recycled" if on_colab() else "local disk"


def folders(preset: Optional[str] = None, *, data_dir: Optional[PathLike] = None,
            results_dir: Optional[PathLike] = None, figures_dir: Optional[PathLike] = None,
            cache_dir: Optional[PathLike] = None) -> Folders:
    """Resolve the folders a notebook's parameters name, mounting Google Drive once if one needs it.

    Each argument is a notebook parameter: ``None`` = this notebook has no such parameter; ``""`` =
    the default (on Colab ``MyDrive/kdlib-data/PRESET``, ``MyDrive/kdlib``, ``MyDrive/kdlib-figures``
    on Drive and ``/content/kdlib-cache/PRESET`` on the runtime's disk; elsewhere ``data/PRESET``,
    ``runs``, ``figures`` and ``DATA_DIR/cache``, the CLI's); a path = that folder. When Drive cannot
    be mounted, the error names exactly this notebook's parameters to set instead.
    """
    if preset is not None and preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {choices(NOTEBOOK_PRESETS)}")
    given = {"data_dir": data_dir, "results_dir": results_dir, "figures_dir": figures_dir, "cache_dir": cache_dir}
    given = {k: (None if v is None else str(v).strip()) for k, v in given.items()}
    fill = {"preset": preset or "PRESET"}
    paths = {k: Path(v).expanduser() for k, v in given.items() if v}
    colab = on_colab()
    defaults = [k for k, v in given.items() if v == "" and k != "cache_dir"]  # the cache never goes to Drive
    on_drive = [k for k, p in paths.items() if _under(p, DRIVE)]
    mydrive = None
    if colab and (defaults or on_drive):
        fix = "set " + " and ".join(f"{k} = '{_FOLDERS[k][2].format(**fill)}'" for k in defaults + on_drive) \
            + " in the parameters cell"
        mydrive = _mount(fix)
    for name in defaults:
        if colab:
            paths[name] = mydrive / _FOLDERS[name][0].format(**fill)
            paths[name].mkdir(parents=True, exist_ok=True)
        else:
            paths[name] = Path(_FOLDERS[name][1].format(**fill))
    if given["cache_dir"] is not None and "cache_dir" not in paths:
        paths["cache_dir"] = cache_folder(preset or "PRESET", paths.get("data_dir", Path("data") / fill["preset"]))
    for name, path in paths.items():
        blocked = next((p for p in (path, *path.absolute().parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            where = "is a file" if blocked == path else f"is inside {blocked}, a file"
            raise KdlibError(f"{name} = {str(path)!r} {where}, not a folder; give a folder")
    return Folders(**paths)


def _under(path: Path, folder: Path) -> bool:
    try:
        Path(path).absolute().relative_to(Path(folder).absolute())
        return True
    except ValueError:
        return False


def default_resume_dir(preset: str) -> Optional[str]:
    """Where a notebook run keeps its resume state: the preset's folder (the working folder's local
    disk for the study-sized presets); on Colab, for the others, the runtime's disk: the state is several
    times the student's size and would not fit a 100 MB Drive budget. None = the run folder."""
    return make_preset(preset).train.resume_dir or (COLAB_RESUME_DIR if on_colab() else None)


# --------------------------------------------------------------------------
# the runtime


def runtime_report(preset: Optional[str] = None) -> tuple[str, list[str]]:
    """(what this runtime is, problems for ``preset``): Colab or not, the GPU, its memory and bf16
    support, the versions that matter, and what the preset will run in (its precisions)."""
    import platform

    import torch
    import transformers

    lines = [f"runtime: {'Google Colab' if on_colab() else 'not Colab (' + platform.system() + ')'}, "
             f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}"]
    problems = []
    gpu = torch.cuda.is_available()
    if gpu:
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.get_device_capability(0)[0] >= 8
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 in hardware: "
                     f"{'yes' if bf16 else 'no (emulated, slow)'}")
    else:
        bf16 = False
        lines.append(f"GPU: none (CPU only, {os.cpu_count()} cores)")
    if preset is not None:
        from .models import resolve_teacher_dtype
        from .optim import mixed_precision

        cfg = make_preset(preset)
        names = {"no": "fp32", "fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast",
                 "auto": "bf16/fp16 autocast on a GPU"}
        student, here = names[cfg.train.precision], names[mixed_precision(cfg.train.precision)]
        student += "" if here == student else " (fp32 on this runtime's CPU)"
        teacher = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[
            str(resolve_teacher_dtype(cfg.teacher.dtype, "cuda" if gpu else "cpu")).replace("torch.", "")]
        made_for = f", made for one {GPU_PRESETS[preset]}" if preset in GPU_PRESETS else ", made for a CPU"
        lines.append(f"preset {preset}: student in {student}, teacher in {teacher}{made_for}")
        if preset in GPU_PRESETS and not gpu:
            where = (f"choose {CHANGE_RUNTIME} -> {GPU_PRESETS[preset]} GPU -> Save, then Runtime -> Run all"
                     if on_colab() else "run it on a machine with a CUDA GPU")
            problems.append(f"preset {preset} trains on a GPU and this runtime has none (a CPU would take "
                            f"days): {where}; or set preset = 'smoke' to try the notebooks on a CPU")
        elif gpu and cfg.train.precision == "bf16" and not bf16:
            problems.append(f"preset {preset} trains in bf16, which this GPU ({props.name}) only emulates, "
                            "slowly: choose preset 'colab-t4' (fp16) for this GPU, or an A100 runtime "
                            f"({CHANGE_RUNTIME})")
    return "\n".join(lines), problems


def check_runtime(preset: Optional[str] = None, needs_gpu: bool = False, log: Callable[[str], None] = print) -> str:
    """Print where this notebook runs (``runtime_report``); with ``needs_gpu`` (the notebooks that train
    or run the teacher) a GPU preset on a runtime without a GPU, or bf16 on a GPU without it, stops here
    with ``KdlibError`` saying how to choose a GPU; otherwise such problems are printed as warnings."""
    text, problems = runtime_report(preset)
    log(text)
    if problems and needs_gpu:
        raise KdlibError("; ".join(problems))
    for problem in problems:
        log(f"note: this notebook needs no GPU, but 02 and 03 with this preset do: {problem}")
    return text

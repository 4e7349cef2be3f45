"""Student checkpoints (fp16 safetensors) and resume state: the files a run saves.

- ``save_student``/``load_student``: one float16 ``.safetensors`` file, tied
  weights stored once, no projectors or optimizer, the model config in the
  file's metadata so the file alone rebuilds the model. The study's student
  (50,951,680 parameters) is about 97 MiB this way; its float32 copy (194 MiB)
  would not fit the 100 MiB of Drive the researcher has.
- ``save_resume``/``load_resume``: everything needed to continue a run
  (optimizer, scheduler, RNG states, sampler position, step, best metric) as
  tensors in a safetensors file plus a JSON structure. Nothing is ever loaded
  with pickle.

Every write takes an optional ``StorageBudget`` (``kdlib.storage``, also
importable from here) and is refused before it would exceed it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .config import TinyGPTConfig
from .config.strict import build
from .errors import KdlibError
from .fileio import PathLike, atomic_write_bytes
from .models import TinyGPT
from .storage import MiB, StorageBudget  # noqa: F401 (MiB: re-exported, imported from here across kdlib)

STUDENT_FORMAT = "kdlib.student/1"
RESUME_FORMAT = "kdlib.resume/1"


def _write(path: PathLike, data: bytes, budget: Optional[StorageBudget]) -> None:
    if budget is not None:
        budget.write_bytes(path, data)
    else:
        atomic_write_bytes(path, data)


# --------------------------------------------------------------------------
# student weights


def save_student(model: TinyGPT, path: PathLike, budget: Optional[StorageBudget] = None, **meta) -> int:
    """Write ``model`` as one float16 safetensors file; returns its size in bytes.

    ``meta`` (experiment name, step, metrics, ...) must be JSON-serialisable;
    it is stored in the file's metadata next to the model config.
    """
    if not isinstance(model, TinyGPT):
        raise KdlibError(f"save_student takes a TinyGPT, got {type(model).__name__}")
    tied = model.config.tie_embeddings
    tensors = {}
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":  # the same tensor as wte.weight: stored once
            continue
        half = value.detach().to("cpu", torch.float16).contiguous()
        if not torch.isfinite(half).all():
            raise KdlibError(f"parameter {name} does not fit float16 (|value| > 65504 or not finite); "
                             "the model diverged: keep the last good checkpoint")
        tensors[name] = half
    try:
        meta_json = json.dumps(meta)
    except TypeError as e:
        raise KdlibError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    metadata = {"format": STUDENT_FORMAT, "kdlib_version": __version__,
                "model_config": json.dumps(dataclasses.asdict(model.config)), "meta": meta_json}
    data = st_save(tensors, metadata=metadata)
    _write(path, data, budget)
    return len(data)


def _open_metadata(path: Path, expected_format: str, what: str) -> dict:
    if not path.is_file():
        raise KdlibError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise KdlibError(f"{path} is not a readable safetensors file ({e}); it may be truncated, "
                         "corrupt or a pickle (kdlib never unpickles files). Delete it and save again "
                         "or use an earlier checkpoint") from None
    if metadata.get("format") != expected_format:
        raise KdlibError(f"{path} is a safetensors file but not a kdlib {what} (format "
                         f"{metadata.get('format')!r}, expected {expected_format!r})")
    return metadata


def student_metadata(path: PathLike) -> dict:
    """The metadata of a student file: ``model_config`` (dict), ``kdlib_version`` and ``meta`` (dict)."""
    md = _open_metadata(Path(path), STUDENT_FORMAT, "student checkpoint")
    try:
        return {"model_config": json.loads(md["model_config"]), "kdlib_version": md.get("kdlib_version"),
                "meta": json.loads(md.get("meta", "{}"))}
    except (KeyError, json.JSONDecodeError) as e:
        raise KdlibError(f"student checkpoint {path} has corrupt metadata ({e})") from None


# A student file's metadata is read before its tensors: a model it claims that is larger than this
# is refused before anything is built (the study's student has 51M parameters).
MAX_STUDENT_PARAMETERS = 10**10


def model_parameters(config: TinyGPTConfig) -> int:
    """A TinyGPT's parameter count from its config alone (tied embeddings counted once; biases
    counted even when ``bias`` is off: an upper bound then), with no allocation."""
    m = config
    per_block = 4 * m.n_embd * m.n_embd + 2 * m.n_embd * m.d_ff + 9 * m.n_embd + m.d_ff
    return m.vocab_size * m.n_embd * (1 if m.tie_embeddings else 2) + m.n_layer * per_block + 2 * m.n_embd \
        + (m.block_size * m.n_embd if m.positions == "learned" else 0)


def expected_tensors(config: TinyGPTConfig) -> dict[str, tuple]:
    """The names and shapes of the tensors a student file of ``config`` holds, with nothing allocated:
    one block built on the meta device, repeated ``n_layer`` times (the blocks are alike)."""
    with torch.device("meta"):
        one = TinyGPT(dataclasses.replace(config, n_layer=1))
    shapes = {k: tuple(v.shape) for k, v in one.state_dict().items()
              if not (config.tie_embeddings and k == "lm_head.weight")}
    block = {k[len("h.0."):]: v for k, v in shapes.items() if k.startswith("h.0.")}
    out = {k: v for k, v in shapes.items() if not k.startswith("h.")}
    for i in range(config.n_layer):
        out.update({f"h.{i}.{k}": v for k, v in block.items()})
    return out


def _header(path: Path) -> dict[str, tuple]:
    """{name: (shape, dtype)} of a safetensors file, from its header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise KdlibError(f"cannot read the tensors' header in {path} ({e}); the file is corrupt") from None


def load_student(path: PathLike, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, expect: Optional[TinyGPTConfig] = None) -> TinyGPT:
    """Rebuild a TinyGPT from a file written by ``save_student`` (weights cast to ``dtype``).

    With ``expect``, a checkpoint of another model config is refused. The file is untrusted: the
    model its metadata claims is bounded (``MAX_STUDENT_PARAMETERS``) and compared with the
    tensors its header lists (names, shapes, float16) before the model is built, so a small file
    cannot make kdlib allocate a huge one.
    """
    path = Path(path)
    info = student_metadata(path)
    config = build(TinyGPTConfig, info["model_config"], f"{path.name}: model_config")
    if expect is not None and config != expect:
        diff = {k: (getattr(config, k), getattr(expect, k)) for k in dataclasses.asdict(config)
                if getattr(config, k) != getattr(expect, k)}
        raise KdlibError(f"{path} holds a student of another shape: " +
                         ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in diff.items()))
    n_params = model_parameters(config)
    if n_params > MAX_STUDENT_PARAMETERS:
        raise KdlibError(f"{path} claims a student of {n_params:,} parameters, over the {MAX_STUDENT_PARAMETERS:,} "
                         "kdlib loads; its metadata is corrupt or it is not a kdlib student. Nothing was loaded")
    header = _header(path)
    if config.n_layer > len(header):  # every block has tensors: checked before listing n_layer blocks
        raise KdlibError(f"{path} claims {config.n_layer:,} blocks but holds {len(header)} tensors: it does not "
                         "match its own model config; the file is corrupt")
    expected = expected_tensors(config)
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    wrong = sorted(k for k in expected.keys() & header.keys() if header[k][0] != expected[k])
    not_fp16 = sorted(k for k in expected.keys() & header.keys() if header[k][1] != "F16")
    if missing or extra or wrong or not_fp16:
        raise KdlibError(f"{path} does not match its own model config: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, wrong shape {wrong[:3]}"
                         + (f", not float16 {not_fp16[:3]}" if not_fp16 else "") + "; the file is corrupt")
    model = TinyGPT(config)
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise KdlibError(f"cannot read the weights in {path} ({e}); the file is truncated or corrupt") from None
    model.load_state_dict(tensors, strict=False)  # lm_head is tied to wte, and loaded with it
    return model.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------
# resume state


def _encode(obj: Any, tensors: dict, key: str):
    """JSON structure for ``obj``; tensors go to ``tensors`` under numbered names (``key`` is for errors)."""
    if isinstance(obj, torch.Tensor):
        # A tensor reachable twice (tied embeddings: wte.weight is lm_head.weight) is stored once.
        memo = tensors.setdefault("__memo__", {})
        ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), tuple(obj.stride()), obj.device.type)
        if obj.numel() and ident in memo:
            return {"__tensor__": memo[ident]}
        name = f"t{len(tensors) - 1}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        memo[ident] = name
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.ravel().tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}.k{i}"), _encode(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise KdlibError(f"cannot store a {type(obj).__name__} at {key!r} in a resume state; "
                     "use tensors, arrays, numbers, strings, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_resume(path: PathLike, state: dict, budget: Optional[StorageBudget] = None) -> int:
    """Write a resume state (nested dicts/lists/tuples of tensors, arrays and JSON values) atomically."""
    tensors: dict = {}
    structure = _encode(state, tensors, "state")
    tensors.pop("__memo__", None)
    data = st_save(tensors, metadata={"format": RESUME_FORMAT, "kdlib_version": __version__,
                                      "state": json.dumps(structure)})
    _write(path, data, budget)
    return len(data)


def load_resume(path: PathLike) -> dict:
    """Read a resume state written by ``save_resume``."""
    path = Path(path)
    md = _open_metadata(path, RESUME_FORMAT, "resume state")
    try:
        tensors = st_load(path.read_bytes())
        return _decode(json.loads(md["state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise KdlibError(f"resume state {path} is corrupt ({e}); a run cannot continue from it") from None

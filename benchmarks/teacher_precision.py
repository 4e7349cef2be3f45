"""Which dtype should the frozen teacher run in: fp32, fp16 or bf16? Fidelity against fp32.

    python benchmarks/teacher_precision.py --out /tmp/teacher-precision    # ~2 min on 2 idle CPU cores
    python benchmarks/teacher_precision.py --teacher DIR --out OUT         # reuse a trained teacher
    python benchmarks/teacher_precision.py --teacher gpt2 --data data/study --block 128 --offset none \
        --max-windows 100

The last measures GPT-2 small itself (its weights and ``python -m kdlib prep
--preset study`` data needed; 100 windows keep each [N, 50,257] float32 copy
of the logits at 2.6 GB of host memory); ``--device auto`` (the default)
takes a GPU when there is one.

GPT-2 small's logits carry a large common negative offset (about -65 on
average; every logit of a position shares it, so softmax ignores it) on top of
a per-position spread of a few units. Half precision rounds a logit relative to
its magnitude, so at |logit| ~ 65 bf16 (8 significant bits: a step of 0.25 in
[32, 64) and 0.5 in [64, 128)) moves each logit by up to 0.125-0.25, a change
of up to 13-28% in a probability; fp16 (11 bits) is 8x finer.

There are no GPT-2 weights offline, so the default teacher is a stand-in: the
demo's GPT-2-architecture model (``transformers.GPT2LMHeadModel``, 4 x 160,
trained on Python's documentation by ``kdlib.demo.train_teacher``), given
GPT-2's logit geometry by an edit that is exact in exact arithmetic:

* ``lm_head`` is untied from ``wte`` (the input embeddings stay as trained).
* q = 1 / ln_f.weight (elementwise) is a direction along which the final
  LayerNorm's output y has the same component at every position: y = g*n + b
  with n of zero mean, so y.q = sum(n) + b.q = b.q. With q^ = q/|q|, each
  lm_head row is split as w_v = w_v_perp + (w_v.q^) q^.
* ln_f.bias gets + (K - b.q^) q^, so y.q^ = K at every position, and the
  lm_head rows become s * w_v_perp + s_v q^, s_v = (s (w_v.q^)(b.q^) + c) / K.
  Then every logit becomes s * logit + c exactly: c shifts every logit of every
  position by the same amount (softmax unchanged), s scales the spread
  (``--spread-std``; by default s = 1 and the distribution is unchanged).
  Every lm_head row shares a component ~ c/K along q^ (a shared direction of
  the output embedding matrix, as in GPT-2, of norm ``--shared-norm`` x the
  rows' median norm), and the final hidden state has a large constant
  component K along it: that product is the offset.
* c is chosen so that the mean logit over the measured windows is ``--offset``
  (default -65, the figure this project measured on GPT-2 small).

The edit is done in float64; the float32 model after it is the reference, and
the fp16 / bf16 copies are that same model cast (``model.to(dtype)``). Every
variant sees the same windows (non-overlapping, block tokens each, with the
next token as target) and its logits are cast to float32 before any softmax.
Metrics per position, against the fp32 reference, at T = 1 and T = 2:
KL(p_fp32 || p_dtype) (mean and max), total variation distance, the relative
error of the probability of fp32's top-1 token and of the target token, top-1
agreement, and the centred RMS error of the logits (the part softmax sees).
Perplexity is ``kdlib.evaluate.perplexity`` (stride = block). The "logits to
fp16/bf16" rows round only the fp32 model's final logits, which separates the
rounding of the logits from the rounding inside the network; "fp32 lm_head"
runs the network in fp16/bf16 and the final projection in float32 (the
network's rounding alone); "centred lm_head" subtracts the mean row from
lm_head (untied) before the cast, which removes each position's mean logit
exactly (softmax unchanged) so the offset is never rounded; the fp64 row is
fp32's own error (its KL floor, ~1e-9 mean and ~1e-6 max, is float32
log_softmax's). Forward hooks record the largest finite activation magnitude
and any inf/NaN in every module's output.

Writes ``teacher_precision.md`` and ``teacher_precision.json`` into ``--out``
(which also holds the prepared data and the trained teacher).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The kdlib beside this script, not whichever one is installed (as benchmarks/gpu_session.sh does).
_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "kdlib" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEMPERATURES = (1.0, 2.0)


# --------------------------------------------------------------------------
# the machine


def machine(device: torch.device) -> dict:
    import transformers

    import kdlib

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        root = Path(kdlib.__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "kdlib"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem,
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "kdlib": kdlib.__version__,
           "kdlib_path": str(Path(kdlib.__file__).parent), "git_commit": commit,
           "kdlib_tree_modified": dirty, "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


# --------------------------------------------------------------------------
# the teacher and its GPT-2-like logit geometry


def get_teacher(args, log) -> tuple[str, Path]:
    """(teacher name or folder, prepared data folder)."""
    from kdlib.config import preset
    from kdlib.prep import prepare

    out = Path(args.out)
    if args.data is not None:
        data_dir = Path(args.data)
    else:
        data_dir = out / "data"
        prepare(preset("demo"), data_dir, log=log)
    if args.teacher is not None:
        return args.teacher, data_dir
    from kdlib.demo import train_teacher

    t0 = time.perf_counter()
    folder = train_teacher(preset("demo"), data_dir, out / "teacher", steps=args.teacher_steps, log=log,
                           progress=False)
    log(f"teacher ready in {time.perf_counter() - t0:.0f} s")
    return str(folder), data_dir


def load_model(name: str) -> nn.Module:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(name, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def untie(model: nn.Module) -> None:
    """Give lm_head its own copy of the weights, so editing it leaves the input embeddings alone."""
    if model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


def geometry(logits: torch.Tensor, chunk: int = 1024) -> dict:
    """Where the logits sit: [N, V] float (in chunks of positions, so GPT-2's vocabulary fits)."""
    parts: dict[str, list] = {}
    for i in range(0, len(logits), chunk):
        x = logits[i:i + chunk].double()
        for name, v in (("mean", x.mean(-1)), ("std", x.std(-1)), ("top", x.max(-1).values),
                        ("min", x.min(-1).values), ("ge64", (x.abs() >= 64).double().mean(-1)),
                        ("ge32", (x.abs() >= 32).double().mean(-1))):
            parts.setdefault(name, []).append(v)
    a = {k: torch.cat(v) for k, v in parts.items()}
    return {"mean": float(a["mean"].mean()), "per_position_std": float(a["std"].mean()),
            "per_position_mean_min": float(a["mean"].min()), "per_position_mean_max": float(a["mean"].max()),
            "top1_mean": float(a["top"].mean()), "min": float(a["min"].min()), "max": float(a["top"].max()),
            "frac_abs_ge_64": float(a["ge64"].mean()), "frac_abs_ge_32": float(a["ge32"].mean())}


def add_offset(model64: nn.Module, c: float, s: float, shared_norm: float) -> dict:
    """In place, in float64: every logit becomes s * logit + c (see the module docstring)."""
    ln = model64.transformer.ln_f
    g, b = ln.weight.data, ln.bias.data  # [d]
    W = model64.lm_head.weight.data  # [V, d]
    q = 1.0 / g
    qh = q / q.norm()
    kappa = float(b @ qh)  # y.q^ today, the same at every position
    a = W @ qh  # [V]
    W_perp = W - a[:, None] * qh[None, :]
    row_norm = float((s * W_perp).norm(dim=1).median())
    K = abs(c) / (shared_norm * row_norm) if c != 0 else kappa
    s_v = (s * a * kappa + c) / K  # [V]
    ln.bias.data = b + (K - kappa) * qh
    model64.lm_head.weight.data = s * W_perp + s_v[:, None] * qh[None, :]
    u = s_v.mean() * qh
    return {"c": c, "spread_scale": s, "hidden_component_K": K, "kappa_before": kappa,
            "shared_direction_norm": float(u.norm()), "lm_head_row_median_norm_perp": row_norm,
            "lm_head_row_median_norm_after": float(model64.lm_head.weight.data.norm(dim=1).median()),
            "ln_f_bias_max_abs_after": float(ln.bias.data.abs().max()),
            "min_abs_ln_f_weight": float(g.abs().min())}


# --------------------------------------------------------------------------
# forward passes


class ActivationStats:
    """Largest finite |value| and count of inf/NaN over every module's output tensors."""

    def __init__(self, model: nn.Module):
        self.max_abs, self.where, self.nonfinite, self.nonfinite_where = 0.0, "", 0, set()
        self.per_module: dict[str, float] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules() if name]

    def _hook(self, name):
        def hook(module, inputs, output):
            for t in _tensors(output):
                if not t.is_floating_point():
                    continue
                finite = torch.isfinite(t)
                bad = int((~finite).sum())
                if bad:
                    self.nonfinite += bad
                    self.nonfinite_where.add(name)
                m = float(torch.where(finite, t, 0).abs().max()) if t.numel() else 0.0
                self.per_module[name] = max(m, self.per_module.get(name, 0.0))
                if m > self.max_abs:
                    self.max_abs, self.where = m, name
        return hook

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        # Inside the network: everything but the final logits (lm_head) and the model's own outputs.
        inside = {k: v for k, v in self.per_module.items() if k not in ("lm_head", "transformer")}
        where_in = max(inside, key=inside.get) if inside else ""
        return {"max_abs_activation": self.max_abs, "max_abs_module": self.where,
                "max_abs_inside": inside.get(where_in, 0.0), "max_abs_inside_module": where_in,
                "nonfinite_values": self.nonfinite, "nonfinite_modules": sorted(self.nonfinite_where),
                "per_module_max_abs": dict(sorted(self.per_module.items(), key=lambda kv: -kv[1])[:12])}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


@torch.inference_mode()
def all_logits(model: nn.Module, inputs: torch.Tensor, device, batch: int, stats: bool = False,
               dtype: torch.dtype = torch.float32):
    """float32 (or ``dtype``) logits [N, V] of every position of ``inputs`` [W, B] (+ activation stats)."""
    model.eval()  # no dropout, whatever state the model was left in
    hooks = ActivationStats(model) if stats else None
    out = []
    try:
        for i in range(0, len(inputs), batch):
            x = inputs[i:i + batch].to(device)
            out.append(model(x).logits.to(dtype).flatten(0, 1).cpu())
    finally:
        info = hooks.close() if hooks else {}
    return torch.cat(out), info


class RoundedLogits(nn.Module):
    """The wrapped model with its final logits cast to ``dtype`` and back (for kdlib.evaluate)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.eval()  # kdlib.evaluate restores the mode it found: keep the wrapped model in eval

    def forward(self, ids):
        out = self.model(ids)
        out.logits = out.logits.to(self.dtype).float()
        return out


def fp32_head(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype`` except lm_head, which runs in float32 on the upcast final hidden
    state: the network's rounding without the rounding of the logits."""
    m = copy.deepcopy(model)
    untie(m)  # a tied lm_head would take the input embeddings to float32 with it
    m.to(dtype)
    m.lm_head.float()
    m.lm_head.register_forward_pre_hook(lambda mod, args: tuple(a.float() for a in args))
    return m.eval()


def centred_head(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose lm_head rows have their mean row subtracted (in float64), then cast to
    ``dtype``. Every logit of a position moves by the same y.mean_row, so softmax is unchanged in exact
    arithmetic, and each position's mean logit becomes exactly 0: the common offset is gone before
    anything is rounded. (The input embeddings stay as they are: lm_head is untied first.)"""
    m = copy.deepcopy(model)
    untie(m)
    W = m.lm_head.weight.data.double()
    m.lm_head.weight.data = (W - W.mean(0, keepdim=True)).to(m.lm_head.weight.dtype)
    return m.to(dtype).eval()


# --------------------------------------------------------------------------
# fidelity


def fidelity(ref: torch.Tensor, other: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
             device="cpu") -> dict:
    """Per-position fidelity of ``other`` against ``ref`` (float32 logits [N, V]); means and maxima.

    Works in chunks of positions on ``device``, so GPT-2's vocabulary fits."""
    acc: dict[str, list] = {}

    def put(name, x):
        acc.setdefault(name, []).append(x.double().cpu())

    for i in range(0, len(ref), chunk):
        r, o, tgt = ref[i:i + chunk].to(device), other[i:i + chunk].to(device), targets[i:i + chunk].to(device)
        top = r.argmax(-1)
        put("agree", o.argmax(-1) == top)
        # Tie-aware: fp32's top-1 is among the other's (possibly tied, after rounding) maxima.
        put("agree_ties", o.gather(1, top[:, None])[:, 0] >= o.max(-1).values)
        d = o.double() - r.double()
        put("logit_err", (d - d.mean(-1, keepdim=True)).pow(2).mean(-1).sqrt())
        put("logit_abs", d.abs().max(-1).values)
        for temperature in TEMPERATURES:
            at = f"T{temperature:g}"  # the metrics' suffix: T1, T2
            lp = F.log_softmax(r / temperature, -1).double()  # float32 log_softmax, as a loss computes it; sums in float64
            lq = F.log_softmax(o / temperature, -1).double()
            p, q = lp.exp(), lq.exp()
            put(f"kl_{at}", (p * (lp - lq)).sum(-1))
            put(f"tvd_{at}", 0.5 * (p - q).abs().sum(-1))
            for name, idx in (("top1", top), ("target", tgt)):
                pi, qi = p.gather(1, idx[:, None])[:, 0], q.gather(1, idx[:, None])[:, 0]
                put(f"{name}_{at}", (qi - pi).abs() / pi)
    a = {k: torch.cat(v) for k, v in acc.items()}
    res = {"top1_agreement": float(a["agree"].mean()),
           "top1_agreement_tie_aware": float(a["agree_ties"].mean()),
           "logit_err_rms_centred_mean": float(a["logit_err"].mean()),
           "logit_err_abs_max": float(a["logit_abs"].max())}
    for temperature in TEMPERATURES:
        at = f"T{temperature:g}"
        kl = a[f"kl_{at}"]
        res.update({f"kl_mean_{at}": float(kl.mean()), f"kl_max_{at}": float(kl.max()),
                    f"kl_p99_{at}": float(kl.quantile(0.99)),
                    f"tvd_mean_{at}": float(a[f"tvd_{at}"].mean()), f"tvd_max_{at}": float(a[f"tvd_{at}"].max()),
                    f"top1_p_relerr_mean_{at}": float(a[f"top1_{at}"].mean()),
                    f"target_p_relerr_mean_{at}": float(a[f"target_{at}"].mean()),
                    f"target_p_relerr_max_{at}": float(a[f"target_{at}"].max())})
    return res


# --------------------------------------------------------------------------
# report


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def _pct(x: float) -> str:
    return "0" if x == 0 else (f"{100 * x:.2f}%" if x >= 1e-4 else f"{100 * x:.1e}%")


def _agree(f: dict) -> str:
    return f"{100 * f['top1_agreement']:.2f}% ({100 * f['top1_agreement_tie_aware']:.2f}%)"


def tables(rows: list[dict]) -> str:
    head1 = ("| teacher | val ppl | top-1 agree (ties) | KL mean | KL max | TVD mean | top-1 p rel. err | "
             "target p rel. err | logit err (RMS, centred) | max abs act. (inside) | inf/NaN |")
    lines = ["T = 1:", "", head1, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["fidelity"]
        act = r.get("activations", {})
        acts = (f"{act['max_abs_activation']:.1f} ({act['max_abs_inside']:.1f}) | {act['nonfinite_values']}"
                if act else "(as fp32) | -")
        lines.append(
            f"| {r['label']} | {r['val_ppl']:.4f} | {_agree(f)} | {_e(f['kl_mean_T1'])} | "
            f"{_e(f['kl_max_T1'])} | {_e(f['tvd_mean_T1'])} | {_pct(f['top1_p_relerr_mean_T1'])} | "
            f"{_pct(f['target_p_relerr_mean_T1'])} | {_e(f['logit_err_rms_centred_mean'])} | {acts} |")
    lines += ["", "T = 2 (the study's temperature):", "",
              "| teacher | KL mean | KL max | KL p99 | TVD mean | top-1 p rel. err | target p rel. err |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["fidelity"]
        lines.append(f"| {r['label']} | {_e(f['kl_mean_T2'])} | {_e(f['kl_max_T2'])} | {_e(f['kl_p99_T2'])} | "
                     f"{_e(f['tvd_mean_T2'])} | {_pct(f['top1_p_relerr_mean_T2'])} | "
                     f"{_pct(f['target_p_relerr_mean_T2'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------


@dataclass
class Windows:
    """The token windows every variant sees, and where perplexity is measured."""

    inputs: torch.Tensor  # [n, block]: the first block tokens of each window
    targets: torch.Tensor  # [n * block]: the next token at each position
    ppl_ids: np.ndarray  # the perplexity split's tokens
    ppl_split: str
    block: int


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="teacher-precision", help="working folder: data, teacher, reports")
    ap.add_argument("--teacher", default=None, help="a GPT-2 save_pretrained folder or hub id to reuse "
                    "(default: train the demo teacher in OUT/teacher)")
    ap.add_argument("--teacher-steps", type=int, default=500, help="training steps of the demo teacher")
    ap.add_argument("--data", default=None, help="a prepared kdlib data folder matching the teacher's "
                    "tokenizer (default: the demo preset's, prepared in OUT/data)")
    ap.add_argument("--splits", nargs="+", default=["validation", "test"], help="splits the windows come from")
    ap.add_argument("--block", type=int, default=64, help="tokens per window (the demo's block size)")
    ap.add_argument("--max-windows", type=int, default=400)
    ap.add_argument("--offset", default="-65", help="target mean logit, or 'none' to leave the model as it "
                    "is (a real GPT-2 has its own offset)")
    ap.add_argument("--spread-std", type=float, default=None, help="scale the logits to this mean "
                    "per-position std (default: keep the teacher's; GPT-2 small's is ~3-4)")
    ap.add_argument("--shared-norm", type=float, default=1.0, help="norm of the shared lm_head direction, "
                    "in units of the rows' median norm")
    ap.add_argument("--device", default="auto", help="auto: cuda when there is one, else cpu")
    ap.add_argument("--batch", type=int, default=16, help="windows per forward pass")
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def load_windows(data_dir: Path, splits, block: int, max_windows: int) -> Windows:
    """Non-overlapping windows of block + 1 tokens: inputs the first block, targets the last block."""
    from kdlib.data import load_split

    wins, ppl_ids = [], {}
    for split in splits:
        toks = np.asarray(load_split(data_dir, split).tokens(), dtype=np.int64)
        ppl_ids[split] = toks
        n = (len(toks) - 1) // block
        wins += [toks[i * block:i * block + block + 1] for i in range(n)]
    wins = torch.from_numpy(np.stack(wins[:max_windows]))  # [n, block + 1]
    return Windows(wins[:, :-1], wins[:, 1:].flatten(), ppl_ids.get("validation", next(iter(ppl_ids.values()))),
                   "validation" if "validation" in ppl_ids else splits[0], block)


def edit_reference(original: nn.Module, args, win: Windows, device, geo_before: dict, log):
    """(the float64 model the variants are cast from, the edit's record or None): ``original`` given
    GPT-2's logit offset (``--offset``), edited in float64 and checked there."""
    master = copy.deepcopy(original).double()
    if args.offset == "none":
        return master, None
    untie(master)
    wte_before = original.transformer.wte.weight.detach().double().clone()
    s = 1.0 if args.spread_std is None else args.spread_std / geo_before["per_position_std"]
    c = float(args.offset) - s * geo_before["mean"]
    edit = add_offset(master, c, s, args.shared_norm)
    assert torch.equal(master.transformer.wte.weight, wte_before.to(device)), "input embeddings changed"
    # Check the edit in float64: the logits are s * logit + c.
    l64_orig, _ = all_logits(copy.deepcopy(original).double(), win.inputs[:8], device, args.batch,
                             dtype=torch.float64)
    l64_new, _ = all_logits(master, win.inputs[:8], device, args.batch, dtype=torch.float64)
    edit["float64_max_err_vs_s_logit_plus_c"] = float(
        (l64_new.double() - (s * l64_orig.double() + c)).abs().max())
    log(f"edit: c {c:+.3f}, spread x{s:.3f}, hidden-state component K {edit['hidden_component_K']:.1f} "
        f"along a shared lm_head direction of norm {edit['shared_direction_norm']:.3f} (rows' median "
        f"{edit['lm_head_row_median_norm_perp']:.3f}); float64 check max err "
        f"{edit['float64_max_err_vs_s_logit_plus_c']:.1e}")
    return master, edit


def variant_rows(master: nn.Module, ref_model: nn.Module, ref: tuple, win: Windows, device, batch: int,
                 log) -> list[dict]:
    """One row per teacher variant: perplexity, fidelity against ``ref`` (the fp32 reference's
    logits [N, V] and activation statistics), activation statistics."""
    from kdlib.evaluate import perplexity

    ref_logits, ref_act = ref
    rows = []

    def add(label, key, model, logits, act):
        t0 = time.perf_counter()
        ppl = perplexity(model, win.ppl_ids, win.block, win.block)
        r = {"label": label, "key": key, "val_ppl": ppl,
             "fidelity": fidelity(ref_logits, logits, win.targets, device=device), "activations": act}
        rows.append(r)
        f = r["fidelity"]
        log(f"{label}: ppl {ppl:.4f}, KL T=1 {f['kl_mean_T1']:.2e} (max {f['kl_max_T1']:.2e}), T=2 "
            f"{f['kl_mean_T2']:.2e} (max {f['kl_max_T2']:.2e}), top-1 p rel err {f['top1_p_relerr_mean_T1']:.2e}, "
            f"agree {100 * f['top1_agreement']:.2f}%"
            + (f", max |act| {act['max_abs_activation']:.1f} in {act['max_abs_module']}, "
               f"inf/NaN {act['nonfinite_values']}" if act else "") + f" ({time.perf_counter() - t0:.0f} s ppl)")

    for key in ("fp64", "fp32", "fp16", "bf16"):
        t0 = time.perf_counter()
        if key in ("fp64", "fp32"):
            model = master if key == "fp64" else ref_model
        else:
            model = copy.deepcopy(ref_model).to(DTYPES[key])
        if key == "fp32":
            logits, act = ref_logits, ref_act
        else:
            logits, act = all_logits(model, win.inputs, device, batch, stats=True)
        log(f"{key} forward: {time.perf_counter() - t0:.0f} s")
        label = {"fp64": "fp64 model (fp32's own error)", "fp32": "fp32 model (reference)"}.get(key,
                                                                                               f"{key} model")
        add(label, key, model, logits, act)
        if key not in ("fp64", "fp32"):
            del model
    for key in ("fp16", "bf16"):
        add(f"fp32 model, logits to {key}", f"fp32-logits-{key}", RoundedLogits(ref_model, DTYPES[key]),
            ref_logits.to(DTYPES[key]).float(), {})
    for make, what, suffix in ((fp32_head, "fp32 lm_head", "fp32-head"), (centred_head, "centred lm_head",
                                                                           "centred-head")):
        for key in ("fp16", "bf16"):
            model = make(ref_model, DTYPES[key])
            logits, act = all_logits(model, win.inputs, device, batch, stats=True)
            add(f"{key} model, {what}", f"{key}-{suffix}", model, logits, act)
            del model
    return rows


def markdown(result: dict) -> str:
    a, geo_before, geo_after = result["args"], result["geometry_before"], result["geometry_after"]
    edit, exactness, block = result["edit"], result["edit_exactness_fp32"], a["block"]
    md = [f"Command: `{result['command']}`", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), "",
          f"Teacher: {result['teacher']} ({result['parameters']:,} parameters); windows: {result['windows']} x "
          f"{block} tokens from {'+'.join(a['splits'])} ({result['positions']:,} positions); perplexity: "
          f"kdlib.evaluate.perplexity on {result['ppl_split']}, stride {block}.", "",
          f"Logits before the edit: mean {geo_before['mean']:.2f}, per-position std "
          f"{geo_before['per_position_std']:.2f}; after (the fp32 reference): mean {geo_after['mean']:.2f}, "
          f"per-position std {geo_after['per_position_std']:.2f}, per-position means "
          f"{geo_after['per_position_mean_min']:.1f}..{geo_after['per_position_mean_max']:.1f}, top-1 logit mean "
          f"{geo_after['top1_mean']:.1f}, range {geo_after['min']:.1f}..{geo_after['max']:.1f}, "
          f"{100 * geo_after['frac_abs_ge_64']:.1f}% of logits with |l| >= 64."
          + (f" Validation ppl before the edit {result['val_ppl_before_edit']:.4f}." if edit else ""), "",
          tables(result["rows"])]
    if exactness is not None:
        md += ["", f"The edit in fp32 (before vs after, offset removed): KL at T=1 mean "
                   f"{exactness['kl_mean_T1']:.1e}, max {exactness['kl_max_T1']:.1e}; top-1 agreement "
                   f"{100 * exactness['top1_agreement']:.3f}%; float64 check of s*logit+c: max error "
                   f"{edit['float64_max_err_vs_s_logit_plus_c']:.1e}."]
    md += ["", f"Wall time: {result['wall_s']:.0f} s."]
    return "\n".join(md)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.set_float32_matmul_precision("highest")  # the fp32 reference is fp32, not TF32
    command = "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
    info = machine(device)
    log(f"command: {command}")
    log("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))

    from kdlib.evaluate import perplexity

    teacher_name, data_dir = get_teacher(args, log)
    win = load_windows(data_dir, args.splits, args.block, args.max_windows)
    log(f"windows: {len(win.inputs)} x {args.block} tokens from {'+'.join(args.splits)} "
        f"({len(win.targets):,} positions)")

    original = load_model(teacher_name)
    n_params = sum(p.numel() for p in original.parameters())
    orig_logits, _ = all_logits(original.to(device), win.inputs, device, args.batch)
    geo_before = geometry(orig_logits)
    ppl_before = perplexity(original, win.ppl_ids, args.block, args.block)
    log(f"teacher {teacher_name}: {n_params:,} parameters, {win.ppl_split} ppl {ppl_before:.4f}; logits: mean "
        f"{geo_before['mean']:.2f}, per-position std {geo_before['per_position_std']:.2f}")

    # The reference: the edited model, edited in float64, then float32.
    master, edit = edit_reference(original, args, win, device, geo_before, log)
    master.to(device)
    ref_model = copy.deepcopy(master).float()
    ref_logits, ref_act = all_logits(ref_model, win.inputs, device, args.batch, stats=True)
    geo_after = geometry(ref_logits)
    log(f"reference (fp32) logits: mean {geo_after['mean']:.2f}, per-position std "
        f"{geo_after['per_position_std']:.2f}, per-position means {geo_after['per_position_mean_min']:.1f}.."
        f"{geo_after['per_position_mean_max']:.1f}, top-1 mean {geo_after['top1_mean']:.1f}, "
        f"{100 * geo_after['frac_abs_ge_64']:.1f}% of |logits| >= 64")
    exactness = None
    if edit is not None:
        # fp32 after the edit against fp32 before it (with the offset removed, the same distribution).
        exactness = fidelity(orig_logits * edit["spread_scale"], ref_logits, win.targets, device=device)
        log(f"edit in fp32: KL(before || after) at T=1 mean {exactness['kl_mean_T1']:.1e}, max "
            f"{exactness['kl_max_T1']:.1e}; top-1 agreement {100 * exactness['top1_agreement']:.3f}%")

    rows = variant_rows(master, ref_model, (ref_logits, ref_act), win, device, args.batch, log)
    result = {"command": command, "machine": info, "args": vars(args), "teacher": teacher_name,
              "parameters": n_params, "windows": len(win.inputs), "positions": len(win.targets),
              "ppl_split": win.ppl_split, "val_ppl_before_edit": ppl_before,
              "geometry_before": geo_before, "geometry_after": geo_after, "edit": edit,
              "edit_exactness_fp32": exactness, "rows": rows, "wall_s": time.perf_counter() - t_start}
    text = markdown(result)
    (out / "teacher_precision.md").write_text(text + "\n", encoding="utf-8")
    (out / "teacher_precision.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print()
    print(text)
    return result


if __name__ == "__main__":
    main()

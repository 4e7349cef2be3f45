"""The original study's training step, re-implemented as its notebook ran it: the benchmark's baseline.

Deliberately not kdlib's step (that is ``kdlib.bench.KdlibStep``): float32; the
teacher's forward outside ``no_grad`` with trainable parameters (so backward also
runs through the teacher); explicit attention in student and teacher; full-vocabulary
softmax tensors with ``+ eps`` inside the logs; attention-map "hidden MSE"; the loss
read back every step; on a GPU, in a subprocess with ``CUDA_LAUNCH_BLOCKING=1``.
tests/test_benchmarks_reference.py checks that its loss is the study objective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdlib.bench import Result, Shapes, measure_step, release, token_windows
from kdlib.config import TinyGPTConfig
from kdlib.errors import KdlibError
from kdlib.grid import parse
from kdlib.losses import layer_pairs
from kdlib.perf import flop_params

REFERENCE_EPS = 1e-8
ROOT = Path(__file__).resolve().parent.parent  # the checkout: benchmarks/ and kdlib/ side by side


def reference_loss(spec, s_logits, t_logits, labels, temperature: float = 2.0, eps: float = REFERENCE_EPS):
    """The original notebook's output loss: dense softmax tensors, ``log(p + eps)``, weights 0.5 CE,
    0.5 KD, 0.05 cosine. ``s_logits``, ``t_logits``: [B, L, V]; ``labels``: [B, L]."""
    vocab = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits.reshape(-1, vocab), labels.reshape(-1),
                         label_smoothing=0.1 if spec.divergence == "kl" else 0.0)
    if spec.divergence is None:
        return ce
    p_s = F.softmax(s_logits / temperature, dim=-1)  # [B, L, V]
    p_t = F.softmax(t_logits / temperature, dim=-1)  # [B, L, V]
    if spec.divergence == "kl":
        kd = (p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))).sum(-1).mean()
    elif spec.divergence == "js":
        m = 0.5 * (p_s + p_t)
        kd = 0.5 * ((p_t * (torch.log(p_t + eps) - torch.log(m + eps))).sum(-1)
                    + (p_s * (torch.log(p_s + eps) - torch.log(m + eps))).sum(-1)).mean()
    else:
        raise KdlibError(f"the reference implements the study's divergences (kl, js), not {spec.divergence!r}")
    loss = 0.5 * kd * temperature * temperature + 0.5 * ce
    if spec.cosine:
        loss = loss + 0.05 * (1.0 - F.cosine_similarity(s_logits, t_logits, dim=-1)).mean()
    return loss


def reference_feature_loss(s_attn, t_attn, pairs):
    """The notebook's "hidden MSE", weight 0.05: the MSE of head-averaged attention maps of each
    (student block, teacher block) pair, averaged over pairs. ``s_attn``, ``t_attn``: per block
    [B, heads, L, L]."""
    mse = sum(F.mse_loss(s_attn[i].mean(1), t_attn[j].mean(1)) for i, j in pairs) / len(pairs)  # maps [B, L, L]
    return 0.05 * mse


def reference_teacher(shapes: Shapes, dev: torch.device, need_attentions: bool):
    """The teacher as the notebook had it: float32, trainable, eval mode; Hugging Face's default
    attention (SDPA), eager only where attention maps are trained on. Giving the reference the same
    attention kernel as kdlib keeps its gap to kdlib about the method, not the kernel."""
    from kdlib.models import _use_eager_attention, random_teacher

    model = random_teacher(shapes.teacher)
    if need_attentions:
        _use_eager_attention(model)
    return model.to(dev).eval()


class ReferenceStep:
    """One training step of the original method (see the module docstring)."""

    path = "reference"

    def __init__(self, shapes: Shapes, exp: str, dev: torch.device):
        from kdlib.models import TinyGPT

        self.spec = parse(exp)
        self.exp = self.spec.name
        torch.manual_seed(0)
        self.student = TinyGPT(TinyGPTConfig(**shapes.student)).to(dev).train()
        n_s, n_t = shapes.student["n_layer"], shapes.teacher["n_layer"]
        layer_map = self.spec.feature_map
        if layer_map == "layerwise" and (n_s, n_t) == (8, 12):
            layer_map = "study"  # the notebook's odd-layer map
        self.pairs = layer_pairs(layer_map, n_s, n_t) if layer_map else []
        self.teacher = reference_teacher(shapes, dev, need_attentions=bool(self.pairs)) \
            if self.spec.needs_teacher else None
        self.n_student = flop_params(self.student)
        self.n_teacher = flop_params(self.teacher) if self.teacher is not None else 0
        self.teacher_shape = (shapes.teacher["n_layer"], shapes.teacher["n_embd"]) if self.n_teacher else (0, 0)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.dev = dev

    def __call__(self, idx, batch: np.ndarray) -> float:
        win = torch.from_numpy(batch).to(self.dev)  # [B, L + 1]
        ids, labels = win[:, :-1], win[:, 1:]
        s_out = self.student(ids, output_attentions=True)  # explicit attention, maps kept
        t_out = None
        if self.teacher is not None:
            t_out = self.teacher(ids, output_attentions=bool(self.pairs))  # not under no_grad
        loss = reference_loss(self.spec, s_out.logits, None if t_out is None else t_out.logits, labels)
        if self.pairs:
            loss = loss + reference_feature_loss(s_out.attentions, t_out.attentions, self.pairs)
        self.optimizer.zero_grad()
        if self.teacher is not None:
            self.teacher.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()  # the notebook read every step's loss back


def measure_reference(report: dict, exp: str) -> Result:
    """One row: the original method's step for ``exp`` at the report's shapes, in this process."""
    shapes, dev = Shapes(**report["shapes"]), torch.device(report["device"])
    release(dev)  # what earlier measurements left must not count in this one's peak
    windows = token_windows(shapes)
    return measure_step(ReferenceStep(shapes, exp, dev), shapes, windows, dev, report["peak_tflops"])


def measure_reference_isolated(report: dict, exp: str) -> Result:
    """``measure_reference`` in a fresh process with ``CUDA_LAUNCH_BLOCKING=1``, as the notebook ran
    (on a GPU: the variable must be set before CUDA starts)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from dataclasses import asdict; "
            "from benchmarks.reference import measure_reference; a = json.loads(sys.argv[1]); "
            "print('KDLIB-BENCH ' + json.dumps(asdict(measure_reference(a, a['exp']))))")
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    arg = json.dumps({"shapes": report["shapes"], "device": report["device"], "peak_tflops": report["peak_tflops"],
                      "exp": exp})
    done = subprocess.run([sys.executable, "-c", code, arg, str(ROOT)], env=env, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("KDLIB-BENCH ")]
    if done.returncode != 0 or not lines:
        raise KdlibError(f"the reference benchmark of {exp!r} failed in its subprocess:\n{done.stderr[-2000:]}")
    return Result(**json.loads(lines[-1][len("KDLIB-BENCH "):]))

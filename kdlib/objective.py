"""The composed distillation objective of one experiment.

``DistillationLoss`` turns a ``LossConfig`` (an experiment's components plus
the preset's weights) into the total loss and its named parts. It owns the
hidden-MSE projectors, which train with the student: give ``loss.parameters()``
to the optimizer next to the student's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from . import losses
from .config import LossConfig, TinyGPTConfig
from .errors import KdlibError
from .losses import TopKTargets
from .models import supports_output, teacher_shape


@dataclass
class LossOutput:
    total: Tensor  # scalar, with grad: what to backpropagate
    parts: dict  # name -> detached scalar tensor, unweighted (ce, kl/js/..., cos, feat)


class DistillationLoss(nn.Module):
    """w_ce·CE + w_div·divergence + w_cos·cosine + w_feat·feature, for one experiment.

    Arguments:
        config: the experiment's loss config (``ExperimentConfig.loss``).
        student: the student's ``TinyGPTConfig`` (layers and width for the feature maps).
        teacher: the teacher model, or its (n_layer, hidden size); needed when
            the experiment has a feature loss, else may be None.
        compile: run the vocabulary-sized losses' formulas through ``torch.compile``.
    """

    def __init__(self, config: LossConfig, student: TinyGPTConfig,
                 teacher: Union[nn.Module, tuple[int, int], None] = None, compile: bool = False):
        super().__init__()
        config.validate()
        self.config = config.effective()
        self.compile = compile  # torch.compile the output losses' per-chunk formulas
        self.pairs: list[tuple[int, int]] = []
        self.projectors: Optional[nn.ModuleList] = None
        if self.config.feature_map is not None:
            if teacher is None:
                raise KdlibError(f"feature map {self.config.feature_map!r} needs the teacher's shape: "
                                 "pass the teacher model or (n_layer, hidden size)")
            if isinstance(teacher, nn.Module):
                what = "hidden_states" if self.config.feature == "hidden" else "attentions"
                if not supports_output(teacher, what):
                    raise KdlibError(f"the teacher ({type(teacher).__name__}) cannot return {what}, "
                                     f"which feature={self.config.feature!r} needs; use an output-only "
                                     "experiment (kl, js, ...) or a Hugging Face causal LM teacher")
                n_teacher, d_teacher = teacher_shape(teacher)
            else:
                n_teacher, d_teacher = teacher
            self.pairs = losses.layer_pairs(self.config.layer_map_name, student.n_layer, n_teacher)
            if self.config.feature == "hidden":
                self.projectors = losses.make_projectors(self.pairs, student.n_embd, d_teacher)

    @property
    def needs_teacher(self) -> bool:
        return self.config.needs_teacher

    @property
    def needs_hidden_states(self) -> bool:
        return self.config.needs_hidden_states

    @property
    def needs_attentions(self) -> bool:
        return self.config.needs_attentions

    def forward(self, student_out, teacher_out, labels: Tensor) -> LossOutput:
        """student_out/teacher_out: ``.logits`` [B, T, V] (+ features if needed); labels [B, T], -100 = ignored."""
        c = self.config
        s = student_out.logits
        mask = labels != -100  # [B, T]
        if self.needs_teacher and teacher_out is None:
            raise KdlibError("this experiment distils from a teacher but no teacher outputs were given")
        if isinstance(teacher_out, TopKTargets):
            if not c.output_only:
                raise KdlibError("a top-k cache only serves output-only experiments (a divergence, no "
                                 "cosine, no feature map); run this one with the teacher online")
            target = teacher_out
        else:
            target = teacher_out.logits if (c.divergence is not None or c.cosine) else None
        # CE, the divergence and the cosine share one chunked pass over the vocabulary.
        total, parts = losses.output_losses(
            s, labels, target, w_ce=c.w_ce, divergence=c.divergence, w_div=c.w_div, temperature=c.temperature,
            param=c.divergence_param, cosine=c.cosine, w_cos=c.w_cos, label_smoothing=c.label_smoothing,
            compile=self.compile)
        if self.needs_hidden_states:
            feat = losses.hidden_mse(_states(student_out, "hidden_states", "student"),
                                     _states(teacher_out, "hidden_states", "teacher"),
                                     self.pairs, self.projectors, mask, c.feature_norm)
        elif self.needs_attentions:
            feat = losses.attention_mse(_states(student_out, "attentions", "student"),
                                        _states(teacher_out, "attentions", "teacher"), self.pairs, mask)
        else:
            feat = None
        if feat is not None:
            total = total + c.w_feat * feat
            parts["feat"] = feat.detach()
        return LossOutput(total, parts)


def _states(out, what: str, who: str):
    states = getattr(out, what, None)
    if not states:
        raise KdlibError(f"the {who} returned no {what}; call it with output_{what}=True "
                         "(DistillationLoss.needs_hidden_states / needs_attentions say which)")
    return states

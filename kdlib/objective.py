"""The composed distillation objective of one experiment.

``DistillationLoss`` turns an experiment's ``LossTerms`` (its components
plus the preset's values for them, ``ExperimentConfig.loss_terms``) into the
total loss and its named parts. It owns the hidden-MSE projectors, which
train with the student: give ``loss.parameters()`` to the optimizer next to
the student's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn

from . import losses
from .config import LossTerms, TinyGPTConfig
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
        terms: the experiment's resolved loss (``ExperimentConfig.loss_terms``);
            what it needs of the models is ``self.spec`` (``needs_teacher``,
            ``needs_hidden_states``, ``needs_attentions``, ``output_only``).
        student: the student's ``TinyGPTConfig`` (layers and width for the feature maps).
        teacher: the teacher model, or its (n_layer, hidden size); needed when
            the experiment has a feature loss, else may be None.
        compile: run the vocabulary-sized losses' formulas through ``torch.compile``.
    """

    def __init__(self, terms: LossTerms, student: TinyGPTConfig,
                 teacher: Union[nn.Module, tuple[int, int], None] = None, compile: bool = False):
        super().__init__()
        terms.validate()
        self.terms = terms
        self.spec = terms.spec
        self.compile = compile  # torch.compile the output losses' per-chunk formulas
        self.pairs: list[tuple[int, int]] = []
        self.projectors: Optional[nn.ModuleList] = None
        if self.spec.feature_map is not None:
            if teacher is None:
                raise KdlibError(f"feature map {self.spec.feature_map!r} needs the teacher's shape: "
                                 "pass the teacher model or (n_layer, hidden size)")
            if isinstance(teacher, nn.Module):
                what = "hidden_states" if self.spec.needs_hidden_states else "attentions"
                if not supports_output(teacher, what):
                    raise KdlibError(f"the teacher ({type(teacher).__name__}) cannot return {what}, "
                                     f"which feature={self.spec.feature!r} needs; use an output-only "
                                     "experiment (kl, js, ...) or a Hugging Face causal LM teacher")
                n_teacher, d_teacher = teacher_shape(teacher)
            else:
                n_teacher, d_teacher = teacher
            self.pairs = losses.layer_pairs(terms.layer_map_name, student.n_layer, n_teacher)
            if self.spec.needs_hidden_states:
                self.projectors = losses.make_projectors(self.pairs, student.n_embd, d_teacher)

    def forward(self, student_out, teacher_out, labels: Tensor) -> LossOutput:
        """student_out/teacher_out: ``.logits`` [B, T, V] (+ features if needed); labels [B, T], -100 = ignored."""
        c, spec = self.terms, self.spec
        s = student_out.logits
        mask = labels != -100  # [B, T]
        if spec.needs_teacher and teacher_out is None:
            raise KdlibError("this experiment distils from a teacher but no teacher outputs were given")
        if isinstance(teacher_out, TopKTargets):
            if not spec.output_only:
                raise KdlibError("a top-k cache only serves output-only experiments (a divergence, no "
                                 "cosine, no feature map); run this one with the teacher online")
            target = teacher_out
        else:
            target = teacher_out.logits if (spec.divergence is not None or spec.cosine) else None
        # CE, the divergence and the cosine share one chunked pass over the vocabulary.
        total, parts = losses.output_losses(
            s, labels, target, w_ce=c.w_ce, divergence=spec.divergence, w_div=c.w_div, temperature=c.temperature,
            param=spec.divergence_param, cosine=spec.cosine, w_cos=c.w_cos, label_smoothing=c.label_smoothing,
            compile=self.compile)
        if spec.needs_hidden_states:
            feat = losses.hidden_mse(_states(student_out, "hidden_states", "student"),
                                     _states(teacher_out, "hidden_states", "teacher"),
                                     self.pairs, self.projectors, mask, c.feature_norm)
        elif spec.needs_attentions:
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
                         "(DistillationLoss.spec.needs_hidden_states / needs_attentions say which)")
    return states

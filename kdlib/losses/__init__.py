"""Knowledge-distillation losses: pure functions of tensors, no state, no I/O.

Where things are:

- ``divergences.py``: the formulas, read top to bottom: KL, reverse KL, JS,
  generalized JSD, TVD, skew KLs, the cosine loss and cross-entropy;
- ``chunked.py``: the chunk engine every vocabulary-sized loss runs through
  (``_RowMean``: ``chunk_size`` positions at a time, the gradient made in the
  forward pass, one ``[N, V]`` gradient buffer and nothing recomputed);
- ``sparse.py``: the same divergences on the teacher's top-k cache;
- ``fused.py``: ``output_losses``, an experiment's CE, divergence and cosine
  in one chunked pass;
- ``features.py``: layer maps, hidden-state and attention-map MSE;
- ``checks.py``: argument checks and the input conventions shared by all.

Conventions (design.md §4), shared by every function here:

- student logits ``s`` and teacher logits ``t`` have shape ``[..., V]``;
  ``mask`` has shape ``[...]`` (True = position counts), ``None`` = all count;
- each loss is summed over the vocabulary, then averaged over the counted
  positions; with no counted position the loss is 0 (not NaN);
- the maths runs in float32 (float64 stays float64) in log space
  (``log_softmax``/``logaddexp``), whatever the input dtype, with no ``+ eps``
  inside a log, so bf16/fp16 logits of magnitude 1e4 give finite values;
- divergences are scaled by τ² (τ the temperature; Hinton et al.), so their
  gradients keep the same size when the temperature changes.
"""

from .checks import DIVERGENCES, PARAMETRIC, check_temperature, check_unit_interval
from .chunked import AUTO, ChunkSize
from .divergences import (cosine_loss, cross_entropy, divergence, generalized_jsd, js_divergence, kl_divergence,
                          reverse_kl, skew_kl, skew_reverse_kl, total_variation)
from .features import LAYER_MAPS, NORMS, attention_mse, hidden_mse, layer_pairs, make_projectors
from .fused import output_losses
from .sparse import TopKTargets, sparse_divergence, sparse_generalized_jsd, sparse_js, sparse_kl, teacher_top_k

__all__ = [
    "AUTO", "ChunkSize", "DIVERGENCES", "LAYER_MAPS", "NORMS", "PARAMETRIC", "TopKTargets",
    "attention_mse", "check_temperature", "check_unit_interval", "cosine_loss", "cross_entropy", "divergence",
    "generalized_jsd", "hidden_mse", "js_divergence", "kl_divergence", "layer_pairs", "make_projectors",
    "output_losses", "reverse_kl", "skew_kl", "skew_reverse_kl", "sparse_divergence", "sparse_generalized_jsd",
    "sparse_js", "sparse_kl", "teacher_top_k", "total_variation",
]

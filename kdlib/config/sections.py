"""The sections of a run's config: model, loss, teacher, data, cache and train.

Defaults are the original study's where it had one. Every section's
``validate`` raises ``KdlibError`` naming the field (``kdlib.config.strict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import KdlibError, choices
from ..grid import DIVERGENCES, FEATURES, ExperimentSpec
from .strict import check_fields, require_in_range, require_one_of, require_positive

TEACHER_SOURCES = ("online", "cache")


@dataclass
class TinyGPTConfig:
    """The student: a small pre-LayerNorm GPT. Defaults are the original study's TinyGPT."""

    SECTION = "model"

    vocab_size: int = 50257  # must equal the teacher's: GPT-2 BPE
    block_size: int = 256  # longest sequence; the study's sinusoidal table had 256 rows
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    d_ff: int = 2048  # MLP hidden width (4 × n_embd in GPT-2)
    dropout: float = 0.2  # on embeddings, attention probabilities and residual branches
    bias: bool = True  # biases in every Linear and LayerNorm (the study had them)
    tie_embeddings: bool = True  # lm_head shares the token embedding (saves V × d parameters)
    positions: str = "sinusoidal"  # "sinusoidal" (fixed, the study) or "learned" (GPT-2)
    activation: str = "gelu"  # "gelu" (exact, the study) or "gelu_tanh" (GPT-2's gelu_new)
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # N(0, init_std) for Linear and embedding weights, biases 0

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff"):
            require_positive(self, name)
        if self.n_embd % self.n_head:
            raise KdlibError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head "
                             f"({self.n_head}) so each head gets a whole number of dimensions")
        require_in_range(self, "dropout", 0.0, 1.0, high_open=True)
        require_one_of(self, "positions", ("sinusoidal", "learned"))
        require_one_of(self, "activation", ("gelu", "gelu_tanh"))
        require_in_range(self, "layer_norm_eps", 0.0, math.inf, low_open=True)
        require_in_range(self, "init_std", 0.0, math.inf, low_open=True)



@dataclass
class LossConfig:
    """A preset's loss values: loss = w_ce·CE + w_div·divergence + w_cos·cosine + w_feat·feature (design.md §4).

    Which components a run has (divergence, layer map, cosine) is its experiment
    name, ``ExperimentConfig.exp``, and nothing here. ``overrides`` holds the
    preset's per-divergence exceptions: the original study, for instance, used
    label smoothing in its KL runs only. ``resolve`` applies them for one
    experiment; ``ExperimentConfig.loss_terms`` is that, for the run's own.
    """

    SECTION = "loss"

    feature: str = "hidden"  # "hidden" states (the write-up) or "attention" maps (the notebook)
    layer_map: str = "spread"  # for layerwise: "spread" (ceil rule) or "study" (8→12 odd-layer map)
    feature_norm: str = "layer"  # parameter-free layer norm on both sides of hidden MSE, or "none"
    temperature: float = 2.0  # T of the divergence, scaled back by T²
    label_smoothing: float = 0.0  # on the CE term
    w_ce: float = 0.5
    w_div: float = 0.5
    w_cos: float = 0.05
    w_feat: float = 0.05
    # {"kl": {"label_smoothing": 0.1}, "none": {"w_ce": 1.0}}: values used when
    # the run's divergence is that key ("none" = no divergence).
    overrides: dict = field(default_factory=dict)

    OVERRIDABLE = ("temperature", "label_smoothing", "w_ce", "w_div", "w_cos", "w_feat")

    def resolve(self, spec: ExperimentSpec) -> "LossTerms":
        """The loss of experiment ``spec`` under these values, its divergence's override applied."""
        self.validate()
        values = {name: getattr(self, name) for name in self.OVERRIDABLE}
        values.update(self.overrides.get(spec.divergence or "none", {}))
        return LossTerms(spec, layer_map=self.layer_map, feature_norm=self.feature_norm, **values)

    def validate(self) -> None:
        require_one_of(self, "feature", FEATURES)
        require_one_of(self, "layer_map", ("spread", "study"))
        require_one_of(self, "feature_norm", ("layer", "none"))
        _validate_values(self)
        valid_keys = ("none",) + DIVERGENCES
        for key, values in self.overrides.items():
            if key not in valid_keys:
                raise KdlibError(f"loss.overrides has key {key!r}; keys are divergences: {choices(valid_keys)}")
            if not isinstance(values, dict):
                raise KdlibError(f"loss.overrides[{key!r}] must be an object of field values, got {values!r}")
            for name in values:
                if name not in self.OVERRIDABLE:
                    raise KdlibError(f"loss.overrides[{key!r}] sets {name!r}; it can set: "
                                     f"{choices(self.OVERRIDABLE)}")
            values = check_fields(LossConfig, values, f"loss.overrides[{key!r}]")
            _validate_values(dataclasses.replace(self, overrides={}, **values))


@dataclass(frozen=True)
class LossTerms:
    """One experiment's loss, resolved: its components (``spec``, from the name) and the values for them."""

    SECTION = "loss"

    spec: ExperimentSpec
    layer_map: str
    feature_norm: str
    temperature: float
    label_smoothing: float
    w_ce: float
    w_div: float
    w_cos: float
    w_feat: float

    @property
    def layer_map_name(self) -> Optional[str]:
        """The ``kdlib.losses.layer_pairs`` map this loss uses, or None without feature loss."""
        if self.spec.feature_map == "layerwise" and self.layer_map == "study":
            return "study"
        return self.spec.feature_map

    def validate(self) -> None:
        _validate_values(self)

    def to_dict(self) -> dict:
        """Flat: the components, then the values (what ``python -m kdlib grid --json`` shows)."""
        spec = self.spec.to_dict()
        del spec["name"]
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        return {**spec, **values}


def _validate_values(loss) -> None:
    """The numbers of a ``LossConfig`` or ``LossTerms`` in range."""
    require_in_range(loss, "temperature", 0.0, math.inf, low_open=True)
    require_in_range(loss, "label_smoothing", 0.0, 1.0)
    for name in ("w_ce", "w_div", "w_cos", "w_feat"):
        require_in_range(loss, name, 0.0, math.inf)


@dataclass
class TeacherConfig:
    """The teacher: any Hugging Face causal LM, by hub name or local path."""

    SECTION = "teacher"

    name: str = "gpt2"  # hub id or a folder written by save_pretrained
    revision: Optional[str] = None  # hub revision (commit, tag or branch); None = main
    # GPT2Config fields for a randomly initialised teacher instead of ``name``:
    # offline smoke runs, tests and speed benchmarks (where weights don't matter).
    random_init: Optional[dict] = None
    # The frozen teacher's dtype. "auto" = fp16 on a GPU, fp32 on a CPU: GPT-2's
    # logits sit near -60..-75, where bf16's 8-bit mantissa moves the teacher's
    # probabilities by ~3% (T = 2) against fp16's 0.4%: mean KL(fp32 || bf16)
    # 1.1e-3 vs 1.8e-5 for fp16, 63x less, measured on a GPT-2-architecture
    # stand-in with GPT-2's logit offset (docs/benchmarks.md, "Teacher
    # precision"); fp32 on a GPU is exact but several times slower.
    dtype: str = "auto"  # "auto", "fp32", "fp16" or "bf16"

    def validate(self) -> None:
        require_one_of(self, "dtype", ("auto", "fp32", "fp16", "bf16"))
        if not self.name.strip():
            raise KdlibError("teacher.name is empty; give a Hugging Face model id (e.g. 'gpt2') or a folder")
        if self.random_init is not None:
            allowed = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner")
            unknown = set(self.random_init) - set(allowed)
            if unknown:
                raise KdlibError(f"teacher.random_init has unknown keys {sorted(unknown)}; allowed: "
                                 f"{choices(allowed)}")
            for key in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
                v = self.random_init.get(key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise KdlibError(f"teacher.random_init.{key} must be a whole number >= 1, got {v!r}")



@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how it is cut into training windows."""

    SECTION = "data"

    # A Hugging Face dataset id (or a local dataset folder), "python-docs" (the
    # documentation shipped with Python: real text, offline), or None for text_files.
    dataset: Optional[str] = "Salesforce/wikitext"
    dataset_config: Optional[str] = "wikitext-103-raw-v1"
    revision: Optional[str] = None  # dataset revision (commit, tag, branch); None = main
    text_column: str = "text"
    # {"train": path, "validation": path, "test": path}, or {"all": path} to split by ratio.
    text_files: dict = field(default_factory=dict)
    split_ratios: tuple = (0.9, 0.05, 0.05)  # train/validation/test, when one text is split
    split_seed: int = 0  # seeded shuffle of documents before a ratio split
    max_chars: Optional[int] = None  # keep about this many characters of a ratio-split text (smoke runs)
    # None = the teacher's tokenizer; "bpe" = a byte-level BPE with model.vocab_size
    # tokens trained on the train split (offline presets); or a tokenizer id/path.
    tokenizer: Optional[str] = None
    block_size: int = 128  # tokens per training window (the study: 128, 127 predicted)
    # A split with fewer tokens per character is refused: GPT-2 BPE gives about
    # 0.2-0.3 on English; the study's truncation gave 0.003.
    min_tokens_per_char: float = 0.05
    # Train on a seeded subset of whole training documents of about this many
    # tokens (None = the whole split). The study preset: the ~1.65M tokens the
    # original actually trained on, so its 50 epochs are its regime done honestly.
    train_tokens: Optional[int] = None
    subset_seed: int = 0  # which documents the subset takes

    def validate(self) -> None:
        require_positive(self, "block_size")
        if self.train_tokens is not None:
            require_positive(self, "train_tokens")
        if isinstance(self.subset_seed, bool) or not isinstance(self.subset_seed, int) or self.subset_seed < 0:
            raise KdlibError(f"data.subset_seed must be a whole number >= 0, got {self.subset_seed!r}")
        if self.dataset is not None and self.text_files:
            raise KdlibError(f"data.text_files is set but data.dataset is {self.dataset!r} too; set "
                             "data.dataset to None to use the files")
        if self.dataset is None and not self.text_files:
            raise KdlibError("data.dataset is None and data.text_files is empty; give a Hugging Face "
                             "dataset id, 'python-docs', or local text files per split")
        for split, path in self.text_files.items():
            if not isinstance(path, str) or split not in ("train", "validation", "test", "all"):
                raise KdlibError(f"data.text_files must map train/validation/test (or 'all') to paths, "
                                 f"got {split!r}: {path!r}")
        if "all" in self.text_files and len(self.text_files) > 1:
            raise KdlibError("data.text_files has 'all' and other splits; give either one file to split "
                             "by data.split_ratios or one file per split")
        r = self.split_ratios
        if len(r) != 3 or not all(isinstance(x, (int, float)) and x > 0 for x in r) \
                or abs(sum(r) - 1.0) > 1e-6:
            raise KdlibError(f"data.split_ratios must be three positive numbers summing to 1, got {r!r}")
        if self.max_chars is not None:
            require_positive(self, "max_chars")
        require_in_range(self, "min_tokens_per_char", 0.0, math.inf)



@dataclass
class CacheConfig:
    """The teacher's top-k cache for output-only experiments (design.md §7)."""

    SECTION = "cache"

    top_k: int = 32  # log-probabilities kept per position, plus one tail bucket
    batch_size: int = 16  # windows per teacher forward pass while building
    chunk_windows: int = 256  # windows written between resume points

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "chunk_windows"):
            require_positive(self, name)



@dataclass
class TrainConfig:
    """Optimisation and schedule. Defaults are the original study's."""

    SECTION = "train"

    lr: float = 4e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.01
    decay_all: bool = True  # the study decayed every parameter; False = matrices only
    batch_size: int = 64  # windows per optimizer step (before gradient accumulation)
    grad_accum: int = 1
    # The run's token budget, the same for every experiment of a preset: the
    # schedule (warmup, cosine decay) is laid over it. None = ``epochs`` passes
    # over the training windows. ``kdlib plan`` shows tokens, steps and epochs.
    max_tokens: Optional[int] = None
    epochs: int = 50  # passes over the training windows when max_tokens is None
    max_steps: Optional[int] = None  # cut the budget to this many optimizer steps (short tries, tests)
    warmup_frac: float = 0.05  # linear warmup over this fraction of all steps
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio × lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "fp32"  # "auto" (bf16/fp16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32"
    patience: int = 6  # evaluations without improvement before early stopping
    # Tokens between evaluations on the whole validation split (about 20 per run
    # draw a curve); eval_every (steps), when set, wins; both None = once per epoch.
    eval_every_tokens: Optional[int] = None
    eval_every: Optional[int] = None  # steps between evaluations
    eval_batch_size: int = 8  # windows per forward pass when scoring perplexity
    log_every: int = 10  # steps between metrics.jsonl lines (each costs a host sync)
    # torch.compile the student and the vocabulary-sized losses' formulas: faster
    # steps after a minute or two of compiling; off by default (compile time
    # dominates short runs).
    compile: bool = False
    # Where the resume state (optimizer, scheduler, RNG, data position) lives:
    # None = inside the run folder (counted in its storage budget); a local
    # path such as /content/resume keeps the ~2x-model-size file off Drive.
    resume_dir: Optional[str] = None
    # The resume state is also saved at the first log line after this many
    # seconds of training since the last save (and at every evaluation): an
    # interruption loses minutes.
    save_every_s: float = 600.0
    # Where the teacher's outputs come from, for every KD experiment of the run:
    # "online" (the teacher runs in every step) or "cache" (the top-k cache,
    # output-only experiments only: a sparse, weaker objective, labelled as such).
    teacher_source: str = "online"
    # Where the students' weights go. "run": each run's best student in its run
    # folder. "best": every student in weights_dir (outside the results folder),
    # and the results folder keeps a copy of its best finished run's only: what
    # lets a 14 x 3 sweep of 97 MiB students fit a 100 MiB results folder.
    weights: str = "run"
    weights_dir: Optional[str] = None  # for weights="best": a local folder, e.g. kdlib-local/weights

    def validate(self) -> None:
        require_in_range(self, "lr", 0.0, math.inf, low_open=True)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and 0 <= b < 1 for b in self.betas):
            raise KdlibError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        require_in_range(self, "weight_decay", 0.0, math.inf)
        for name in ("batch_size", "grad_accum", "epochs", "patience", "eval_batch_size", "log_every"):
            require_positive(self, name)
        for name in ("max_tokens", "max_steps", "eval_every", "eval_every_tokens"):
            if getattr(self, name) is not None:
                require_positive(self, name)
        require_in_range(self, "save_every_s", 0.0, math.inf, low_open=True)
        require_one_of(self, "teacher_source", TEACHER_SOURCES)
        require_one_of(self, "weights", ("run", "best"))
        if self.weights == "best" and not self.weights_dir:
            raise KdlibError("train.weights is 'best' but train.weights_dir is not set; give a local folder "
                             "for the students (e.g. kdlib-local/weights), or use train.weights = 'run'")
        require_in_range(self, "warmup_frac", 0.0, 1.0)
        require_in_range(self, "min_lr_ratio", 0.0, 1.0)
        require_in_range(self, "grad_clip", 0.0, math.inf)
        require_one_of(self, "precision", ("auto", "bf16", "fp16", "fp32"))


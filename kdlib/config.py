"""Configuration: dataclasses for model, loss, data, training and experiment; presets.

A run's full ``ExperimentConfig`` is saved next to its results as JSON and
``ExperimentConfig.from_dict`` rebuilds it exactly. Loading is strict: an
unknown key, a value of the wrong type or a value out of range raises
``KdlibError`` naming the field, so a typo in a config file never silently
falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import KdlibError, choices

TEACHER_SOURCES = ("online", "cache")


# --------------------------------------------------------------------------
# dataclasses


@dataclass
class TinyGPTConfig:
    """The student: a small pre-LayerNorm GPT. Defaults are the original study's TinyGPT."""

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
            _positive(self, name)
        if self.n_embd % self.n_head:
            raise KdlibError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head "
                             f"({self.n_head}) so each head gets a whole number of dimensions")
        _in_range(self, "dropout", 0.0, 1.0, high_open=True)
        _one_of(self, "positions", ("sinusoidal", "learned"))
        _one_of(self, "activation", ("gelu", "gelu_tanh"))
        _in_range(self, "layer_norm_eps", 0.0, math.inf, low_open=True)
        _in_range(self, "init_std", 0.0, math.inf, low_open=True)


@dataclass
class LossConfig:
    """Loss = w_ce·CE + w_div·divergence + w_cos·cosine + w_feat·feature (design.md §4).

    The component fields (``divergence``, ``feature_map``, ``cosine``) come from
    the experiment name (``kdlib.grid``); the rest from the preset. ``overrides``
    holds a preset's per-divergence exceptions, applied by ``effective()``: the
    original study, for instance, used label smoothing in its KL runs only.
    """

    divergence: Optional[str] = None  # None (no output KD), kl, rkl, js, tvd, gjsd, skl, srkl
    divergence_param: Optional[float] = None  # β of gjsd, α of skl/srkl, in [0, 1]
    feature_map: Optional[str] = None  # None, layerwise, last2last, last2all
    cosine: bool = False  # 1 − cos(student logits, teacher logits)
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

    def effective(self) -> "LossConfig":
        """This config with the override for its divergence applied (and no overrides left)."""
        extra = self.overrides.get(self.divergence or "none", {})
        return dataclasses.replace(self, overrides={}, **extra)

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.feature_map is not None or self.cosine

    @property
    def needs_hidden_states(self) -> bool:
        return self.feature_map is not None and self.feature == "hidden"

    @property
    def needs_attentions(self) -> bool:
        return self.feature_map is not None and self.feature == "attention"

    @property
    def output_only(self) -> bool:
        """Needs only the teacher's output distribution: a top-k cache can stand in for the teacher."""
        return self.divergence is not None and self.feature_map is None and not self.cosine

    @property
    def layer_map_name(self) -> Optional[str]:
        """The ``kdlib.losses.layer_pairs`` map this config uses, or None without feature loss."""
        if self.feature_map == "layerwise" and self.layer_map == "study":
            return "study"
        return self.feature_map

    def validate(self) -> None:
        from .losses import DIVERGENCES, PARAMETRIC

        if self.divergence is not None:
            _one_of(self, "divergence", DIVERGENCES)
        if self.divergence in PARAMETRIC:
            _in_range(self, "divergence_param", 0.0, 1.0)
        elif self.divergence_param is not None:
            raise KdlibError(f"loss.divergence_param is set ({self.divergence_param!r}) but divergence "
                             f"{self.divergence!r} takes none; only {choices(PARAMETRIC)} do")
        if self.feature_map is not None:
            _one_of(self, "feature_map", ("layerwise", "last2last", "last2all"))
        _one_of(self, "feature", ("hidden", "attention"))
        _one_of(self, "layer_map", ("spread", "study"))
        _one_of(self, "feature_norm", ("layer", "none"))
        self._validate_values()
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
            values = _check_fields(LossConfig, values, f"loss.overrides[{key!r}]")
            dataclasses.replace(self, overrides={}, **values)._validate_values()

    def _validate_values(self) -> None:
        _in_range(self, "temperature", 0.0, math.inf, low_open=True)
        _in_range(self, "label_smoothing", 0.0, 1.0)
        for name in ("w_ce", "w_div", "w_cos", "w_feat"):
            _in_range(self, name, 0.0, math.inf)


@dataclass
class TeacherConfig:
    """The teacher: any Hugging Face causal LM, by hub name or local path."""

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
        _one_of(self, "dtype", ("auto", "fp32", "fp16", "bf16"))
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
        _positive(self, "block_size")
        if self.train_tokens is not None:
            _positive(self, "train_tokens")
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
            _positive(self, "max_chars")
        _in_range(self, "min_tokens_per_char", 0.0, math.inf)


@dataclass
class CacheConfig:
    """The teacher's top-k cache for output-only experiments (design.md §7)."""

    top_k: int = 32  # log-probabilities kept per position, plus one tail bucket
    batch_size: int = 16  # windows per teacher forward pass while building
    chunk_windows: int = 256  # windows written between resume points

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "chunk_windows"):
            _positive(self, name)


@dataclass
class TrainConfig:
    """Optimisation and schedule. Defaults are the original study's."""

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
        _in_range(self, "lr", 0.0, math.inf, low_open=True)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and 0 <= b < 1 for b in self.betas):
            raise KdlibError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")
        _in_range(self, "weight_decay", 0.0, math.inf)
        for name in ("batch_size", "grad_accum", "epochs", "patience", "eval_batch_size", "log_every"):
            _positive(self, name)
        for name in ("max_tokens", "max_steps", "eval_every", "eval_every_tokens"):
            if getattr(self, name) is not None:
                _positive(self, name)
        _in_range(self, "save_every_s", 0.0, math.inf, low_open=True)
        _one_of(self, "teacher_source", TEACHER_SOURCES)
        _one_of(self, "weights", ("run", "best"))
        if self.weights == "best" and not self.weights_dir:
            raise KdlibError("train.weights is 'best' but train.weights_dir is not set; give a local folder "
                             "for the students (e.g. kdlib-local/weights), or use train.weights = 'run'")
        _in_range(self, "warmup_frac", 0.0, 1.0)
        _in_range(self, "min_lr_ratio", 0.0, 1.0)
        _in_range(self, "grad_clip", 0.0, math.inf)
        _one_of(self, "precision", ("auto", "bf16", "fp16", "fp32"))


MAX_SEED = 2**63  # torch.manual_seed takes a 64-bit seed; kdlib's seeds stay below its signed range


@dataclass
class ExperimentConfig:
    """Everything that defines one run: preset, experiment name, seed and the parts."""

    preset: str = "study"
    exp: str = "ce"  # a name from kdlib.grid (the 14 of the study, or any the grammar parses)
    seed: int = 42
    model: TinyGPTConfig = field(default_factory=TinyGPTConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def with_experiment(self, name: str, feature: Optional[str] = None) -> "ExperimentConfig":
        """A copy that runs experiment ``name``: its loss components set from the name."""
        from .grid import parse

        spec = parse(name, feature=feature or self.loss.feature)
        return dataclasses.replace(self, exp=spec.name, loss=spec.apply(self.loss))

    def validate(self) -> "ExperimentConfig":
        """Raise ``KdlibError`` on any out-of-range value; return self for chaining."""
        from .grid import parse

        for part in (self.model, self.teacher, self.loss, self.data, self.cache, self.train):
            part.validate()
        # The preset names a folder (RESULTS/PRESET/RUN, data/PRESET): a plain name, never a path.
        if not isinstance(self.preset, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.preset) \
                or ".." in self.preset:
            raise KdlibError(f"preset must be a plain name (letters, digits, '.', '_', '-'), got {self.preset!r}: "
                             "it names the run's and the data's folders")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise KdlibError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}: torch takes seeds "
                             "below 2**63")
        r = self.teacher.random_init
        if r is not None:
            if r["n_positions"] < self.data.block_size:
                raise KdlibError(f"teacher.random_init.n_positions ({r['n_positions']}) is shorter than "
                                 f"data.block_size ({self.data.block_size})")
            if r["n_embd"] % r["n_head"]:
                raise KdlibError(f"teacher.random_init.n_embd ({r['n_embd']}) must be divisible by n_head "
                                 f"({r['n_head']})")
        spec = parse(self.exp, feature=self.loss.feature)
        if spec.apply(self.loss) != self.loss:
            raise KdlibError(f"the loss components in this config do not match experiment {self.exp!r}; "
                             "build it with config.with_experiment(name)")
        if self.train.teacher_source == "cache" and spec.needs_teacher and not spec.output_only:
            raise KdlibError(f"experiment {self.exp!r} needs the teacher online (features or cosine need its "
                             "full outputs); a top-k cache cannot serve it: use train.teacher_source = 'online'")
        if self.cache.top_k > self.model.vocab_size:
            raise KdlibError(f"cache.top_k ({self.cache.top_k}) exceeds the vocabulary ({self.model.vocab_size})")
        if self.data.block_size > self.model.block_size:
            raise KdlibError(f"data.block_size ({self.data.block_size}) exceeds the model's "
                             f"block_size ({self.model.block_size})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        return _build(cls, d, "config").validate()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise KdlibError(f"config is not valid JSON ({e}); rewrite it or delete it to start over") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ExperimentConfig":
        path = Path(path)
        if path.exists() and not path.is_file():  # a folder, or a FIFO that would block the read forever
            raise KdlibError(f"cannot read config {path}: it is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KdlibError(f"cannot read config {path}: {e}") from None
        try:
            return cls.from_json(text)
        except KdlibError as e:
            raise KdlibError(f"{path}: {e}") from None


# --------------------------------------------------------------------------
# presets


# Large files of the study-sized presets go to the working folder's local disk
# (on Colab /content, not Drive): the resume state is ~12 bytes per parameter
# (611 MiB for the study's student), and 42 students of 97 MiB each would not fit
# a 100 MiB results folder, which keeps the best one (train.weights = "best").
LOCAL_RESUME_DIR = "kdlib-local/resume"
LOCAL_WEIGHTS_DIR = "kdlib-local/weights"


def _smoke() -> ExperimentConfig:
    # Tiny everything: for tests and CI, seconds on a CPU. The teacher and the
    # tokenizer are built locally (no hub), so vocab_size is a small BPE's.
    # 20 steps of 8 x 32 tokens, an evaluation after each: a curve of 20 points.
    return ExperimentConfig(
        preset="smoke", seed=0,
        model=TinyGPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                            dropout=0.0, positions="learned"),
        teacher=TeacherConfig(name="random-gpt2", random_init=dict(
            n_layer=3, n_embd=48, n_head=2, vocab_size=512, n_positions=64)),
        loss=LossConfig(),
        data=DataConfig(dataset="python-docs", max_chars=100_000, tokenizer="bpe", block_size=32),
        cache=CacheConfig(top_k=16, batch_size=8, chunk_windows=16),
        train=TrainConfig(lr=1e-3, batch_size=8, max_tokens=20 * 8 * 32, warmup_frac=0.1,
                          precision="fp32", patience=3, eval_every_tokens=8 * 32),
    )


def _demo() -> ExperimentConfig:
    # Offline, minutes on 2 CPU cores: a small GPT-2-architecture teacher and
    # tokenizer trained locally on real text, then the grid with a small student.
    # 3 epochs of ~0.14M tokens; an evaluation every 25 steps (~17 per run).
    return ExperimentConfig(
        preset="demo", seed=0,
        model=TinyGPTConfig(vocab_size=2048, block_size=128, n_layer=3, n_head=4, n_embd=128, d_ff=512,
                            dropout=0.1, positions="learned"),
        loss=LossConfig(),
        data=DataConfig(dataset="python-docs", tokenizer="bpe", block_size=64),
        train=TrainConfig(lr=1e-3, batch_size=16, epochs=3, warmup_frac=0.05, precision="fp32",
                          patience=3, eval_every=25),
    )


def _study() -> ExperimentConfig:
    # The original study's model and loss values exactly (reference/original_study.md),
    # with the data pipeline done right. Its "hidden MSE" was computed on
    # head-averaged attention maps with an odd-layer map: kept, so runs compare.
    # Its regime done honestly: 50 epochs over a seeded subset of whole
    # documents the size it actually trained on (~1.65M tokens: 82.5M tokens a
    # run), validated on the whole validation split every epoch, tested once at
    # the end (docs/protocol.md).
    return ExperimentConfig(
        preset="study", seed=42,
        model=TinyGPTConfig(),
        loss=LossConfig(feature="attention", layer_map="study", temperature=2.0,
                        w_ce=0.5, w_div=0.5, w_cos=0.05, w_feat=0.05, label_smoothing=0.0,
                        # KL runs: 0.5·T²·KL + 0.5·CE with label smoothing 0.1; the
                        # no-KD run: plain CE.
                        overrides={"kl": {"label_smoothing": 0.1}, "none": {"w_ce": 1.0}}),
        data=DataConfig(train_tokens=1_650_000),
        train=TrainConfig(log_every=50, resume_dir=LOCAL_RESUME_DIR, weights="best",
                          weights_dir=LOCAL_WEIGHTS_DIR),
    )


# Tokens per run of the Colab presets, sized by `python -m kdlib plan` (docs/protocol.md):
# colab-a100: <= 15 min a run on an A100 and 14 x 3 runs <= 8 A100-hours; colab-t4:
# <= 30 min a run on a T4 and 14 runs <= 6 T4-hours. Both under one pass over
# WikiText-103's ~119M training tokens: no window is seen twice.
COLAB_TOKENS = {"a100": 100_000_000, "t4": 40_000_000}


def _colab(gpu: str) -> ExperimentConfig:
    # The corrected protocol (hidden-state features, spread layer map, decay on
    # matrices only, mixed precision) sized for one Colab GPU.
    cfg = _study()
    cfg.preset, cfg.seed = f"colab-{gpu}", 0
    cfg.loss = LossConfig()
    cfg.data = DataConfig()
    tokens = COLAB_TOKENS[gpu]
    cfg.train = TrainConfig(decay_all=False, precision="bf16" if gpu == "a100" else "fp16",
                            batch_size=64 if gpu == "a100" else 32, grad_accum=1 if gpu == "a100" else 2,
                            max_tokens=tokens, eval_every_tokens=tokens // 20, log_every=100,
                            resume_dir=LOCAL_RESUME_DIR, weights="best", weights_dir=LOCAL_WEIGHTS_DIR)
    return cfg


PRESETS = {
    "smoke": _smoke,
    "demo": _demo,
    "study": _study,
    "colab-a100": lambda: _colab("a100"),
    "colab-t4": lambda: _colab("t4"),
}

# The seeds a preset's sweep runs, the same for `train` (its first), `sweep`, the
# notebooks and the panel. Three for the Colab presets: a confidence interval.
SEEDS = {"smoke": (0,), "demo": (0,), "study": (42,), "colab-a100": (0, 1, 2), "colab-t4": (0, 1, 2)}


def preset_seeds(name: str) -> tuple:
    """The seeds of preset ``name``'s sweep (its config's ``seed`` is the first)."""
    if name not in SEEDS:
        raise KdlibError(f"unknown preset {name!r}; choose one of: {choices(PRESETS)}")
    return SEEDS[name]


def preset(name: str, exp: Optional[str] = None) -> ExperimentConfig:
    """A fresh copy of preset ``name`` (smoke, demo, study, colab-a100, colab-t4), for ``exp`` if given."""
    if name not in PRESETS:
        raise KdlibError(f"unknown preset {name!r}; choose one of: {choices(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.with_experiment(exp) if exp is not None else cfg


# --------------------------------------------------------------------------
# strict dict -> dataclass


def _positive(obj, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise KdlibError(f"{_where(obj)}.{name} must be a whole number >= 1, got {v!r}")


def _in_range(obj, name: str, low: float, high: float, low_open=False, high_open=False) -> None:
    v = getattr(obj, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise KdlibError(f"{_where(obj)}.{name} must be a finite number in {lo}, {hi}, got {v!r}")


def _one_of(obj, name: str, valid) -> None:
    v = getattr(obj, name)
    if v not in valid:
        raise KdlibError(f"{_where(obj)}.{name} is {v!r}; choose one of: {choices(valid)}")


def _where(obj) -> str:
    return {TinyGPTConfig: "model", LossConfig: "loss", TeacherConfig: "teacher", DataConfig: "data",
            CacheConfig: "cache", TrainConfig: "train"}.get(type(obj), type(obj).__name__)


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to type ``hint``, or KdlibError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except KdlibError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif hint is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    else:  # pragma: no cover - a field type this loader does not know yet
        raise TypeError(f"config field type {hint!r} is not supported by the loader")
    name = getattr(hint, "__name__", str(hint))
    raise KdlibError(f"{where} must be of type {name}, got {value!r} ({type(value).__name__})")


def _check_fields(cls, d: dict, where: str) -> dict:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in d.items():
        if key not in names:
            raise KdlibError(f"{where} has unknown key {key!r}; valid keys: {choices(names)}")
        out[key] = _check_value(value, hints[key], f"{where}.{key}")
    return out


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise KdlibError(f"{where} must be a JSON object, got {type(d).__name__}")
    return cls(**_check_fields(cls, d, where))

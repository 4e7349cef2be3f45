"""One run's config: preset, experiment, seed and the sections; saved as JSON, loaded strictly.

A run's full ``ExperimentConfig`` is saved next to its results as JSON and
``ExperimentConfig.from_dict`` rebuilds it exactly. The experiment's name
``exp`` is the one place its loss components are stored: ``spec`` parses it
(with ``loss.feature``), ``loss_terms`` adds the preset's values for its
divergence.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..errors import KdlibError
from ..grid import ExperimentSpec, parse
from .sections import CacheConfig, DataConfig, LossConfig, LossTerms, TeacherConfig, TinyGPTConfig, TrainConfig
from .strict import build, check_value
from .sweep import check_sweep

MAX_SEED = 2**63  # torch.manual_seed takes a 64-bit seed; kdlib's seeds stay below its signed range

# A config.json written before the name became the one source repeated the
# experiment's components in "loss"; such a file loads when they agree with "exp".
_OLD_LOSS_FIELDS = {"divergence": Optional[str], "divergence_param": Optional[float],
                    "feature_map": Optional[str], "cosine": bool}


@dataclass
class ExperimentConfig:
    """Everything that defines one run: preset, experiment name, seed and the sections."""

    preset: str = "study"
    exp: str = "ce"  # a name from kdlib.grid (the 14 of the study, or any the grammar parses)
    seed: int = 42
    model: TinyGPTConfig = field(default_factory=TinyGPTConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The sensitivity sweep's values this run was given ({"loss.temperature": 1.0}; kdlib.config.sweep):
    # already set in the sections above, recorded here for the run's name and the report. {} = no sweep
    # (then left out of config.json, as kdlib wrote it before sweeps).
    sweep: dict = field(default_factory=dict)

    @property
    def spec(self) -> ExperimentSpec:
        """The experiment's loss components and what it needs (teacher, features), parsed from ``exp``.

        Parsed once and kept; parsed again only if ``exp`` or ``loss.feature`` changed since.
        """
        key = (self.exp, self.loss.feature)
        cached = self.__dict__.get("_spec")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_spec"] = (key, parse(self.exp, feature=self.loss.feature))
        return cached[1]

    @property
    def loss_terms(self) -> LossTerms:
        """The loss this run computes: ``spec``'s components with the preset's values for its divergence."""
        return self.loss.resolve(self.spec)

    def with_experiment(self, name: str, feature: Optional[str] = None) -> "ExperimentConfig":
        """A copy that runs experiment ``name`` (canonicalised), on feature kind ``feature`` if given.

        The loss values stay the preset's (``loss_terms`` resolves them for the
        experiment), so setting another experiment afterwards gives exactly
        what setting it first would have.
        """
        loss = dataclasses.replace(self.loss, feature=feature or self.loss.feature)
        return dataclasses.replace(self, exp=parse(name, feature=loss.feature).name, loss=loss)

    def validate(self) -> "ExperimentConfig":
        """Raise ``KdlibError`` on any out-of-range value; return self for chaining."""
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
        spec = self.spec
        if self.train.teacher_source == "cache" and spec.needs_teacher and not spec.output_only:
            raise KdlibError(f"experiment {self.exp!r} needs the teacher online (features or cosine need its "
                             "full outputs); a top-k cache cannot serve it: use train.teacher_source = 'online'")
        if self.cache.top_k > self.model.vocab_size:
            raise KdlibError(f"cache.top_k ({self.cache.top_k}) exceeds the vocabulary ({self.model.vocab_size})")
        if self.data.block_size > self.model.block_size:
            raise KdlibError(f"data.block_size ({self.data.block_size}) exceeds the model's "
                             f"block_size ({self.model.block_size})")
        check_sweep(self)
        return self

    def to_dict(self) -> dict:
        """The config as JSON-able dicts; ``sweep`` only where it has values, so that the config.json
        of a run outside any sweep is what kdlib wrote before sweeps (its resume state's digest too)."""
        d = dataclasses.asdict(self)
        if not d["sweep"]:
            del d["sweep"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        d, old = _split_old_loss_fields(d)
        cfg = build(cls, d, "config").validate()
        disagree = [f"loss.{k} is {v!r}, the experiment's {getattr(cfg.spec, k)!r}" for k, v in old.items()
                    if v != getattr(cfg.spec, k)]
        if disagree:
            raise KdlibError(f"the loss components in this config do not match experiment {cfg.exp!r} "
                             f"({'; '.join(disagree)}); an experiment's components are its name: drop "
                             f"{', '.join(f'loss.{k}' for k in old)} and set exp (config.with_experiment(name))")
        return cfg

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


def _split_old_loss_fields(d) -> tuple:
    """``d`` without, and apart, the components an older config.json repeated in "loss" (``_OLD_LOSS_FIELDS``)."""
    loss = d.get("loss") if isinstance(d, dict) else None
    if not isinstance(loss, dict) or not set(loss) & set(_OLD_LOSS_FIELDS):
        return d, {}
    old = {k: check_value(loss[k], hint, f"config.loss.{k}") for k, hint in _OLD_LOSS_FIELDS.items() if k in loss}
    return {**d, "loss": {k: v for k, v in loss.items() if k not in old}}, old

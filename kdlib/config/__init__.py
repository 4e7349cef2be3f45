"""Configuration: the sections of a run's config, one run's ``ExperimentConfig``, and the presets.

    sections.py    model, loss, teacher, data, cache and train dataclasses
    experiment.py  ExperimentConfig: the experiment name (the one source of its
                   loss components), JSON save and strict load
    presets.py     smoke, demo, study, colab-a100, colab-t4; their sweeps' seeds
    strict.py      range checks that name the field; the dict -> dataclass loader
    sweep.py       sensitivity sweeps: --set KEY=V1,V2 parsed and checked, their points applied

Every name is importable from ``kdlib.config`` as before the split.
"""

from .experiment import MAX_SEED, ExperimentConfig
from .presets import (COLAB_TOKENS, LOCAL_RESUME_DIR, LOCAL_WEIGHTS_DIR, PRESETS, SEEDS, preset,
                      preset_seeds)
from .sections import (TEACHER_SOURCES, CacheConfig, DataConfig, LossConfig, LossTerms, TeacherConfig,
                       TinyGPTConfig, TrainConfig)

__all__ = [
    "CacheConfig", "COLAB_TOKENS", "DataConfig", "ExperimentConfig", "LOCAL_RESUME_DIR", "LOCAL_WEIGHTS_DIR",
    "LossConfig", "LossTerms", "MAX_SEED", "PRESETS", "SEEDS", "TEACHER_SOURCES", "TeacherConfig",
    "TinyGPTConfig", "TrainConfig", "preset", "preset_seeds",
]

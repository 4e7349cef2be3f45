"""Shared fixtures: tiny random models, built locally (no hub access, ever)."""

from __future__ import annotations

import os

# No network here: make any accidental hub lookup fail fast instead of waiting
# on connection timeouts. Set before transformers / huggingface_hub import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kdlib.config import TinyGPTConfig  # noqa: E402

TEACHER_VOCAB = 97

# tests/browser drives a real browser under ipywidgets 7 (its own environment: .ci/run builds it);
# collected only when named, as `python -m pytest tests/browser`.
collect_ignore = ["browser"]


def build_teacher(n_layer: int = 4, n_embd: int = 24, n_head: int = 2, vocab_size: int = TEACHER_VOCAB,
                  n_positions: int = 64, seed: int = 0, **kw):
    """A tiny random GPT2LMHeadModel (dropout 0, sdpa attention as built)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def build_tiny_config(**overrides) -> TinyGPTConfig:
    """A tiny TinyGPTConfig: vocab 97 (the tiny teacher's), 2 layers, width 16, dropout 0."""
    base = TinyGPTConfig(vocab_size=TEACHER_VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=16, d_ff=32,
                         dropout=0.0, positions="learned")
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def make_teacher():
    """Factory: make_teacher(n_layer=4, n_embd=24, ...) -> fresh tiny random GPT2LMHeadModel."""
    return build_teacher


@pytest.fixture
def tiny_config():
    """Factory: tiny_config(**overrides) -> TinyGPTConfig."""
    return build_tiny_config


@pytest.fixture
def ids():
    """[2, 8] random token ids in the tiny vocabulary."""
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, TEACHER_VOCAB, (2, 8), generator=g)


# --------------------------------------------------------------------------
# prepared smoke data (tests/test_data.py, tests/test_cache.py)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """(folder, {split: TokenSplit}): the smoke preset's data prepared once per session.

    Shared read-only: a test that changes files copies the folder first.
    """
    from kdlib.config import preset
    from kdlib.prep import prepare

    folder = tmp_path_factory.mktemp("smoke_data")
    splits = prepare(preset("smoke"), folder, log=lambda line: None)
    return folder, splits


@pytest.fixture
def data_dir(smoke_data, tmp_path):
    """A private copy of the prepared smoke data (training writes teacher_ppl.json into it)."""
    import shutil

    return shutil.copytree(smoke_data[0], tmp_path / "data")


@pytest.fixture(scope="module")
def cache_data(smoke_data, tmp_path_factory):
    """A copy of the smoke data with the train split's top-k cache (k = 16) for 'kl' in DATA/cache.

    Shared: tests that train from it copy it first (``cached_data_dir``).
    """
    import shutil

    from kdlib.cache import build_cache
    from kdlib.config import preset

    folder = shutil.copytree(smoke_data[0], tmp_path_factory.mktemp("cache_data") / "data")
    build_cache(preset("smoke", "kl"), folder, folder / "cache", split="train", log=lambda *_: None,
                progress=False)
    return folder


@pytest.fixture
def cached_data_dir(cache_data, tmp_path):
    import shutil

    return shutil.copytree(cache_data, tmp_path / "data")


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """One intra-op thread for the whole session: on the 2-core CI machine a second OpenMP thread
    only adds contention (a teacher pass measured ~20x slower), and the golden curve was made so."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle (pickle or torch.load) fails the test: kdlib must refuse such files unread."""
    import pickle

    import torch

    def boom(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, boom)

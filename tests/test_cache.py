"""kdlib.cache: the teacher's top-k cache (design.md §7).

The cache is checked against the teacher run directly on the same windows
(``losses.teacher_top_k``), and the sparse loss read from the cache against
the one computed from the live teacher, so output-only training can drop the
teacher. Then resumption after an interruption (byte-identical to an
uninterrupted build), refusal of a cache built for another run, corrupt files
and the CLI. The smoke preset's validation split (136 windows) keeps builds
to a fraction of a second.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import snapshot
import torch
from torch import nn
from torch.testing import assert_close

from kdlib import cli
from kdlib import losses as L
from kdlib.cache import CACHE_FORMAT, TopKCache, build_cache, bytes_per_token, cache_identity
from kdlib.config import preset
from kdlib.data import load_split
from kdlib.errors import KdlibError
from kdlib.models import load_teacher
from kdlib.prep import prepare

SPLIT = "validation"




@pytest.fixture(scope="module")
def cfg():
    return preset("smoke")


@pytest.fixture(scope="module")
def teacher(cfg):
    return load_teacher(cfg.teacher, student_vocab_size=cfg.model.vocab_size)


@pytest.fixture(scope="module")
def built(smoke_data, cfg, teacher, tmp_path_factory):
    """(cache folder, log lines): an uninterrupted build of the validation split's cache."""
    folder = tmp_path_factory.mktemp("cache")
    lines = []
    build_cache(cfg, smoke_data[0], folder, split=SPLIT, teacher=teacher, log=lines.append, progress=False)
    return folder, lines


@pytest.fixture
def built_copy(built, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(built[0], folder)
    return folder


def live_top_k(teacher, tokens: np.ndarray, windows, T: int, k: int, temperature: float):
    """teacher_top_k on the teacher's logits for each window's inputs tokens[i·T : i·T + T], one at a time."""
    out = []
    for i in windows:
        ids = torch.from_numpy(np.asarray(tokens[i * T:i * T + T], dtype=np.int64))[None]  # [1, T]
        with torch.no_grad():
            logits = teacher(ids).logits  # [1, T, V]
        out.append((logits, *L.teacher_top_k(logits, k, temperature)))
    return [torch.cat(parts) for parts in zip(*out)]  # logits [n, T, V], logp, ids [n, T, k], tail [n, T]


class Interrupting(nn.Module):
    """The teacher, but its forward raises after ``after`` calls: a Colab disconnect mid-build."""

    def __init__(self, teacher: nn.Module, after: int):
        super().__init__()
        self.teacher, self.after, self.calls = teacher, after, 0

    def forward(self, ids, **kw):
        if self.calls >= self.after:
            raise RuntimeError("simulated interruption")
        self.calls += 1
        return self.teacher(ids, **kw)


class Counting(nn.Module):
    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher, self.windows = teacher, 0

    def forward(self, ids, **kw):
        self.windows += ids.shape[0]
        return self.teacher(ids, **kw)


# --------------------------------------------------------------------------
# contents


def test_bytes_per_token():
    per_token = bytes_per_token(32, 50_257)
    print(f"\ntop-32 cache at V = 50,257: {per_token} bytes per token")
    assert per_token == 132  # 32 fp16 log-probs + 32 uint16 ids + 1 fp32 tail
    assert bytes_per_token(16, 512) == 16 * 2 + 16 * 2 + 4
    assert bytes_per_token(32, 151_936) == 32 * 2 + 32 * 4 + 4  # ids need uint32


def test_manifest_and_file_sizes(built, smoke_data, cfg):
    folder, lines = built
    tokens = load_split(smoke_data[0], SPLIT)
    T, k = cfg.data.block_size, cfg.cache.top_k
    n = (tokens.n_tokens - 1) // T
    m = json.loads((folder / f"{SPLIT}.cache.json").read_text())
    assert m["format"] == CACHE_FORMAT
    assert m["k"] == k == 16 and m["temperature"] == 2.0 == cfg.loss_terms.temperature
    assert m["tokenizer_hash"] == tokens.manifest["inputs"]["tokenizer"]["hash"]
    assert m["data_sha256"] == tokens.manifest["sha256"]
    assert m["split"] == SPLIT and m["block_size"] == T and m["windows"] == n > 100
    assert m["teacher"] == {"name": "random-gpt2", "revision": None, "random_init": cfg.teacher.random_init}
    assert m["dtypes"] == {"logp": "float16", "ids": "uint16", "tail": "float32"}
    assert m["complete"] is True and m["complete_windows"] == n
    assert {k_: m[k_] for k_ in cache_identity(cfg, tokens)} == cache_identity(cfg, tokens)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sizes[f"{SPLIT}.topk_logp.bin"] == n * T * k * 2
    assert sizes[f"{SPLIT}.topk_ids.bin"] == n * T * k * 2
    assert sizes[f"{SPLIT}.log_tail.bin"] == n * T * 4
    assert sum(sizes[f"{SPLIT}.{p}.bin"] for p in ("topk_logp", "topk_ids", "log_tail")) \
        == n * T * bytes_per_token(k, cfg.model.vocab_size)
    assert not list(folder.glob(".*.tmp"))
    assert any("68 bytes/token" in line for line in lines)


def test_cache_holds_the_teachers_top_k(built, smoke_data, cfg, teacher):
    folder, _ = built
    cache = TopKCache(folder, SPLIT)
    T, k, temp = cfg.data.block_size, cache.k, cache.manifest["temperature"]
    tokens = load_split(smoke_data[0], SPLIT).tokens()
    windows = [0, 5, 77, cache.manifest["windows"] - 1]
    logits, ref_logp, ref_ids, ref_tail = live_top_k(teacher, tokens, windows, T, k, temp)
    logp, ids, tail = cache.batch(windows)
    assert logp.shape == ids.shape == (4, T, k) and tail.shape == (4, T)
    assert logp.dtype == tail.dtype == torch.float32 and ids.dtype == torch.int64
    # log-probs to fp16 precision (the cache's storage type)
    assert_close(logp, ref_logp, rtol=2e-3, atol=1e-4)
    # ids exactly where the neighbouring values are not (numerically) tied ...
    gaps = (ref_logp[..., :-1] - ref_logp[..., 1:]).abs()  # [n, T, k-1]
    clear = torch.ones_like(ref_ids, dtype=torch.bool)
    clear[..., :-1] &= gaps > 1e-3
    clear[..., 1:] &= gaps > 1e-3
    assert clear.float().mean() > 0.5
    assert torch.equal(ids[clear], ref_ids[clear])
    # ... and everywhere the cached ids carry the teacher's log-probs at those ids
    full = torch.log_softmax(logits / temp, dim=-1)  # [n, T, V]
    assert_close(full.gather(-1, ids), logp, rtol=2e-3, atol=1e-4)
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct ids per position
    assert_close(tail, ref_tail, rtol=1e-4, atol=1e-5)
    # top-k mass + tail mass = 1
    assert_close(torch.logaddexp(logp.logsumexp(-1), tail), torch.zeros_like(tail), rtol=0, atol=2e-3)


def test_sparse_loss_from_the_cache_equals_the_live_teacher(built, smoke_data, cfg, teacher):
    folder, _ = built
    cache = TopKCache(folder, SPLIT)
    T, k, temp = cfg.data.block_size, cache.k, cache.manifest["temperature"]
    tokens = load_split(smoke_data[0], SPLIT).tokens()
    windows = [3, 4, 50, 100]
    _, ref_logp, ref_ids, ref_tail = live_top_k(teacher, tokens, windows, T, k, temp)
    g = torch.Generator().manual_seed(0)
    student = (2.0 * torch.randn(len(windows), T, cfg.model.vocab_size, generator=g)).requires_grad_(True)
    mask = torch.rand(len(windows), T, generator=g) > 0.2
    for name, param in (("kl", None), ("js", None), ("gjsd", 0.3)):
        from_cache = L.sparse_divergence(name, student, *cache.batch(windows), temperature=temp, mask=mask,
                                         param=param)
        live = L.sparse_divergence(name, student, ref_logp, ref_ids, ref_tail, temperature=temp, mask=mask,
                                   param=param)
        assert from_cache.item() > 0
        assert_close(from_cache, live, rtol=2e-3, atol=1e-5)
        g_cache, = torch.autograd.grad(from_cache, student)
        g_live, = torch.autograd.grad(live, student)
        assert_close(g_cache, g_live, rtol=1e-2, atol=1e-5)


def test_a_complete_cache_is_reused_without_the_teacher(built_copy, smoke_data, cfg, teacher):
    before = snapshot(built_copy)
    lines = []
    cache = build_cache(cfg, smoke_data[0], built_copy, split=SPLIT, teacher=Interrupting(teacher, after=0),
                        log=lines.append, progress=False)
    assert cache.manifest["complete"] and any("reused" in line for line in lines)
    assert snapshot(built_copy) == before


# --------------------------------------------------------------------------
# interruption and resumption


def test_interrupted_build_resumes_to_identical_files(built, smoke_data, cfg, teacher, tmp_path):
    folder = tmp_path / "cache"
    assert cfg.cache.batch_size == 8 and cfg.cache.chunk_windows == 16  # 2 forward calls per chunk
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build_cache(cfg, smoke_data[0], folder, split=SPLIT, teacher=Interrupting(teacher, after=2),
                    log=lambda s: None, progress=False)
    m = json.loads((folder / f"{SPLIT}.cache.json").read_text())
    assert m["complete"] is False and m["complete_windows"] == 16 < m["windows"]
    with pytest.raises(KdlibError, match="incomplete.*16 of"):
        TopKCache(folder, SPLIT)
    lines = []
    counting = Counting(teacher)
    cache = build_cache(cfg, smoke_data[0], folder, split=SPLIT, teacher=counting, log=lines.append,
                        progress=False)
    assert any("resuming" in line and "16" in line for line in lines)
    assert counting.windows == m["windows"] - 16  # the finished chunk was not computed again
    assert cache.manifest["complete"] and cache.manifest["complete_windows"] == m["windows"]
    assert snapshot(folder) == snapshot(built[0])


def test_interrupted_in_the_first_chunk_starts_over(built, smoke_data, cfg, teacher, tmp_path):
    folder = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build_cache(cfg, smoke_data[0], folder, split=SPLIT, teacher=Interrupting(teacher, after=1),
                    log=lambda s: None, progress=False)
    assert json.loads((folder / f"{SPLIT}.cache.json").read_text())["complete_windows"] == 0
    build_cache(cfg, smoke_data[0], folder, split=SPLIT, teacher=teacher, log=lambda s: None, progress=False)
    assert snapshot(folder) == snapshot(built[0])


# --------------------------------------------------------------------------
# a cache built for another run is refused


def other_run(ident: dict, key: str) -> dict:
    ident = json.loads(json.dumps(ident))
    if key == "k":
        ident["k"] = 32
    elif key == "temperature":
        ident["temperature"] = 1.0
    elif key == "teacher":
        ident["teacher"]["name"] = "gpt2"
    elif key == "tokenizer_hash":
        ident["tokenizer_hash"] = "0" * 64
    elif key == "data_sha256":
        ident["data_sha256"] = "f" * 64
    elif key == "block_size":
        ident["block_size"] = 64
    return ident


@pytest.mark.parametrize("key", ["k", "temperature", "teacher", "tokenizer_hash", "data_sha256", "block_size"])
def test_cache_for_another_run_is_refused_naming_the_mismatch(built, smoke_data, cfg, key):
    folder, _ = built
    ident = cache_identity(cfg, load_split(smoke_data[0], SPLIT))
    TopKCache(folder, SPLIT, expect=ident)  # the matching run opens it
    with pytest.raises(KdlibError, match=f"{key}: cache has") as e:
        TopKCache(folder, SPLIT, expect=other_run(ident, key))
    assert "built for another run" in str(e.value)
    assert str(e.value).count("cache has") == 1  # only the key that differs


def test_build_into_a_folder_with_another_runs_cache_changes_nothing(built_copy, smoke_data, teacher):
    before = snapshot(built_copy)
    for change in ("k", "temperature"):
        cfg = preset("smoke")
        if change == "k":
            cfg.cache.top_k = 8
        else:
            cfg.loss.temperature = 1.0
        with pytest.raises(KdlibError, match=f"{change}: cache has.*Nothing was changed"):
            build_cache(cfg, smoke_data[0], built_copy, split=SPLIT, teacher=teacher, log=lambda s: None,
                        progress=False)
        assert snapshot(built_copy) == before


def test_cache_of_other_data_is_refused(built_copy, smoke_data, cfg, teacher, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(smoke_data[0], data)
    other = preset("smoke")
    other.data.split_seed = 1
    prepare(other, data, log=lambda s: None)
    before = snapshot(built_copy)
    with pytest.raises(KdlibError, match="data_sha256: cache has"):
        build_cache(other, data, built_copy, split=SPLIT, teacher=teacher, log=lambda s: None, progress=False)
    assert snapshot(built_copy) == before


# --------------------------------------------------------------------------
# corrupt files


@pytest.mark.parametrize("part", ["topk_logp", "topk_ids", "log_tail"])
def test_truncated_cache_file_is_refused_naming_it(built_copy, part):
    path = built_copy / f"{SPLIT}.{part}.bin"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(KdlibError, match=f"{SPLIT}.{part}.bin.*truncated"):
        TopKCache(built_copy, SPLIT)


def test_missing_cache_file_is_refused_naming_it(built_copy):
    (built_copy / f"{SPLIT}.topk_ids.bin").unlink()
    with pytest.raises(KdlibError, match="topk_ids.bin.*missing"):
        TopKCache(built_copy, SPLIT)


@pytest.mark.parametrize("content", ["{truncated", "[]", '{"format": "something else"}',
                                     '{"format": "kdlib.topk/1", "complete": true}'])
def test_corrupt_cache_manifest_is_refused(built_copy, smoke_data, cfg, teacher, content):
    (built_copy / f"{SPLIT}.cache.json").write_text(content)
    with pytest.raises(KdlibError, match="cache.json"):
        TopKCache(built_copy, SPLIT)
    if content == "{truncated":
        with pytest.raises(KdlibError, match="cache.json.*corrupt"):
            build_cache(cfg, smoke_data[0], built_copy, split=SPLIT, teacher=teacher, log=lambda s: None,
                        progress=False)


def test_missing_cache_is_refused(tmp_path):
    with pytest.raises(KdlibError, match="does not exist"):
        TopKCache(tmp_path, SPLIT)


# --------------------------------------------------------------------------
# CLI


def test_cli_cache(smoke_data, tmp_path, capsys):
    data, cache_dir = str(smoke_data[0]), str(tmp_path / "cache")
    assert cli.main(["cache", "--preset", "smoke", "--data-dir", data, "--cache-dir", cache_dir]) == 0
    out = capsys.readouterr().out
    assert "train: top-16 cache complete" in out
    manifest = json.loads((tmp_path / "cache" / "train.cache.json").read_text())
    assert manifest["complete"] and manifest["temperature"] == 2.0 and manifest["k"] == 16
    cache = TopKCache(cache_dir, "train", expect=cache_identity(preset("smoke", "kl"),
                                                                 load_split(data, "train")))
    assert cache.batch([0])[0].shape == (1, 32, 16)
    files = snapshot(tmp_path / "cache")
    assert cli.main(["cache", "--preset", "smoke", "--data-dir", data, "--cache-dir", cache_dir]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "train: top-16 cache complete" in out
    assert snapshot(tmp_path / "cache") == files


def test_cli_cache_without_prepared_data_exits_2(tmp_path, capsys):
    code = cli.main(["cache", "--preset", "smoke", "--data-dir", str(tmp_path), "--cache-dir",
                     str(tmp_path / "cache")])
    assert code == 2
    assert "train.json does not exist" in capsys.readouterr().err


def test_coverage_is_the_top_k_mass_kept_per_position(cached_data_dir):
    from kdlib.cache import TopKCache, coverage

    cache = TopKCache(cached_data_dir / "cache", "train")
    tail = np.asarray(cache.arrays["tail"], dtype=np.float64)
    kept = 1.0 - np.exp(tail)  # the tail is log(1 - top-k mass)
    every = coverage(cache, max_windows=10**9)
    assert every["windows"] == tail.shape[0] and every["positions"] == tail.size
    assert every["mean"] == pytest.approx(kept.mean()) and every["min"] == pytest.approx(kept.min())
    assert every["p05"] == pytest.approx(np.quantile(kept, 0.05)) and every["k"] == cache.k
    few = coverage(cache, max_windows=3)
    assert few["windows"] == 3 and few["positions"] == 3 * tail.shape[1]

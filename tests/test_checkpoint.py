"""Student checkpoints (fp16 safetensors), resume state and atomic writes (the budget: test_storage.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.testing import assert_close

import kdlib
import kdlib.config
from kdlib.checkpoint import (RESUME_FORMAT, STUDENT_FORMAT, load_resume, load_student, save_resume,
                              save_student, student_metadata)
from kdlib.errors import KdlibError
from kdlib.evaluate import perplexity
from kdlib.fileio import atomic_path, atomic_write_bytes
from kdlib.models import TinyGPT
from kdlib.storage import MiB



def _model(cfg, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(cfg).eval()
    # Non-trivial biases and norms, so a mix-up between parameters shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _keys(path) -> set:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _stored(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _raw_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _temp_files(folder: Path) -> list:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def _snapshot(root: Path) -> dict:
    """{relative path: bytes} of every file under root (folders included as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _ids(vocab: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------
# save_student / load_student round trip


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_student_round_trip_weights_are_the_fp16_rounded_originals(tmp_path, tiny_config, tie, positions):
    cfg = tiny_config(tie_embeddings=tie, positions=positions)
    model = _model(cfg)
    path = tmp_path / "run" / "student.safetensors"
    n_bytes = save_student(model, path, exp="layerwise-kl", step=150)
    assert path.is_file() and n_bytes == path.stat().st_size
    assert not _temp_files(tmp_path)

    loaded = load_student(path)
    assert isinstance(loaded, TinyGPT) and loaded.config == cfg
    original = model.state_dict()
    restored = loaded.state_dict()
    assert set(restored) == set(original)
    for k, v in original.items():
        assert restored[k].dtype == torch.float32, k
        assert_close(restored[k], v.half().float(), rtol=0, atol=0, msg=f"{k} is not the fp16-rounded original")
        assert v.abs().sum() > 0, k  # every tensor is non-trivial, so a mix-up would show
    if tie:
        assert loaded.lm_head.weight is loaded.wte.weight
    else:
        assert loaded.lm_head.weight is not loaded.wte.weight
        assert_close(loaded.lm_head.weight, model.lm_head.weight.half().float(), rtol=0, atol=0)

    # Logits: identical to a model holding the fp16-rounded weights, close to the original's.
    ids = _ids(cfg.vocab_size, (2, 20))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    loaded.eval()
    with torch.no_grad():
        got, want, exact = loaded(ids).logits, model(ids).logits, rounded(ids).logits
    assert_close(got, exact)
    assert_close(got, want, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_student_file_stores_fp16_tied_head_once_and_no_position_table(tmp_path, tiny_config, tie):
    cfg = tiny_config(tie_embeddings=tie, positions="sinusoidal")
    model = _model(cfg)
    path = tmp_path / "s.safetensors"
    save_student(model, path)
    stored = _stored(path)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
    assert set(stored) == expected
    assert ("lm_head.weight" in stored) == (not tie)
    assert "wte.weight" in stored
    assert not any("pos" in k or "wpe" in k for k in stored), sorted(stored)
    for k, t in stored.items():
        assert t.dtype == torch.float16, k
    # Learned positions are parameters: stored.
    learned = tiny_config(tie_embeddings=tie, positions="learned")
    save_student(_model(learned), tmp_path / "l.safetensors")
    assert "wpe.weight" in _keys(tmp_path / "l.safetensors")


def test_tied_file_is_smaller_by_one_embedding_table(tmp_path, tiny_config):
    tied = save_student(_model(tiny_config()), tmp_path / "a.safetensors")
    untied = save_student(_model(tiny_config(tie_embeddings=False)), tmp_path / "b.safetensors")
    cfg = tiny_config()
    table = cfg.vocab_size * cfg.n_embd * 2
    assert untied - tied >= table
    assert untied - tied < table + 200  # plus one header entry


def test_student_metadata_holds_config_version_and_meta(tmp_path, tiny_config):
    cfg = tiny_config(positions="sinusoidal", n_layer=3)
    path = tmp_path / "s.safetensors"
    meta = {"exp": "last2all-js-cos", "step": 1234, "metrics": {"val_ppl": 42.5}}
    save_student(_model(cfg), path, **meta)

    raw = _raw_metadata(path)
    assert raw["format"] == STUDENT_FORMAT
    assert raw["kdlib_version"] == kdlib.__version__
    assert json.loads(raw["model_config"]) == dataclasses.asdict(cfg)
    assert json.loads(raw["meta"]) == meta

    info = student_metadata(path)
    assert info == {"model_config": dataclasses.asdict(cfg), "kdlib_version": kdlib.__version__, "meta": meta}
    # The file alone rebuilds the model with the same config.
    assert load_student(path).config == cfg


def test_student_meta_must_be_json(tmp_path, tiny_config):
    path = tmp_path / "s.safetensors"
    with pytest.raises(KdlibError, match="JSON"):
        save_student(_model(tiny_config()), path, exp={1, 2})
    assert not path.exists() and not _temp_files(tmp_path)


def test_save_student_refuses_a_non_tinygpt(tmp_path, make_teacher):
    path = tmp_path / "s.safetensors"
    with pytest.raises(KdlibError, match="TinyGPT"):
        save_student(make_teacher(n_layer=1), path)
    assert not path.exists()


def test_load_student_in_float16(tmp_path, tiny_config):
    cfg = tiny_config()
    model = _model(cfg)
    path = tmp_path / "s.safetensors"
    save_student(model, path)
    half = load_student(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert all(t.dtype == torch.float16 for t in half.state_dict().values())
    assert half.lm_head.weight is half.wte.weight
    for k, v in model.state_dict().items():
        assert_close(half.state_dict()[k], v.half(), rtol=0, atol=0)
    sinus = tiny_config(positions="sinusoidal")
    save_student(_model(sinus), tmp_path / "p.safetensors")
    half = load_student(tmp_path / "p.safetensors", dtype=torch.float16)
    assert half.pos_table.dtype == torch.float16


def test_study_student_checkpoint_fits_100_mib(tmp_path):
    cfg = kdlib.config.preset("study").model
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    n_params = model.num_parameters()
    assert n_params == 50_951_680
    path = tmp_path / "study" / "student.safetensors"
    n_bytes = save_student(model, path, exp="ce", step=0)
    size = path.stat().st_size
    assert size == n_bytes
    print(f"\nstudy student checkpoint: {size / MiB:.2f} MiB (float32 would be {4 * n_params / MiB:.1f} MiB)")
    assert size < 100 * MiB
    assert size < 0.51 * 4 * n_params
    assert 4 * n_params > 100 * MiB  # the float32 copy would not fit
    assert "lm_head.weight" not in _keys(path)
    assert student_metadata(path)["model_config"] == dataclasses.asdict(cfg)


# --------------------------------------------------------------------------
# fp16 round trip on a trained student: perplexity barely moves


def _markov_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1234)  # the chain itself: shared by train and held-out text
    nxt = np.stack([rng.choice(vocab, size=3, replace=False) for _ in range(vocab)])  # [V, 3]
    probs = np.array([0.75, 0.2, 0.05])
    draw = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = draw.integers(vocab)
    choices = draw.choice(3, size=n, p=probs)
    for i in range(1, n):
        out[i] = nxt[out[i - 1], choices[i]]
    return out


def test_fp16_round_trip_of_a_trained_student_keeps_perplexity(tmp_path, tiny_config):
    vocab, block = 64, 32
    cfg = tiny_config(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32, d_ff=64)
    train = torch.from_numpy(_markov_tokens(20_000, vocab, seed=1))
    held_out = _markov_tokens(1_000, vocab, seed=2)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    before = perplexity(model, held_out, block, stride=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        starts = torch.randint(0, len(train) - block - 1, (16,), generator=g)
        x = torch.stack([train[s:s + block + 1] for s in starts])
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = perplexity(model, held_out, block, stride=16)
    assert before > 0.8 * vocab
    assert trained < vocab / 4, f"training did not learn the chain: ppl {trained:.2f}"

    path = tmp_path / "student.safetensors"
    save_student(model, path, step=150)
    loaded = load_student(path)
    after = perplexity(loaded, held_out, block, stride=16)
    rel = abs(after - trained) / trained
    print(f"\ntrained tiny student perplexity: {before:.2f} untrained, {trained:.4f} float32, "
          f"{after:.4f} after the fp16 round trip (relative change {100 * rel:.4f}%)")
    assert rel < 0.005


# --------------------------------------------------------------------------
# refusals on save


@pytest.mark.parametrize("bad", [1e6, float("inf"), float("nan")])
def test_save_student_refuses_weights_that_do_not_fit_fp16(tmp_path, tiny_config, bad):
    model = _model(tiny_config())
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[3, 4] = bad
    path = tmp_path / "run" / "student.safetensors"
    with pytest.raises(KdlibError, match=r"h\.1\.mlp\.c_fc\.weight.*float16"):
        save_student(model, path)
    assert not path.exists()
    assert not _temp_files(tmp_path)


def test_save_student_overflow_keeps_the_previous_good_file(tmp_path, tiny_config):
    model = _model(tiny_config())
    path = tmp_path / "student.safetensors"
    save_student(model, path, step=1)
    good = path.read_bytes()
    with torch.no_grad():
        model.wte.weight[0, 0] = -1e6
    with pytest.raises(KdlibError, match="float16"):
        save_student(model, path, step=2)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]


# --------------------------------------------------------------------------
# refusals on load


def test_load_student_nonexistent_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(KdlibError, match="does not exist") as e:
        load_student(path)
    assert "nope.safetensors" in str(e.value)
    with pytest.raises(KdlibError, match="does not exist"):
        student_metadata(path)
    with pytest.raises(KdlibError, match="does not exist"):
        load_student(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("cut", [0.5, 0.99, 12])
def test_load_student_truncated_file(tmp_path, tiny_config, cut):
    path = tmp_path / "s.safetensors"
    save_student(_model(tiny_config()), path)
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    path.write_bytes(data[:n])
    with pytest.raises(KdlibError, match="truncated") as e:
        load_student(path)
    assert str(path) in str(e.value)


def test_load_student_empty_and_random_bytes(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"")
    with pytest.raises(KdlibError, match="not a readable safetensors"):
        load_student(path)
    for seed in range(3):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(KdlibError, match="not a readable safetensors"):
            load_student(path)
    # A plausible header length followed by garbage JSON.
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 16)
    with pytest.raises(KdlibError, match="not a readable safetensors"):
        load_student(path)


def test_load_student_refuses_a_pickle_without_unpickling(tmp_path, tiny_config, no_unpickling):
    path = tmp_path / "student.safetensors"
    torch.save(_model(tiny_config()).state_dict(), path)  # what a careless save would write (saving pickles, loading is forbidden)
    for call in (load_student, student_metadata, load_resume):
        with pytest.raises(KdlibError, match="pickle") as e:
            call(path)
        assert str(path) in str(e.value)
        assert not isinstance(e.value, AssertionError)


def test_load_student_refuses_safetensors_without_kdlib_metadata(tmp_path, tiny_config):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _model(tiny_config(tie_embeddings=False)).state_dict().items()},
              str(path))
    with pytest.raises(KdlibError, match="not a kdlib student") as e:
        load_student(path)
    assert STUDENT_FORMAT in str(e.value)
    path2 = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path2), metadata={"format": "pt"})
    with pytest.raises(KdlibError, match="not a kdlib student"):
        student_metadata(path2)


def _rewrite(src: Path, dst: Path, tensors=None, metadata=None) -> None:
    stored = _stored(src)
    md = dict(_raw_metadata(src))
    if tensors is not None:
        stored = tensors(stored)
    if metadata is not None:
        md = metadata(md)
    save_file(stored, str(dst), metadata=md)


def test_load_student_refuses_shapes_that_do_not_match_its_config(tmp_path, tiny_config):
    cfg = tiny_config()
    src = tmp_path / "s.safetensors"
    save_student(_model(cfg), src)

    def other_config(**changes):
        def edit(md):
            md["model_config"] = json.dumps(dataclasses.asdict(dataclasses.replace(cfg, **changes)))
            return md
        return edit

    bad = tmp_path / "bad.safetensors"
    _rewrite(src, bad, metadata=other_config(d_ff=64))
    with pytest.raises(KdlibError, match="does not match its own model config") as e:
        load_student(bad)
    assert "wrong shape" in str(e.value) and "c_fc" in str(e.value)

    _rewrite(src, bad, metadata=other_config(n_layer=3))  # a layer missing from the file
    with pytest.raises(KdlibError, match=r"missing \['h\.2\."):
        load_student(bad)

    _rewrite(src, bad, tensors=lambda t: {**t, "projector.weight": torch.zeros(2, 2, dtype=torch.float16)})
    with pytest.raises(KdlibError, match="unexpected.*projector.weight"):
        load_student(bad)

    _rewrite(src, bad, tensors=lambda t: {k: v for k, v in t.items() if k != "ln_f.weight"})
    with pytest.raises(KdlibError, match="missing.*ln_f.weight"):
        load_student(bad)


def test_load_student_refuses_corrupt_config_metadata(tmp_path, tiny_config):
    src = tmp_path / "s.safetensors"
    save_student(_model(tiny_config()), src)
    bad = tmp_path / "bad.safetensors"

    def set_config(value):
        def edit(md):
            md["model_config"] = value
            return md
        return edit

    _rewrite(src, bad, metadata=set_config("{not json"))
    with pytest.raises(KdlibError, match="corrupt metadata"):
        load_student(bad)
    _rewrite(src, bad, metadata=set_config(json.dumps({**dataclasses.asdict(tiny_config()), "n_lyr": 2})))
    with pytest.raises(KdlibError, match="n_lyr"):
        load_student(bad)
    _rewrite(src, bad, metadata=set_config(json.dumps({**dataclasses.asdict(tiny_config()), "n_head": 3})))
    with pytest.raises(KdlibError, match="n_head"):
        load_student(bad)


def test_load_student_expect_names_the_differing_fields(tmp_path, tiny_config):
    cfg = tiny_config()
    path = tmp_path / "s.safetensors"
    save_student(_model(cfg), path)
    assert load_student(path, expect=tiny_config()).config == cfg
    with pytest.raises(KdlibError, match=r"n_layer=2 \(expected 3\)") as e:
        load_student(path, expect=tiny_config(n_layer=3))
    assert "n_embd" not in str(e.value)
    with pytest.raises(KdlibError) as e:
        load_student(path, expect=tiny_config(positions="sinusoidal", dropout=0.1))
    assert "positions='learned' (expected 'sinusoidal')" in str(e.value)
    assert "dropout=0.0 (expected 0.1)" in str(e.value)


# --------------------------------------------------------------------------
# resume state


def _tiny_training_setup(tiny_config, seed=0):
    cfg = tiny_config(n_layer=1, n_embd=8, d_ff=16, vocab_size=31, block_size=8)
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model, opt, sched, seed):
    x = _ids(model.config.vocab_size, (4, 8), seed=seed)
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.transpose(1, 2), x[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_resume_optimizer_and_scheduler_continue_identically(tmp_path, tiny_config):
    model, opt, sched = _tiny_training_setup(tiny_config)
    _step(model, opt, sched, seed=1)
    _step(model, opt, sched, seed=2)
    path = tmp_path / "resume.safetensors"
    weights = copy.deepcopy(model.state_dict())
    save_resume(path, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 2})
    state = load_resume(path)
    assert state["step"] == 2

    # A fresh model/optimizer/scheduler restored from the file...
    model2, opt2, sched2 = _tiny_training_setup(tiny_config, seed=99)
    model2.load_state_dict(weights)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    loaded_sd, orig_sd = opt2.state_dict(), opt.state_dict()
    assert loaded_sd["param_groups"] == orig_sd["param_groups"]
    for i, s in orig_sd["state"].items():
        for k, v in s.items():
            assert_close(loaded_sd["state"][i][k], v, rtol=0, atol=0)

    # ... takes exactly the same next steps as the original.
    for seed in (3, 4):
        _step(model, opt, sched, seed=seed)
        _step(model2, opt2, sched2, seed=seed)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert_close(b, a, rtol=0, atol=0, msg=k)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched2.get_last_lr() != [1e-2]


def test_resume_cosine_scheduler_state(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    for _ in range(3):
        opt.step()
        sched.step()
    path = tmp_path / "r.safetensors"
    save_resume(path, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    state = load_resume(path)
    restored = state["scheduler"]
    assert restored == sched.state_dict()
    # The cosine schedule is recursive in the optimizer's lr: both states are restored.
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.5)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10, eta_min=0.01)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(restored)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.5
    for _ in range(4):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert sched2.get_last_lr() == sched.get_last_lr()


def test_resume_rng_states_reproduce_the_next_draws(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    torch.rand(3), np.random.rand(3), random.random(), np.random.randn()  # a cached gaussian, too
    state = {"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                     "python": random.getstate()}}
    path = tmp_path / "r.safetensors"
    save_resume(path, state)
    expected = (torch.rand(5), np.random.rand(5), np.random.randn(5), [random.random() for _ in range(5)])

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    rng = load_resume(path)["rng"]
    assert isinstance(rng["numpy"], tuple) and isinstance(rng["numpy"][1], np.ndarray)
    assert rng["numpy"][1].dtype == np.random.get_state()[1].dtype
    assert isinstance(rng["python"], tuple) and isinstance(rng["python"][1], tuple)
    assert rng["python"] == state["rng"]["python"]
    assert_close(rng["torch"], state["rng"]["torch"], rtol=0, atol=0)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    got = (torch.rand(5), np.random.rand(5), np.random.randn(5), [random.random() for _ in range(5)])
    assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3]


def test_resume_plain_values_round_trip(tmp_path):
    state = {
        "step": 1234, "epoch": 0, "best": 3.25, "worst": float("inf"), "neg": -1.5e-300, "none": None,
        "flag": True, "off": False, "name": "layerwise-kl ü", "empty": {}, "empty_list": [],
        "int_keys": {0: {"a": 1}, 7: [1, 2, (3, 4)], -2: None},
        "mixed_keys": {"x": 1, 2: "y"}, "dunder": {"__tensor__": "not a tensor", "__items__": [1]},
        "nested": {"a": {"b": {"c": [1, {"d": (None, 2.5)}]}}},
        "sampler": {"position": 98765, "order": np.arange(10, dtype=np.int64)},
        "np_scalars": [np.float32(1.5), np.int64(-3)],
        "tensors": {"f": torch.randn(3, 2), "i": torch.arange(5), "b": torch.tensor([True, False]),
                    "bf": torch.randn(4).bfloat16(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
                    "view": torch.arange(12.).reshape(3, 4).t()},
        "shared": [torch.ones(2)] * 2,
    }
    path = tmp_path / "r.safetensors"
    n = save_resume(path, state)
    assert n == path.stat().st_size
    assert _raw_metadata(path)["format"] == RESUME_FORMAT
    got = load_resume(path)

    tensors, got_tensors = state.pop("tensors"), got.pop("tensors")
    assert set(got_tensors) == set(tensors)
    for k, v in tensors.items():
        assert got_tensors[k].dtype == v.dtype and got_tensors[k].shape == v.shape, k
        assert_close(got_tensors[k], v, rtol=0, atol=0)
    shared = got.pop("shared")
    assert len(shared) == 2 and all(torch.equal(t, torch.ones(2)) for t in shared)
    state.pop("shared")
    order = got["sampler"].pop("order")
    np.testing.assert_array_equal(order, np.arange(10))
    assert order.dtype == np.int64
    state["sampler"].pop("order")
    assert got["np_scalars"] == [1.5, -3] and all(type(v) in (int, float) for v in got["np_scalars"])
    state.pop("np_scalars"), got.pop("np_scalars")
    assert got == state
    assert list(got["int_keys"]) == [0, 7, -2]
    assert got["int_keys"][7][2] == (3, 4) and isinstance(got["int_keys"][7][2], tuple)
    assert isinstance(got["nested"]["a"]["b"]["c"][1]["d"], tuple)
    assert math.isinf(got["worst"])


def test_resume_tensors_under_dotted_keys_do_not_collide(tmp_path):
    # Tensor names are built by joining keys with '.', so {"a.b": t1, "a": {"b": t2}}
    # (or {"x": [t1], "x.0": t2}) must still round-trip to two different tensors.
    state = {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)},
             "x": [torch.full((1,), 3.0)], "x.0": torch.full((1,), 4.0)}
    path = tmp_path / "r.safetensors"
    save_resume(path, state)
    got = load_resume(path)
    assert_close(got["a.b"], torch.zeros(2), rtol=0, atol=0)
    assert_close(got["a"]["b"], torch.ones(2), rtol=0, atol=0)
    assert_close(got["x"][0], torch.full((1,), 3.0), rtol=0, atol=0)
    assert_close(got["x.0"], torch.full((1,), 4.0), rtol=0, atol=0)


def test_resume_empty_ndarray_keeps_its_shape(tmp_path):
    state = {"e": np.zeros((0, 3), dtype=np.float32), "f": np.zeros((2, 0), dtype=np.int32)}
    path = tmp_path / "r.safetensors"
    save_resume(path, state)
    got = load_resume(path)
    for k, v in state.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, (k, got[k].shape, v.shape)


@pytest.mark.parametrize("bad", [{1, 2}, object(), b"bytes", lambda: 0, frozenset()])
def test_resume_refuses_unsupported_types(tmp_path, bad):
    path = tmp_path / "r.safetensors"
    with pytest.raises(KdlibError, match=type(bad).__name__):
        save_resume(path, {"ok": 1, "deep": {"list": [0, bad]}})
    assert not path.exists() and not _temp_files(tmp_path)


def test_resume_refuses_custom_class_and_names_where(tmp_path):
    class Sampler:
        pass

    with pytest.raises(KdlibError, match=r"Sampler at .state\.data\.sampler."):
        save_resume(tmp_path / "r.safetensors", {"data": {"sampler": Sampler()}})


def test_load_resume_refuses_corrupt_truncated_and_wrong_files(tmp_path, tiny_config):
    path = tmp_path / "resume.safetensors"
    save_resume(path, {"step": 3, "t": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KdlibError, match="truncated"):
        load_resume(path)
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(KdlibError):
        load_resume(path)
    with pytest.raises(KdlibError, match="does not exist"):
        load_resume(tmp_path / "missing.safetensors")

    # Valid safetensors, corrupt state JSON or a state pointing at a missing tensor.
    save_file({"s.t": torch.zeros(1)}, str(path), metadata={"format": RESUME_FORMAT, "state": "{oops"})
    with pytest.raises(KdlibError, match="corrupt"):
        load_resume(path)
    save_file({"s.t": torch.zeros(1)}, str(path),
              metadata={"format": RESUME_FORMAT, "state": json.dumps({"t": {"__tensor__": "s.gone"}})})
    with pytest.raises(KdlibError, match="corrupt"):
        load_resume(path)
    save_file({"s.t": torch.zeros(1)}, str(path), metadata={"format": RESUME_FORMAT})
    with pytest.raises(KdlibError, match="corrupt"):
        load_resume(path)

    # Formats are checked both ways.
    student = tmp_path / "student.safetensors"
    save_student(_model(tiny_config()), student)
    with pytest.raises(KdlibError, match="not a kdlib resume state"):
        load_resume(student)
    resume = tmp_path / "resume2.safetensors"
    save_resume(resume, {"step": 1})
    with pytest.raises(KdlibError, match="not a kdlib student"):
        load_student(resume)
    with pytest.raises(KdlibError, match="not a kdlib student"):
        student_metadata(resume)


# --------------------------------------------------------------------------
# atomic writes


def test_atomic_path_writer_error_keeps_old_content(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_bytes(b"old content\n")
    with pytest.raises(RuntimeError, match="disconnect"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            raise RuntimeError("disconnect")
    assert target.read_bytes() == b"old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_atomic_path_success_replaces_content(tmp_path):
    target = tmp_path / "sub" / "deeper" / "summary.json"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    atomic_write_bytes(target, b"")
    assert target.read_bytes() == b""
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"via path")
    assert target.read_bytes() == b"via path"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_atomic_write_crash_at_rename_keeps_old_file(tmp_path, monkeypatch, tiny_config):
    target = tmp_path / "student.safetensors"
    target.write_bytes(b"the old checkpoint")

    def crash(src, dst):
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(target, b"new bytes")
    assert target.read_bytes() == b"the old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]
    # The same through save_student and save_resume.
    with pytest.raises(OSError, match="simulated crash"):
        save_student(_model(tiny_config()), target)
    with pytest.raises(OSError, match="simulated crash"):
        save_resume(tmp_path / "resume.safetensors", {"step": 1})
    assert target.read_bytes() == b"the old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]

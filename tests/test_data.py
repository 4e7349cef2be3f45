"""kdlib.data: prepared token splits on disk and the training windows (design.md §5).

A split is checked against its manifest (size, dtype, checksum) and against the run that reads it
(vocabulary, tokenizer, corpus). The window sampler is checked against the tiling arithmetic of
its docstring and for exact resumption.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from data_helpers import prepared_copy  # noqa: F401 (fixtures)

from kdlib.config import preset
from kdlib.data import WindowSampler, check_tokenizer_fits, load_split, token_dtype
from kdlib.errors import KdlibError
from kdlib.tokenizer import train_bpe


def test_check_tokenizer_fits_refuses_a_larger_tokenizer(smoke_data):
    _, splits = smoke_data
    with pytest.raises(KdlibError, match="512-token tokenizer"):
        check_tokenizer_fits(splits["train"], 300)



def test_token_dtype():
    assert token_dtype(512) == "uint16"
    assert token_dtype(50_257) == "uint16"
    assert token_dtype(65_536) == "uint16"  # ids 0..65535 fit
    assert token_dtype(65_537) == "uint32"
    assert token_dtype(151_936) == "uint32"
    assert np.iinfo(token_dtype(65_537)).max >= 151_935



def test_truncated_bin_is_refused_naming_the_file(prepared_copy):
    path = prepared_copy / "train.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(KdlibError, match="train.bin.*truncated"):
        load_split(prepared_copy, "train")
    path.unlink()
    with pytest.raises(KdlibError, match="train.bin is missing"):
        load_split(prepared_copy, "train")



@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": "kdlib.tokens/1"}',
                                     '{"format": "something else", "tokens": 3, "dtype": "uint16"}'])
def test_corrupt_manifest_is_refused_naming_the_file(prepared_copy, content):
    (prepared_copy / "validation.json").write_text(content)
    with pytest.raises(KdlibError, match="validation.json"):
        load_split(prepared_copy, "validation")



def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(KdlibError, match="train.json does not exist"):
        load_split(tmp_path, "train")



def test_verify_detects_a_flipped_byte(prepared_copy):
    path = prepared_copy / "test.bin"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    load_split(prepared_copy, "test")  # the size still fits: only the checksum can tell
    with pytest.raises(KdlibError, match="test.bin.*checksum"):
        load_split(prepared_copy, "test", verify=True)



def test_check_tokenizer_refuses_data_made_with_another_tokenizer(smoke_data, tmp_path):
    from kdlib.data import check_tokenizer

    folder, splits = smoke_data
    check_tokenizer(splits["validation"], folder / "tokenizer")  # its own tokenizer: fine
    other = train_bpe(["another text, another tokenizer " * 50], 300, tmp_path / "other")
    with pytest.raises(KdlibError, match="another tokenizer"):
        check_tokenizer(splits["validation"], other)



def test_data_of_another_corpus_or_bpe_size_is_refused_before_training(smoke_data, tmp_path):
    from kdlib.data import check_prepared_for, load_split
    from kdlib.train import train

    split = load_split(smoke_data[0], "train")
    check_prepared_for(preset("smoke"), split)  # its own preset's data
    with pytest.raises(KdlibError, match="holds text from Python's documentation, and preset 'colab-t4' reads "
                                         r"Salesforce/wikitext \(wikitext-103-raw-v1\)"):
        check_prepared_for(preset("colab-t4"), split)
    bigger = preset("smoke")
    bigger.model.vocab_size = 1024
    with pytest.raises(KdlibError, match="a 512-token BPE, and preset 'smoke' trains a 1024-token one"):
        check_prepared_for(bigger, split)
    # Training makes the same check first: nothing is built or written.
    with pytest.raises(KdlibError, match="Prepare this preset's data in its own folder"):
        train(preset("colab-t4", "kl"), tmp_path / "run", smoke_data[0], progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("edit", [
    lambda m: m.pop("inputs"),
    lambda m: m.update(inputs=None),
    lambda m: m["inputs"].pop("tokenizer"),
    lambda m: m["inputs"]["tokenizer"].update(vocab_size="512"),
    lambda m: m["inputs"]["tokenizer"].pop("hash"),
])
def test_an_old_or_edited_manifest_is_a_clear_error_for_training_and_the_panel(smoke_data, tmp_path, edit):
    from kdlib.data import load_split
    from kdlib.train import train
    from kdlib.ui import panel

    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    manifest = json.loads((data / "train.json").read_text())
    edit(manifest)
    (data / "train.json").write_text(json.dumps(manifest))
    with pytest.raises(KdlibError, match="is corrupt or from an older kdlib .*run prep again"):
        load_split(data, "train")
    with pytest.raises(KdlibError, match="run prep again"):
        train(preset("smoke", "kl"), tmp_path / "run", data, progress=False, log=lambda *_: None)
    p = panel("smoke", tmp_path / "runs", data)  # builds, and says why it cannot train
    assert p.button.disabled and "run prep again" in p.status.value



def test_a_subset_the_manifest_does_not_describe_is_named_not_a_crash(smoke_data, tmp_path):
    from kdlib.data import load_split
    from kdlib.runs import check_subset

    data = shutil.copytree(smoke_data[0], tmp_path / "data")
    manifest = json.loads((data / "train.json").read_text())
    manifest["inputs"]["subset"] = {"tokens": 1000}  # no seed
    (data / "train.json").write_text(json.dumps(manifest))
    with pytest.raises(KdlibError, match=r"holds a subset of 1,000 tokens \(seed None\), but this run"):
        check_subset(preset("smoke"), load_split(data, "train"))
    manifest["inputs"]["subset"] = "half"
    (data / "train.json").write_text(json.dumps(manifest))
    with pytest.raises(KdlibError, match="a subset it does not describe"):
        check_subset(preset("smoke"), load_split(data, "train"))



def arange_tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)



def test_window_sampler_batches_are_the_windows():
    bs, B = 8, 4
    sampler = WindowSampler(arange_tokens(1 + 8 * 37 + 5), bs, B, seed=3)
    assert sampler.n_windows == 37 and sampler.batches_per_epoch == 9
    for _ in range(12):
        idx, batch = sampler.next_batch()
        assert batch.shape == (B, bs + 1) and batch.dtype == np.int64
        for i, row in zip(idx, batch):
            np.testing.assert_array_equal(row, np.arange(i * bs, i * bs + bs + 1))



def test_window_sampler_on_a_memmap(smoke_data):
    _, splits = smoke_data
    tokens = splits["validation"].tokens()
    sampler = WindowSampler(tokens, 32, 8, seed=0)
    assert sampler.n_windows == (len(tokens) - 1) // 32
    idx, batch = sampler.next_batch()
    assert batch.dtype == np.int64
    for i, row in zip(idx, batch):
        np.testing.assert_array_equal(row, np.asarray(tokens[i * 32:i * 32 + 33], dtype=np.int64))



@pytest.mark.parametrize("extra", [0, 1, 7])
def test_every_token_after_the_first_is_a_target_exactly_once(extra):
    bs, n_windows = 8, 25
    n = 1 + bs * n_windows + extra
    sampler = WindowSampler(arange_tokens(n), bs, 5, seed=0)
    assert sampler.n_windows == n_windows
    targets = np.concatenate([sampler.window(i)[1:] for i in range(n_windows)])
    inputs = np.concatenate([sampler.window(i)[:-1] for i in range(n_windows)])
    np.testing.assert_array_equal(np.sort(targets), np.arange(1, 1 + bs * n_windows))
    np.testing.assert_array_equal(np.sort(inputs), np.arange(0, bs * n_windows))



def test_window_sampler_epoch_serves_distinct_windows_then_rolls_over():
    sampler = WindowSampler(arange_tokens(1 + 4 * 50), 4, 6, seed=0)
    assert sampler.batches_per_epoch == 8  # 50 windows: 8 batches of 6, 2 windows dropped
    for epoch in range(3):
        seen = []
        for _ in range(sampler.batches_per_epoch):
            idx, _ = sampler.next_batch()
            assert sampler.epoch == epoch
            seen.extend(idx.tolist())
        assert len(seen) == len(set(seen)) == 48
        assert set(seen) <= set(range(50))
        assert seen == sampler.order(epoch)[:48].tolist()
    sampler.next_batch()
    assert sampler.epoch == 3 and sampler.index == 6



def batches(sampler: WindowSampler, n: int) -> list[np.ndarray]:
    return [sampler.next_batch()[1] for _ in range(n)]



def test_window_sampler_order_depends_on_seed_and_epoch_only():
    tokens = arange_tokens(1 + 16 * 40)
    a, b = WindowSampler(tokens, 16, 4, seed=7), WindowSampler(tokens.copy(), 16, 4, seed=7)
    for x, y in zip(batches(a, 25), batches(b, 25)):  # two experiments of a sweep: same batches
        np.testing.assert_array_equal(x, y)
    c = WindowSampler(tokens, 16, 4, seed=8)
    assert not np.array_equal(np.stack(batches(c, 10)), np.stack(batches(WindowSampler(tokens, 16, 4, 7), 10)))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), c.order(0))
    np.testing.assert_array_equal(np.sort(a.order(5)), np.arange(40))



@pytest.mark.parametrize("stop", [3, 9, 10, 11, 23])  # 10 batches per epoch: mid, end and across epochs
def test_window_sampler_resumes_exactly(stop):
    tokens = arange_tokens(1 + 8 * 41)
    ref = WindowSampler(tokens, 8, 4, seed=5)
    assert ref.batches_per_epoch == 10
    expected = batches(ref, stop + 15)
    run = WindowSampler(tokens, 8, 4, seed=5)
    head = batches(run, stop)
    state = json.loads(json.dumps(run.state_dict()))  # saved with a checkpoint as JSON
    resumed = WindowSampler(tokens, 8, 4, seed=5)
    resumed.next_batch()  # a fresh run that moved already: the state must override it
    resumed.load_state_dict(state)
    for got, want in zip(head + batches(resumed, 15), expected):
        np.testing.assert_array_equal(got, want)
    assert resumed.state_dict() == ref.state_dict()



@pytest.mark.parametrize("change", [dict(seed=6), dict(batch_size=2), dict(block_size=4, n_tokens=1 + 4 * 41),
                                    dict(n_tokens=1 + 8 * 60)])
def test_window_sampler_refuses_the_state_of_another_run(change):
    args = dict(n_tokens=1 + 8 * 41, block_size=8, batch_size=4, seed=5)
    src = WindowSampler(arange_tokens(args["n_tokens"]), 8, 4, 5)
    src.next_batch()
    args.update(change)
    other = WindowSampler(arange_tokens(args["n_tokens"]), args["block_size"], args["batch_size"], args["seed"])
    key = "n_windows" if list(change) == ["n_tokens"] else next(iter(change))
    with pytest.raises(KdlibError, match=key):
        other.load_state_dict(src.state_dict())



def test_window_sampler_needs_one_batch_of_windows():
    WindowSampler(arange_tokens(1 + 8 * 4), 8, 4, seed=0)  # exactly one batch: fine
    with pytest.raises(KdlibError, match="fewer than one batch"):
        WindowSampler(arange_tokens(8 * 4), 8, 4, seed=0)
    with pytest.raises(KdlibError, match="fewer than one batch"):
        WindowSampler(arange_tokens(5), 8, 1, seed=0)

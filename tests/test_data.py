"""kdlib.data: text -> tokens on disk -> training windows (design.md §5).

Prepared token files are checked against the text they came from (a
byte-level BPE is lossless, so decoding the file gives the text back exactly),
against their manifests (counts, dtype, checksum) and against re-running
(reuse when nothing changed, rebuild when anything did). Bad input must raise
``KdlibError`` and leave no file behind and existing files untouched. The
window sampler is checked against the tiling arithmetic of its docstring and
for exact resumption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import snapshot

from kdlib import cli
from kdlib.config import DataConfig, ExperimentConfig, preset
from kdlib.data import (SPLITS, TOKENS_FORMAT, WindowSampler, check_vocab, load_split, load_texts,
                        load_tokenizer, prepare, token_dtype, tokenizer_hash, train_bpe)
from kdlib.errors import KdlibError




def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def files_config(tmp_path: Path, texts: dict[str, str], **data_kw) -> ExperimentConfig:
    """The smoke preset reading local files, one per key of ``texts`` (written to tmp_path)."""
    cfg = preset("smoke")
    files = {}
    for split, text in texts.items():
        path = tmp_path / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        files[split] = str(path)
    cfg.data = dataclasses.replace(cfg.data, dataset=None, text_files=files, **data_kw)
    return cfg


def documents(n: int, seed: int = 0) -> list[str]:
    """n distinct multi-line documents of made-up words (no blank lines inside)."""
    rng = random.Random(seed)
    words = ["token", "window", "teacher", "student", "loss", "cache", "epoch", "layer", "python", "data",
             "value", "print", "return", "class", "the", "of", "and", "a", "to", "is"]
    docs = []
    for i in range(n):
        lines = [f"Document {i}."]
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + ".")
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def smoke_tok(smoke_data):
    """The BPE trained for the smoke data (512 tokens), loaded from the prepared folder."""
    folder, _ = smoke_data
    return load_tokenizer(folder / "tokenizer")


# --------------------------------------------------------------------------
# prepare on the smoke preset


def test_prepare_smoke_writes_every_split_with_its_manifest(smoke_data, smoke_tok):
    folder, splits = smoke_data
    cfg = preset("smoke")
    texts, _ = load_texts(cfg.data)
    assert set(splits) == set(SPLITS)
    tok_hash = tokenizer_hash(smoke_tok)
    assert len(smoke_tok) == cfg.model.vocab_size == 512
    for split in SPLITS:
        raw = (folder / f"{split}.bin").read_bytes()
        m = json.loads((folder / f"{split}.json").read_text())
        assert m == splits[split].manifest
        assert m["format"] == TOKENS_FORMAT
        assert m["split"] == split
        assert m["tokenizer"] == "bpe"
        assert m["dtype"] == "uint16"
        assert m["tokens"] == len(raw) // 2 > 1000
        assert m["texts"] == len(texts[split])
        assert m["chars"] == sum(len(p) for p in texts[split])
        assert m["sha256"] == hashlib.sha256(raw).hexdigest()
        assert m["inputs"]["tokenizer"] == {"vocab_size": 512, "hash": tok_hash}
        assert m["inputs"]["source"]["kind"] == "python-docs"
        # byte-level BPE on English-like text: a few characters per token
        assert 0.2 < m["tokens"] / m["chars"] < 1.0
        ts = load_split(folder, split, verify=True)
        assert ts.n_tokens == m["tokens"]
        np.testing.assert_array_equal(ts.tokens(), np.frombuffer(raw, dtype=np.uint16))
        check_vocab(ts, 512)
    # validation and test together are roughly a tenth of the text, each at least one document
    total = sum(splits[s].manifest["chars"] for s in SPLITS)
    for split in ("validation", "test"):
        assert 0.05 <= splits[split].manifest["chars"] / total < 0.3


def test_prepared_tokens_decode_to_the_original_text(smoke_data, smoke_tok):
    folder, splits = smoke_data
    texts, _ = load_texts(preset("smoke").data)
    for split in SPLITS:
        assert decode(smoke_tok, splits[split].tokens()) == "".join(texts[split]), split


def test_prepare_logs_the_token_count_of_every_split(tmp_path):
    lines = []
    splits = prepare(preset("smoke"), tmp_path, log=lines.append)
    assert "tokens" in lines[0] and "characters" in lines[0]
    assert len(lines) == 1 + len(SPLITS)
    for split, line in zip(SPLITS, lines[1:]):
        m = splits[split].manifest
        assert line.split()[0] == split
        assert f"{m['tokens']:,}" in line and f"{m['chars']:,}" in line
        assert "(reused)" not in line
    assert {p.name for p in tmp_path.iterdir()} >= {f"{s}.{e}" for s in SPLITS for e in ("bin", "json")}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_check_vocab_refuses_a_larger_tokenizer(smoke_data):
    _, splits = smoke_data
    with pytest.raises(KdlibError, match="512-token tokenizer"):
        check_vocab(splits["train"], 300)


# --------------------------------------------------------------------------
# reuse and rebuild


@pytest.fixture
def prepared_copy(smoke_data, tmp_path):
    """A private copy of the prepared smoke folder (modification times kept)."""
    folder = tmp_path / "data"
    shutil.copytree(smoke_data[0], folder)
    return folder


def test_prepare_reuses_files_when_nothing_changed(prepared_copy):
    before, times = snapshot(prepared_copy), mtimes(prepared_copy)
    lines = []
    prepare(preset("smoke"), prepared_copy, log=lines.append)
    assert all(line.endswith("(reused)") for line in lines[1:]) and len(lines) == 4
    assert mtimes(prepared_copy) == times
    assert snapshot(prepared_copy) == before


@pytest.mark.parametrize("change", ["split_seed", "max_chars"])
def test_prepare_rebuilds_when_the_text_changes(prepared_copy, change):
    old = {s: load_split(prepared_copy, s).manifest for s in SPLITS}
    cfg = preset("smoke")
    if change == "split_seed":
        cfg.data.split_seed = 1
    else:
        cfg.data.max_chars = 60_000
    lines = []
    new = prepare(cfg, prepared_copy, log=lines.append)
    assert not any("(reused)" in line for line in lines)
    texts, _ = load_texts(cfg.data)
    tok = load_tokenizer(prepared_copy / "tokenizer")  # retrained on the new train text
    for split in SPLITS:
        m = load_split(prepared_copy, split, verify=True).manifest
        assert m == new[split].manifest
        assert m["sha256"] != old[split]["sha256"]
        assert m["inputs"] != old[split]["inputs"]
        assert m["inputs"]["tokenizer"]["hash"] == tokenizer_hash(tok)
        assert decode(tok, new[split].tokens()) == "".join(texts[split])
    # train is other text either way (validation and test can be the same documents: they come
    # first in the seeded order, and only the tokenizer retrained on the new train text changes)
    assert new["train"].manifest["inputs"]["text_sha256"] != old["train"]["inputs"]["text_sha256"]
    # and a third run with the new inputs reuses the rebuilt files
    lines.clear()
    prepare(cfg, prepared_copy, log=lines.append)
    assert all(line.endswith("(reused)") for line in lines[1:])


def test_prepare_rebuilds_for_another_tokenizer(prepared_copy, tmp_path):
    cfg = preset("smoke")
    texts, _ = load_texts(cfg.data)
    other = train_bpe(texts["train"], 300, tmp_path / "tok300")
    old = {s: load_split(prepared_copy, s).manifest for s in SPLITS}
    lines = []
    new = prepare(cfg, prepared_copy, tokenizer=other, log=lines.append)
    assert not any("(reused)" in line for line in lines)
    for split in SPLITS:
        m = new[split].manifest
        assert m["inputs"]["tokenizer"] == {"vocab_size": len(other), "hash": tokenizer_hash(other)}
        assert m["inputs"]["tokenizer"]["hash"] != old[split]["inputs"]["tokenizer"]["hash"]
        assert m["tokens"] > old[split]["tokens"]  # a smaller vocabulary: more tokens for the same text
        assert decode(other, new[split].tokens()) == "".join(texts[split])


def test_prepare_rebuilds_a_corrupt_file_instead_of_reusing_it(prepared_copy):
    path = prepared_copy / "validation.bin"
    good = path.read_bytes()
    path.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])  # same size, one byte flipped
    lines = []
    prepare(preset("smoke"), prepared_copy, log=lines.append)
    status = {line.split()[0]: line.endswith("(reused)") for line in lines[1:]}
    assert status == {"train": True, "validation": False, "test": True}
    assert path.read_bytes() == good


# --------------------------------------------------------------------------
# no truncation


def test_very_long_lines_are_tokenized_completely(tmp_path, smoke_tok):
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "python", "token", "function", "value", "(x)", "42,"]
    line = " ".join(rng.choice(words) for _ in range(40_000))[:200_000]
    assert len(line) == 200_000 and "\n" not in line
    train = line + "\n" + "a second, short line\n"
    cfg = files_config(tmp_path, {"train": train, "validation": "short validation text\n",
                                  "test": "short test text\n"})
    # A tokenizer set up to truncate (as a model's tokenizer often is) must not cut the corpus.
    smoke_tok.backend_tokenizer.enable_truncation(1024)
    try:
        splits = prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lambda s: None)
    finally:
        smoke_tok.backend_tokenizer.no_truncation()
    whole = smoke_tok(line, add_special_tokens=False)["input_ids"]
    assert len(whole) > 20_000  # far beyond any truncation length
    per_line = sum(len(smoke_tok(p, add_special_tokens=False)["input_ids"]) for p in train.splitlines(True))
    toks = splits["train"].tokens()
    m = splits["train"].manifest
    assert m["chars"] == len(train)
    assert m["tokens"] == per_line
    assert abs(m["tokens"] - len(whole)) < 50  # the long line is nearly all of it
    np.testing.assert_array_equal(toks[:len(whole)], whole)
    assert decode(smoke_tok, toks) == train


# --------------------------------------------------------------------------
# local files


def test_one_file_per_split(tmp_path, smoke_tok):
    texts = {"train": "\n".join(documents(30, seed=1)) + "\n",
             "validation": "Validation text.\nWith a second line.\n",
             "test": "Test text, one line, no newline at the end"}
    cfg = files_config(tmp_path, texts)
    splits = prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lambda s: None)
    for split, text in texts.items():
        m = splits[split].manifest
        assert m["chars"] == len(text) and m["texts"] == len(text.splitlines())
        assert m["inputs"]["source"] == {"kind": "files", "files": {s: str(Path(cfg.data.text_files[s]).resolve())
                                                                   for s in SPLITS}}
        assert decode(smoke_tok, splits[split].tokens()) == text


def ratio_config(tmp_path: Path, n_docs: int = 40, **kw) -> tuple[ExperimentConfig, list[str]]:
    docs = documents(n_docs)
    return files_config(tmp_path, {"all": "\n\n".join(docs)}, **kw), docs


def test_ratio_split_keeps_whole_documents(tmp_path):
    cfg, docs = ratio_config(tmp_path)
    texts, source = load_texts(cfg.data)
    assert source["kind"] == "files" and set(source["files"]) == {"all"}
    pieces = [p for s in SPLITS for p in texts[s]]
    # every document lands whole in exactly one split
    assert sorted(p.rstrip("\n") for p in pieces) == sorted(docs)
    assert all(texts[s] for s in SPLITS)
    total = sum(len(p) for p in pieces)
    for split in ("validation", "test"):
        share = sum(len(p) for p in texts[split]) / total
        assert 0.05 <= share < 0.2  # its 5 % share, filled with whole documents
    assert sum(len(p) for p in texts["train"]) / total > 0.7


def test_ratio_split_is_seeded(tmp_path):
    cfg, _ = ratio_config(tmp_path)
    first, _ = load_texts(cfg.data)
    again, _ = load_texts(cfg.data)
    assert first == again
    other, _ = load_texts(dataclasses.replace(cfg.data, split_seed=1))
    assert {s: sorted(v) for s, v in other.items()} != {s: sorted(v) for s, v in first.items()}
    assert sorted(p for v in other.values() for p in v) == sorted(p for v in first.values() for p in v)


def test_ratio_split_prepares_and_decodes(tmp_path, smoke_tok):
    cfg, _ = ratio_config(tmp_path)
    texts, _ = load_texts(cfg.data)
    splits = prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lambda s: None)
    for split in SPLITS:
        assert splits[split].manifest["texts"] == len(texts[split])
        assert decode(smoke_tok, splits[split].tokens()) == "".join(texts[split])


def test_token_dtype():
    assert token_dtype(512) == "uint16"
    assert token_dtype(50_257) == "uint16"
    assert token_dtype(65_536) == "uint16"  # ids 0..65535 fit
    assert token_dtype(65_537) == "uint32"
    assert token_dtype(151_936) == "uint32"
    assert np.iinfo(token_dtype(65_537)).max >= 151_935


# --------------------------------------------------------------------------
# bad input: KdlibError, nothing written, existing files untouched


def assert_nothing_written(folder: Path):
    assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))


def test_missing_text_file(tmp_path):
    cfg = files_config(tmp_path, {"train": "some text\n", "validation": "more\n"})
    cfg.data.text_files["test"] = str(tmp_path / "no_such_file.txt")
    with pytest.raises(KdlibError, match="no_such_file.txt.*does not exist"):
        prepare(cfg, tmp_path / "data", log=lambda s: None)
    assert_nothing_written(tmp_path / "data")


def test_empty_split_file(tmp_path):
    cfg = files_config(tmp_path, {"train": "some text\n", "validation": "", "test": "more\n"})
    with pytest.raises(KdlibError, match="validation"):
        prepare(cfg, tmp_path / "data", log=lambda s: None)
    assert_nothing_written(tmp_path / "data")


def test_split_missing_from_text_files(tmp_path):
    cfg = files_config(tmp_path, {"train": "some text\n", "validation": "more\n"})
    with pytest.raises(KdlibError, match="test") as e:
        prepare(cfg, tmp_path / "data", log=lambda s: None)
    assert "train, validation" in str(e.value)  # what the source does have
    assert_nothing_written(tmp_path / "data")


def test_all_with_other_splits_is_refused_by_validation(tmp_path):
    cfg = files_config(tmp_path, {"all": "a\n\nb\n\nc\n", "train": "x\n"})
    with pytest.raises(KdlibError, match="'all' and other splits"):
        cfg.data.validate()
    with pytest.raises(KdlibError, match="'all' and other splits"):
        ExperimentConfig.from_dict(cfg.to_dict())


def test_ratio_split_needs_three_documents(tmp_path):
    cfg = files_config(tmp_path, {"all": "the first document\nhas two lines\n\nthe second document"})
    with pytest.raises(KdlibError, match="2 document"):
        load_texts(cfg.data)
    with pytest.raises(KdlibError, match="2 document"):
        prepare(cfg, tmp_path / "data", log=lambda s: None)
    assert_nothing_written(tmp_path / "data")


def test_ratio_split_does_not_count_a_trailing_blank_line_as_a_document(tmp_path):
    # Text files usually end with a newline; a blank line at the end is no document.
    cfg = files_config(tmp_path, {"all": "doc one\n\ndoc two\n\n"})
    with pytest.raises(KdlibError, match="2 document"):
        load_texts(cfg.data)


def test_ratio_split_with_too_little_text_for_the_shares_raises_kdlib_error(tmp_path):
    # Two tiny documents and a big one: whichever order, validation or test cannot get its
    # 5 % share and the train split would be left empty. That is bad input, not a crash.
    cfg = files_config(tmp_path, {"all": "a\n\nb\n\n" + "c" * 1000})
    with pytest.raises(KdlibError):
        load_texts(cfg.data)


def test_too_few_tokens_per_character_writes_nothing(tmp_path, smoke_tok):
    cfg = files_config(tmp_path, {"train": "x y z " * 100, "validation": "v\n", "test": "t\n"},
                       min_tokens_per_char=10.0)
    with pytest.raises(KdlibError, match="tokens per character.*Nothing was written"):
        prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lambda s: None)
    assert_nothing_written(tmp_path / "data")


def test_too_few_tokens_per_character_leaves_a_prepared_folder_untouched(prepared_copy):
    # The tokenizer comes from a path, so the failing run has nothing to train.
    before, times = snapshot(prepared_copy), mtimes(prepared_copy)
    cfg = preset("smoke")
    cfg.data.split_seed = 1  # other text: the files would be rebuilt
    cfg.data.min_tokens_per_char = 10.0
    cfg.data.tokenizer = str(prepared_copy / "tokenizer")
    with pytest.raises(KdlibError, match="tokens per character"):
        prepare(cfg, prepared_copy, log=lambda s: None)
    assert snapshot(prepared_copy) == before
    assert mtimes(prepared_copy) == times


def test_a_failed_prepare_leaves_the_trained_tokenizer_untouched(prepared_copy):
    # With tokenizer="bpe" the new inputs retrain the BPE before the splits are refused. The old
    # token files stay, so the folder's tokenizer must stay the one that wrote them.
    before = snapshot(prepared_copy)
    cfg = preset("smoke")
    cfg.data.split_seed = 1
    cfg.data.min_tokens_per_char = 10.0
    with pytest.raises(KdlibError, match="tokens per character"):
        prepare(cfg, prepared_copy, log=lambda s: None)
    changed = sorted(k for k in set(before) | set(snapshot(prepared_copy))
                     if before.get(k) != snapshot(prepared_copy).get(k))
    assert changed == []
    tok = load_tokenizer(prepared_copy / "tokenizer")
    assert load_split(prepared_copy, "train").manifest["inputs"]["tokenizer"]["hash"] == tokenizer_hash(tok)


def test_min_tokens_per_char_also_applies_to_reused_splits(prepared_copy):
    cfg = preset("smoke")
    cfg.data.min_tokens_per_char = 10.0  # the same inputs otherwise: every split would be reused
    with pytest.raises(KdlibError, match="tokens per character"):
        prepare(cfg, prepared_copy, log=lambda s: None)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, smoke_data):
    cfg = preset("smoke")
    cfg.model.vocab_size = 300
    cfg.data.tokenizer = str(smoke_data[0] / "tokenizer")
    with pytest.raises(KdlibError, match="512 tokens.*300"):
        prepare(cfg, tmp_path / "data", log=lambda s: None)
    assert_nothing_written(tmp_path / "data")


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


# --------------------------------------------------------------------------
# WindowSampler


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


# --------------------------------------------------------------------------
# Hugging Face datasets with a local folder


@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(documents(20, seed=2)) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("The validation text.\nA second line.\n", encoding="utf-8")
    (folder / "test.txt").write_text("The test text.\n", encoding="utf-8")
    return folder


def test_hf_local_folder_is_loaded_and_tokenized(hf_folder, tmp_path, smoke_tok):
    cfg = preset("smoke")
    cfg.data = DataConfig(dataset=str(hf_folder), dataset_config=None, block_size=32)
    texts, source = load_texts(cfg.data)
    assert source["kind"] == "hf" and source["dataset"] == str(hf_folder)
    assert set(texts) == set(SPLITS)
    assert list(texts["validation"]) == ["The validation text.", "A second line."]  # one row per line
    splits = prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lambda s: None)
    for split in SPLITS:
        m = splits[split].manifest
        assert m["inputs"]["source"]["kind"] == "hf"
        assert m["texts"] == len(texts[split])
        assert decode(smoke_tok, splits[split].tokens()) == "".join(texts[split])
    lines = []
    prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lines.append)
    assert all(line.endswith("(reused)") for line in lines[1:])


def test_hf_wrong_text_column_lists_the_columns(hf_folder):
    data = DataConfig(dataset=str(hf_folder), dataset_config=None, text_column="body")
    with pytest.raises(KdlibError, match="no column 'body'; its columns: text"):
        load_texts(data)


def test_hf_nonexistent_dataset_is_a_kdlib_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = DataConfig(dataset=str(tmp_path / "no_such_dataset"), dataset_config=None)
    with pytest.raises(KdlibError, match="cannot load dataset .*no_such_dataset"):
        load_texts(data)


# --------------------------------------------------------------------------
# CLI


def test_cli_prep(tmp_path, capsys):
    assert cli.main(["prep", "--preset", "smoke", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "tokens" in lines[0] and "tokens/char" in lines[0]
    for split in SPLITS:
        m = load_split(tmp_path, split, verify=True).manifest
        row = next(line for line in lines if line.startswith(split + " "))
        assert f"{m['tokens']:,}" in row
    assert f"token files in {tmp_path}" in out
    assert cli.main(["prep", "--preset", "smoke", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("(reused)") == 3



def test_check_tokenizer_refuses_data_made_with_another_tokenizer(smoke_data, tmp_path):
    from kdlib.data import check_tokenizer, train_bpe

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

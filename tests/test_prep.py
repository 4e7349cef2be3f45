"""kdlib.prep: text -> token files with their manifests in a data folder (design.md §5).

Prepared token files are checked against the text they came from (a byte-level BPE is lossless,
so decoding the file gives the text back exactly), against their manifests (counts, dtype,
checksum) and against re-running (reuse when nothing changed, rebuild when anything did). Bad
input must raise ``KdlibError`` and leave no file behind and existing files untouched.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from data_helpers import assert_nothing_written, decode, files_config, mtimes
from data_helpers import prepared_copy, smoke_tok  # noqa: F401 (fixtures)
from helpers import snapshot

from kdlib import cli
from kdlib.config import preset
from kdlib.corpus import load_texts
from kdlib.data import SPLITS, TOKENS_FORMAT, check_tokenizer_fits, load_split
from kdlib.errors import KdlibError
from kdlib.prep import prepare
from kdlib.tokenizer import load_tokenizer, tokenizer_hash, train_bpe


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
        check_tokenizer_fits(ts, 512)
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

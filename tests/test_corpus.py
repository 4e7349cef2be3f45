"""kdlib.corpus: the text sources (local files, one per split or one split by ratio into whole
documents; a Hugging Face dataset) and their refusals of bad input, which leave nothing written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from data_helpers import assert_nothing_written, decode, files_config, made_up_documents
from data_helpers import smoke_tok  # noqa: F401 (fixtures)

from kdlib.config import DataConfig, ExperimentConfig, preset
from kdlib.corpus import load_texts
from kdlib.data import SPLITS
from kdlib.errors import KdlibError
from kdlib.prep import prepare


def ratio_config(tmp_path: Path, n_docs: int = 40, **kw) -> tuple[ExperimentConfig, list[str]]:
    docs = made_up_documents(n_docs)
    return files_config(tmp_path, {"all": "\n\n".join(docs)}, **kw), docs



@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(made_up_documents(20, seed=2)) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("The validation text.\nA second line.\n", encoding="utf-8")
    (folder / "test.txt").write_text("The test text.\n", encoding="utf-8")
    return folder



def test_one_file_per_split(tmp_path, smoke_tok):
    texts = {"train": "\n".join(made_up_documents(30, seed=1)) + "\n",
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

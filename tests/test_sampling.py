"""kdlib.sampling (top-p filter and seeded generation), ``python -m kdlib sample`` on a finished run,
and the analysis notebook's samples table. Tiny random models on the CPU: a few seconds in all."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdlib.checkpoint import load_student, save_student
from kdlib.cli import main
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.models import TinyGPT
from kdlib.sampling import DEFAULT_PROMPTS, generate, top_p_filter
from conftest import build_teacher, build_tiny_config
from helpers import trained_smoke_run
from results_helpers import make_run


def naive_nucleus(row, top_p: float) -> set[int]:
    """The ids a top-p nucleus keeps, one token at a time over the float64 probabilities sorted by
    (probability descending, id ascending): add tokens until their mass reaches top_p."""
    p = np.exp(np.asarray(row, dtype=np.float64) - np.max(row))
    p /= p.sum()
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: (-p[i], i)):
        kept.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [1e-300, 1e-6, 0.3, 0.75, 0.95, 1.0])
def test_top_p_filter_keeps_the_nucleus_of_each_row(top_p):
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(1)) * 2  # [3, 4, V]
    logits[0, 0] = torch.tensor([2.0, 2.0] + [0.0] * 9)  # a tie at the top: the lower id first
    out = top_p_filter(logits, top_p)
    for idx in np.ndindex(3, 4):
        kept = {i for i in range(11) if torch.isfinite(out[idx][i])}
        assert kept == naive_nucleus(logits[idx].numpy(), top_p), (idx, top_p)
        assert torch.equal(out[idx][sorted(kept)], logits[idx][sorted(kept)])  # kept logits unchanged


class FixedLogits(nn.Module):
    """A "model" whose next-token logits are always ``logits``, whatever the context."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return SimpleNamespace(logits=self.logits.expand(x.shape[0], x.shape[1], -1))  # [b, L, V]


def test_draws_follow_the_renormalised_nucleus_at_the_temperature():
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0]
    top_p, temperature, n = 0.85, 0.7, 3000  # the nucleus: 3 tokens at this temperature, 4 at 1
    scaled = np.array(logits) / temperature
    kept = sorted(naive_nucleus(scaled, top_p))
    p = np.exp(scaled[kept] - scaled.max())
    expected = np.zeros(len(logits))
    expected[kept] = p / p.sum()
    ids = generate(FixedLogits(logits), [0], n, top_p=top_p, temperature=temperature, seed=3)
    freq = np.bincount(ids, minlength=len(logits)) / n
    assert set(ids) <= set(kept)
    assert np.abs(freq - expected).max() < 0.03, (freq, expected)  # ~3.5 standard errors at n = 3000


def test_same_seed_same_ids_and_another_seed_other_ids():
    model = TinyGPT(build_tiny_config())
    model.train()
    a = generate(model, [1, 2, 3], 20, seed=0)
    assert model.training  # put back as it was
    assert a == generate(model, [1, 2, 3], 20, seed=0)
    assert a != generate(model, [1, 2, 3], 20, seed=1)
    assert len(a) == 20 and all(0 <= i < 97 for i in a)


def test_a_tiny_top_p_is_greedy_and_a_long_context_is_cropped_to_the_block():
    torch.manual_seed(0)
    model = TinyGPT(build_tiny_config()).eval()  # block_size 32
    prompt = torch.randint(0, 97, (45,)).tolist()  # longer than the block
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # the argmax loop, cropping by hand
            ids.append(int(model(torch.tensor([ids[-32:]])).logits[0, -1].argmax()))
    assert generate(model, prompt, 12, top_p=1e-9, seed=5) == ids[45:]
    assert generate(model, prompt, 12, seed=5) == generate(model, prompt[-32:], 12, seed=5)


def test_vocab_size_restricts_a_hugging_face_model_to_the_tokenizers_ids():
    teacher = build_teacher(n_layer=1, n_positions=16)  # 97 outputs, near uniform: any id comes up
    free = generate(teacher, [4, 5], 30, top_p=1.0, seed=0)
    assert max(free) >= 5
    kept = generate(teacher, [4, 5], 30, top_p=1.0, seed=0, vocab_size=5)
    assert len(kept) == 30 and max(kept) < 5  # 30 tokens past the 16 positions: cropped too


@pytest.mark.parametrize("kw, says", [
    ({"top_p": 0.0}, "top_p 0.0 is not a probability mass"), ({"top_p": 1.5}, "top_p 1.5"),
    ({"top_p": True}, "top_p True"), ({"temperature": 0}, "temperature 0 must be"),
    ({"temperature": -1.0}, "temperature -1.0"), ({"n_tokens": 0}, "n_tokens 0 is not"),
    ({"prompt_ids": []}, "the prompt has no tokens"), ({"vocab_size": 98}, "vocab_size 98 must be"),
    ({"vocab_size": 0}, "vocab_size 0"), ({"prompt_ids": [3, 97]}, "range from 3 to 97"),
    ({"seed": 2**64}, "seed 18446744073709551616 must be"), ({"seed": 1.5}, "seed 1.5 must be"),
])
def test_bad_requests_are_refused_with_what_to_give(kw, says):
    args = {"prompt_ids": [1, 2], "n_tokens": 3, **kw}
    with pytest.raises(KdlibError, match=says):
        generate(TinyGPT(build_tiny_config()), args.pop("prompt_ids"), args.pop("n_tokens"), **args)


# --------------------------------------------------------------------------
# python -m kdlib sample


@pytest.fixture(scope="module")
def trained(smoke_data, tmp_path_factory):
    """(run folder, data folder): a 2-step smoke kl run, shared read-only."""
    _, folder, data = trained_smoke_run(smoke_data, tmp_path_factory, "sampled", steps=2)
    return folder, data


def continuation(model, tok, prompt: str, n: int, seed: int = 0) -> str:
    return tok.decode(generate(model, tok(prompt)["input_ids"], n, seed=seed, vocab_size=len(tok)))


def test_sample_prints_each_prompt_and_its_seeded_continuation(trained, capsys):
    from kdlib.tokenizer import tokenizer_of

    folder, data = trained
    assert main(["sample", str(folder), "--data-dir", str(data), "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "kl-seed0: 6 sampled tokens after each prompt (top-p 0.9, seed 0;" in out
    tok = tokenizer_of(preset("smoke"), data)
    model = load_student(folder / "student.safetensors")
    for i, prompt in enumerate(DEFAULT_PROMPTS, 1):
        shown = ("    ..." + continuation(model, tok, prompt, 6)).splitlines()[0]
        assert f"\n[{i}] {prompt}\n{shown}" in out
    assert main(["sample", str(folder), "--data-dir", str(data), "--tokens", "6"]) == 0
    assert capsys.readouterr().out == out  # seeded
    assert main(["sample", str(folder), "--data-dir", str(data), "--tokens", "6", "--seed", "1"]) == 0
    assert capsys.readouterr().out != out


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_sample_reads_a_prompts_file_and_refuses_a_bad_one(trained, tmp_path, capsys):
    folder, data = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The module\n\n   \n  A list of  \n", encoding="utf-8")
    assert main(["sample", str(folder), "--data-dir", str(data), "--prompts", str(prompts), "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "\n[1] The module\n" in out and "\n[2] A list of\n" in out and "[3]" not in out
    prompts.write_bytes(b"\xef\xbb\xbfThe module\r\n  A list of  \r\n")  # a byte-order mark, CRLF: the same prompts
    assert main(["sample", str(folder), "--data-dir", str(data), "--prompts", str(prompts), "--tokens", "3"]) == 0
    assert capsys.readouterr().out == out
    cases = {"empty": (b"", 2, "has no prompts"), "blank": (b"\n  \n", 2, "has no prompts"),
             "latin1": (b"caf\xe9\n", 2, "is not UTF-8 text"), "missing": (None, 3, "does not exist")}
    for name, (content, code, says) in cases.items():
        path = tmp_path / f"{name}.txt"
        if content is not None:
            path.write_bytes(content)
        assert main(["sample", str(folder), "--data-dir", str(data), "--prompts", str(path)]) == code, name
        line = one_error_line(capsys.readouterr().err)
        assert says in line and str(path) in line, line


def test_sample_refuses_a_bad_top_p_and_another_tokenizer(trained, tmp_path, capsys):
    folder, data = trained
    assert main(["sample", str(folder), "--data-dir", str(data), "--top-p", "1.5"]) == 2
    assert "top_p 1.5 is not a probability mass" in one_error_line(capsys.readouterr().err)
    other = shutil.copytree(folder, tmp_path / "runs" / "smoke" / "kl-seed0")
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "tokenizer_hash": "0" * 64}))
    assert main(["sample", str(other), "--data-dir", str(data)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was tokenized with another tokenizer" in line and "decoded" in line


# --------------------------------------------------------------------------
# the analysis notebook's table


def results_folder(root, data, runs: dict) -> None:
    """Finished smoke runs {(exp, seed): test ppl} with random students and the data's tokenizer hash."""
    from kdlib.tokenizer import tokenizer_hash, tokenizer_of

    found = tokenizer_hash(tokenizer_of(preset("smoke"), data))
    for (exp, seed), test in runs.items():
        folder = make_run(root / "smoke", exp, seed, [test + 5, test + 1], test=test)
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**summary, "tokenizer_hash": found}))
        torch.manual_seed(seed + len(exp))
        save_student(TinyGPT(preset("smoke").model), folder / "student.safetensors", exp=exp, seed=seed)


def test_samples_table_sets_the_teacher_ce_kl_and_the_best_run_side_by_side(smoke_data, tmp_path):
    from kdlib.models import load_teacher
    from kdlib.notebook import samples_table
    from kdlib.tokenizer import tokenizer_of

    data = smoke_data[0]
    results_folder(tmp_path, data, {("ce", 0): 40.0, ("kl", 1): 31.0, ("kl", 0): 30.0, ("layerwise-kl", 1): 25.0})
    make_run(tmp_path / "demo", "js", 0, [50.0], test=50.0, preset_name="demo")  # another protocol, no student
    notes = []
    table = samples_table(tmp_path, data, prompts=["The module", "A list"], n_tokens=5, log=notes.append)
    assert list(table.columns) == ["teacher", "ce (seed 0)", "kl (seed 1)", "best: layerwise-kl (seed 1)"]
    assert list(table.index) == ["The module", "A list"] and notes == []
    cfg, tok = preset("smoke"), tokenizer_of(preset("smoke"), data)
    teacher = load_teacher(cfg.teacher, device="cpu")
    for prompt in table.index:
        assert table.loc[prompt, "teacher"] == continuation(teacher, tok, prompt, 5)
        for column, run_name in (("ce (seed 0)", "ce-seed0"), ("best: layerwise-kl (seed 1)", "layerwise-kl-seed1")):
            student = load_student(tmp_path / "smoke" / run_name / "student.safetensors")
            assert table.loc[prompt, column] == continuation(student, tok, prompt, 5)
    (tmp_path / "smoke" / "ce-seed0" / "student.safetensors").unlink()  # on Colab only the best's is on Drive
    table = samples_table(tmp_path, data, prompts=["The module"], n_tokens=2, log=notes.append)
    assert list(table.columns) == ["teacher", "kl (seed 1)", "best: layerwise-kl (seed 1)"]
    assert len(notes) == 1 and notes[0].startswith("ce (seed 0): left out, its student cannot be read")


def test_samples_are_shown_whole_and_wrapped(monkeypatch):
    import IPython.display
    import pandas as pd

    from kdlib.notebook import show_samples

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    long = "word " * 80
    show_samples(pd.DataFrame({"teacher": [long]}, index=pd.Index(["The"], name="prompt")))
    html = shown[0].data
    assert long.strip() in html and "white-space: pre-wrap" in html

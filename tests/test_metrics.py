"""kdlib.metrics and kdlib.scoring: every test metric against an independent computation.

ECE and the reliability bins against a direct numpy binning; the frequency buckets against a naive
loop over the ranked types; agreement, KL(teacher || student), ECE and perplexity by bucket against
a token-by-token loop in float64 on tiny random GPT-2s; and a finished smoke run's summary.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch

from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.evaluate import perplexity, windows
from kdlib.metrics import ECE_BINS, ece, frequency_buckets, reliability, test_metrics as measure
from helpers import run

V = 40  # the tiny models' vocabulary


# --------------------------------------------------------------------------
# independent computations


def naive_reliability(conf, correct, n_bins: int = ECE_BINS) -> dict:
    """Bin m (1-based) holds the confidences in ((m-1)/n, m/n]; a confidence of 0 goes to bin 1."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    out = {"count": [], "confidence": [], "accuracy": []}
    for m in range(1, n_bins + 1):
        inside = (conf > (m - 1) / n_bins) & (conf <= m / n_bins)
        if m == 1:
            inside |= conf == 0
        out["count"].append(int(inside.sum()))
        out["confidence"].append(float(conf[inside].mean()) if inside.any() else None)
        out["accuracy"].append(float(correct[inside].mean()) if inside.any() else None)
    return out


def naive_ece(conf, correct, n_bins: int = ECE_BINS) -> float:
    bins = naive_reliability(conf, correct, n_bins)
    total = sum(bins["count"])
    return sum(n / total * abs(a - c) for n, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"]) if n)


def naive_buckets(train_ids, vocab_size: int, n: int) -> list[int]:
    """Each type's 0-based bucket: floor(n x share of the training tokens ranked before it), in exact
    integer arithmetic, types ranked by (-count, id); never-seen types in the last bucket."""
    counts = [0] * vocab_size
    for t in train_ids:
        counts[int(t)] += 1
    total, before, out = len(train_ids), 0, [0] * vocab_size
    for t in sorted(range(vocab_size), key=lambda t: (-counts[t], t)):
        out[t] = n - 1 if counts[t] == 0 else min(n * before // total, n - 1)
        before += counts[t]
    return out


def log_softmax64(logits) -> np.ndarray:
    z = logits.detach().double().numpy()
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def token_by_token(student, teacher, ids, block: int, stride: int, bucket_of) -> dict:
    """Every token the protocol scores, predicted by each model run on that token's own context in
    its window alone (one forward per token), every formula in float64."""
    rows = []  # (target, log p [V], log q [V])
    with torch.no_grad():
        for begin, end, n_scored in windows(len(ids), block, stride):
            for t in range(end - n_scored, end):
                context = torch.as_tensor(ids[begin:t], dtype=torch.int64)[None]  # [1, t - begin]
                lp = log_softmax64(student(context).logits[0, -1])
                lq = log_softmax64(teacher(context).logits[0, -1]) if teacher is not None else None
                rows.append((int(ids[t]), lp, lq))
    out = {}
    for who in ("student", "teacher"):
        if who == "teacher" and teacher is None:
            continue
        nll = np.array([-(lp if who == "student" else lq)[y] for y, lp, lq in rows])
        top = [(lp if who == "student" else lq) for _, lp, lq in rows]
        conf = np.array([math.exp(x.max()) for x in top])
        correct = np.array([float(np.argmax(x) == y) for x, (y, _, _) in zip(top, rows)])
        buckets = np.array([bucket_of[y] for y, _, _ in rows])
        n_buckets = int(max(bucket_of)) + 1
        out[who] = {"ppl": math.exp(nll.mean()), "tokens": len(rows), "ece": naive_ece(conf, correct),
                    "reliability": naive_reliability(conf, correct),
                    "bucket_tokens": [int((buckets == k).sum()) for k in range(n_buckets)],
                    "bucket_ppl": [math.exp(nll[buckets == k].mean()) if (buckets == k).any() else None
                                   for k in range(n_buckets)]}
    if teacher is not None:
        out["student"]["agreement"] = float(np.mean([np.argmax(lp) == np.argmax(lq) for _, lp, lq in rows]))
        out["student"]["kl_teacher"] = float(np.mean([np.sum(np.exp(lq) * (lq - lp)) for _, lp, lq in rows]))
    return out


def close(a, b, rel=1e-5) -> bool:
    """Equal to ``rel`` (None only where the other is None; lists and dicts element by element)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return a == pytest.approx(b, rel=rel, abs=1e-12)


# --------------------------------------------------------------------------
# ECE and the reliability bins


def test_ece_and_reliability_match_a_direct_numpy_binning_on_random_inputs():
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000):
        conf = rng.random(n) ** 2  # denser near 0: some bins fuller than others
        correct = rng.random(n) < conf
        bins = reliability(conf, correct)
        assert close(bins, naive_reliability(conf, correct), rel=1e-12)
        assert sum(bins["count"]) == n
        assert ece(conf, correct) == pytest.approx(naive_ece(conf, correct), rel=1e-12, abs=1e-15)
    # Another number of bins follows the same rule.
    conf, correct = rng.random(200), rng.random(200) < 0.5
    assert close(reliability(conf, correct, 4), naive_reliability(conf, correct, 4), rel=1e-12)


def test_a_confidence_on_a_bin_edge_goes_to_the_bin_it_closes():
    edges = np.array([m / 15 for m in range(1, 16)])  # 1/15 .. 1.0: each the upper edge of bin m
    correct = np.arange(15) % 2 == 0
    bins = reliability(edges, correct)
    assert bins["count"] == [1] * 15 == naive_reliability(edges, correct)["count"]
    assert bins["confidence"] == pytest.approx(list(edges), rel=1e-15)
    # One token just above 1/15 and one at 2/15: both in bin 2; 0 in bin 1, beside 1/15.
    conf = np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 2 / 15])
    bins = reliability(conf, [1, 0, 1, 1])
    assert bins["count"][:3] == [2, 2, 0] and sum(bins["count"]) == 4
    assert bins["accuracy"][:2] == [0.5, 1.0] and bins["confidence"][0] == pytest.approx(1 / 30)
    assert ece(conf, [1, 0, 1, 1]) == pytest.approx(naive_ece(conf, [1, 0, 1, 1]), rel=1e-12)


def test_all_in_one_bin_gives_its_gap_and_empty_bins_give_none():
    conf = np.full(8, 0.9)  # bin 14: (13/15, 14/15]
    correct = np.array([1, 1, 1, 0, 0, 1, 1, 1])
    bins = reliability(conf, correct)
    assert bins["count"] == [0] * 13 + [8, 0]
    assert bins["confidence"][:13] == [None] * 13 and bins["accuracy"][14] is None
    assert bins["confidence"][13] == pytest.approx(0.9) and bins["accuracy"][13] == 0.75
    assert ece(conf, correct) == pytest.approx(0.15)
    # Perfect calibration in every bin: ECE 0; no tokens at all: NaN.
    assert ece([1.0, 1.0, 0.5, 0.5], [1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(ece([], []))


# --------------------------------------------------------------------------
# frequency buckets


def test_frequency_buckets_match_a_naive_loop_and_state_their_boundaries():
    rng = np.random.default_rng(1)
    cases = [(rng.zipf(1.3, 5000) % 60, 64, 5),  # a long tail, ids 60..63 never seen
             (rng.integers(0, 10, 37), 10, 5),  # nearly uniform, few tokens
             (np.array([3, 3, 3, 3, 1, 1, 2, 0, 0, 0]), 6, 5),  # ties, shares on exact boundaries
             (np.array([7] * 9 + [2]), 8, 3),  # one type holds 90%: bucket 2 empty, the rest in bucket 3
             (rng.integers(0, 5, 50), 5, 1)]
    for train, vocab, n in cases:
        b = frequency_buckets(train, vocab, n)
        expected = naive_buckets(train, vocab, n)
        assert b["bucket_of"].tolist() == expected and b["bucket_of"].shape == (vocab,)
        counts = np.bincount(train, minlength=vocab)
        for k in range(n):
            members = counts[np.array(expected) == k]
            assert b["types"][k] == len(members)
            assert b["min_count"][k] == (int(members.min()) if len(members) else None)
            assert b["max_count"][k] == (int(members.max()) if len(members) else None)
            assert b["train_share"][k] == pytest.approx(members.sum() / len(train), rel=1e-12, abs=0)
        assert sum(b["types"]) == vocab and sum(b["train_share"]) == pytest.approx(1.0, rel=1e-12)
        assert b["bucket_of"][int(np.argmax(counts))] == 0  # the most frequent type opens bucket 1
    exact = frequency_buckets(np.array([3, 3, 3, 3, 1, 1, 2, 0, 0, 0]), 6, 5)
    # Ranked 3 (4 tokens), 0 (3), 1 (2), 2 (1), then 4 and 5 unseen: shares before 0, .4, .7, .9.
    assert exact["bucket_of"].tolist() == [2, 3, 4, 0, 4, 4] and exact["types"] == [1, 0, 1, 1, 3]
    assert exact["min_count"][1] is None and exact["train_share"][1] == 0.0


def test_frequency_buckets_refuse_what_they_cannot_bucket():
    with pytest.raises(KdlibError, match="no tokens"):
        frequency_buckets(np.array([], dtype=np.int64), 10)
    for bad in (0, -1, 2.0):
        with pytest.raises(KdlibError, match="n_buckets"):
            frequency_buckets(np.array([1, 2]), 10, bad)


# --------------------------------------------------------------------------
# test_metrics against a token-by-token loop


def tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1, initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)  # dropout on: a pass left in training mode would not match


@pytest.fixture(scope="module")
def models():
    """(student, teacher): the student a perturbed copy of the teacher, so that they agree often but
    not always; both confident enough to fill several confidence bins."""
    teacher = tiny_gpt2(0)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student, teacher


@pytest.fixture(scope="module")
def zipf_data():
    """(train ids, test ids of 75 tokens) from one long-tailed distribution over the vocabulary."""
    rng = np.random.default_rng(2)
    probs = 1.0 / np.arange(1, V + 1) ** 1.1
    probs /= probs.sum()
    return rng.choice(V, 3000, p=probs), rng.choice(V, 75, p=probs)


@pytest.mark.parametrize("block, stride", [(16, 8), (16, 16), (12, 5)])
def test_test_metrics_match_a_token_by_token_float64_loop(models, zipf_data, block, stride):
    student, teacher = models
    train, test = zipf_data
    bucket_of = frequency_buckets(train, V)["bucket_of"]
    assert windows(len(test), block, stride)[-1][1] - windows(len(test), block, stride)[-1][0] < block  # a short last
    student.train(), teacher.train()
    got = measure(student, test, block, stride, teacher=teacher, bucket_of=bucket_of, batch_size=3)
    assert student.training and teacher.training  # the modes the caller left them in
    student.eval(), teacher.eval()
    want = token_by_token(student, teacher, test, block, stride, bucket_of)
    for who in ("student", "teacher"):
        g, w = got[who], want[who]
        assert g["tokens"] == w["tokens"] == sum(n for _, _, n in windows(len(test), block, stride))
        assert g["bucket_tokens"] == w["bucket_tokens"] and g["reliability"]["count"] == w["reliability"]["count"]
        for key in ("ppl", "ece", "bucket_ppl", "reliability"):
            assert close(g[key], w[key]), (who, key, g[key], w[key])
    assert close(got["student"]["agreement"], want["student"]["agreement"])
    assert close(got["student"]["kl_teacher"], want["student"]["kl_teacher"])
    # The case is not degenerate: the models disagree sometimes, fill several bins and all buckets.
    assert 0.3 < want["student"]["agreement"] < 0.9 and want["student"]["kl_teacher"] > 1e-3
    assert sum(n > 0 for n in want["student"]["reliability"]["count"]) >= 3
    assert all(n > 0 for n in want["student"]["bucket_tokens"])
    # The student's perplexity is test perplexity's.
    assert got["student"]["ppl"] == pytest.approx(perplexity(student, test, block, stride, 3), rel=1e-6)


def test_without_a_teacher_the_student_alone_in_one_bucket(models, zipf_data):
    student, _ = models
    test = zipf_data[1]
    got = measure(student, test, 16, 8)
    assert got["teacher"] is None and "agreement" not in got["student"] and "kl_teacher" not in got["student"]
    student.eval()
    want = token_by_token(student, None, test, 16, 8, [0] * V)["student"]
    assert got["student"]["bucket_ppl"] == pytest.approx([want["ppl"]], rel=1e-5)
    assert close(got["student"]["ece"], want["ece"]) and got["student"]["tokens"] == want["tokens"]


def test_a_student_that_is_the_teacher_agrees_always_and_has_kl_zero(models, zipf_data):
    _, teacher = models
    train, test = zipf_data
    got = measure(teacher, test, 16, 8, teacher=teacher, bucket_of=frequency_buckets(train, V)["bucket_of"])
    assert got["student"]["agreement"] == 1.0 and got["student"]["kl_teacher"] == pytest.approx(0.0, abs=1e-7)
    same = {k: v for k, v in got["student"].items() if k not in ("agreement", "kl_teacher")}
    assert same == got["teacher"]


def test_test_metrics_refuse_buckets_that_do_not_cover_the_ids(models, zipf_data):
    student, teacher = models
    test = zipf_data[1]
    with pytest.raises(KdlibError, match="bucket_of covers ids 0..9"):
        measure(student, test, 16, 8, teacher=teacher, bucket_of=np.zeros(10, dtype=np.int64))
    with pytest.raises(KdlibError, match="stride"):
        measure(student, test, 16, 0, teacher=teacher)
    with pytest.raises(KdlibError, match="embeddings for"):
        measure(student, np.array([1, 2, V]), 16, 8)
    from transformers import GPT2Config, GPT2LMHeadModel

    short = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=1, bos_token_id=0,
                                       eos_token_id=0))
    with pytest.raises(KdlibError, match="longer than the model's context"):  # the teacher's context too
        measure(student, test, 16, 8, teacher=short)
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=V + 10, n_positions=32, n_embd=8, n_layer=1, n_head=1,
                                       bos_token_id=0, eos_token_id=0)).eval()
    student.train()
    with pytest.raises(KdlibError, match="teacher scores 50 token ids but the student 40"):
        measure(student, test, 16, 8, teacher=wider)
    assert student.training and not wider.training  # the refusal leaves the modes as they were


# --------------------------------------------------------------------------
# a finished run's summary


def smoke_cfg(exp: str):
    cfg = preset("smoke", exp)
    cfg.train.max_steps = 4
    return cfg.validate()


@pytest.fixture(scope="module")
def two_runs(smoke_data, tmp_path_factory):
    """(kl summary, ce summary, data folder): two smoke runs in one data folder, the ce run trained
    after the kl run's stored teacher entry was marked (its ECE edited: a teacher read back shows it)."""
    root = tmp_path_factory.mktemp("metric_runs")
    data = shutil.copytree(smoke_data[0], root / "data")
    kl = run(smoke_cfg("kl"), root / "kl", data)
    path = data / "teacher_metrics.json"
    stored = json.loads(path.read_text())
    stored["entries"][0]["metrics"]["ece"] = 0.123456  # a mark: read back, not measured again
    path.write_text(json.dumps(stored))
    ce = run(smoke_cfg("ce"), root / "ce", data)
    return kl, ce, data


def test_a_runs_summary_has_test_metrics_matching_its_test_perplexities(two_runs):
    kl, ce, data = two_runs
    for summary in (kl, ce):
        m = summary["test_metrics"]
        assert m["student"]["ppl"] == pytest.approx(summary["test_ppl"], rel=1e-6)
        assert m["teacher"]["ppl"] == pytest.approx(summary["teacher_test_ppl"], rel=1e-6)
        assert m["block_size"] == 32 and m["stride"] == 16 and m["ece_bins"] == ECE_BINS
        assert 0 <= m["student"]["agreement"] <= 1 and m["student"]["kl_teacher"] > 0  # ce too: no teacher in training
        assert len(m["student"]["bucket_ppl"]) == m["buckets"]["n"] == 5
        assert sum(m["buckets"]["train_share"]) == pytest.approx(1.0)
        assert sum(m["student"]["bucket_tokens"]) == m["student"]["tokens"] == sum(m["student"]["reliability"]["count"])
    assert kl["teacher_source"] == "online" and ce["teacher_source"] == "none"
    # One entry, written by the first run; the second run read it back (the mark) instead of scoring again.
    entries = json.loads((data / "teacher_metrics.json").read_text())["entries"]
    assert len(entries) == 1
    assert ce["test_metrics"]["teacher"] == entries[0]["metrics"]
    assert ce["test_metrics"]["teacher"] == {**kl["test_metrics"]["teacher"], "ece": 0.123456}
    assert ce["test_metrics"]["buckets"] == kl["test_metrics"]["buckets"]
    assert ce["test_metrics"]["student"]["tokens"] == kl["test_metrics"]["student"]["tokens"]


def test_a_last_bucket_without_a_type_keeps_its_entry_and_true_is_not_a_bucket_count():
    """Four equally frequent types in five buckets: bucket 5 has no type, and its entry is None, not
    missing (a summary's bucket list always has FREQUENCY_BUCKETS entries)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    buckets = frequency_buckets(np.arange(400) % 4, 4)
    assert buckets["types"] == [1, 1, 1, 1, 0]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    got = measure(model, np.arange(40) % 4, 8, 4, bucket_of=buckets["bucket_of"], n_buckets=5)["student"]
    assert len(got["bucket_ppl"]) == 5 and got["bucket_ppl"][4] is None and got["bucket_tokens"][4] == 0
    with pytest.raises(KdlibError, match="n_buckets it was built with"):
        measure(model, np.arange(40) % 4, 8, 4, bucket_of=buckets["bucket_of"], n_buckets=2)
    with pytest.raises(KdlibError, match="n_buckets must be a whole number"):
        frequency_buckets(np.arange(10) % 4, 4, n_buckets=True)


@pytest.mark.parametrize("content", ["{broken", "[]", '{"entries": "all"}', "MATCHING_BUT_MALFORMED",
                                     "MATCHING_BUT_NAN", "MATCHING_BUT_NEGATIVE"])
def test_an_unreadable_teacher_metrics_file_is_written_afresh_not_the_end_of_the_run(two_runs, tmp_path, content):
    """teacher_metrics.json is derived: edited, cut short or another tool's, it is replaced by this
    run's measurement, and the run finishes."""
    kl, _, data = two_runs
    folder = shutil.copytree(data, tmp_path / "data")
    path = folder / "teacher_metrics.json"
    if content == "MATCHING_BUT_MALFORMED":  # the right key, its numbers not kdlib's
        stored = json.loads(path.read_text())
        stored["entries"][0]["metrics"]["bucket_ppl"] = "many"
        content = json.dumps(stored)
    elif content.startswith("MATCHING_BUT_"):  # the right key and structure, a number no measurement gives
        stored = json.loads(path.read_text())
        stored["entries"][0]["metrics"]["ece" if content.endswith("NAN") else "ppl"] = \
            float("nan") if content.endswith("NAN") else -5.0
        content = json.dumps(stored)
    path.write_text(content)
    summary = run(smoke_cfg("kl"), tmp_path / "kl", folder)
    assert summary["test_metrics"]["teacher"]["ppl"] == pytest.approx(kl["test_metrics"]["teacher"]["ppl"], rel=1e-6)
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 1 and entries[0]["metrics"] == summary["test_metrics"]["teacher"]
    assert math.isfinite(summary["test_metrics"]["teacher"]["ece"])  # json's NaN is one object: == holds


def test_a_data_folder_where_the_teacher_metrics_cannot_be_written_does_not_end_the_run(
        two_runs, tmp_path, monkeypatch, capsys):
    """A read-only data folder (teacher_metrics.json and teacher_ppl.json cannot be written): the run
    still writes its summary, with the teacher measured by this run, and says why nothing was stored."""
    import kdlib.fileio

    kl, _, data = two_runs
    folder = shutil.copytree(data, tmp_path / "data")
    (folder / "teacher_metrics.json").unlink()

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    (folder / "teacher_ppl.json").unlink()  # the teacher's perplexity, stored by training alike
    monkeypatch.setattr(kdlib.fileio, "atomic_write_json", refuse)  # what store_derived writes with
    summary = run(smoke_cfg("kl"), tmp_path / "kl", folder)
    assert summary["test_metrics"]["teacher"]["ppl"] == pytest.approx(kl["test_metrics"]["teacher"]["ppl"], rel=1e-6)
    assert summary["teacher_test_ppl"] == pytest.approx(kl["teacher_test_ppl"], rel=1e-6)
    assert (tmp_path / "kl" / "summary.json").is_file() and not (folder / "teacher_metrics.json").exists()
    assert not (folder / "teacher_ppl.json").exists()
    err = capsys.readouterr().err
    assert "not stored: the teacher's test metrics" in err and "not stored: the teacher's perplexity" in err

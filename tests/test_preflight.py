import json

import torch
from torch import nn

from kdlib import preflight
from kdlib.cli import main
from kdlib.config import preset
from kdlib.grid import EXPERIMENTS
from kdlib.models import load_teacher
from kdlib.objective import DistillationLoss, LossOutput


def _teacher(cfg, attentions=False):
    return load_teacher(cfg.teacher, need_attentions=attentions, student_vocab_size=cfg.model.vocab_size)


def test_check_passes_for_every_experiment_and_both_features(capsys):
    assert main(["check", "--preset", "smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[1] for l in lines[:-1]] == list(EXPERIMENTS)
    assert all(l.startswith("ok") for l in lines[:-1])
    assert lines[-1] == "14 passed, 0 failed"
    assert main(["check", "--feature", "attention", "--exps", "layerwise-js-cos", "last2all-kl"]) == 0


def test_check_reports_a_parameter_that_gets_no_gradient(monkeypatch):
    cfg = preset("smoke", "kl")
    original = preflight.TinyGPT

    class WithDeadWeight(original):
        def __init__(self, c):
            super().__init__(c)
            self.unused = nn.Parameter(torch.ones(3))

    monkeypatch.setattr(preflight, "TinyGPT", WithDeadWeight)
    result = preflight.check_experiment(cfg, _teacher(cfg))
    assert not result.ok
    assert any("gradient for: student.unused" in p for p in result.problems)
    assert any("did not change: student.unused" in p for p in result.problems)
    assert result.line().startswith("FAIL")


def test_check_reports_a_missing_loss_component(monkeypatch):
    cfg = preset("smoke", "layerwise-kl-cos")
    original = DistillationLoss.forward

    def drops_cosine(self, s, t, labels):
        out = original(self, s, t, labels)
        return LossOutput(out.total, {k: v for k, v in out.parts.items() if k != "cos"})

    monkeypatch.setattr(DistillationLoss, "forward", drops_cosine)
    result = preflight.check_experiment(cfg, _teacher(cfg))
    assert any("missing: cos" in p for p in result.problems)


def test_check_reports_a_non_finite_loss(monkeypatch):
    cfg = preset("smoke", "js")
    original = DistillationLoss.forward

    def nan_loss(self, s, t, labels):
        out = original(self, s, t, labels)
        out.parts["js"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(DistillationLoss, "forward", nan_loss)
    result = preflight.check_experiment(cfg, _teacher(cfg))
    assert any("non-finite loss (js)" in p for p in result.problems)


def test_check_exit_code_is_nonzero_on_failure(monkeypatch, capsys):
    monkeypatch.setattr(preflight, "check_experiment",
                        lambda cfg, teacher, steps, **kw: preflight.CheckResult(cfg.exp, ["broken"]))
    assert main(["check", "--exps", "kl"]) == 1
    assert "FAIL  kl" in capsys.readouterr().out


def test_check_reports_unknown_experiment_without_traceback(capsys):
    assert main(["check", "--exps", "kl-jsd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown part 'jsd'") and "Traceback" not in err


def test_check_on_prepared_data_uses_its_windows_and_round_trips_the_checkpoint(smoke_data, capsys):
    folder, splits = smoke_data
    assert main(["check", "--exps", "kl", "last2all-js-cos", "--data-dir", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 passed, 0 failed"
    cfg = preset("smoke", "kl")
    tokens = preflight.check_data(folder, cfg)
    assert len(tokens) == splits["train"].n_tokens


def test_check_reports_a_checkpoint_that_does_not_round_trip(monkeypatch, smoke_data):
    cfg = preset("smoke", "ce")

    def broken_load(path, expect=None):
        return preflight.TinyGPT(expect)  # fresh weights: not what was saved

    monkeypatch.setattr(preflight, "load_student", broken_load)
    result = preflight.check_experiment(cfg, None, tokens=preflight.check_data(smoke_data[0], cfg))
    assert any("does not reproduce" in p for p in result.problems)


def test_check_refuses_data_too_short_for_a_window(smoke_data, tmp_path):
    import shutil

    from kdlib.errors import KdlibError
    import pytest

    folder = tmp_path / "data"
    shutil.copytree(smoke_data[0], folder)
    cfg = preset("smoke", "kl")
    cfg.data.block_size = 64
    cfg.model.block_size = 64
    manifest = json.loads((folder / "test.json").read_text())
    keep = 40  # tokens: fewer than one window of 64
    (folder / "test.bin").write_bytes((folder / "test.bin").read_bytes()[:keep * 2])
    manifest["tokens"] = keep
    (folder / "test.json").write_text(json.dumps(manifest))
    with pytest.raises(KdlibError, match="split 'test'.*not one window"):
        preflight.check_data(folder, cfg)


def test_check_catches_an_optimizer_that_never_steps(monkeypatch):
    """The original study's saved no-KD cell lacked optimizer.step(): preflight must say so."""
    cfg = preset("smoke", "ce")
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    result = preflight.check_experiment(cfg, None)
    assert any(p.startswith("the optimizer did not change: student.wte.weight") for p in result.problems)

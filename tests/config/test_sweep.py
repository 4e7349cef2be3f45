"""Sensitivity sweeps: --set parsing and its refusals, the product of the axes, the run names,
the config's record of its point (and an older config without one), and the loss a point computes."""

import hashlib
import json

import pytest

from kdlib.cli import main as cli_main
from kdlib.config import ExperimentConfig, preset
from kdlib.config.sweep import apply_point, format_value, parse_sets, point_label, short_names
from kdlib.errors import KdlibError
from kdlib.launch import RunChoices, run_configs
from kdlib.runs import RunPaths, check_config, config_digest, run_name


def test_sets_parse_into_typed_axes():
    axes = parse_sets(["loss.temperature=1,2.5", "train.batch_size=8,16", "train.lr=3e-4"])
    assert axes == {"loss.temperature": (1.0, 2.5), "train.batch_size": (8, 16), "train.lr": (0.0003,)}
    assert [type(v) for v in axes["loss.temperature"]] == [float, float]  # a float field: floats
    assert [type(v) for v in axes["train.batch_size"]] == [int, int]  # an int field keeps ints
    assert parse_sets([]) == {}


@pytest.mark.parametrize("sets, says", [
    (["model.n_layer=2"], "SECTION one of: loss, train"),  # an unknown section
    (["temperature=1"], "SECTION one of: loss, train"),  # no section
    (["loss.tempature=1"], "is not a field of it; the numeric fields of loss are: temperature"),
    (["loss.feature=1"], "loss.feature is not a number"),  # a str field
    (["train.decay_all=1"], "train.decay_all is not a number"),  # a bool field
    (["train.betas=0.9"], "train.betas is not a number"),  # a tuple field
    (["train.save_every_s=60,120"], "not what it learns"),
    (["train.batch_size=1.5"], "'1.5' is not a whole number"),  # wrong type for an int field
    (["loss.temperature=warm"], "'warm' is not a number"),
    (["loss.temperature=0,1"], "loss.temperature must be a finite number in (0, inf]"),  # out of range
    (["loss.label_smoothing=1.5"], "loss.label_smoothing must be a finite number in [0, 1]"),
    (["loss.w_div=-1"], "loss.w_div must be a finite number in [0, inf]"),
    (["loss.temperature=nan"], "must be a finite number"),
    (["train.batch_size=0"], "train.batch_size must be a whole number >= 1"),
    (["loss.temperature=1", "loss.temperature=2"], "--set loss.temperature is given twice"),
    (["loss.temperature="], "no values"),
    (["loss.temperature=1,,2"], "an empty value between commas"),
    (["loss.temperature=1,1.0"], "the value 1 is given twice"),  # the same float twice
    (["loss.temperature"], "expected KEY=V1,V2"),
])
def test_each_bad_set_is_refused_in_one_line(sets, says):
    with pytest.raises(KdlibError) as e:
        parse_sets(sets)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_notebooks_sweep_gives_lists_of_values():
    assert run_configs("smoke", ["kl"], [0], RunChoices(sweep={"loss.w_cos": (0.1,)}), log=print)[0].loss.w_cos == 0.1
    with pytest.raises(KdlibError, match=r"give its values as a list \(\[1, 2\]\), got 2"):
        run_configs("smoke", ["kl"], [0], RunChoices(sweep={"loss.temperature": 2}))


def test_plan_refuses_a_bad_set_before_anything_starts(capsys, tmp_path):
    assert cli_main(["plan", "--preset", "smoke", "--exps", "kl", "--seeds", "0", "--set", "loss.w_feat=x",
                     "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set loss.w_feat: 'x' is not a number") and not (tmp_path / "runs").exists()


def test_the_product_gives_every_point_its_config_and_folder():
    sweep = {"loss.temperature": [1, 2], "loss.w_div": ["0.25", 0.5]}  # numbers or text, as a notebook gives
    cfgs = run_configs("smoke", ["kl", "ce"], [0], RunChoices(sweep=sweep), log=lambda m: None)
    assert len(cfgs) == 8 and len({run_name(c) for c in cfgs}) == 8
    expected = {(e, t, w) for e in ("kl", "ce") for t in (1.0, 2.0) for w in (0.25, 0.5)}
    assert {(c.exp, c.loss.temperature, c.loss.w_div) for c in cfgs} == expected
    for c in cfgs:
        assert c.sweep == {"loss.temperature": c.loss.temperature, "loss.w_div": c.loss.w_div}
        assert (c.loss_terms.temperature, c.loss_terms.w_div) == (c.loss.temperature, c.loss.w_div)
    assert "kl+temperature=2+w_div=0.25-seed0" in {run_name(c) for c in cfgs}


def test_a_swept_value_no_term_of_the_experiment_weighs_is_said():
    notes = []
    run_configs("smoke", ["ce", "kl", "layerwise-kl-cos"], [0],
                RunChoices(sweep={"loss.temperature": [1, 2], "loss.w_cos": [0.1], "train.lr": [1e-3]}), log=notes.append)
    assert notes == ["note: swept values that act on no term of the experiment: loss.temperature on ce, loss.w_cos on "
                     "ce, loss.w_cos on kl; points that differ only in them train the same student (drop the "
                     "experiment from --exps, or sweep it apart)"]


def test_the_plan_shows_the_sweeps_total(capsys, tmp_path, monkeypatch):
    import kdlib.plan

    monkeypatch.setattr(kdlib.plan, "timing", lambda cfgs, *a: type("T", (), {
        "rate": staticmethod(lambda cfg: 1e9), "notes": [], "source": "stub", "device": "stub"})())
    assert cli_main(["plan", "--preset", "smoke", "--exps", "kl", "--seeds", "0", "1", "--set", "loss.temperature=1,2",
                     "--set", "train.lr=0.001,0.002,0.004", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "1 experiment(s) x 2 seed(s) (0, 1) x 6 sweep point(s) = 12 run(s)" in out
    assert "kl+temperature=1+lr=0.004-seed1" in out


def test_names_say_the_values_canonically_and_compose_with_the_cache():
    cfg = apply_point(preset("smoke", "kl"), {"loss.temperature": 1.0, "train.lr": 4e-4})
    cfg.seed = 3
    assert run_name(cfg.validate()) == "kl+temperature=1+lr=0.0004-seed3"
    cfg.train.teacher_source = "cache"
    assert run_name(cfg.validate()) == "kl-top16+temperature=1+lr=0.0004-seed3"
    assert [format_value(v) for v in (1.0, 0.5, 2.25, 16, 1e-5)] == ["1", "0.5", "2.25", "16", "0.00001"]
    assert point_label({"loss.w_div": 0.5, "loss.temperature": 2.0}) == "temperature=2, w_div=0.5"
    assert short_names(["loss.x", "train.x", "train.lr"]) == {"loss.x": "loss.x", "train.x": "train.x",
                                                               "train.lr": "lr"}


def test_a_folder_of_another_point_is_refused(tmp_path):
    one, two = (apply_point(preset("smoke", "kl"), {"loss.temperature": t}).validate() for t in (1.0, 2.0))
    folder = tmp_path / "smoke" / run_name(one)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(one.to_json())
    paths = RunPaths.of(one, folder)
    check_config(paths, one)  # its own point
    with pytest.raises(KdlibError, match=r"differs in: loss.temperature \(1.0 there, 2.0 now\), sweep"):
        check_config(paths, two)


def test_the_point_is_saved_and_loaded_strictly_and_an_older_config_still_loads():
    cfg = apply_point(preset("smoke", "kl"), {"loss.temperature": 1.0}).validate()
    d = json.loads(cfg.to_json())
    assert d["sweep"] == {"loss.temperature": 1.0}
    assert ExperimentConfig.from_dict(d) == cfg
    for bad, says in (({"loss.temperature": 3.0}, "records loss.temperature = 3, but the run uses 1"),
                      ({"loss.feature": 1}, "loss.feature is not a number"), ([1.0], "must be of type dict")):
        with pytest.raises(KdlibError, match=says):
            ExperimentConfig.from_dict({**d, "sweep": bad})
    old = preset("smoke", "kl").validate().to_dict()
    assert "sweep" not in old  # outside a sweep, config.json is what kdlib wrote before sweeps
    loaded = ExperimentConfig.from_dict(old)
    assert loaded.sweep == {} and loaded == preset("smoke", "kl").validate()
    # its resume state is bound to the digest of that older file, written as kdlib wrote it then
    for k in ("compile", "save_every_s"):
        old["train"].pop(k)
    assert config_digest(loaded) == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()


def test_a_swept_loss_value_wins_over_the_presets_override():
    base = preset("study", "kl")
    assert base.loss_terms.label_smoothing == 0.1  # the study's KL runs: its override
    for value in (0.0, 0.2):
        cfg = apply_point(preset("study", "kl"), {"loss.label_smoothing": value}).validate()
        assert cfg.loss_terms.label_smoothing == value
    cfg = apply_point(preset("study", "ce"), {"loss.w_ce": 0.7}).validate()
    assert cfg.loss_terms.w_ce == 0.7  # over the "none" override's 1.0
    cfg = apply_point(preset("study", "kl"), {"loss.temperature": 4.0}).validate()
    assert (cfg.loss_terms.temperature, cfg.loss_terms.label_smoothing) == (4.0, 0.1)  # the other override stays
    cfg = apply_point(preset("smoke", "kl"), {"loss.temperature": 1.0}).validate()
    assert cfg.loss_terms.temperature == 1.0
    # a config whose override hides its recorded point is refused
    hidden = cfg.to_dict()
    hidden["loss"]["overrides"] = {"kl": {"temperature": 3.0}}
    with pytest.raises(KdlibError, match="loss.overrides sets it for this divergence"):
        ExperimentConfig.from_dict(hidden)

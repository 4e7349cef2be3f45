"""The study grid: experiment names, the name grammar, and ``python -m kdlib grid``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlib import grid
from kdlib.cli import main
from kdlib.errors import KdlibError
from kdlib.grid import EXPERIMENTS, ExperimentSpec, parse

STUDY_14 = (
    "ce", "kl",
    "layerwise-kl", "layerwise-kl-cos", "layerwise-js", "layerwise-js-cos",
    "last2last-kl", "last2last-kl-cos", "last2last-js", "last2last-js-cos",
    "last2all-kl", "last2all-kl-cos", "last2all-js", "last2all-js-cos",
)


def test_experiments_are_the_study_14_in_order():
    assert tuple(EXPERIMENTS) == STUDY_14
    assert len(set(EXPERIMENTS)) == 14


@pytest.mark.parametrize("name", STUDY_14)
def test_each_study_name_parses_to_its_components(name):
    spec = parse(name)
    assert isinstance(spec, ExperimentSpec)
    assert spec.name == name
    assert spec.in_grid
    parts = name.split("-")
    expected_map = parts[0] if parts[0] in ("layerwise", "last2last", "last2all") else None
    expected_div = next((p for p in parts if p in ("kl", "js")), None)
    assert spec.feature_map == expected_map
    assert spec.divergence == expected_div
    assert spec.divergence_param is None
    assert spec.cosine == name.endswith("-cos")
    assert spec.feature == "hidden"
    assert spec.needs_teacher == (name != "ce")
    assert spec.needs_hidden_states == (expected_map is not None)
    assert not spec.needs_attentions
    assert parse(spec.name) == spec


def test_specs_lists_the_grid():
    assert [s.name for s in grid.specs()] == list(STUDY_14)
    assert all(s.feature == "attention" for s in grid.specs("attention"))


# --------------------------------------------------------------------------
# names beyond the grid


@pytest.mark.parametrize("name, canonical, div, param, fmap, cos", [
    ("js", "js", "js", None, None, False),
    ("kl-cos", "kl-cos", "kl", None, None, True),
    ("rkl", "rkl", "rkl", None, None, False),
    ("gjsd0.3", "gjsd0.3", "gjsd", 0.3, None, False),
    ("skl0.1", "skl0.1", "skl", 0.1, None, False),
    ("srkl0.25", "srkl0.25", "srkl", 0.25, None, False),
    ("tvd", "tvd", "tvd", None, None, False),
    ("cos", "cos", None, None, None, True),
    ("layerwise", "layerwise", None, None, "layerwise", False),
    ("last2all-tvd-cos", "last2all-tvd-cos", "tvd", None, "last2all", True),
    ("kl-layerwise", "layerwise-kl", "kl", None, "layerwise", False),
    ("cos-js", "js-cos", "js", None, None, True),
    ("cos-kl-last2last", "last2last-kl-cos", "kl", None, "last2last", True),
    ("  LayerWise-KL-Cos  ", "layerwise-kl-cos", "kl", None, "layerwise", True),
    ("CE", "ce", None, None, None, False),
    (" ce\n", "ce", None, None, None, False),
    ("gjsd0.30", "gjsd0.3", "gjsd", 0.3, None, False),
    ("GJSD.5", "gjsd0.5", "gjsd", 0.5, None, False),
    ("gjsd0", "gjsd0", "gjsd", 0.0, None, False),
    ("gjsd1", "gjsd1", "gjsd", 1.0, None, False),
    ("gjsd1.0", "gjsd1", "gjsd", 1.0, None, False),
])
def test_extended_names_parse(name, canonical, div, param, fmap, cos):
    spec = parse(name)
    assert spec.name == canonical
    assert spec.divergence == div
    assert spec.divergence_param == param
    assert spec.feature_map == fmap
    assert spec.cosine == cos
    assert parse(canonical) == spec
    assert spec.in_grid == (canonical in STUDY_14)


def test_feature_attention():
    spec = parse("layerwise-kl", feature="attention")
    assert spec.name == "layerwise-kl"
    assert spec.feature == "attention"
    assert spec.needs_attentions and not spec.needs_hidden_states
    hidden = parse("layerwise-kl")
    assert hidden.needs_hidden_states and not hidden.needs_attentions
    # without a layer map the feature kind asks for nothing
    kl = parse("kl", feature="attention")
    assert not kl.needs_attentions and not kl.needs_hidden_states


@pytest.mark.parametrize("name, expected", [
    ("kl", True), ("js", True), ("rkl", True), ("gjsd0.3", True), ("tvd", True),
    ("ce", False), ("kl-cos", False), ("layerwise-kl", False), ("cos", False), ("last2all", False),
])
def test_output_only(name, expected):
    assert parse(name).output_only is expected


def test_grid_knows_names_only():
    """grid imports nothing of kdlib but its errors: config and losses build on it, not it on them."""
    code = "import sys, kdlib.grid; print(*sorted(m for m in sys.modules if m.startswith('kdlib.')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["kdlib.errors", "kdlib.grid"]
    import kdlib.losses

    assert (kdlib.losses.DIVERGENCES, kdlib.losses.PARAMETRIC) == (grid.DIVERGENCES, grid.PARAMETRIC)


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name, needles", [
    ("layerwise-jsd", ["'jsd'", "kl", "layerwise", "js", "last2all"]),
    ("foo", ["'foo'", "kl", "layerwise", "cos"]),
    ("", ["empty", "kl", "layerwise"]),
    ("   ", ["empty", "kl", "layerwise"]),
    ("kl-js", ["two divergences", "kl", "js", "rkl"]),
    ("layerwise-last2all-kl", ["two layer maps", "layerwise", "last2all", "last2last"]),
    ("cos-cos", ["cos"]),
    ("ce-kl", ["ce", "stands alone"]),
    ("kl-ce", ["ce", "stands alone"]),
    ("gjsd", ["gjsd", "weight", "gjsd0.3"]),
    ("gjsd1.5", ["gjsd", "[0, 1]", "1.5"]),
    ("skl2", ["skl", "[0, 1]"]),
    ("kl-", ["''", "kl"]),
    ("-kl", ["''", "kl"]),
    ("kl--cos", ["''"]),
])
def test_bad_names_raise_with_valid_parts(name, needles):
    with pytest.raises(KdlibError) as e:
        parse(name)
    message = str(e.value)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("name, canonical, target", [
    ("ce@kl", "ce@kl", "kl"),
    ("CE@Layerwise-KL-COS", "ce@layerwise-kl-cos", "layerwise-kl-cos"),
    (" ce@cos-kl-last2all ", "ce@last2all-kl-cos", "last2all-kl-cos"),
    ("ce@gjsd.30", "ce@gjsd0.3", "gjsd0.3"),
    ("ce@cos", "ce@cos", "cos"),
])
def test_equal_compute_names_parse(name, canonical, target):
    """ce@EXP: the no-KD student (no teacher, no KD component) at the compute of EXP, by EXP's canonical name."""
    spec = parse(name, feature="attention")
    assert (spec.name, spec.compute_of, spec.feature) == (canonical, target, "attention")
    assert (spec.divergence, spec.divergence_param, spec.feature_map, spec.cosine) == (None, None, None, False)
    assert not spec.needs_teacher and not spec.needs_attentions and not spec.output_only and not spec.in_grid
    assert parse(canonical, feature="attention") == spec
    assert parse("ce").compute_of is None and parse("kl").compute_of is None


@pytest.mark.parametrize("name, needles", [
    ("ce@ce", ["'ce'", "not a KD experiment", "ce@kl"]),
    ("ce@", ["no experiment after '@'", "ce@kl"]),
    ("kl@ce", ["only 'ce'", "'kl'", "ce@kl"]),
    ("layerwise-kl@kl", ["only 'ce'", "'layerwise-kl'"]),
    ("@kl", ["only 'ce'", "nothing"]),
    ("ce@kl@js", ["more than one '@'"]),
    ("ce@@kl", ["more than one '@'"]),
    ("ce@foo", ["after '@'", "'foo'", "layerwise"]),
    ("ce@kl-js", ["after '@'", "two divergences"]),
])
def test_bad_equal_compute_names_raise(name, needles):
    with pytest.raises(KdlibError) as e:
        parse(name)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_the_grammar_states_equal_compute():
    with pytest.raises(KdlibError) as e:
        parse("foo")
    assert "ce@EXP" in str(e.value)


@pytest.mark.parametrize("value", [3, None, 1.5, b"kl", ["kl"]])
def test_non_string_names_raise(value):
    with pytest.raises(KdlibError, match="string") as e:
        parse(value)
    assert "layerwise" in str(e.value)  # the grammar is shown


@pytest.mark.parametrize("feature", ["hidden_states", "attn", "", None])
def test_unknown_feature_raises(feature):
    with pytest.raises(KdlibError) as e:
        parse("layerwise-kl", feature=feature)
    assert "hidden" in str(e.value) and "attention" in str(e.value)
    with pytest.raises(KdlibError):
        parse("ce", feature=feature)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), feature=st.sampled_from(["hidden", "attention"]))
def test_fuzz_parse_returns_spec_or_kdlib_error(text, feature):
    try:
        spec = parse(text, feature=feature)
    except KdlibError:
        return
    assert isinstance(spec, ExperimentSpec)
    again = parse(spec.name, feature=feature)
    assert again == spec
    assert again.name == spec.name


_PART = st.sampled_from(["layerwise", "last2last", "last2all", "kl", "js", "rkl", "tvd", "cos", "ce",
                         "gjsd", "skl", "srkl", "gjsd0.3", "skl0.1", "srkl1", "gjsd.25", "x", ""])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_PART, min_size=1, max_size=4), upper=st.booleans())
def test_fuzz_parse_part_combinations(parts, upper):
    text = "-".join(parts)
    text = text.upper() if upper else text
    try:
        spec = parse(text)
    except KdlibError:
        return
    assert parse(spec.name) == spec
    # a valid name is any permutation of at most one part of each kind
    assert len(parts) == len(set(parts)) or parts == ["ce"]
    permuted = parse("-".join(reversed(parts)))
    assert permuted == spec


# --------------------------------------------------------------------------
# CLI


def test_cli_grid_prints_the_14_names(capsys):
    assert main(["grid"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == list(STUDY_14)
    assert out == "\n".join(STUDY_14) + "\n"


def test_cli_grid_json(capsys):
    assert main(["grid", "--json", "--preset", "study"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preset"] == "study"
    rows = data["experiments"]
    assert [r["name"] for r in rows] == list(STUDY_14)
    for row in rows:
        assert isinstance(row["loss"], dict)
        assert row["loss"]["feature_map"] == row["feature_map"]
        assert row["loss"]["divergence"] == row["divergence"]
        assert row["loss"]["feature"] == "attention"  # the study preset's
        assert row["output_only"] == (row["name"] == "kl")
    by_name = {r["name"]: r["loss"] for r in rows}
    assert by_name["kl"]["label_smoothing"] == 0.1
    assert by_name["layerwise-js"]["label_smoothing"] == 0.0
    assert by_name["ce"]["w_ce"] == 1.0
    assert by_name["kl"]["w_ce"] == 0.5


def test_cli_grid_json_feature_and_preset(capsys):
    assert main(["grid", "--json", "--preset", "smoke", "--feature", "hidden"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preset"] == "smoke"
    assert {r["feature"] for r in data["experiments"]} == {"hidden"}


def test_python_m_kdlib_grid_and_help():
    run = subprocess.run([sys.executable, "-m", "kdlib", "grid"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == list(STUDY_14)
    run = subprocess.run([sys.executable, "-m", "kdlib", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "grid" in run.stdout and "usage" in run.stdout.lower()

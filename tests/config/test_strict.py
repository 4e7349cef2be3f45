"""kdlib.config.strict: a config file's unknown key or wrong type is an error naming it."""

from __future__ import annotations

import pytest

from kdlib.config import ExperimentConfig, preset
from kdlib.errors import KdlibError


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["model"].update(n_layr=3), "valid keys"),
    (lambda d: d["model"].update(n_layer="8"), "model.n_layer must be of type int"),
    (lambda d: d["model"].update(n_layer=2.5), "type int"),
    (lambda d: d["model"].update(bias=1), "type bool"),
    (lambda d: d.update(train=[1, 2]), "JSON object"),
    (lambda d: d["loss"].update(cosine=None), "type bool"),
])
def test_strict_loading_names_the_bad_key(mutate, fragment):
    d = preset("smoke").to_dict()
    mutate(d)
    with pytest.raises(KdlibError, match=fragment):
        ExperimentConfig.from_dict(d)


def test_int_is_accepted_where_a_float_is_expected():
    d = preset("smoke").to_dict()
    d["train"]["lr"] = 1
    assert ExperimentConfig.from_dict(d).train.lr == 1.0 and isinstance(ExperimentConfig.from_dict(d).train.lr, float)

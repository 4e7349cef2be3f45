"""kdlib.speed: the plan's time on a named GPU, at its stated MFU and its half-precision or fp32 peak."""

from __future__ import annotations

import pytest
from plan_helpers import plan_json
from plan_helpers import no_gpu, own_folder  # noqa: F401 (fixtures)

import kdlib.speed
from kdlib.cli import main as cli_main
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.perf import device_peak


def test_plan_time_scales_with_the_named_gpu(capsys, no_gpu):
    a100 = plan_json(capsys, "--preset", "colab-a100", "--seeds", "0", "--device", "A100")
    t4 = plan_json(capsys, "--preset", "colab-a100", "--seeds", "0", "--device", "T4")
    auto = plan_json(capsys, "--preset", "colab-a100", "--seeds", "0")
    assert (a100["device"], t4["device"]) == ("A100", "T4")
    assert [r["name"] for r in a100["runs"]] == [r["name"] for r in t4["runs"]]
    # colab-a100 trains in bf16: both at their half-precision peak and stated MFU.
    rate = {g: device_peak(g)[0] * kdlib.speed.STATED_MFU[g] for g in ("A100", "T4")}
    expected = rate["A100"] / rate["T4"]
    assert 3 < expected < 15  # an A100 is several times a T4
    for a, t in zip(a100["runs"], t4["runs"]):
        assert (a["tokens"], a["steps"], a["evals"]) == (t["tokens"], t["steps"], t["evals"])
        assert t["hours"] / a["hours"] == pytest.approx(expected, rel=1e-9)
    assert t4["total_hours"] / a100["total_hours"] == pytest.approx(expected, rel=1e-9)
    assert t4["total_hours"] > a100["total_hours"]
    # auto without a GPU: the preset's own GPU.
    assert auto["device"] == "A100" and auto["total_hours"] == pytest.approx(a100["total_hours"])
    # An fp32 preset at the fp32 peaks.
    s_a100 = plan_json(capsys, "--preset", "study", "--exps", "kl", "--device", "A100")
    s_t4 = plan_json(capsys, "--preset", "study", "--exps", "kl", "--device", "T4")
    fp32 = (kdlib.speed.FP32_PEAK["A100"] * kdlib.speed.STATED_MFU["A100"]) / \
        (kdlib.speed.FP32_PEAK["T4"] * kdlib.speed.STATED_MFU["T4"])
    assert s_t4["total_hours"] / s_a100["total_hours"] == pytest.approx(fp32, rel=1e-9)


def test_plan_refuses_a_gpu_it_has_no_mfu_for(capsys):
    assert cli_main(["plan", "--preset", "colab-a100", "--seeds", "0", "--device", "Abacus9000"]) == 2
    assert "no stated MFU" in capsys.readouterr().err


@pytest.mark.parametrize("name, key", [("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"),
                                       ("Tesla T4", "T4"), ("Abacus9000", None)])
def test_a_gpu_is_known_by_its_name(name, key):
    assert kdlib.speed.gpu_key(name) == key


def test_measured_speeds_must_cover_every_experiment():
    cfg = preset("smoke", "kl")
    timing = kdlib.speed.timing([cfg], "smoke", measured={"ce": 1000.0})
    assert timing.source == "from measured tokens/s (kdlib bench)"
    with pytest.raises(KdlibError, match="no measured speed for 'kl'; measured: ce"):
        timing.rate(cfg)

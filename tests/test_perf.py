"""kdlib.perf: model FLOPs per token, device peaks (datasheet, given, environment, measured), MFU."""

from __future__ import annotations

import pytest

from kdlib.errors import KdlibError
from kdlib.perf import PEAK_ENV, flops_per_token, measured_peak_tflops, mfu, peak_tflops


def test_flops_per_token_of_the_study_shapes():
    student = 6 * 50_951_680 + 12 * 8 * 512 * 128
    teacher = 2 * 124_439_808 + 4 * 12 * 768 * 128
    assert flops_per_token(50_951_680, 8, 512, 128) == student
    assert flops_per_token(50_951_680, 8, 512, 128, 124_439_808, 12, 768) == student + teacher


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-40GB", 312.0), ("Tesla T4", 65.0),
                                        ("NVIDIA L4", 121.0), ("NVIDIA H200", 989.0), ("NVIDIA L40S", 362.0),
                                        ("NVIDIA L40", 181.0), ("NVIDIA H100 NVL", 835.0),
                                        ("Tesla V100-SXM2-16GB", 125.0), ("Some GPU", None), ("x86_64", None),
                                        ("cpu", None)])
def test_peak_by_device_name(name, peak, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(name) == peak


def test_peak_override_and_environment(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "100")
    assert peak_tflops("Tesla T4") == 100.0
    assert peak_tflops("Tesla T4", override=50) == 50.0
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(KdlibError, match="TFLOP/s"):
        peak_tflops("x")
    with pytest.raises(KdlibError, match="> 0"):
        peak_tflops("x", override=0)
    assert mfu(1000.0, 1e9, 10.0) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def test_peak_can_be_measured_on_a_cpu():
    assert 0 < measured_peak_tflops(n=256, repeats=2) < 1e4

"""hardware: ISA flags, native bf16, the measured matmul peak and its cache file."""

from __future__ import annotations

import json

import pytest
import torch

from dptrain import hardware

XEON = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8488C
flags		: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor	: 1
model name	: second processor
flags		: fpu
"""
EPYC = """processor	: 0
model name	: AMD EPYC
flags		: fpu sse2 avx avx2 fma
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and no figures memoised from other tests."""
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(tmp_path))
    hardware.clear_memo()
    yield tmp_path / hardware.CACHE_NAME
    hardware.clear_memo()


def _fake_cpu(monkeypatch, text: str) -> hardware.CpuInfo:
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: hardware.parse_cpuinfo(text))
    info = hardware.cpu_info(refresh=True)
    monkeypatch.setattr(hardware, "_info", None)  # the next real call reads the machine again
    return info


def test_parse_cpuinfo_first_processor_only():
    model, flags = hardware.parse_cpuinfo(XEON)
    assert model == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= flags and "fpu" in flags
    assert hardware.parse_cpuinfo("") == ("", set())


def test_xeon_with_amx_runs_bf16_natively(monkeypatch):
    info = _fake_cpu(monkeypatch, XEON)
    assert info.native_bf16 is True
    assert info.names == ["AVX2", "FMA", "AVX-512F", "AVX512-VNNI", "AVX512-BF16", "AMX-TILE",
                          "AMX-BF16", "AMX-INT8"]
    assert info.to_dict()["flags"][0] == "avx2"


def test_epyc_with_avx2_only_does_not(monkeypatch):
    info = _fake_cpu(monkeypatch, EPYC)
    assert (info.native_bf16, info.names, info.model) == (False, ["AVX2", "FMA"], "AMD EPYC")
    # AVX-512 without its BF16 extension is not native bf16 either
    info = _fake_cpu(monkeypatch, EPYC.replace("fma", "fma avx512f"))
    assert info.native_bf16 is False and "AVX-512F" in info.names


def test_a_onednn_isa_cap_below_bf16_makes_bf16_not_native(monkeypatch):
    for cap, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                        ("avx512_core_amx", True), ("ALL", True), ("", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert _fake_cpu(monkeypatch, XEON).native_bf16 is native, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # the older name
    assert _fake_cpu(monkeypatch, XEON).native_bf16 is False
    assert _fake_cpu(monkeypatch, EPYC).native_bf16 is False  # no bf16 flags: never native


def test_why_bf16_is_not_native_names_the_cause(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert hardware.why_not_native_bf16(_fake_cpu(monkeypatch, XEON).flags) is None
    epyc = _fake_cpu(monkeypatch, EPYC).flags
    assert hardware.why_not_native_bf16(epyc) == "no AMX-BF16 or AVX512-BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert hardware.why_not_native_bf16(_fake_cpu(monkeypatch, XEON).flags) == (
        "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from the bf16 instructions")


def test_this_machine_matches_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    model, flags = hardware._read_cpuinfo()
    info = hardware.cpu_info(refresh=True)
    assert info.native_bf16 == bool(flags & {"amx_bf16", "avx512_bf16"})
    assert hardware.native_bf16() is info.native_bf16
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    if model:
        assert info.model == model


def test_dtype_names():
    assert hardware.dtype_name("32") == "fp32" and hardware.dtype_name(torch.bfloat16) == "bf16"
    assert hardware.dtype_name("16") == "fp16"
    with pytest.raises(ValueError, match="unknown dtype"):
        hardware.dtype_name("int8")


def test_measure_matmul_is_sane():
    r = hardware.measure_matmul("fp32", size=256, seconds=0.1)
    assert r["size"] == 256 and r["dtype"] == "fp32" and r["threads"] == torch.get_num_threads()
    assert 3 <= r["repeats"] <= 25
    assert r["spread"][0] <= r["median"] <= r["spread"][1]
    assert r["flops"] == r["spread"][1]  # a peak is the best product, not a busy median
    assert 1e8 < r["flops"] < 1e14  # between a slow phone and a GPU


def test_slow_dtype_shrinks_the_matrix(monkeypatch):
    # bf16 without native support runs ~300x slower than fp32: the size adapts to the budget
    r = hardware.measure_matmul("bf16", size=4096, seconds=0.2)
    assert r["size"] <= 4096 and r["flops"] > 0
    assert 2 * r["size"] ** 3 / r["flops"] < 1.0  # one product well within ~the budget


def test_peak_is_memoised_and_cached(cache, monkeypatch):
    calls = []

    def fake(dtype, *, size, seconds, device):
        calls.append(hardware.dtype_name(dtype))
        return {"flops": 5e10, "size": size}

    monkeypatch.setattr(hardware, "measure_matmul", fake)
    assert hardware.matmul_peak("fp32", size=512) == 5e10
    assert hardware.matmul_peak(torch.float32, size=512) == 5e10  # memoised
    assert calls == ["fp32"]
    doc = json.loads(cache.read_text())
    key = hardware.cache_key("fp32", 512)
    assert doc["schema"] == hardware.CACHE_SCHEMA and doc["entries"][key]["flops"] == 5e10
    assert str(torch.get_num_threads()) in key and torch.__version__ in key
    hardware.clear_memo()
    assert hardware.matmul_peak("fp32", size=512) == 5e10  # from the file: no new measurement
    assert calls == ["fp32"]
    assert hardware.peak_for_precision("bf16", size=512) == 5e10 and calls[-1] == "bf16"


def test_refresh_keeps_the_best_figure(cache, monkeypatch):
    figures = iter([8e10, 6e10, 9e10])
    monkeypatch.setattr(hardware, "measure_matmul",
                        lambda *a, **k: {"flops": next(figures)})
    assert hardware.matmul_peak("fp32", size=64) == 8e10
    assert hardware.matmul_peak("fp32", size=64, refresh=True) == 8e10  # 6e10: a noisy one
    assert hardware.matmul_peak("fp32", size=64, refresh=True) == 9e10


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema": 99, "entries": {}}',
                                     '{"schema": 2, "entries": []}', "\xff\xfe"])
def test_broken_cache_file_is_ignored(cache, monkeypatch, content):
    cache.write_text(content, errors="surrogateescape")
    monkeypatch.setattr(hardware, "measure_matmul", lambda *a, **k: {"flops": 3e10})
    assert hardware.matmul_peak("fp32", size=64) == 3e10
    assert json.loads(cache.read_text())["schema"] == hardware.CACHE_SCHEMA  # rewritten, whole


def test_bad_cached_value_is_measured_again(cache, monkeypatch):
    key = hardware.cache_key("fp32", 64)
    for bad in (-1, "fast", True, None):
        cache.write_text(json.dumps({"schema": hardware.CACHE_SCHEMA,
                                     "entries": {key: {"flops": bad}}}))
        hardware.clear_memo()
        monkeypatch.setattr(hardware, "measure_matmul", lambda *a, **k: {"flops": 2e10})
        assert hardware.matmul_peak("fp32", size=64) == 2e10


def test_a_schema_1_cache_of_medians_is_measured_again(cache, monkeypatch):
    # schema 1 held median rates, some measured on a busy machine (14.6 GFLOP/s here once)
    key = hardware.cache_key("fp32", 64)
    cache.write_text(json.dumps({"schema": 1, "entries": {key: {"flops": 1.46e10}}}))
    hardware.clear_memo()
    monkeypatch.setattr(hardware, "measure_matmul", lambda *a, **k: {"flops": 1.2e11})
    assert hardware.matmul_peak("fp32", size=64) == 1.2e11


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DPTRAIN_CACHE_DIR", str(blocker / "sub"))  # a file where a dir should be
    hardware.clear_memo()
    monkeypatch.setattr(hardware, "measure_matmul", lambda *a, **k: {"flops": 1e10})
    assert hardware.matmul_peak("fp32", size=64) == 1e10
    hardware.clear_memo()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DPTRAIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.cache_dir() == tmp_path / "dptrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hardware.cache_dir().parts[-2:] == (".cache", "dptrain")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak():
    r = hardware.measure_matmul("bf16", size=2048, seconds=0.2, device="cuda")
    assert r["flops"] > 1e12

"""The precision choice per machine (runtime.precision: auto) and the runtime section."""
import dataclasses

import pytest
import torch

from ferpipe import runtime

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given capability and bf16 instructions."""
    def set_cpu(capability, avx512_bf16=False, amx=False, onednn_isa=None):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        if onednn_isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    return set_cpu


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu):
    cpu("AVX2")
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    cpu("DEFAULT")  # e.g. an ARM CPU
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    cpu("AVX512")   # AVX-512 without AVX512_BF16 or AMX: bf16 would be emulated
    assert runtime.resolve_precision("auto", CPU) == "fp32"


def test_auto_is_bf16_where_the_cpu_has_it(cpu):
    cpu("AVX512", avx512_bf16=True)
    assert runtime.resolve_precision("auto", CPU) == "bf16"
    cpu("AVX512", amx=True)
    assert runtime.resolve_precision("auto", CPU) == "bf16"


def test_isa_limits_make_an_avx512_machine_an_avx2_one(cpu):
    cpu("AVX512", avx512_bf16=True, amx=True, onednn_isa="AVX2")
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    cpu("AVX2", avx512_bf16=True, amx=True)  # ATEN_CPU_CAPABILITY=avx2
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    cpu("AVX512", avx512_bf16=True, onednn_isa="avx512_core_bf16")
    assert runtime.resolve_precision("auto", CPU) == "bf16"


def test_forced_precisions_are_kept_whatever_the_machine(cpu):
    cpu("AVX2")
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    cpu("AVX512", amx=True)
    assert runtime.resolve_precision("fp32", CPU) == "fp32"


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto", gpu) == "fp32"


def test_setup_records_what_it_chose_and_on_what(cpu):
    cpu("AVX2")
    rt = runtime.setup({"device": "cpu", "threads": 1, "precision": "auto", "batch_size": 64,
                        "log_seconds": 60})
    assert rt.precision == "fp32" and rt.device == CPU and torch.get_num_threads() == 1
    rec = rt.record()
    assert rec == {"precision": "fp32", "precision_requested": "auto", "threads": 1,
                   "device": "cpu", "cpu_capability": "AVX2", "native_bf16": False}


def test_a_rank_gets_its_own_copy_and_the_record_names_the_processes(cpu):
    cpu("AVX2")
    rt = runtime.setup({"device": "cpu", "threads": 1, "precision": "auto", "batch_size": 64,
                        "log_seconds": 60, "processes": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        rt.precision = "bf16"  # made once: nothing downstream re-decides it
    rank = dataclasses.replace(rt, world_size=2, backend="gloo", rank=1)
    assert rank.record() == {**rt.record(), "processes": 2, "backend": "gloo"}
    assert "processes" not in rt.record()  # one process trained: nothing to say


def test_another_precision_is_resolved_by_the_runtime(cpu):
    cpu("AVX2")
    rt = runtime.setup({"device": "cpu", "threads": 1, "precision": "fp32", "batch_size": 64,
                        "log_seconds": 60, "processes": 1})
    assert rt.with_precision("auto").precision == "fp32"  # emulated bf16 is not chosen
    forced = rt.with_precision("bf16")
    assert (forced.precision, forced.precision_requested, forced.device) == ("bf16", "bf16", CPU)


_HEAP_PROBE = """
import ctypes, sys
import torch
from ferpipe import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "make":
    runtime.make(device="cpu", threads=1, precision="fp32")
mapped = libc.mallinfo2().hblkhd
x = torch.ones(64 << 20, dtype=torch.uint8)  # an activation-sized block, 64 MiB
mapped_for_it = libc.mallinfo2().hblkhd - mapped
del x
print(mapped_for_it, libc.mallinfo2().fordblks)
"""


def test_large_blocks_come_from_the_heap_and_stay_for_the_next_batch():
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")

    def probe(mode):  # a fresh process: malloc's settings are per process
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    block = 64 << 20
    mapped, _ = probe("default")
    assert mapped >= block  # glibc's own way: mapped fresh, returned when freed
    mapped, free_in_heap = probe("make")
    assert mapped == 0 and free_in_heap >= block  # from the heap, and kept once freed

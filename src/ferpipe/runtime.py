"""Run-time settings: the `runtime:` section of params.yaml.

No stage declares this section in dvc.yaml, so changing it re-runs nothing and leaves the
resume checkpoints valid: it holds only what changes speed or logging on the machine at
hand (device, threads, precision, inference batch size, progress interval, the number of
training processes). The precision resolved here, and the hardware it was resolved on, are
written into the metrics.
"""
import dataclasses
import os

import torch

from ferpipe import params
from ferpipe.errors import FerPipeError
from ferpipe.params import choice, integer, number

SCHEMA = {
    "device": choice("auto", "cpu", "cuda"),
    "threads": integer(lo=0),
    "precision": choice("auto", "bf16", "fp32"),
    "batch_size": integer(lo=1),
    "log_seconds": number(lo=1.0),
    # training processes on this machine (distributed.py): > 1 runs the training stages
    # data-parallel under torchrun
    "processes": integer(lo=1),
}


def load(path=params.PARAMS_FILE):
    return params.load({"runtime": SCHEMA}, path)["runtime"]


# ---------------------------------------------------------------- device and precision

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FerPipeError("params.yaml: runtime.device: 'cuda' asked for, but no CUDA GPU is "
                           "available; use 'auto' or 'cpu'")
    return torch.device(name)


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which its bf16 kernels are still native.
_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
              "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")


def native_bf16(device):
    """Does this device run bf16 natively? Without it (AVX2 CPUs, AVX-512 without
    AVX512_BF16/AMX, ARM) autocast emulates bf16 and is many times slower than fp32.
    On the CPU it honours the ISA limits ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, so a
    machine limited to AVX2 kernels is treated as the AVX2 machine it then is."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in _BF16_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(requested, device):
    """auto -> bf16 where the hardware runs it natively, else fp32; bf16 and fp32 as asked."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def hardware(device):
    """The hardware a precision was chosen on, as the metrics record it."""
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device)}
    return {"device": device.type, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(device)}


def set_threads(threads):
    torch.set_num_threads(threads or os.cpu_count() or 1)


# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Have glibc's malloc serve large blocks from its heap and keep what is freed there for
    the next batch. By default every block over its mmap threshold (128 KiB, rising to at
    most 32 MiB) is mapped fresh and unmapped when freed, so each activation of a batch is
    page-faulted in anew: on a 2-core AVX2 EPYC in fp32 the first convolution of a training
    step (128 faces, 32 channels at 40x40, a 26 MB output) took 27-31 ms, and 3.4-4.4 ms with
    the heap kept; the default CNN trained 3-27% faster (three alternating benchmark pairs)
    and scored tencrop views 2.1 times as fast (docs/speed.md). The arithmetic, and so every
    result, is the same. The cost: the
    process keeps its peak memory until it exits. Returns whether it applied (glibc only)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


# ---------------------------------------------------------------- the settings of one process

@dataclasses.dataclass(frozen=True)
class Runtime:
    """How this process computes: made once (`setup`), then read by everything that runs a
    network. Under torchrun distributed.setup gives each rank its own copy (its GPU, the
    world size and the backend)."""
    device: torch.device
    precision: str                 # resolved on this machine: bf16 or fp32
    precision_requested: str       # as runtime.precision asks: auto, bf16 or fp32
    threads: int                   # torch's intra-op threads, as set
    batch_size: int = 512          # faces per forward pass when scoring
    log_seconds: float = 60.0      # seconds between progress lines
    processes: int = 1             # training processes asked for (runtime.processes)
    hardware: dict = dataclasses.field(default_factory=dict)  # what the precision was chosen on
    world_size: int = 1            # processes training together (torchrun)
    backend: str | None = None     # their process group's backend: gloo or nccl
    rank: int = 0

    def with_precision(self, requested):
        """The same runtime computing in `requested` (auto, bf16, fp32) resolved here."""
        return dataclasses.replace(self, precision=resolve_precision(requested, self.device),
                                   precision_requested=requested)

    def record(self):
        """What the metrics say about the machine and the precision a result came from (and,
        when it trained data-parallel, on how many processes)."""
        out = {"precision": self.precision, "precision_requested": self.precision_requested,
               "threads": self.threads, **self.hardware}
        if self.world_size > 1:
            out.update(processes=self.world_size, backend=self.backend)
        return out


def make(device="auto", threads=0, precision="auto", batch_size=512, log_seconds=60.0,
         processes=1):
    """The Runtime for these settings: threads set, freed memory kept, device picked,
    precision resolved."""
    set_threads(threads)
    keep_freed_memory()
    dev = pick_device(device)
    return Runtime(device=dev, precision=resolve_precision(precision, dev),
                   precision_requested=precision, threads=torch.get_num_threads(),
                   batch_size=batch_size, log_seconds=log_seconds, processes=processes,
                   hardware=hardware(dev))


def reference(batch_size=512):
    """fp32 on the CPU, whatever this machine would choose: what a parity check compares
    an exported graph against, so its verdict is the same everywhere."""
    cpu = torch.device("cpu")
    return Runtime(device=cpu, precision="fp32", precision_requested="fp32",
                   threads=torch.get_num_threads(), batch_size=batch_size, hardware=hardware(cpu))


def setup(settings):
    """The Runtime of a stage, from the validated `runtime:` settings (`load`); on a GPU
    also the settings that make CUDA runs repeatable."""
    if pick_device(settings["device"]).type == "cuda":
        deterministic_cuda()  # before anything touches cuBLAS
    return make(**settings)


def deterministic_cuda():
    """What repeatable CUDA runs need: deterministic cuDNN convolutions chosen without
    benchmarking, and a fixed cuBLAS workspace (read when cuBLAS starts, so set it first)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

"""The device held like a T4 (`t4_settings`: memory cap, attention kernels, TF32 and cudnn off), the T4-dtype
mode on a CPU, and what a phase is measured by (`Meter`: peak memory; `StepClock`: seconds per step)."""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from pathlib import Path

import torch

from ..core.precision import T4_DTYPES_ENV
from ..models import release_cuda_cache
from ..plan.meta import GIB
from ..plan.model import (
    T4_USABLE_GIB,
)
from ..train.hooks import Hook
from ..train.stops import TrainingStopped

# ---------------------------------------------------------------- the device as a T4

def t4_settings(device: torch.device) -> dict:
    """Make this CUDA device hold memory as a T4 would: the allocator capped at T4_USABLE_GIB less the CUDA context
    (measured now, before any tensor), memory-efficient or math attention only, TF32 and cudnn.benchmark off."""
    torch.cuda.init()
    torch.empty(1, device=device)  # the context exists, the allocator holds one small block
    release_cuda_cache()
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    cap = T4_USABLE_GIB * GIB - context
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_math_sdp(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    return {"gpu": torch.cuda.get_device_name(device), "total_gib": total / GIB, "context_gib": context / GIB,
            "cap_gib": cap / GIB, "attention": "memory-efficient or math SDPA (no flash, no cuDNN)",
            "tf32": False, "cudnn_benchmark": False, "cuda": torch.version.cuda}


def _vm_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


class Meter:
    """Peak memory and time of one phase at a time. CUDA: torch's peak allocated and reserved since the phase began
    and the memory outside the allocator (the CUDA context, cuDNN/cuBLAS handles, loaded kernels) at its end;
    measured = reserved + context, what a T4 would need. CPU: the process's peak resident set (VmHWM, reset when a
    phase begins) as measured, the resident set when it began as "context" and the difference as "allocated"."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.t0, self.rss_before, self.held_before = 0.0, 0.0, 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        release_cuda_cache()
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.held_before = torch.cuda.memory_allocated(self.device) / GIB  # what earlier phases left
        else:
            with contextlib.suppress(OSError):  # Linux ≥ 4.0; elsewhere the peak since the process began
                Path("/proc/self/clear_refs").write_text("5")
            self.rss_before = _vm_kib("VmRSS") * 1024 / GIB
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        self.sync()
        seconds = time.perf_counter() - self.t0
        if not self.cuda:
            peak = _vm_kib("VmHWM") * 1024 / GIB
            return {"allocated_gib": max(0.0, peak - self.rss_before), "reserved_gib": None, "context_gib": self.rss_before,
                    "measured_gib": peak, "seconds": seconds}
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.max_memory_allocated(self.device) / GIB
        reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        context = (total - free - torch.cuda.memory_reserved(self.device)) / GIB
        return {"allocated_gib": allocated, "reserved_gib": reserved, "context_gib": context,
                "held_before_gib": self.held_before, "measured_gib": reserved + context, "seconds": seconds}


class StepClock(Hook):
    """Wall time of each optimizer step (the device synchronised), and of the Trainer's setup before the first."""

    def __init__(self, meter: Meter):
        self.meter, self.created, self.started, self.steps = meter, time.perf_counter(), 0.0, []

    def on_start(self, trainer) -> None:
        self.meter.sync()
        self.started = time.perf_counter()

    def on_step(self, trainer) -> None:
        self.meter.sync()
        self.steps.append(time.perf_counter())

    @property
    def setup_seconds(self) -> float:
        return self.started - self.created

    def seconds_per_step(self) -> float | None:
        """The median step after the first (which also warms kernels up); the first when it is the only one."""
        times = [self.started, *self.steps]
        intervals = [b - a for a, b in zip(times, times[1:])]
        return statistics.median(intervals[1:] or intervals) if intervals else None



# ---------------------------------------------------------------- one preset, phase by phase

def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, TrainingStopped)
                                                         and "out of memory" in str(error))



# ---------------------------------------------------------------- the whole proof

@contextlib.contextmanager
def t4_dtype_mode(on: bool):
    """LAB_T4_DTYPES=1 and one torch thread for the duration (the CPU smoke), restored after: the smoke's matrices
    are narrow, and a second thread on a shared 2-core machine spins more than it multiplies (4× the CPU time)."""
    before, threads = os.environ.get(T4_DTYPES_ENV), torch.get_num_threads()
    if on:
        os.environ[T4_DTYPES_ENV] = "1"
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop(T4_DTYPES_ENV, None)
        else:
            os.environ[T4_DTYPES_ENV] = before

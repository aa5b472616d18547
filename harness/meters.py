"""Run meters: wall time, server GPU memory (pynvml, sampled, and torch's own peak), user-side memory.

Over HTTP (`harness run --service-url`) the run's process is the user's alone: its sampled peak resident memory
is the user side, measured (the runner records it as `client_rss_peak_mb`, beside the server's own peak). In
process, the server and the user share a process, so:
- server memory is the GPU's (pynvml's device-used peak; torch's max_memory_allocated beside it);
- user-side memory is the peak of Python/NumPy heap allocations made during the run (tracemalloc), which is
  where the user-side state of black-box methods lives (CMA-ES, projections, probes' features); torch tensors a
  method keeps on the user side add their own bytes through `Method.user_tensor_bytes`.
On a CPU-only machine the GPU fields are None and `device` says "cpu", so reports print "n/a (CPU)", not zeros.
For CPU runs `cpu_rss_peak_mb` (sampled peak resident memory of the whole process: the loaded backbone, the
method's state, activations) is the closest figure; the report labels it as such.
"""

from __future__ import annotations

import platform
import threading
import time
import tracemalloc
from contextlib import contextmanager

import psutil
import torch


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there, bf16 matrix products run
    faster than float32 (BBT's calls 2.3x on a 2-core Xeon with AMX, sst2); elsewhere they are emulated, about 3x
    slower than native. torch exposes the check only under torch.cpu's private names, hence the guard."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def device_description() -> str:
    """The device a figure came from; a CPU says whether it has native bf16, which changes speeds about 3x."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.machine()} x{psutil.cpu_count()}" + (" bf16" if cpu_has_fast_bf16() else "")


def place(device: str, threads: int | None) -> str:
    """The device, and on a CPU the threads torch used (where known): the thread count changes the order of
    bf16/float32 sums, which a search can amplify, and a run given one thread beside another takes longer."""
    if threads and device.startswith("cpu:"):
        return f"{device} ({threads} thread{'s' * (threads > 1)})"
    return device


def current_place() -> str:
    return place(device_description(), torch.get_num_threads())


class _NvmlSampler:
    """Samples the GPU's used memory every few milliseconds and keeps the peak."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = None
        self._stop = threading.Event()
        self._thread = None
        self._handle = None

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # no NVIDIA driver: the GPU column says so
            return
        self.peak = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._read())

    def stop(self) -> int | None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._read())
        return self.peak


class _RssSampler(threading.Thread):
    """Samples this process's resident memory every few milliseconds and keeps the peak."""

    def __init__(self, interval_s: float = 0.05):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def finish(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@contextmanager
def measure():
    """Yields a dict that holds the measurements once the block ends."""
    figures: dict = {"device": device_description()}
    gpu = torch.cuda.is_available()
    sampler = _NvmlSampler()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        sampler.start()
    rss = _RssSampler()
    rss.start()
    tracing = not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        yield figures
    finally:
        if gpu:
            torch.cuda.synchronize()
        figures["wall_s"] = time.perf_counter() - start
        figures["user_heap_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        if tracing:
            tracemalloc.stop()
        nvml_peak = sampler.stop() if gpu else None
        figures["server_gpu_peak_mb"] = nvml_peak / 2**20 if nvml_peak is not None else None
        figures["torch_gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
        figures["process_rss_mb"] = psutil.Process().memory_info().rss / 2**20
        figures["cpu_rss_peak_mb"] = rss.finish() / 2**20

"""Benchmark harness shared by every system: machine header, timing, isolated peak memory.

- :func:`machine_info`: what the numbers were measured on (CPU model, cores, torch threads,
  torch version, device incl. the CUDA GPU's name, thread settings, load average). Measuring
  processes inherit the environment, so e.g. ``OMP_WAIT_POLICY=PASSIVE`` applies to them.
- :func:`time_ms`: median wall time of a call after warm-up, synchronising CUDA.
- :func:`run_isolated`: calls ``"module:function"`` in a fresh Python process and adds its
  peak memory to the result. On CPU, ``peak_mem_bytes`` is the process's peak resident set
  size (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` when the call returns) minus its
  resident set size right after the imports (``VmRSS`` of ``/proc/self/status``, read after
  ``torch``, the function's module and any ``imports`` are loaded and before the function
  runs, so before it builds a model or inputs). On CUDA it is
  ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` at the same
  point (the peak counter is reset there). A fresh process per call keeps one measurement's
  allocations, caches and allocator state out of the next one.
- :func:`available_memory_bytes`: what a method may use (``MemAvailable`` or free GPU memory),
  to skip a method that would not fit instead of running it.

Run as ``python -m neurolattice.bench.harness SPEC_JSON RESULT_JSON``: the worker side of
:func:`run_isolated`.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from neurolattice.io import atomic_write_json
from neurolattice.train.distributed import exit_process


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """The machine header of a benchmark: CPU, cores, torch threads and version, the device,
    the thread-related environment variables that are set (:data:`THREAD_ENV`), and the load
    average when it starts (other work on the machine skews the timings)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": f"{dev} ({name})",
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "load_average_1_5_15_min": load,
    }


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on a CUDA device; nothing on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], Any], *, device: str | torch.device = "cpu", warmup: int = 1,
            repeats: int = 5, budget_s: float | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    ``warmup`` untimed calls, then up to ``repeats`` timed ones; with ``budget_s``, timing
    stops early once the timed calls have taken that long (at least one timed call is made),
    so a slow method costs a few calls and a fast one gets all ``repeats``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (budget_s is None or not times or spent < budget_s):
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return 1000.0 * statistics.median(times)



PEAK_REPEATS = 10


def matmul_peak(device: str, dtype: torch.dtype, size: int, repeats: int = PEAK_REPEATS) -> float:
    """FLOP/s of the best of ``repeats`` timed ``size x size`` matmuls (``2 size^3`` FLOPs each)
    in ``dtype``, after one warm-up, with this process's torch threads: the machine's attainable
    peak, measured rather than taken from a datasheet (it drifts on a shared machine)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best_ms = min(time_ms(lambda: a @ b, device=device, warmup=0, repeats=1) for _ in range(repeats))
    return 2 * size**3 / (best_ms / 1000)

def available_memory_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new computation may use: free GPU memory on CUDA, else ``MemAvailable`` from
    ``/proc/meminfo`` (or psutil's ``available`` where there is no ``/proc``); None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def _current_rss_bytes() -> int:
    """Resident set size now (``VmRSS``), or the peak so far where ``/proc`` is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_isolated(target: str, kwargs: dict[str, Any], *, device: str = "cpu",
                 imports: Sequence[str] = (), threads: int | None = None, processes: int = 1,
                 timeout_s: float | None = None) -> dict[str, Any]:
    """Call ``target`` (``"package.module:function"``) with JSON-able ``kwargs`` in a fresh
    Python process and return its result (a JSON-able dict) with ``peak_mem_bytes`` added.

    ``imports`` are modules loaded before the memory baseline, so their import cost is not
    counted (e.g. an optional library the function imports lazily). ``device`` picks how
    memory is measured (see the module docstring); ``threads`` sets
    ``torch.set_num_threads`` (and ``OMP_NUM_THREADS``) there (torch's default if None).
    ``processes > 1`` runs ``target`` on that many ranks of a real
    ``python -m torch.distributed.run --standalone`` launch (the target joins the group, e.g.
    with :func:`neurolattice.train.distributed.init_from_env`); rank 0's result is returned.
    Raises ``RuntimeError`` with the launch's last error line if it fails (killed for memory
    included), or if it has not finished after ``timeout_s`` (its whole process group killed).
    """
    spec = {"target": target, "kwargs": kwargs, "device": device, "imports": list(imports),
            "threads": threads}
    with tempfile.TemporaryDirectory(prefix="neurolattice-bench-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        cmd = [sys.executable, *(torchrun if processes > 1 else []), "-m", "neurolattice.bench.harness",
               str(spec_path), str(result_path)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own group: a hung launch dies whole
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{target} gave no result after {timeout_s} s") from None
        if proc.returncode != 0 or not result_path.exists():
            lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else "no error message"
            why = next((line for line in reversed(lines) if "Error" in line), last)
            raise RuntimeError(f"{target} failed (exit code {proc.returncode}): {why}")
        return json.loads(result_path.read_text())


def _worker(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    module_name, func_name = spec["target"].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    for name in spec["imports"]:
        importlib.import_module(name)
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    cuda = torch.device(spec["device"]).type == "cuda"
    if cuda:
        dev = torch.device(spec["device"])
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev)
    else:
        baseline = _current_rss_bytes()
    result = func(**spec["kwargs"])
    peak = torch.cuda.max_memory_allocated(dev) if cuda else _peak_rss_bytes()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        atomic_write_json(result_path, {**result, "peak_mem_bytes": max(0, peak - baseline)})


if __name__ == "__main__":
    _worker(*sys.argv[1:])
    exit_process(0)

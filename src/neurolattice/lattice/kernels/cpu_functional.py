"""The ``cpp`` backend: :class:`~neurolattice.lattice.experts.FunctionalAggregate` as one fused
C++ kernel per direction (``cpu_functional.cpp``), for float32 and float64 CPU tensors.

Built on first use with the system C++ compiler (``$CXX``, else ``c++``, ``g++``, ``clang++``)
as ``-O3 -march=native``, i.e. for the machine it runs on, into a shared library loaded with
:mod:`ctypes`; no torch headers, so a build takes seconds, not the half minute a
``torch.utils.cpp_extension`` build of ``torch/extension.h`` takes. The library is cached
under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)``/neurolattice/``,
named by a hash of the source, the flags, the compiler's version and this CPU's model and
feature flags: ``-march=native`` code is only reused on the CPU it was built for, even where
machines share a home directory. The file is written to a temporary name and renamed, so
processes building at once never load a partial library.

:func:`load` raises :class:`KernelUnavailable` (one line: no compiler, a failed build) and the
backend registry falls back to the ``torch`` backend with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_functional.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", "-pthread")
MAX_RUN = 16  # kMaxRun of the source: most cells per run
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why in one line."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable("no C++ compiler found ($CXX, c++, g++, clang++)")


def _cpu_identity() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "neurolattice"


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The compiled kernel library, built once per (source, flags, compiler, CPU)."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_identity()]).encode()).hexdigest()
    path = cache_dir() / f"cpu_functional_{key[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no output"])[0]
                raise KernelUnavailable(f"{Path(compiler).name} failed to build {SOURCE.name}: {first}")
            os.replace(built, path)
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelUnavailable(f"cannot load {path}: {err}") from err


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _int32s(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int32 * len(values))(*values)


class FusedFunctionalAggregate(torch.autograd.Function):
    """The same function, inputs and output as :class:`~neurolattice.lattice.experts.FunctionalAggregate`
    (``run_cells`` in place of its ``chunk_elems``: cells of one run, at most :data:`MAX_RUN`),
    each direction one call of the C++ kernel: runs of up to ``run_cells`` cells along z walk
    the offsets with their running max, denominator and weighted sum in L1-sized buffers."""

    @staticmethod
    def forward(ctx, p_pad, q, v, score_bias, offsets, pad, run_cells):
        lib, suffix = load(), SUFFIX[q.dtype]
        p_pad, q, v = p_pad.contiguous(), q.contiguous(), v.contiguous()
        score_bias = None if score_bias is None else score_bias.contiguous()
        hagg = torch.empty_like(q)
        run_max, den = q.new_empty(q.shape[:-1]), q.new_empty(q.shape[:-1])
        shape = _int32s([*q.shape[:4], *pad, q.shape[-1], run_cells])
        flat_offsets = _int32s(c for o in offsets for c in o)
        getattr(lib, f"nl_functional_forward_{suffix}")(
            _ptr(p_pad), _ptr(q), _ptr(v), _ptr(score_bias), flat_offsets, len(offsets), shape,
            _ptr(hagg), _ptr(run_max), _ptr(den), torch.get_num_threads())
        ctx.save_for_backward(p_pad, q, v, score_bias, run_max, den, hagg)
        ctx.offsets, ctx.pad, ctx.run_cells = offsets, pad, run_cells
        return hagg

    @staticmethod
    def backward(ctx, grad_hagg):
        """The derivation of :meth:`FunctionalAggregate.backward`, per run of cells."""
        p_pad, q, v, score_bias, run_max, den, hagg = ctx.saved_tensors
        lib, suffix = load(), SUFFIX[q.dtype]
        grad_hagg = grad_hagg.contiguous()
        d_p_pad, d_q, d_v = torch.zeros_like(p_pad), torch.zeros_like(q), torch.zeros_like(v)
        shape = _int32s([*q.shape[:4], *ctx.pad, q.shape[-1], ctx.run_cells])
        flat_offsets = _int32s(c for o in ctx.offsets for c in o)
        getattr(lib, f"nl_functional_backward_{suffix}")(
            _ptr(p_pad), _ptr(q), _ptr(v), _ptr(score_bias), flat_offsets, len(ctx.offsets), shape,
            _ptr(grad_hagg), _ptr(hagg), _ptr(run_max), _ptr(den), _ptr(d_p_pad), _ptr(d_q), _ptr(d_v),
            torch.get_num_threads())
        return d_p_pad, d_q, d_v, None, None, None, None

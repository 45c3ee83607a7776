"""The ``cpp`` backend: :class:`~neurolattice.lattice.experts.FunctionalAggregate` and
:func:`~neurolattice.lattice.geometry.tier_sums` as fused C++ kernels, one call per direction
(``cpu_functional.cpp``), for float32 and float64 CPU tensors.

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


def lanes(dtype: torch.dtype) -> int:
    """Cells per vector register of the built kernel for ``dtype`` (the most cells of one run)."""
    return getattr(load(), f"nl_functional_lanes_{SUFFIX[dtype]}")()


def _z_major(t: torch.Tensor) -> torch.Tensor:
    """``[B, X, Y, Z, H] -> [B, X, Y, H, Z]``, contiguous: the kernel loads W cells of one e at once."""
    return t.transpose(-1, -2).contiguous()


class FusedFunctionalAggregate(torch.autograd.Function):
    """The same function, inputs and output as :class:`~neurolattice.lattice.experts.FunctionalAggregate`
    (``run_cells`` in place of its ``chunk_elems``: cells of one run, at most :func:`lanes`),
    each direction one call of the C++ kernel. ``P`` and ``Q`` go to it z-major
    (``[B, X, Y, H, Z]``: free where they are transposed views of z-major storage, as the
    ``cpp`` backend's :meth:`~neurolattice.lattice.experts.FunctionalExpert.project` makes them,
    else one transposing copy each), so one vector register holds one hidden unit of ``W``
    consecutive cells and the online softmax runs on ``W`` cells at once."""

    @staticmethod
    def forward(ctx, p_pad, q, v, score_bias, offsets, pad, run_cells):
        lib, suffix = load(), SUFFIX[q.dtype]
        p_t, q_t, v = _z_major(p_pad), _z_major(q), v.contiguous()
        score_bias = None if score_bias is None else score_bias.contiguous()
        hagg = torch.empty_like(q, memory_format=torch.contiguous_format)
        run_max, den = q.new_empty(q.shape[:-1]), q.new_empty(q.shape[:-1])
        shape = _int32s([*q.shape[:4], *pad, q.shape[-1], run_cells])
        flat_offsets = _int32s(c for o in offsets for c in o)
        getattr(lib, f"nl_functional_forward_{suffix}")(
            _ptr(p_t), _ptr(q_t), _ptr(v), _ptr(score_bias), flat_offsets, len(offsets), shape,
            _ptr(hagg), _ptr(run_max), _ptr(den), torch.get_num_threads())
        ctx.save_for_backward(p_t, q_t, v, score_bias, run_max, den, hagg)
        ctx.offsets, ctx.pad, ctx.run_cells = offsets, pad, run_cells
        return hagg

    @staticmethod
    def backward(ctx, grad_hagg):
        """The derivation of :meth:`FunctionalAggregate.backward`, per run of cells; ``dL/dP`` is
        accumulated z-major and returned as a transposed view."""
        p_t, q_t, v, score_bias, run_max, den, hagg = ctx.saved_tensors
        lib, suffix = load(), SUFFIX[q_t.dtype]
        grad_hagg = grad_hagg.contiguous()
        d_p_t, d_q, d_v = torch.zeros_like(p_t), torch.zeros_like(hagg), torch.zeros_like(v)
        shape = _int32s([*hagg.shape[:4], *ctx.pad, hagg.shape[-1], ctx.run_cells])
        flat_offsets = _int32s(c for o in ctx.offsets for c in o)
        getattr(lib, f"nl_functional_backward_{suffix}")(
            _ptr(p_t), _ptr(q_t), _ptr(v), _ptr(score_bias), flat_offsets, len(ctx.offsets), shape,
            _ptr(grad_hagg), _ptr(hagg), _ptr(run_max), _ptr(den), _ptr(d_p_t), _ptr(d_q), _ptr(d_v),
            torch.get_num_threads())
        return d_p_t.transpose(-1, -2), d_q, d_v, None, None, None, None


def _tier_arguments(offsets: list[tuple], dims, pad, channels: int) -> tuple:
    """The stencil kernels' description of the tiers and the block: counts, flat offsets, shape."""
    flat = [c for tier in offsets for o in tier for c in o]
    return (_int32s(len(t) for t in offsets), _int32s(flat or [0]), len(offsets),
            _int32s([*dims, *pad, channels]))


class FusedTierSums(torch.autograd.Function):
    """:func:`~neurolattice.lattice.geometry.tier_sums` (``xp`` padded by ``pad`` -> the local,
    functional and distant sums over ``offsets``, ``[B, *dims, C]`` each) as one C++ call: each
    ``(z-row, offset)`` is one contiguous add of ``Z * C`` elements. The backward is the adjoint,
    ``dL/dxp[j] = sum_t sum_{o in tier t} G_t[j - pad - o]`` over the sources inside the block,
    one C++ call that writes each padded z-row once per ``dz`` (no padded copy of the ``G_t``)."""

    @staticmethod
    def forward(ctx, xp, offsets, pad, dims):
        xp = xp.contiguous()
        outs = [xp.new_zeros(xp.shape[0], *dims, xp.shape[-1]) for _ in offsets]
        pointers = ctypes.c_void_p * len(offsets)
        getattr(load(), f"nl_stencil_sums_{SUFFIX[xp.dtype]}")(
            pointers(*(xp.data_ptr() for _ in offsets)), pointers(*(t.data_ptr() for t in outs)),
            *_tier_arguments(offsets, (xp.shape[0], *dims), pad, xp.shape[-1]), torch.get_num_threads())
        ctx.offsets, ctx.pad, ctx.padded_shape = offsets, pad, xp.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.contiguous() for g in grads]
        d_xp = grads[0].new_zeros(ctx.padded_shape)
        getattr(load(), f"nl_stencil_adjoint_{SUFFIX[d_xp.dtype]}")(
            (ctypes.c_void_p * len(grads))(*(g.data_ptr() for g in grads)), _ptr(d_xp),
            *_tier_arguments(ctx.offsets, grads[0].shape[:4], ctx.pad, d_xp.shape[-1]), torch.get_num_threads())
        return d_xp, None, None, None

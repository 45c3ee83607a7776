"""Triton shrink and expand kernels for BEM adapters with per-token codes.

``shrink``: ``t = (x V) * c`` ([N, in] x [in, r] scaled by the [N, r] code tile, fp32 result);
``expand_``: ``y += t U^T`` in place. The layout follows static-LoRA serving kernels (S-LoRA,
punica's shrink/expand), with the per-token code applied to the rank-r tile between the two.
The rank is padded to a power of two >= 16 inside the kernels (``tl.dot``'s minimum).
Float32 inputs use IEEE products (no TF32) so that results match the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 32
BLOCK_K = 32
BLOCK_N = 64


@triton.jit
def _shrink_kernel(x_ptr, v_ptr, c_ptr, t_ptr, n, k_size, r,
                   sxn, sxk, svk, svr, scn, scr, stn, str_,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * sxn + ks[None, :] * sxk,
                    mask=(rows[:, None] < n) & (ks[None, :] < k_size), other=0.0)
        v = tl.load(v_ptr + ks[:, None] * svk + ranks[None, :] * svr,
                    mask=(ks[:, None] < k_size) & (ranks[None, :] < r), other=0.0)
        acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    keep = (rows[:, None] < n) & (ranks[None, :] < r)
    c = tl.load(c_ptr + rows[:, None] * scn + ranks[None, :] * scr, mask=keep, other=0.0)
    tl.store(t_ptr + rows[:, None] * stn + ranks[None, :] * str_, acc * c.to(tl.float32), mask=keep)


@triton.jit
def _expand_kernel(t_ptr, u_ptr, y_ptr, n, out, r,
                   stn, str_, suo, sur, syn, syo,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    t = tl.load(t_ptr + rows[:, None] * stn + ranks[None, :] * str_,
                mask=(rows[:, None] < n) & (ranks[None, :] < r), other=0.0)
    u_t = tl.load(u_ptr + ranks[:, None] * sur + cols[None, :] * suo,
                  mask=(ranks[:, None] < r) & (cols[None, :] < out), other=0.0)  # (R, N): U^T
    delta = tl.dot(t, u_t.to(tl.float32), input_precision="ieee")
    keep = (rows[:, None] < n) & (cols[None, :] < out)
    y_ptrs = y_ptr + rows[:, None] * syn + cols[None, :] * syo
    y = tl.load(y_ptrs, mask=keep, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=keep)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def shrink(x: Tensor, v: Tensor, codes: Tensor) -> Tensor:
    """``(x V) * c`` as float32 [N, r]; ``x`` [N, in], ``v`` [in, r], ``codes`` [N, r]."""
    n, k_size = x.shape
    r = v.shape[1]
    t = torch.empty(n, r, device=x.device, dtype=torch.float32)
    _shrink_kernel[(triton.cdiv(n, BLOCK_M),)](
        x, v, codes, t, n, k_size, r, x.stride(0), x.stride(1), v.stride(0), v.stride(1),
        codes.stride(0), codes.stride(1), t.stride(0), t.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(r))
    return t


def expand_(y: Tensor, t: Tensor, u: Tensor) -> Tensor:
    """``y += t U^T`` in place and return ``y``; ``y`` [N, out], ``t`` [N, r], ``u`` [out, r]."""
    n, out = y.shape
    r = t.shape[1]
    grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(out, BLOCK_N))
    _expand_kernel[grid](t, u, y, n, out, r, t.stride(0), t.stride(1), u.stride(0), u.stride(1),
                         y.stride(0), y.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(r))
    return y

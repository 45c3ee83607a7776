r"""Triton kernels for the functional tier's aggregation, forward and backward.

They compute what :class:`~neurolattice.lattice.experts.FunctionalAggregate` computes,

.. math::
    h_{ij} = \mathrm{gelu}(P_{i+o_j} + Q_i), \quad s_{ij} = v \cdot h_{ij} + \beta_{i+o_j}, \quad
    \mathrm{hagg}_i = \textstyle\sum_j \mathrm{softmax}_j(s_{ij})\, h_{ij}

(exact erf gelu; ``beta`` the score bias, ``-inf`` in the padding of an open lattice), with
``hagg_i = 0`` for a cell whose functional tier is empty, and take the same arguments.

Forward: one program per block of ``BLOCK_N`` cells, the whole hidden vector of each cell in
registers (``H`` padded to the power of two ``BLOCK_H``, masked). The program loops over the
``K`` offsets (an int32 ``[K, 3]`` tensor), reads ``P`` at the padded index
``(x + px + dx, y + py + dy, z + pz + dz)``, and keeps the running max, denominator and
weighted sum of the online softmax in registers. The bias is read from ``score_bias`` at the
same padded index, not derived from coordinates: inside :class:`~neurolattice.lattice.LatticeMoE`
a block of x-planes sees a slice of the lattice's bias, whose validity its own coordinates do
not tell. The max and the denominator are saved for the backward.

Backward, with ``G = dL/dhagg`` masked to the non-empty cells, ``w_ij = exp(s_ij - max_i) / den_i``,
``dL/ds_ij = w_ij (G_i . h_ij - G_i . hagg_i)`` and
``dL/du_ij = (w_ij G_i + dL/ds_ij v) gelu'(u_ij)`` (the derivation is FunctionalAggregate's):

- a pass over the cells recomputes ``h_ij`` per offset and sums ``dL/du_ij`` into ``dQ_i``
  and ``dL/ds_ij h_ij`` into one partial ``dv`` per program; the partials are summed after;
- a pass over the padded cells ``j`` of ``P`` gathers ``dP_j = sum_o dL/du_{j - o, o}`` over the
  offsets whose source cell ``j - pad - o`` lies in the lattice, recomputing ``h`` once more.

Both passes are deterministic (no atomics): each output element is written by one program,
summed in a fixed order, at the price of computing ``h`` three times in all instead of two.

Dtypes: float64 inputs are computed in float64 (Python float literals take the dtype of the
tensor they meet, so nothing is rounded to float32 on the way: the result is the torch
path's up to summation order); other float dtypes in float32, the results stored in the
inputs' dtypes. ``chunk_elems`` (the torch path's slab size) is accepted for the signature
and unused: no ``[N, K, H]`` or slab buffer exists here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

NEG = tl.constexpr(torch.finfo(torch.float32).min)  # the running max before any score: finite, so exp(NEG - NEG) = 1


@triton.jit
def _gelu(u):
    return 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))           # exact: u Phi(u)


@triton.jit
def _gelu_grad(u):
    return 0.5 * (1.0 + tl.erf(u * 0.7071067811865476)) + u * tl.exp(-0.5 * u * u) * 0.3989422804014327


@triton.jit
def _cell_coords(cells, X, Y, Z):
    z = cells % Z
    rest = cells // Z
    y = rest % Y
    rest = rest // Y
    return rest // X, rest % X, y, z                       # b, x, y, z


@triton.jit
def _score(p_ptr, bias_ptr, j_space, j, q, v, hs, H, tile, live, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """``u = P_j + Q_i``, ``h = gelu(u)`` and the score ``v . h + bias_j`` of each cell's offset."""
    p = tl.load(p_ptr + j[:, None] * H + hs[None, :], mask=tile, other=0.0).to(ACC)
    u = p + q                                              # (BLOCK_N, BLOCK_H)
    h = _gelu(u)
    s = tl.sum(h * v[None, :], axis=1)                     # (BLOCK_N,)
    if HAS_BIAS:
        s += tl.load(bias_ptr + j_space, mask=live, other=0.0).to(ACC)
    return u, h, s


@triton.jit
def _score_grad(u, h, s, g, v, run_max, scale, centre):
    """``dL/du`` and ``dL/ds`` of one offset; ``scale = 1/den`` (0 for empty or masked cells)."""
    w = tl.where(scale > 0, tl.exp(s - run_max) * scale, 0.0)
    d_s = (tl.sum(h * g, axis=1) - centre) * w
    d_u = (g * w[:, None] + d_s[:, None] * v[None, :]) * _gelu_grad(u)
    return d_u, d_s


@triton.jit
def _forward_kernel(p_ptr, q_ptr, v_ptr, bias_ptr, off_ptr, hagg_ptr, max_ptr, den_ptr,
                    n_cells, n_offsets, X, Y, Z, XP, YP, ZP, px, py, pz, H,
                    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    cells = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cells < n_cells
    b, x, y, z = _cell_coords(cells, X, Y, Z)
    hs = tl.arange(0, BLOCK_H)
    tile = live[:, None] & (hs < H)[None, :]
    q = tl.load(q_ptr + cells[:, None] * H + hs[None, :], mask=tile, other=0.0).to(ACC)
    v = tl.load(v_ptr + hs, mask=hs < H, other=0.0).to(ACC)
    run_max = tl.full([BLOCK_N], NEG, ACC)
    den = tl.zeros([BLOCK_N], ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_H], ACC)
    for k in range(n_offsets):
        dx, dy, dz = tl.load(off_ptr + 3 * k), tl.load(off_ptr + 3 * k + 1), tl.load(off_ptr + 3 * k + 2)
        j_space = ((x + px + dx) * YP + y + py + dy) * ZP + z + pz + dz   # the neighbour, padded
        u, h, s = _score(p_ptr, bias_ptr, j_space, b * (XP * YP * ZP) + j_space, q, v, hs, H, tile, live,
                         HAS_BIAS, ACC)
        # online softmax: rescale what was summed under the old max
        m_new = tl.maximum(run_max, s)
        alpha = tl.exp(run_max - m_new)
        w = tl.exp(s - m_new)
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * h
        run_max = m_new
    hagg = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(hagg_ptr + cells[:, None] * H + hs[None, :], hagg, mask=tile)
    tl.store(max_ptr + cells, run_max, mask=live)
    tl.store(den_ptr + cells, den, mask=live)


@triton.jit
def _backward_cells_kernel(p_ptr, q_ptr, v_ptr, bias_ptr, off_ptr, g_ptr, max_ptr, scale_ptr, centre_ptr,
                           dq_ptr, dv_ptr, n_cells, n_offsets, X, Y, Z, XP, YP, ZP, px, py, pz, H,
                           HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_H: tl.constexpr):
    cells = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cells < n_cells
    b, x, y, z = _cell_coords(cells, X, Y, Z)
    hs = tl.arange(0, BLOCK_H)
    tile = live[:, None] & (hs < H)[None, :]
    q = tl.load(q_ptr + cells[:, None] * H + hs[None, :], mask=tile, other=0.0).to(ACC)
    g = tl.load(g_ptr + cells[:, None] * H + hs[None, :], mask=tile, other=0.0)
    v = tl.load(v_ptr + hs, mask=hs < H, other=0.0).to(ACC)
    run_max = tl.load(max_ptr + cells, mask=live, other=0.0)
    scale = tl.load(scale_ptr + cells, mask=live, other=0.0)
    centre = tl.load(centre_ptr + cells, mask=live, other=0.0)
    d_q = tl.zeros([BLOCK_N, BLOCK_H], ACC)
    d_v = tl.zeros([BLOCK_H], ACC)
    for k in range(n_offsets):
        dx, dy, dz = tl.load(off_ptr + 3 * k), tl.load(off_ptr + 3 * k + 1), tl.load(off_ptr + 3 * k + 2)
        j_space = ((x + px + dx) * YP + y + py + dy) * ZP + z + pz + dz
        u, h, s = _score(p_ptr, bias_ptr, j_space, b * (XP * YP * ZP) + j_space, q, v, hs, H, tile, live,
                         HAS_BIAS, ACC)
        d_u, d_s = _score_grad(u, h, s, g, v, run_max, scale, centre)
        d_q += d_u
        d_v += tl.sum(d_s[:, None] * h, axis=0)
    tl.store(dq_ptr + cells[:, None] * H + hs[None, :], d_q, mask=tile)
    tl.store(dv_ptr + tl.program_id(0) * BLOCK_H + hs, d_v)


@triton.jit
def _backward_padded_kernel(p_ptr, q_ptr, v_ptr, bias_ptr, off_ptr, g_ptr, max_ptr, scale_ptr, centre_ptr,
                            dp_ptr, n_padded, n_offsets, X, Y, Z, XP, YP, ZP, px, py, pz, H,
                            HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    js = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)   # padded cells of P
    live = js < n_padded
    b, xj, yj, zj = _cell_coords(js, XP, YP, ZP)
    j_space = (xj * YP + yj) * ZP + zj
    hs = tl.arange(0, BLOCK_H)
    hmask = (hs < H)[None, :]
    v = tl.load(v_ptr + hs, mask=hs < H, other=0.0).to(ACC)
    d_p = tl.zeros([BLOCK_N, BLOCK_H], ACC)
    for k in range(n_offsets):
        dx, dy, dz = tl.load(off_ptr + 3 * k), tl.load(off_ptr + 3 * k + 1), tl.load(off_ptr + 3 * k + 2)
        # the cell that reads P_j through offset k, if it is in the lattice
        x, y, z = xj - px - dx, yj - py - dy, zj - pz - dz
        valid = live & (x >= 0) & (x < X) & (y >= 0) & (y < Y) & (z >= 0) & (z < Z)
        tile = valid[:, None] & hmask
        cells = ((b * X + x) * Y + y) * Z + z
        q = tl.load(q_ptr + cells[:, None] * H + hs[None, :], mask=tile, other=0.0).to(ACC)
        g = tl.load(g_ptr + cells[:, None] * H + hs[None, :], mask=tile, other=0.0)
        run_max = tl.load(max_ptr + cells, mask=valid, other=0.0)
        scale = tl.load(scale_ptr + cells, mask=valid, other=0.0)
        centre = tl.load(centre_ptr + cells, mask=valid, other=0.0)
        u, h, s = _score(p_ptr, bias_ptr, j_space, js, q, v, hs, H, tile, valid, HAS_BIAS, ACC)
        d_u, _ = _score_grad(u, h, s, g, v, run_max, scale, centre)
        d_p += d_u
    tl.store(dp_ptr + js[:, None] * H + hs[None, :], d_p, mask=live[:, None] & hmask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(H: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_H)``: the hidden vector padded to a power of two, and cells per program
    such that one ``[BLOCK_N, BLOCK_H]`` tile holds about 2048 values."""
    block_h = triton.next_power_of_2(H)
    return min(64, max(16, 2048 // block_h)), block_h


@functools.lru_cache(maxsize=32)
def _offsets_tensor(offsets: tuple, device: torch.device) -> Tensor:
    """The offsets as an int32 ``[K, 3]`` tensor on ``device``, made once per geometry and device."""
    return torch.tensor(offsets, dtype=torch.int32, device=device).reshape(-1, 3)


def _check(p_pad: Tensor, q: Tensor, v: Tensor, score_bias: Tensor | None, pad) -> None:
    """One-line errors: the device (CUDA, or any under TRITON_INTERPRET=1) and the padded shapes."""
    tensors = {"p_pad": p_pad, "q": q, "v": v, "score_bias": score_bias}
    if not triton.knobs.runtime.interpret:
        for name, t in tensors.items():
            if t is not None and not t.is_cuda:
                raise ValueError(f"the Triton functional aggregation needs CUDA tensors "
                                 f"(or TRITON_INTERPRET=1), got {name} on {t.device}")
    need = [d + 2 * p for d, p in zip(q.shape[1:4], pad)]
    if (p_pad.dim() != 5 or p_pad.shape[0] != q.shape[0] or p_pad.shape[-1] != q.shape[-1]
            or any(n < m for n, m in zip(p_pad.shape[1:4], need))):
        raise ValueError(f"p_pad must be [B, X+2px, Y+2py, Z+2pz, H] = [{q.shape[0]}, {need[0]}, {need[1]}, "
                         f"{need[2]}, {q.shape[-1]}] (or larger in X', Y', Z'), got {list(p_pad.shape)}")
    if score_bias is not None and tuple(score_bias.shape) != (1, *p_pad.shape[1:4], 1):
        raise ValueError(f"score_bias must be [1, X', Y', Z', 1] = [1, {', '.join(map(str, p_pad.shape[1:4]))}, 1] "
                         f"like p_pad, got {list(score_bias.shape)}")


def _launch_args(p_pad: Tensor, q: Tensor, score_bias: Tensor | None, pad):
    """The arguments every kernel shares after its own pointers, and its constexprs."""
    acc = _acc_dtype(q.dtype)
    block_n, block_h = _blocks(q.shape[-1])
    sizes = (*q.shape[1:4], *p_pad.shape[1:4], *pad, q.shape[-1])
    meta = dict(HAS_BIAS=score_bias is not None, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                BLOCK_N=block_n, BLOCK_H=block_h)
    return sizes, meta


def aggregate_forward(p_pad: Tensor, q: Tensor, v: Tensor, score_bias: Tensor | None, offsets,
                      pad: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(hagg, run_max, den)``: ``hagg [B, X, Y, Z, H]`` in ``q``'s dtype, and the softmax's max and
    denominator ``[B, X, Y, Z]`` in the compute dtype (``den == 0`` where the tier is empty).

    Args as :class:`~neurolattice.lattice.experts.FunctionalAggregate`: ``p_pad [B, X', Y', Z', H]``,
    ``q [B, X, Y, Z, H]``, ``v [H]``, ``score_bias [1, X', Y', Z', 1]`` or None, the offsets
    ``[(dx, dy, dz), ...]`` and ``pad (px, py, pz)``.
    """
    _check(p_pad, q, v, score_bias, pad)
    acc = _acc_dtype(q.dtype)
    hagg = torch.zeros(q.shape, dtype=acc, device=q.device)
    run_max = torch.full(q.shape[:-1], NEG.value, dtype=acc, device=q.device)
    den = torch.zeros(q.shape[:-1], dtype=acc, device=q.device)
    n_cells = q.shape[:-1].numel()
    if len(offsets) and n_cells:
        p_pad, q, v = p_pad.contiguous(), q.contiguous(), v.contiguous()
        bias = p_pad if score_bias is None else score_bias.contiguous()        # unread without a bias
        sizes, meta = _launch_args(p_pad, q, score_bias, pad)
        _forward_kernel[(triton.cdiv(n_cells, meta["BLOCK_N"]),)](
            p_pad, q, v, bias, _offsets_tensor(tuple(map(tuple, offsets)), q.device), hagg, run_max, den,
            n_cells, len(offsets), *sizes, **meta)
    return hagg.to(q.dtype), run_max, den


def aggregate_backward(grad_hagg: Tensor, p_pad: Tensor, q: Tensor, v: Tensor, score_bias: Tensor | None,
                       offsets, pad: tuple[int, int, int], run_max: Tensor, den: Tensor,
                       hagg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dP_pad, dQ, dv)`` in the dtypes of ``p_pad, q, v``, from ``G = grad_hagg`` and what
    :func:`aggregate_forward` returned (see the module docstring for the two passes)."""
    _check(p_pad, q, v, score_bias, pad)
    acc = _acc_dtype(q.dtype)
    d_p = torch.zeros(p_pad.shape, dtype=acc, device=q.device)
    d_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    n_cells, n_padded = q.shape[:-1].numel(), p_pad.shape[:-1].numel()
    if not (len(offsets) and n_cells):
        return d_p.to(p_pad.dtype), d_q.to(q.dtype), torch.zeros_like(v)
    nonempty = den > 0
    scale = torch.where(nonempty, 1.0 / torch.where(nonempty, den, 1.0), 0.0)   # (B, X, Y, Z)
    g = (grad_hagg.to(acc) * nonempty.unsqueeze(-1)).contiguous()               # (B, X, Y, Z, H)
    centre = (g * hagg.to(acc)).sum(-1)                                          # G . hagg
    p_pad, q, v = p_pad.contiguous(), q.contiguous(), v.contiguous()
    bias = p_pad if score_bias is None else score_bias.contiguous()
    offs = _offsets_tensor(tuple(map(tuple, offsets)), q.device)
    sizes, meta = _launch_args(p_pad, q, score_bias, pad)
    n_programs = triton.cdiv(n_cells, meta["BLOCK_N"])
    d_v = torch.empty(n_programs, meta["BLOCK_H"], dtype=acc, device=q.device)  # one partial per program
    shared = (p_pad, q, v, bias, offs, g, run_max, scale, centre)
    _backward_cells_kernel[(n_programs,)](*shared, d_q, d_v, n_cells, len(offsets), *sizes, **meta)
    _backward_padded_kernel[(triton.cdiv(n_padded, meta["BLOCK_N"]),)](
        *shared, d_p, n_padded, len(offsets), *sizes, **meta)
    return d_p.to(p_pad.dtype), d_q.to(q.dtype), d_v.sum(0)[: v.shape[0]].to(v.dtype)


class TritonFunctionalAggregate(torch.autograd.Function):
    """:class:`~neurolattice.lattice.experts.FunctionalAggregate` on Triton kernels: the same
    ``apply(p_pad, q, v, score_bias, offsets, pad, chunk_elems)``, the same ``[B, X, Y, Z, H]``
    result (zero where the functional tier is empty) and gradients for ``p_pad``, ``q``, ``v``.

    CUDA tensors only (or any, under ``TRITON_INTERPRET=1``): others raise a one-line
    ``ValueError``. ``chunk_elems`` is unused (see the module docstring).
    """

    @staticmethod
    def forward(ctx, p_pad, q, v, score_bias, offsets, pad, chunk_elems):
        hagg, run_max, den = aggregate_forward(p_pad, q, v, score_bias, offsets, pad)
        ctx.save_for_backward(p_pad, q, v, score_bias, run_max, den, hagg)
        ctx.offsets, ctx.pad = offsets, pad
        return hagg

    @staticmethod
    def backward(ctx, grad_hagg):
        p_pad, q, v, score_bias, run_max, den, hagg = ctx.saved_tensors
        d_p, d_q, d_v = aggregate_backward(grad_hagg, p_pad, q, v, score_bias, ctx.offsets, ctx.pad,
                                           run_max, den, hagg)
        return d_p, d_q, d_v, None, None, None, None

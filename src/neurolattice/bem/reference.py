"""Per-token reference of BEM routing and of the BEM layer, written for clarity, not speed.

For every sequence b and position t, the codes are computed from scratch from the real tokens
``0..t`` with literal loops: the prefix pooling over the first ``min(pos, P - 1) + 1`` real
tokens, the chunk means, the EMA across chunks one chunk at a time. It shares only the learned
pieces (projection, heads, query, key, ``c_static``) with :class:`BEMController`; tests compare
the fast controller to it. Pads get zero codes (the fast path gives them finite values that
nothing reads).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .controller import BEMController
from .layer import BEMLinear


def reference_route(controller: BEMController, features: Tensor, mask: Tensor) -> dict[str, dict[str, Tensor]]:
    """``{"codes": {level: [B, T, S, r]}, "dynamic": {...}, "uncertainty": {level: [B, T, 1]}}``
    for ``features`` [B, T, H] and ``mask`` [B, T], position by position."""
    cfg = controller.config
    batch, length, _ = features.shape
    slots, rank = controller.num_slots, cfg.rank
    dtype = controller.c_static.dtype
    out = {key: {level: [] for level in controller.levels} for key in ("codes", "dynamic", "uncertainty")}
    for b in range(batch):
        rows = {key: {level: [] for level in controller.levels} for key in out}
        for t in range(length):
            real = [j for j in range(t + 1) if mask[b, j]]
            for level in controller.levels:
                if not mask[b, t]:
                    code, dynamic, u = (torch.zeros(slots, rank, dtype=dtype), torch.zeros(slots, rank, dtype=dtype),
                                        torch.zeros(1, dtype=dtype))
                else:
                    g = [controller.proj(features[b, j].to(dtype)) for j in real]
                    code, dynamic, u = _finish(controller, level, _vector(controller, level, g))
                rows["codes"][level].append(code)
                rows["dynamic"][level].append(dynamic)
                rows["uncertainty"][level].append(u)
        for key in out:
            for level in controller.levels:
                out[key][level].append(torch.stack(rows[key][level]))
    return {key: {level: torch.stack(v) for level, v in per.items()} for key, per in out.items()}


def _pooled(controller: BEMController, g: list[Tensor], last: int) -> Tensor:
    """Attention pooling with the learned query over ``g[0..last]``."""
    scores = torch.stack([controller.query @ controller.key(g[j]) / math.sqrt(g[j].shape[0])
                          for j in range(last + 1)])
    weights = torch.softmax(scores, 0)
    return sum(weights[j] * g[j] for j in range(last + 1))


def _prefix_vector(controller: BEMController, g: list[Tensor], slot: int) -> Tensor:
    return controller.heads["prefix"](_pooled(controller, g, slot))


def _vector(controller: BEMController, level: str, g: list[Tensor]) -> Tensor:
    """The raw vector [S r + 1] of the last token of ``g`` (the real tokens 0..t) at ``level``."""
    cfg = controller.config
    pos = len(g) - 1
    p, c = cfg.prefix_len, cfg.chunk_size
    if level == "token":
        return controller.heads["token"](g[pos])
    if level == "prefix" or pos < c:
        return _prefix_vector(controller, g, min(pos, p - 1))
    ema = _prefix_vector(controller, g, min(c, p) - 1)
    for k in range(1, pos // c + 1):
        mean = sum(g[(k - 1) * c + i] for i in range(c)) / c
        summary = _pooled(controller, g, min(k * c - 1, p - 1))
        raw = controller.heads["chunk"](torch.cat([mean, summary]))
        ema = cfg.beta * ema + (1 - cfg.beta) * raw
    return ema


def _finish(controller: BEMController, level: str, vector: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clamp each slot to ``max_norm``, the uncertainty ``u``, the effective code."""
    cfg = controller.config
    rows = []
    for s in range(controller.num_slots):
        code = vector[s * cfg.rank:(s + 1) * cfg.rank]
        norm = torch.sqrt((code * code).sum())
        rows.append(code * (cfg.max_norm / norm) if norm > cfg.max_norm else code)
    dynamic = torch.stack(rows)
    temperature = torch.log1p(torch.exp(controller.temperature_raw[level]))
    u = torch.sigmoid(vector[-1:] / temperature)
    return cfg.scaling * (u * dynamic + (1 - u) * controller.c_static), dynamic, u


def reference_layer(layer: BEMLinear, x: Tensor, codes: Tensor) -> Tensor:
    """``y_t = base(x_t) + U (c_t * (V^T x_t))`` token by token; ``x`` [B, T, in], ``codes`` [B, T, r]."""
    batch, length, _ = x.shape
    rows = []
    for b in range(batch):
        rows.append(torch.stack([
            layer.base_layer(x[b, t]) + layer.U @ (codes[b, t] * (layer.V.T @ x[b, t])) for t in range(length)
        ]))
    return torch.stack(rows)

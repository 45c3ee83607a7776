"""The NeuroGraph network and its fast path: every active node of a batch advances together.

State of an active node ``v`` of sample ``b``: context indices ``cP in Z_N^D``,
``cA in [0, M)^D`` and a strength. One timestep, for all active ``(b, u)`` pairs at once:

1. Radiation: ``score(u, v) = sum_d cos(2 pi (cP_u[d] + P_v[d]) / N)``. By
   ``cos(a + b) = cos a cos b - sin a sin b`` the scores of all active rows against all
   nodes are one matrix product ``[A, 2D] @ [2D, n]`` (float64, in blocks of rows so memory
   stays bounded), masked (``u`` itself and its static targets) and cut to the top ``k``.
   Ties: scores are snapped to a grid of ``2^-S`` (:func:`score_keys`) and equal ones go to
   the lower node index, so the reference's direct cosine sums pick the same targets.
2. Messages to the static targets and the radiation targets: ``mP = (cP_u + P_v) mod N``,
   ``mA = clamp(cA_u + A_v, 0, M-1)``, strength ``sum_d s(mP, mA)`` (float64); those with
   strength ``<= 0`` are dropped.
3. Arrivals (scatter-add over the flat index ``b * n + v``): a node that receives messages
   takes ``cP = (sum mP) mod N``, ``cA = clamp(sum mA, 0, M-1)``; one that receives none keeps
   its context. Strength ``s' = gamma * s + sum of arriving strengths``.
4. A node is active after the step if ``s' >= tau``; an active output node stays active.
5. A sample stops after step ``t`` once ``t >= t_min`` and an output node is active, at
   ``t = T_max``, or when it has no active node; its pairs drop out of the batch.

Gradients (``grad=True``): beside the integer indices, float *carriers* equal to them in value
carry gradients (a straight-through estimator): a message's carrier is ``fP_u + P_v`` (so
``d cP_v / d cP_u = 1`` and ``d cP_v / d P_v`` counts the arrivals), ``mod N`` passes the
gradient through, a clamp that bites stops it. :func:`neurolattice.neurograph.tables.signal`
turns carriers into signals with the table derivatives.

Shapes: ``x`` ``[B, F]``; outputs of :meth:`NeuroGraph.forward`: logits ``[B, C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import NeuroGraphConfig
from .graph import Graph
from .tables import Tables, signal, strength

SCORE_BLOCK = 1 << 22          # score-matrix entries per block of active rows


def class_codes(classes: int, D: int) -> torch.Tensor:
    """Fixed class codes ``[C, D]``: ``+e_0, -e_0, +e_1, -e_1, ...`` (the cross-polytope; for
    ``C <= 2D`` codes are orthogonal or opposite, as far apart as ``D`` allows), then, past
    ``2D``, unit vectors of a seeded Gaussian draw."""
    codes = torch.zeros(classes, D, dtype=torch.float64)
    axis = torch.arange(min(classes, 2 * D))
    codes[axis, axis // 2] = (1 - 2 * (axis % 2)).double()
    if classes > 2 * D:
        extra = torch.randn(classes - 2 * D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        codes[2 * D:] = extra / extra.norm(dim=1, keepdim=True)
    return codes


def ste(carrier: torch.Tensor, value: torch.Tensor, passes: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor equal to the integer ``value`` whose gradient flows to ``carrier`` unchanged,
    except where ``passes`` is False (a clamp that bit: no gradient)."""
    out = carrier + (value.to(carrier.dtype) - carrier).detach()
    if passes is None:
        return out
    return torch.where(passes, out, value.to(carrier.dtype))


def snap_shift(n: int, D: int) -> int:
    """``S`` of the score grid ``2^-S``: 30, less where a key ``D * 2^S * n`` would not be an
    exact float64 integer (``2^52``)."""
    return min(30, 52 - math.ceil(math.log2(max(D, 1) * max(n, 2) + 1)))


def score_keys(scores: torch.Tensor, candidates: torch.Tensor, n: int, D: int) -> torch.Tensor:
    """Sort keys of radiation ``scores`` (float64, in ``[-D, D]``, overwritten) for node indices
    ``candidates``: the score snapped to a grid of ``2^-S`` (round half to even), times ``n``,
    plus ``n - 1 - v``: exact integers in float64, so ``topk`` of the keys is deterministic and
    equal snapped scores go to the lower node index."""
    return scores.mul_(2.0 ** snap_shift(n, D)).round_().mul_(n).add_(n - 1 - candidates)


@dataclass
class InputState:
    """Input nodes at ``t = 0``: indices ``P``, ``A`` ``[B, n_input, D]`` (int64), strength
    ``[B, n_input]``, and (for gradients) float carriers of ``P`` and ``A`` or None."""

    P: torch.Tensor
    A: torch.Tensor
    strength: torch.Tensor
    carrier_P: torch.Tensor | None = None
    carrier_A: torch.Tensor | None = None


@dataclass
class Run:
    """What a forward pass leaves for the readout, the learning rule and the plots.

    - ``out_P``, ``out_A``: ``[B, n_output, D]`` carriers (value = indices) of the output
      nodes when the sample stopped; ``out_active`` ``[B, n_output]`` bool.
    - ``hidden_sample``, ``hidden_P``, ``hidden_A``: the active hidden nodes when their sample
      stopped: sample index ``[H]`` and carriers ``[H, D]``.
    - ``steps``: ``[B]`` timesteps run; ``activity``: ``[T, B]`` active nodes after each step.
    - ``node_P``, ``node_A``: the float copies of the node parameters the gradients land on.
    - ``trace`` (``record=True``): per step, ``{"rows", "radiation", "act", "cP", "cA", "s"}``:
      the active pairs at the step's start (flat ``b * n + u``) and their radiation targets
      ``[A, k]`` (``-1`` pads), then the active pairs after it with their state.
    """

    out_P: torch.Tensor
    out_A: torch.Tensor
    out_active: torch.Tensor
    hidden_sample: torch.Tensor
    hidden_P: torch.Tensor
    hidden_A: torch.Tensor
    steps: torch.Tensor
    activity: torch.Tensor
    node_P: torch.Tensor
    node_A: torch.Tensor
    trace: list[dict[str, torch.Tensor]] = field(default_factory=list)


class NeuroGraph(nn.Module):
    """A NeuroGraph network: the DAG, node indices ``P``, ``A`` ``[n, D]`` (int64 buffers, moved
    by :func:`neurolattice.neurograph.learn.update_indices`), the input projection
    ``Linear(F, n_input * 2D)`` and fixed class codes ``[C, D]`` (:func:`class_codes`).

    ``dtype``: float type of carriers and signals (float32; float64 for exactness tests).
    """

    def __init__(self, config: NeuroGraphConfig, n_features: int, graph: Graph | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        self.config, self.n_features, self.dtype = config, n_features, dtype
        gen = torch.Generator().manual_seed(config.seed)
        self.graph = graph if graph is not None else Graph.random(config, gen)
        sizes = (self.graph.n, self.graph.n_input, self.graph.n_output)
        if sizes != (config.n, config.n_input, config.n_output):
            raise ValueError(f"graph has (n, n_input, n_output) = {sizes}, "
                             f"config {(config.n, config.n_input, config.n_output)}")
        c = config
        self.register_buffer("P", torch.randint(0, c.N, (c.n, c.D), generator=gen))
        self.register_buffer("A", torch.randint(0, c.M, (c.n, c.D), generator=gen))
        self.register_buffer("acc_P", torch.zeros(c.n, c.D, dtype=torch.float64))
        self.register_buffer("acc_A", torch.zeros(c.n, c.D, dtype=torch.float64))
        self.register_buffer("codes", class_codes(c.n_output, c.D).to(dtype))
        self.register_buffer("out_targets", self.graph.out_targets.clone())
        self.proj = nn.Linear(n_features, c.n_input * 2 * c.D, dtype=dtype)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, c.input_scale * c.N / 4 / math.sqrt(n_features), generator=gen)
            self.proj.bias.uniform_(0.0, c.N, generator=gen)
            self.proj.bias.view(c.n_input, 2, c.D)[:, 1] = c.M / 2
        self.version = 0           # bumped whenever P or A move: the reference's cache key
        self._tables: dict[tuple, Tables] = {}

    def extra_repr(self) -> str:
        c = self.config
        return (f"n={c.n}, n_input={c.n_input}, n_output={c.n_output}, fan_in={c.fan_in}, N={c.N}, M={c.M}, "
                f"D={c.D}, k={c.k}, features={self.n_features}, edges={len(self.graph.edges)}")

    def tables(self, dtype: torch.dtype) -> Tables:
        key = (dtype, self.P.device)
        if key not in self._tables:
            self._tables[key] = Tables(self.config.N, self.config.M, dtype, self.P.device)
        return self._tables[key]

    def check_features(self, x: torch.Tensor) -> None:
        """One-line ``ValueError`` unless ``x`` is a finite float ``[B, n_features]`` tensor."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"features must be a torch.Tensor [B, {self.n_features}], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.n_features or len(x) == 0:
            raise ValueError(f"features must be [B, F] = [*, {self.n_features}] with B >= 1, got {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf")

    def project(self, x: torch.Tensor) -> InputState:
        """Input nodes' context from features ``[B, F]``: ``proj(x)`` gives, per input node and
        component, a real phase (bins) and magnitude; they are rounded (phase mod ``N``,
        magnitude clamped to ``[0, M-1]``) with a straight-through estimator. Every input
        node starts with strength ``input_strength``."""
        self.check_features(x)
        c = self.config
        raw = self.proj(x.to(self.dtype)).view(len(x), c.n_input, 2, c.D)
        phase, mag = raw[:, :, 0], raw[:, :, 1]
        p_round, a_round = phase.detach().round(), mag.detach().round()
        P = p_round.long().remainder(c.N)
        A = a_round.clamp(0, c.M - 1).long()
        return InputState(P, A, torch.full(P.shape[:2], c.input_strength, dtype=torch.float64, device=x.device),
                          ste(phase, P), ste(mag, A, (a_round >= 0) & (a_round <= c.M - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of features ``x`` ``[B, F]``."""
        return readout(self, propagate(self, self.project(x), grad=torch.is_grad_enabled()))


def radiation_targets(net: NeuroGraph, nodes: torch.Tensor, cP: torch.Tensor) -> torch.Tensor:
    """Top-``k`` radiation targets ``[A, k]`` (``-1`` where fewer than ``k`` candidates) of the
    active ``nodes`` ``[A]`` with context phases ``cP`` ``[A, D]``: the score matrix
    ``[A, 2D] @ [2D, n]`` in blocks of rows, ``u`` and its static targets masked out."""
    c, n = net.config, net.config.n
    width = min(c.k, n - 1)
    out = torch.full((len(nodes), width), -1, dtype=torch.long, device=nodes.device)
    if width == 0 or len(nodes) == 0:
        return out
    t = net.tables(torch.float64)
    rows = torch.cat([t.cos[cP], -t.sin[cP]], 1)                              # (A, 2D)
    cols = torch.cat([t.cos[net.P], t.sin[net.P]], 1).T                       # (2D, n)
    candidates = torch.arange(n, device=nodes.device, dtype=torch.float64)
    block = max(1, SCORE_BLOCK // n)
    for r0 in range(0, len(nodes), block):
        u = nodes[r0:r0 + block]
        keys = score_keys(rows[r0:r0 + block] @ cols, candidates, n, c.D)     # (a, n)
        static = net.out_targets[u]
        keys.scatter_(1, torch.where(static >= 0, static, u[:, None]), -math.inf)
        keys.scatter_(1, u[:, None], -math.inf)
        top = keys.topk(width, dim=1)
        out[r0:r0 + block] = torch.where(top.values == -math.inf, -1, top.indices)
    return out


def propagate(net: NeuroGraph, inputs: InputState, grad: bool = False, record: bool = False) -> Run:
    """Run the timesteps of the module docstring for a batch. ``grad``: build the carriers'
    autograd graph (gradients reach ``inputs``' carriers and ``Run.node_P``/``node_A``);
    ``record``: keep every step's state in ``Run.trace``."""
    c, g = net.config, net.graph
    n, D, dev = c.n, c.D, net.P.device
    B = inputs.P.shape[0]
    t64 = net.tables(torch.float64)
    node_P = net.P.to(net.dtype).requires_grad_(grad)
    node_A = net.A.to(net.dtype).requires_grad_(grad)
    is_out = g.is_output(torch.arange(n, device=dev)).repeat(B)               # (B*n,)
    is_hidden = g.is_hidden(torch.arange(n, device=dev)).repeat(B)

    act = (torch.arange(B, device=dev)[:, None] * n + torch.arange(c.n_input, device=dev)).flatten()
    cP, cA = inputs.P.reshape(-1, D), inputs.A.reshape(-1, D)
    s = inputs.strength.reshape(-1).to(torch.float64)
    fP = fA = None
    if grad:
        fP, fA = inputs.carrier_P.reshape(-1, D), inputs.carrier_A.reshape(-1, D)
    live = s >= c.tau
    act, cP, cA, s = act[live], cP[live], cA[live], s[live]
    if grad:
        fP, fA = fP[live], fA[live]

    running = torch.ones(B, dtype=torch.bool, device=dev)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    activity, trace, finals = [], [], []
    for t in range(1, c.T_max + 1):
        u = act % n
        rad = radiation_targets(net, u, cP)                                    # (A, k)
        targets = torch.cat([net.out_targets[u], rad], 1)                      # (A, W + k)
        src, col = (targets >= 0).nonzero(as_tuple=True)
        v = targets[src, col]
        mP = (cP[src] + net.P[v]).remainder(c.N)
        mA_raw = cA[src] + net.A[v]
        mA = mA_raw.clamp(0, c.M - 1)
        mS = strength(t64.values(mP, mA))
        keep = mS > 0
        src, v, mP, mA, mA_raw, mS = src[keep], v[keep], mP[keep], mA[keep], mA_raw[keep], mS[keep]
        tgt = act[src] // n * n + v                                            # flat b * n + v

        was = torch.zeros(B * n, dtype=torch.bool, device=dev)
        was[act] = True
        got = torch.zeros(B * n, dtype=torch.bool, device=dev)
        got[tgt] = True
        dense_s = torch.zeros(B * n, dtype=torch.float64, device=dev)
        dense_s[act] = c.gamma * s
        dense_s.index_add_(0, tgt, mS)
        new = (was | got) & ((dense_s >= c.tau) | (is_out & was))
        new_act = new.nonzero().squeeze(1)
        arrived = got[new_act]
        sum_P = torch.zeros(B * n, D, dtype=torch.long, device=dev).index_add_(0, tgt, mP)[new_act]
        sum_A = torch.zeros(B * n, D, dtype=torch.long, device=dev).index_add_(0, tgt, mA)[new_act]
        old = torch.searchsorted(act, new_act).clamp(max=max(len(act) - 1, 0))  # row in act (if was active)
        new_cP = torch.where(arrived[:, None], sum_P.remainder(c.N), cP[old] if len(act) else sum_P)
        new_cA = torch.where(arrived[:, None], sum_A.clamp(0, c.M - 1), cA[old] if len(act) else sum_A)
        if grad:
            zeros = torch.zeros(B * n, D, dtype=net.dtype, device=dev)
            msg_A = ste(fA[src] + node_A[v], mA, (mA_raw >= 0) & (mA_raw <= c.M - 1))
            carry_P = zeros.index_add(0, tgt, fP[src] + node_P[v])[new_act]
            carry_A = zeros.index_add(0, tgt, msg_A)[new_act]
            in_range = (sum_A >= 0) & (sum_A <= c.M - 1)
            keep_P, keep_A = (fP[old], fA[old]) if len(act) else (carry_P, carry_A)
            fP = torch.where(arrived[:, None], ste(carry_P, new_cP), keep_P)
            fA = torch.where(arrived[:, None], ste(carry_A, new_cA, in_range), keep_A)
        if record:
            trace.append({"rows": act, "radiation": rad, "act": new_act, "cP": new_cP, "cA": new_cA,
                          "s": dense_s[new_act]})
        act, cP, cA, s = new_act, new_cP, new_cA, dense_s[new_act]
        sample = act // n
        steps[running] = t
        activity.append(torch.bincount(sample, minlength=B) * running)
        has_out = torch.zeros(B, dtype=torch.bool, device=dev)
        has_out[sample[is_out[act]]] = True
        alive = torch.zeros(B, dtype=torch.bool, device=dev)
        alive[sample] = True
        stop = running & (((t >= c.t_min) & has_out) | ~alive | (t == c.T_max))
        if stop.any():
            leaving = stop[sample]
            finals.append((act[leaving], fP[leaving] if grad else cP[leaving], fA[leaving] if grad else cA[leaving]))
            running &= ~stop
            keep_rows = ~leaving
            act, cP, cA, s = act[keep_rows], cP[keep_rows], cA[keep_rows], s[keep_rows]
            if grad:
                fP, fA = fP[keep_rows], fA[keep_rows]
        if not running.any():
            break

    done = torch.cat([f[0] for f in finals])
    done_P = torch.cat([f[1] for f in finals]).to(net.dtype)
    done_A = torch.cat([f[2] for f in finals]).to(net.dtype)
    outs, hidden = is_out[done], is_hidden[done]
    slot = (done[outs] // n) * c.n_output + done[outs] % n - (n - c.n_output)
    out_P = torch.zeros(B * c.n_output, D, dtype=net.dtype, device=dev).index_copy(0, slot, done_P[outs])
    out_A = torch.zeros(B * c.n_output, D, dtype=net.dtype, device=dev).index_copy(0, slot, done_A[outs])
    out_active = torch.zeros(B * c.n_output, dtype=torch.bool, device=dev)
    out_active[slot] = True
    return Run(out_P.view(B, c.n_output, D), out_A.view(B, c.n_output, D), out_active.view(B, c.n_output),
               done[hidden] // n, done_P[hidden], done_A[hidden], steps, torch.stack(activity), node_P, node_A, trace)


def output_signal(net: NeuroGraph, run: Run) -> torch.Tensor:
    """``s_out`` ``[B, D]``: the mean signal of each sample's active output nodes (0 if none)."""
    sig = signal(run.out_P, run.out_A, net.tables(net.dtype)) * run.out_active[..., None]
    return sig.sum(1) / run.out_active.sum(1, keepdim=True).clamp(min=1)


def readout(net: NeuroGraph, run: Run) -> torch.Tensor:
    """Logits ``[B, C]``: ``logit_scale * cosine(s_out, e_c)`` (0 for a sample without an active
    output node)."""
    s_out = output_signal(net, run)
    return net.config.logit_scale * nn.functional.normalize(s_out, dim=1, eps=1e-12) @ net.codes.T

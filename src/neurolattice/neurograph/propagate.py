"""The NeuroGraph network and its fast path: every active node of a batch advances together.

State of a batch: its active ``(sample, node)`` pairs (:class:`Active`: flat index ``b * n + u``,
context indices ``cP in Z_N^D``, ``cA in [0, M)^D``, a strength), from the input nodes whose
strength is ``>= tau`` (:func:`initial_active`). One timestep, for all active pairs at once:

1. Radiation (:func:`radiation_targets`): ``score(u, v) = sum_d cos(2 pi (cP_u[d] + P_v[d]) / N)``.
   By ``cos(a + b) = cos a cos b - sin a sin b`` the scores of all active rows against all
   nodes are one matrix product ``[A, 2D] @ [2D, n]`` (float64, in blocks of rows so memory
   stays bounded), masked (``u`` itself and its static targets) and cut to the top ``k``.
   Ties: scores are snapped to a grid of ``2^-S`` (:func:`score_keys`) and equal ones go to
   the lower node index, so the reference's direct cosine sums pick the same targets.
2. Messages (:func:`messages`) to the static targets and the radiation targets:
   ``mP = (cP_u + P_v) mod N``, ``mA = clamp(cA_u + A_v, 0, M-1)``, strength
   ``sum_d s(mP, mA)`` (float64); those with strength ``<= 0`` are dropped.
3. Arrivals (:func:`arrivals`, a scatter-add over the flat index ``b * n + v``): strength
   ``s' = gamma * s + sum of arriving strengths``, and the sums of the arriving ``mP``, ``mA``.
4. Activity (:func:`next_active`): a pair is active after the step if ``s' >= tau``; an active
   output node stays active. One that received messages takes ``cP = (sum mP) mod N``,
   ``cA = clamp(sum mA, 0, M-1)``; one that received none keeps its context.
5. Stopping (:func:`stopping`): a sample stops after step ``t`` once ``t >= t_min`` and an
   output node is active, at ``t = T_max``, or when it has no active node; its pairs drop out
   of the batch and what the readout needs of them is kept (:func:`stopped_fields`).

Gradients (``grad=True``): beside the integer indices, float *carriers* equal to them in value
carry gradients (a straight-through estimator): a message's carrier is ``fP_u + P_v`` (so
``d cP_v / d cP_u = 1`` and ``d cP_v / d P_v`` counts the arrivals), ``mod N`` passes the
gradient through, a clamp that bites stops it. :func:`neurolattice.neurograph.tables.signal`
turns carriers into signals with the table derivatives. The carriers travel beside the indices
in the same containers (``fP``, ``fA`` of :class:`Active`, :class:`Messages`, :class:`Arrivals`;
None without gradients), so they are filtered with them.

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


@dataclass
class Active:
    """The active ``(sample, node)`` pairs of a batch; :meth:`select` filters every field alike.

    - ``rows`` ``[A]``: flat index ``b * n + u``, ascending.
    - ``cP``, ``cA`` ``[A, D]`` int64: context indices; ``s`` ``[A]`` float64: strength.
    - ``fP``, ``fA`` ``[A, D]`` (``net.dtype``): carriers of ``cP``, ``cA`` (equal in value,
      gradients flow through them), or None when no gradients are built.
    """

    rows: torch.Tensor
    cP: torch.Tensor
    cA: torch.Tensor
    s: torch.Tensor
    fP: torch.Tensor | None = None
    fA: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> Active:
        """The pairs where ``keep`` (bool ``[A]``) holds."""
        fields = (self.rows, self.cP, self.cA, self.s, self.fP, self.fA)
        return Active(*(None if f is None else f[keep] for f in fields))

    def readout_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, A)`` ``[A, D]`` for the readout: the carriers with gradients, else the indices."""
        return (self.cP, self.cA) if self.fP is None else (self.fP, self.fA)


@dataclass
class Messages:
    """One step's messages with strength ``> 0``, by sender row, then target (static targets
    first, then radiation ones).

    - ``tgt`` ``[E]``: flat index ``b * n + v`` of the receiving pair.
    - ``mP``, ``mA`` ``[E, D]`` int64; ``s`` ``[E]`` float64: ``sum_d s(mP, mA)``.
    - ``fP``, ``fA`` ``[E, D]``: carriers ``fP_u + P_v`` and ``fA_u + A_v`` (no gradient where the
      clamp of ``mA`` bit), or None.
    """

    tgt: torch.Tensor
    mP: torch.Tensor
    mA: torch.Tensor
    s: torch.Tensor
    fP: torch.Tensor | None
    fA: torch.Tensor | None


@dataclass
class Arrivals:
    """Step 3 for every pair of the batch (``B * n`` rows, flat index ``b * n + v``).

    - ``received`` ``[B * n]`` bool: at least one message arrived.
    - ``s`` ``[B * n]`` float64: ``s' = gamma * s + sum of arriving strengths`` (``s = 0`` for
      a pair that was not active).
    - ``sum_P``, ``sum_A`` ``[B * n, D]`` int64: sums of the arriving ``mP``, ``mA`` (0 if none).
    - ``fP``, ``fA`` ``[B * n, D]``: sums of the arriving carriers, or None.
    """

    received: torch.Tensor
    s: torch.Tensor
    sum_P: torch.Tensor
    sum_A: torch.Tensor
    fP: torch.Tensor | None
    fA: torch.Tensor | None


def initial_active(net: NeuroGraph, inputs: InputState, grad: bool) -> Active:
    """The state at ``t = 0``: input node ``i`` of sample ``b`` is pair ``b * n + i`` with the
    projected indices (and their carriers if ``grad``), kept where its strength is ``>= tau``."""
    c, dev = net.config, inputs.P.device
    B = inputs.P.shape[0]
    rows = (torch.arange(B, device=dev)[:, None] * c.n + torch.arange(c.n_input, device=dev)).flatten()
    s = inputs.strength.reshape(-1).to(torch.float64)
    every = Active(rows, inputs.P.reshape(-1, c.D), inputs.A.reshape(-1, c.D), s,
                   inputs.carrier_P.reshape(-1, c.D) if grad else None,
                   inputs.carrier_A.reshape(-1, c.D) if grad else None)
    return every.select(s >= c.tau)


def messages(net: NeuroGraph, act: Active, radiation: torch.Tensor, node_P: torch.Tensor,
             node_A: torch.Tensor) -> Messages:
    """Step 2: every active pair ``(b, u)`` sends to its static targets and its ``radiation``
    targets ``[A, k]`` (``-1`` pads) ``mP = (cP_u + P_v) mod N``, ``mA = clamp(cA_u + A_v, 0,
    M-1)``, strength ``sum_d s(mP, mA)``; messages with strength ``<= 0`` are dropped. The
    carriers add ``node_P``, ``node_A`` ``[n, D]`` (the float copies of ``P``, ``A``)."""
    c, n = net.config, net.config.n
    u = act.rows % n
    targets = torch.cat([net.out_targets[u], radiation], 1)                  # (A, W + k)
    src, col = (targets >= 0).nonzero(as_tuple=True)
    v = targets[src, col]
    mP = (act.cP[src] + net.P[v]).remainder(c.N)                             # (E, D)
    mA_raw = act.cA[src] + net.A[v]
    mA = mA_raw.clamp(0, c.M - 1)
    mS = strength(net.tables(torch.float64).values(mP, mA))                  # (E,)
    keep = mS > 0
    src, v, mA_raw = src[keep], v[keep], mA_raw[keep]
    fP = fA = None
    if act.fP is not None:
        fP = act.fP[src] + node_P[v]
        fA = ste(act.fA[src] + node_A[v], mA[keep], (mA_raw >= 0) & (mA_raw <= c.M - 1))
    return Messages(tgt=act.rows[src] // n * n + v, mP=mP[keep], mA=mA[keep], s=mS[keep], fP=fP, fA=fA)


def arrivals(net: NeuroGraph, act: Active, msgs: Messages, size: int) -> Arrivals:
    """Step 3: scatter-add ``msgs`` over the ``size = B * n`` pairs. ``s'`` adds ``gamma * s``
    first, then the arriving strengths in message order (the reference adds them alike)."""
    c, dev, tgt = net.config, act.rows.device, msgs.tgt
    received = torch.zeros(size, dtype=torch.bool, device=dev)
    received[tgt] = True
    s = torch.zeros(size, dtype=torch.float64, device=dev)
    s[act.rows] = c.gamma * act.s
    s.index_add_(0, tgt, msgs.s)
    sum_P = torch.zeros(size, c.D, dtype=torch.long, device=dev).index_add_(0, tgt, msgs.mP)
    sum_A = torch.zeros(size, c.D, dtype=torch.long, device=dev).index_add_(0, tgt, msgs.mA)
    fP = fA = None
    if msgs.fP is not None:
        zeros = torch.zeros(size, c.D, dtype=msgs.fP.dtype, device=dev)
        fP, fA = zeros.index_add(0, tgt, msgs.fP), zeros.index_add(0, tgt, msgs.fA)
    return Arrivals(received=received, s=s, sum_P=sum_P, sum_A=sum_A, fP=fP, fA=fA)


def next_active(net: NeuroGraph, act: Active, arrived: Arrivals) -> Active:
    """Step 4: the pairs active after the step (among those that were active or received
    messages: ``s' >= tau``, or an active output node) and their contexts: ``cP = (sum mP) mod
    N``, ``cA = clamp(sum mA, 0, M-1)`` where messages arrived, else (the pair was active) the
    context it had."""
    c, n = net.config, net.config.n
    size, dev = len(arrived.s), act.rows.device
    was = torch.zeros(size, dtype=torch.bool, device=dev)
    was[act.rows] = True
    stays = torch.zeros(size, dtype=torch.bool, device=dev)
    stays[act.rows[net.graph.is_output(act.rows % n)]] = True
    rows = ((was | arrived.received) & ((arrived.s >= c.tau) | stays)).nonzero().squeeze(1)
    got = arrived.received[rows][:, None]
    sum_P, sum_A = arrived.sum_P[rows], arrived.sum_A[rows]
    old = torch.searchsorted(act.rows, rows).clamp(max=len(act.rows) - 1)    # its row in act, if it was active
    cP = torch.where(got, sum_P.remainder(c.N), act.cP[old])
    cA = torch.where(got, sum_A.clamp(0, c.M - 1), act.cA[old])
    if arrived.fP is None:
        return Active(rows, cP, cA, arrived.s[rows])
    carry_P, carry_A = arrived.fP[rows], arrived.fA[rows]
    keep_P, keep_A = act.fP[old], act.fA[old]
    fP = torch.where(got, ste(carry_P, cP), keep_P)
    fA = torch.where(got, ste(carry_A, cA, (sum_A >= 0) & (sum_A <= c.M - 1)), keep_A)
    return Active(rows, cP, cA, arrived.s[rows], fP, fA)


def stopping(net: NeuroGraph, act: Active, running: torch.Tensor, t: int) -> torch.Tensor:
    """Step 5: ``[B]`` bool, the ``running`` samples that stop after step ``t``: ``t >= t_min``
    and an output node active, or no active node, or ``t = T_max``."""
    c, n = net.config, net.config.n
    sample = act.rows // n
    has_out = torch.zeros_like(running)
    has_out[sample[net.graph.is_output(act.rows % n)]] = True
    alive = torch.zeros_like(running)
    alive[sample] = True
    return running & (((t >= c.t_min) & has_out) | ~alive | (t == c.T_max))


def stopped_fields(net: NeuroGraph, stopped: list[Active], B: int) -> dict[str, torch.Tensor]:
    """The :class:`Run` fields of the pairs active when their sample stopped (``stopped``: one
    :class:`Active` per stopping step): ``out_P``, ``out_A`` ``[B, n_output, D]`` (0 where the
    output node was not active), ``out_active``, and ``hidden_sample``, ``hidden_P``,
    ``hidden_A`` of the active hidden nodes."""
    c, n, D = net.config, net.config.n, net.config.D
    rows = torch.cat([f.rows for f in stopped])
    indices = [f.readout_indices() for f in stopped]
    P = torch.cat([p for p, _ in indices]).to(net.dtype)                     # (R, D)
    A = torch.cat([a for _, a in indices]).to(net.dtype)
    outs, hidden = net.graph.is_output(rows % n), net.graph.is_hidden(rows % n)
    slot = rows[outs] // n * c.n_output + rows[outs] % n - (n - c.n_output)  # b * n_output + output index
    out_P = torch.zeros(B * c.n_output, D, dtype=net.dtype, device=rows.device).index_copy(0, slot, P[outs])
    out_A = torch.zeros(B * c.n_output, D, dtype=net.dtype, device=rows.device).index_copy(0, slot, A[outs])
    out_active = torch.zeros(B * c.n_output, dtype=torch.bool, device=rows.device)
    out_active[slot] = True
    return {"out_P": out_P.view(B, c.n_output, D), "out_A": out_A.view(B, c.n_output, D),
            "out_active": out_active.view(B, c.n_output), "hidden_sample": rows[hidden] // n,
            "hidden_P": P[hidden], "hidden_A": A[hidden]}


def propagate(net: NeuroGraph, inputs: InputState, grad: bool = False, record: bool = False) -> Run:
    """Run the timesteps of the module docstring for a batch, steps 1-5 for all running samples
    at once. ``grad``: build the carriers' autograd graph (gradients reach ``inputs``' carriers
    and ``Run.node_P``/``node_A``); ``record``: keep every step's state in ``Run.trace``."""
    c = net.config
    B = inputs.P.shape[0]
    node_P = net.P.to(net.dtype).requires_grad_(grad)
    node_A = net.A.to(net.dtype).requires_grad_(grad)
    act = initial_active(net, inputs, grad)
    running = torch.ones(B, dtype=torch.bool, device=net.P.device)
    steps = torch.zeros(B, dtype=torch.long, device=net.P.device)
    activity, trace, stopped = [], [], []
    for t in range(1, c.T_max + 1):
        rad = radiation_targets(net, act.rows % c.n, act.cP)                  # 1. (A, k)
        msgs = messages(net, act, rad, node_P, node_A)                        # 2. (E, ...)
        new = next_active(net, act, arrivals(net, act, msgs, B * c.n))        # 3. (B * n, ...), 4. (A', ...)
        if record:
            trace.append({"rows": act.rows, "radiation": rad, "act": new.rows, "cP": new.cP, "cA": new.cA,
                          "s": new.s})
        act = new
        steps[running] = t
        activity.append(torch.bincount(act.rows // c.n, minlength=B) * running)
        stop = stopping(net, act, running, t)                                  # 5. (B,)
        if stop.any():
            leaving = stop[act.rows // c.n]
            stopped.append(act.select(leaving))
            act = act.select(~leaving)
            running &= ~stop
        if not running.any():
            break
    return Run(**stopped_fields(net, stopped, B), steps=steps, activity=torch.stack(activity),
               node_P=node_P, node_A=node_A, trace=trace)


def output_signal(net: NeuroGraph, run: Run) -> torch.Tensor:
    """``s_out`` ``[B, D]``: the mean signal of each sample's active output nodes (0 if none)."""
    sig = signal(run.out_P, run.out_A, net.tables(net.dtype)) * run.out_active[..., None]
    return sig.sum(1) / run.out_active.sum(1, keepdim=True).clamp(min=1)


def readout(net: NeuroGraph, run: Run) -> torch.Tensor:
    """Logits ``[B, C]``: ``logit_scale * cosine(s_out, e_c)`` (0 for a sample without an active
    output node)."""
    s_out = output_signal(net, run)
    return net.config.logit_scale * nn.functional.normalize(s_out, dim=1, eps=1e-12) @ net.codes.T

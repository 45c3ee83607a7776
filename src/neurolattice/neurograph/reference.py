"""The per-node reference of NeuroGraph: plain loops over samples, active nodes, candidates
and targets, written for clarity. It is the oracle of the fast path (:mod:`.propagate`) in the
tests and the "before" of the benchmark.

It keeps the prototype's speed idea, per-node caches, done right: every cache key holds what
the cached value depends on, so no entry can go stale.

- :class:`SignalCache`: message signal and strength keyed by the message's own indices
  ``(mP, mA)``, which are a function of the current parameters by construction.
- radiation rankings keyed by ``(cP_u, u, net.version)``: the version counter moves whenever
  a learning update moves any ``P`` (the scores depend on every node's ``P``).

Same semantics as the fast path, same tie rule (scores snapped by
:func:`~neurolattice.neurograph.propagate.score_keys`, then the lower node index), and each
node's strength adds ``gamma * s`` first and then the arrivals in the order the fast path
adds them (sources ascending, static targets before radiation ones).
"""

from __future__ import annotations

import torch

from .propagate import InputState, NeuroGraph, Run, snap_shift, ste
from .tables import strength


class SignalCache:
    """``(mP, mA)`` index tuples -> ``(signal [D] float64, strength float)``, and radiation
    rankings ``(cP_u, u, version)`` -> target list."""

    def __init__(self) -> None:
        self.signals: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, float]] = {}
        self.rankings: dict[tuple[tuple[int, ...], int, int], list[int]] = {}
        self.hits = 0

    def message(self, net: NeuroGraph, mP: tuple[int, ...], mA: tuple[int, ...]) -> tuple[torch.Tensor, float]:
        key = (mP, mA)
        if key in self.signals:
            self.hits += 1
        else:
            sig = net.tables(torch.float64).values(torch.tensor(mP), torch.tensor(mA))
            self.signals[key] = (sig, float(strength(sig)))
        return self.signals[key]

    def radiation(self, net: NeuroGraph, u: int, cP: tuple[int, ...]) -> list[int]:
        """The top-``k`` radiation targets of node ``u`` with context phases ``cP``: a loop over
        the candidates with direct cosine sums."""
        key = (cP, u, net.version)
        if key in self.rankings:
            self.hits += 1
            return self.rankings[key]
        c = net.config
        cos = net.tables(torch.float64).cos.tolist()
        P = net.P.tolist()
        static = set(net.out_targets[u].tolist())
        scale = 2.0 ** snap_shift(c.n, c.D)
        keyed = []
        for v in range(c.n):
            if v == u or v in static:
                continue
            score = 0.0
            for d in range(c.D):
                score += cos[(cP[d] + P[v][d]) % c.N]
            keyed.append((round(score * scale), -v))           # Python's round: half to even, like torch's
        keyed.sort(reverse=True)
        self.rankings[key] = [-v for _, v in keyed[:c.k]]
        return self.rankings[key]


def reference_propagate(net: NeuroGraph, inputs: InputState, grad: bool = False, record: bool = False,
                        cache: SignalCache | None = None) -> Run:
    """:func:`~neurolattice.neurograph.propagate.propagate` with loops, one sample at a time.
    Returns the same :class:`~neurolattice.neurograph.propagate.Run` (its trace with the pairs
    of all samples that ran a step, in flat ``b * n + u`` order)."""
    c = net.config
    n, D = c.n, c.D
    cache = cache if cache is not None else SignalCache()
    node_P = net.P.to(net.dtype).requires_grad_(grad)
    node_A = net.A.to(net.dtype).requires_grad_(grad)
    P, A = net.P.tolist(), net.A.tolist()
    targets_of = [[v for v in row if v >= 0] for row in net.out_targets.tolist()]
    B = inputs.P.shape[0]
    steps_taken, activity, per_step = [], [], {}
    out_P = [[torch.zeros(D, dtype=net.dtype)] * c.n_output for _ in range(B)]
    out_A = [[torch.zeros(D, dtype=net.dtype)] * c.n_output for _ in range(B)]
    out_active = torch.zeros(B, c.n_output, dtype=torch.bool)
    hidden = []
    for b in range(B):
        state = {}                                    # node -> [cP, cA, s, carrier P, carrier A]
        for i in range(c.n_input):
            s0 = float(inputs.strength[b, i])
            if s0 >= c.tau:
                state[i] = [tuple(inputs.P[b, i].tolist()), tuple(inputs.A[b, i].tolist()), s0,
                            inputs.carrier_P[b, i] if grad else None, inputs.carrier_A[b, i] if grad else None]
        t, counts = 0, []
        for t in range(1, c.T_max + 1):
            rows, rads = [], []
            arrivals: dict[int, list] = {}
            for u in sorted(state):
                cP, cA, _, fP, fA = state[u]
                radiation = cache.radiation(net, u, cP)
                rows.append(b * n + u)
                rads.append(radiation + [-1] * (min(c.k, n - 1) - len(radiation)))
                for v in targets_of[u] + radiation:
                    mP = tuple((cP[d] + P[v][d]) % c.N for d in range(D))
                    raw = [cA[d] + A[v][d] for d in range(D)]
                    mA = tuple(min(max(r, 0), c.M - 1) for r in raw)
                    _, mS = cache.message(net, mP, mA)
                    if mS > 0:
                        carriers = None
                        if grad:
                            passes = torch.tensor([0 <= r <= c.M - 1 for r in raw])
                            carriers = (fP + node_P[v], ste(fA + node_A[v], torch.tensor(mA), passes))
                        arrivals.setdefault(v, []).append((mP, mA, mS, carriers))
            new_state = {}
            for v in sorted(set(state) | set(arrivals)):
                s = c.gamma * state[v][2] if v in state else 0.0
                for msg in arrivals.get(v, []):
                    s += msg[2]
                was_output_active = v in state and v >= n - c.n_output
                if not (s >= c.tau or was_output_active):
                    continue
                if v in arrivals:
                    msgs = arrivals[v]
                    sum_P = [sum(m[0][d] for m in msgs) for d in range(D)]
                    sum_A = [sum(m[1][d] for m in msgs) for d in range(D)]
                    cP = tuple(x % c.N for x in sum_P)
                    cA = tuple(min(max(x, 0), c.M - 1) for x in sum_A)
                    fP = fA = None
                    if grad:
                        fP = ste(sum(m[3][0] for m in msgs), torch.tensor(cP))
                        fA = ste(sum(m[3][1] for m in msgs), torch.tensor(cA),
                                 torch.tensor([0 <= x <= c.M - 1 for x in sum_A]))
                    new_state[v] = [cP, cA, s, fP, fA]
                else:
                    new_state[v] = [*state[v][:2], s, *state[v][3:]]
            state = new_state
            per_step.setdefault(t, []).append((b, rows, rads, state))
            counts.append(len(state))
            has_out = any(v >= n - c.n_output for v in state)
            if (t >= c.t_min and has_out) or not state:
                break
        steps_taken.append(t)
        activity.append(counts)
        for v, (cP, cA, _, fP, fA) in state.items():
            value_P = fP if grad else torch.tensor(cP, dtype=net.dtype)
            value_A = fA if grad else torch.tensor(cA, dtype=net.dtype)
            if v >= n - c.n_output:
                out_P[b][v - (n - c.n_output)], out_A[b][v - (n - c.n_output)] = value_P, value_A
                out_active[b, v - (n - c.n_output)] = True
            elif v >= c.n_input:
                hidden.append((b, value_P, value_A))
    T = max(steps_taken)
    activity_t = torch.tensor([row + [0] * (T - len(row)) for row in activity]).T
    trace = [_trace_step(per_step[t], n, D, min(c.k, n - 1)) for t in sorted(per_step)] if record else []
    no_hidden = torch.zeros(0, D, dtype=net.dtype)
    return Run(out_P=torch.stack([torch.stack(r) for r in out_P]).to(net.dtype),
               out_A=torch.stack([torch.stack(r) for r in out_A]).to(net.dtype), out_active=out_active,
               hidden_sample=torch.tensor([h[0] for h in hidden], dtype=torch.long),
               hidden_P=torch.stack([h[1] for h in hidden]).to(net.dtype) if hidden else no_hidden,
               hidden_A=torch.stack([h[2] for h in hidden]).to(net.dtype) if hidden else no_hidden,
               steps=torch.tensor(steps_taken), activity=activity_t, node_P=node_P, node_A=node_A, trace=trace)


def _trace_step(entries: list, n: int, D: int, k: int) -> dict[str, torch.Tensor]:
    """One step of the trace in the fast path's layout, from ``(b, rows, rads, state)`` per sample."""
    rows = [r for _, rs, _, _ in entries for r in rs]
    rads = [r for _, _, rs, _ in entries for r in rs]
    act = [(b * n + v, st) for b, _, _, state in entries for v, st in sorted(state.items())]
    return {"rows": torch.tensor(rows, dtype=torch.long),
            "radiation": torch.tensor(rads, dtype=torch.long).reshape(len(rows), k),
            "act": torch.tensor([a for a, _ in act], dtype=torch.long),
            "cP": torch.tensor([st[0] for _, st in act], dtype=torch.long).reshape(-1, D),
            "cA": torch.tensor([st[1] for _, st in act], dtype=torch.long).reshape(-1, D),
            "s": torch.tensor([st[2] for _, st in act], dtype=torch.float64)}

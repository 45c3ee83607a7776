"""The BEM controller: one routing pass per model forward, codes for every attached module.

Features ``f`` ([B, T, H]: the input embeddings, or a decoder layer's output) are projected to
``g = LayerNorm(W f + b)`` ([B, T, h], h = ``hidden``). Each routing level maps them to a vector
of ``D = S r + 1`` entries, one r-slot per attached module plus one uncertainty logit:

- token:  ``v_t = MLP_tok(g_t)``.
- prefix: ``pooled_p = sum_{j <= p, j real} softmax_j(q . W_k g_j / sqrt(h)) g_j`` over the first
  P real tokens (a learned query ``q``), ``v_t = MLP_pre(pooled_{min(pos_t, P-1)})``; an empty
  set pools to zeros.
- chunk:  chunk ``k = pos_t // C``; chunk 0 uses the prefix vector at ``pos_t``; for ``k >= 1``
  ``raw_k = MLP_chk([mean_{chunk k-1} g, pooled_{min(kC-1, P-1)}])`` and
  ``c_k = beta c_{k-1} + (1 - beta) raw_k`` with ``c_0`` the prefix vector at slot ``min(C, P) - 1``.

``pos_t`` counts the real tokens before ``t`` (the attention mask's cumulative sum minus one), so
padding is excluded everywhere (pads get finite codes that nothing reads). Every vector at
position t depends on real tokens ``0..t`` only.

From a vector: the code ``c`` ([S, r]) is clamped per slot to norm ``max_norm``; the uncertainty
``u = sigmoid(logit / T)``, ``T = softplus(t_raw)`` (init 1); the effective code is
``s (u c + (1 - u) c_static)`` with ``s = alpha / rank`` and ``c_static`` ([S, r], init ones):
with ``u = 0`` every module is a static LoRA with scaling s.

One method, :meth:`BEMController.route`, serves a fresh sequence (``state=None``) and its
continuation during decoding (the :class:`RoutingState` it returned), with the same code path:
no loop over tokens or chunks, no host synchronisation.
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache

from neurolattice.lm.model import find_cache

from .config import LEVELS, BEMConfig

# Telemetry sums kept per forward (see ``BEMController.statistics`` and ``attach.telemetry``).
STATS = ("slot_tokens", "norm", "norm_sq", "active", "entries", "uncertainty", "routing_entropy")


def binary_entropy(u: Tensor) -> Tensor:
    """``-u log u - (1 - u) log(1 - u)`` in nats (u clamped away from 0 and 1)."""
    u = u.clamp(1e-7, 1 - 1e-7)
    return -(u * u.log() + (1 - u) * (1 - u).log())


@dataclass
class RoutingState:
    """What routing needs to continue a batch of sequences (all tensors detached).

    ``length``: columns seen (tokens and pads), equal to the KV cache length; ``seen`` [B]:
    real tokens seen; ``prefix`` [B, P, h]: ``g`` of the first P real tokens (slot j filled iff
    ``j < seen``: that is the prefix mask); ``chunk_sum`` [B, h]: sum of ``g`` over the real tokens
    of the current chunk ``seen // C`` (their count is ``seen % C``); ``ema`` [B, D]: that chunk's
    EMA vector ``c_{seen // C}`` (meaningful once ``seen >= C``).
    """

    length: int
    seen: Tensor
    prefix: Tensor
    chunk_sum: Tensor
    ema: Tensor

    def detach(self) -> RoutingState:
        return RoutingState(self.length, self.seen, self.prefix.detach(), self.chunk_sum.detach(), self.ema.detach())

    def select(self, rows: Tensor) -> RoutingState:
        """The state of the sequences ``rows`` (beam search reorders its beams this way)."""
        return RoutingState(self.length, self.seen[rows], self.prefix[rows], self.chunk_sum[rows], self.ema[rows])


# Following the KV cache. transformers passes the cache into the base model's forward as a
# ``transformers.Cache`` object (the argument ``past_key_values`` up to 5.23, ``cache`` from 5.24)
# and returns that object in the forward's output; beam search reorders it in place with
# ``cache.reorder_cache(beam_idx)``. The routing state rides on the object: ``keep_with``,
# ``routed_state`` and ``_reorder_with_routing`` here, used by the hooks
# ``BEMController.before_forward`` and ``after_forward`` (which find the cache by its type).

def keep_with(cache: Cache, controller: nn.Module, state: RoutingState) -> None:
    """Keep ``state`` on the KV cache it belongs to, as ``cache.bem_routing``. The first time, the
    cache's ``reorder_cache`` (beam search's reordering of the beams) is made to reorder the state
    too. The controller is held by a weak reference, so a deep copy of the cache keeps naming the
    controller that routed it (and a copy of the state)."""
    if not hasattr(cache, "bem_routing"):
        cache.reorder_cache = types.MethodType(_reorder_with_routing, cache)
    cache.bem_routing = (weakref.ref(controller), state)


def routed_state(cache: Cache, controller: nn.Module) -> RoutingState | None:
    """The routing state ``controller`` left on ``cache``, None if it did not route that cache."""
    owner, state = getattr(cache, "bem_routing", (None, None))
    return state if owner is not None and owner() is controller else None


def _reorder_with_routing(cache: Cache, beam_idx: Tensor) -> None:
    type(cache).reorder_cache(cache, beam_idx)
    owner, state = cache.bem_routing
    cache.bem_routing = (owner, state.select(beam_idx.to(state.seen.device)))


@dataclass
class RoutingContext:
    """The routing of one forward, read by every BEM layer.

    ``codes[level]`` [B, T, S, r]: effective codes ``s (u c + (1 - u) c_static)``;
    ``dynamic[level]`` [B, T, S, r]: the clamped controller codes ``c``;
    ``uncertainty[level]`` [B, T, 1]: ``u``; ``mask`` [B, T]: real tokens (bool).
    """

    codes: dict[str, Tensor]
    dynamic: dict[str, Tensor]
    uncertainty: dict[str, Tensor]
    mask: Tensor


class Head(nn.Module):
    """``MLP(d_in -> hidden -> d_out)`` with a GELU."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def ema_matrix(k: int, beta: float, device=None, dtype=None) -> Tensor:
    """``A`` [K, K] with ``c_j = sum_i A[j, i] z_i`` for ``z = [c_0, raw_1, ..., raw_{K-1}]``:
    ``A[j, 0] = beta^j``, ``A[j, i] = (1 - beta) beta^(j - i)`` for ``1 <= i <= j``, else 0."""
    j = torch.arange(k, device=device, dtype=dtype)
    powers = torch.tril(beta ** (j[:, None] - j[None, :]).clamp_min(0))
    scale = torch.full((k,), 1 - beta, device=device, dtype=dtype)
    scale[0] = 1.0
    return powers * scale


class BEMController(nn.Module):
    """Computes the codes of all attached modules at once (see the module docstring).

    Args:
        config: the :class:`BEMConfig` (rank, alpha, P, C, beta, max_norm, hidden).
        feature_size: H, the size of the features it routes from.
        slot_levels: the level of each attached module, in slot order (S = its length).

    Only the levels some module uses are computed (chunk also needs the prefix pooling).
    """

    def __init__(self, config: BEMConfig, feature_size: int, slot_levels: list[str]) -> None:
        super().__init__()
        unknown = sorted(set(slot_levels) - set(LEVELS))
        if not slot_levels or unknown:
            raise ValueError(f"slot_levels must be a non-empty list of {LEVELS}, got {slot_levels!r}")
        self.config = config
        self.slot_levels = list(slot_levels)
        self.levels = tuple(level for level in LEVELS if level in slot_levels)
        slots, rank, hidden = len(slot_levels), config.rank, config.hidden
        width = slots * rank + 1
        self.proj = nn.Sequential(nn.Linear(feature_size, hidden), nn.LayerNorm(hidden))
        self.heads = nn.ModuleDict()
        if "token" in self.levels:
            self.heads["token"] = Head(hidden, hidden, width)
        if "prefix" in self.levels or "chunk" in self.levels:
            self.query = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
            self.key = nn.Linear(hidden, hidden, bias=False)
            self.heads["prefix"] = Head(hidden, hidden, width)
        if "chunk" in self.levels:
            self.heads["chunk"] = Head(2 * hidden, hidden, width)
        self.c_static = nn.Parameter(torch.ones(slots, rank))
        # T = softplus(t_raw) per used level, initialised to 1.
        self.temperature_raw = nn.ParameterDict(
            {level: nn.Parameter(torch.tensor(math.log(math.e - 1))) for level in self.levels})
        for level in self.levels:
            index = torch.tensor([s for s, lv in enumerate(slot_levels) if lv == level])
            self.register_buffer(f"slots_{level}", index, persistent=False)
        self.last: RoutingContext | None = None  # the routing of the last forward, read by the layers
        self.state: RoutingState | None = None  # where the last forward left its sequences (a cache keeps its own)
        self.pending: tuple | None = None  # (attention mask, state) armed by the model's pre-hook
        self.running: Tensor | None = None  # telemetry sums since they were last read
        self.forward_args: tuple[str, ...] = ()  # parameter names of the model's forward, set by attach
        self.hooks: list[RemovableHandle] = []  # the handles of the hooks attach installed (detach removes them)

    def _apply(self, fn, recurse=True):
        # Moving or casting the controller drops what it holds from earlier forwards.
        self.last = self.state = self.pending = self.running = None
        return super()._apply(fn, recurse)

    @property
    def num_slots(self) -> int:
        return len(self.slot_levels)

    def slots_of(self, level: str) -> Tensor:
        """Indices [S_level] of the slots whose module uses ``level``."""
        return getattr(self, f"slots_{level}")

    def empty_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> RoutingState:
        h, p, d = self.config.hidden, self.config.prefix_len, self.num_slots * self.config.rank + 1
        return RoutingState(0, torch.zeros(batch, dtype=torch.long, device=device),
                            torch.zeros(batch, p, h, device=device, dtype=dtype),
                            torch.zeros(batch, h, device=device, dtype=dtype),
                            torch.zeros(batch, d, device=device, dtype=dtype))

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: arm routing with the ``attention_mask`` and the state to
        continue. The KV cache is found by its type, not by its argument's name (which moved from
        ``past_key_values`` to ``cache`` in transformers 5.24). An empty cache (or none) starts
        fresh; a cache holding L positions continues the routing state kept with that cache object,
        which must have seen exactly L columns (a cache this controller did not route, or one
        cropped or grown elsewhere, is a one-line error). With ``inputs_embeds`` and no
        ``route_layer``, route now."""
        arguments = {**dict(zip(self.forward_args, args)), **kwargs}
        cache = find_cache(arguments)
        cached = 0 if cache is None else cache.get_seq_length()
        state = None
        if cached:
            state = routed_state(cache, self)
            if state is None:
                raise ValueError(f"the KV cache holds {cached} positions that this BEM controller did not route: "
                                 "continue a cache filled by this model with BEM attached")
            if state.length != cached:
                raise ValueError(f"the KV cache holds {cached} positions but BEM routing of this cache has seen "
                                 f"{state.length}: continue the sequence the controller routed (cropping a cache "
                                 "is not supported)")
        self.pending = (arguments.get("attention_mask"), state)
        embeds = arguments.get("inputs_embeds")
        if embeds is not None and self.config.route_layer is None:
            self.route_from(model, (), embeds)

    def after_forward(self, model: nn.Module, args: tuple, output: Mapping | tuple) -> None:
        """Forward hook of the model: keep the routing state with the KV cache the model returns,
        whether the caller passed that cache in or the model made it (found by type, as in
        :meth:`before_forward`)."""
        cache = find_cache(output if isinstance(output, (Mapping, tuple)) else ())
        if cache is not None and self.state is not None:
            keep_with(cache, self, self.state)

    def route_from(self, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        """Forward hook: route from the module's output ([B, T, H], or a tuple starting with it),
        once per model forward (only when :meth:`before_forward` armed it). Keeps the context in
        ``last``, the state in ``state`` and adds the telemetry sums to ``running`` (no sync).
        During decoding Hugging Face passes the whole sequence's mask: its last T columns are new."""
        if self.pending is None:
            return
        mask, state = self.pending
        self.pending = None
        features = output[0] if isinstance(output, tuple) else output
        length = features.shape[1]
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        elif mask.dim() != 2 or mask.shape[1] < length:
            raise ValueError(f"attention_mask must be [B, >= {length}] (2-D, covering the new tokens), "
                             f"got {list(mask.shape)}")
        self.last, self.state = self.route(features, mask[:, -length:], state)
        with torch.no_grad():
            stats = self.statistics(self.last)
            self.running = stats if self.running is None else self.running + stats

    def route(self, features: Tensor, mask: Tensor, state: RoutingState | None = None,
              ) -> tuple[RoutingContext, RoutingState]:
        """Codes for ``T`` new positions of ``B`` sequences, continuing ``state`` (None: fresh).

        Shapes: ``features`` [B, T, H], ``mask`` [B, T] (nonzero = real token). Returns the
        :class:`RoutingContext` of these T positions and the state after them (detached).
        """
        if features.dim() != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"route expects features [B, T, H] and mask [B, T], got {list(features.shape)} "
                             f"and {list(mask.shape)}")
        batch, length = mask.shape
        dtype = self.c_static.dtype
        if state is None:
            state = self.empty_state(batch, features.device, dtype)
        elif state.seen.shape[0] != batch:
            raise ValueError(f"routing state is for batch {state.seen.shape[0]}, got a batch of {batch} "
                             "(reordering or resizing the batch mid-generation is not supported)")
        mask = mask.bool()
        g = self.proj(features.to(dtype))  # (B, T, h)
        steps = mask.long().cumsum(1)
        pos = (state.seen[:, None] + steps - 1).clamp_min(0)  # (B, T) real tokens before t
        seen = state.seen + steps[:, -1]
        vectors: dict[str, Tensor] = {}
        prefix, chunk_sum, ema = state.prefix, state.chunk_sum, state.ema
        if "token" in self.heads:
            vectors["token"] = self.heads["token"](g)
        if "prefix" in self.heads:
            prefix = self._store_prefix(state.prefix, g, pos, mask)
            pooled = self._pool(prefix, seen)  # (B, P, h)
            slot_vectors = self.heads["prefix"](pooled)  # (B, P, D)
            at_pos = pos.clamp_max(self.config.prefix_len - 1)[..., None].expand(-1, -1, slot_vectors.shape[-1])
            vectors["prefix"] = slot_vectors.gather(1, at_pos)
            if "chunk" in self.heads:
                vectors["chunk"], chunk_sum, ema = self._chunks(g, pos, mask, state, pooled, slot_vectors,
                                                                vectors["prefix"])
        context = RoutingContext({}, {}, {}, mask)
        for level in self.levels:
            context.codes[level], context.dynamic[level], context.uncertainty[level] = self._codes(
                vectors[level], F.softplus(self.temperature_raw[level]))
        new_state = RoutingState(state.length + length, seen, prefix, chunk_sum, ema).detach()
        return context, new_state

    def _store_prefix(self, prefix: Tensor, g: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        """``prefix`` [B, P, h] with the new real tokens at positions < P written in (pads and later
        tokens go to a dropped extra slot P)."""
        p = prefix.shape[1]
        slot = torch.where(mask & (pos < p), pos, p)[..., None].expand_as(g)
        extended = torch.cat([prefix, prefix.new_zeros(prefix.shape[0], 1, prefix.shape[2])], 1)
        return extended.scatter(1, slot, g)[:, :p]

    def _pool(self, prefix: Tensor, seen: Tensor) -> Tensor:
        """``pooled`` [B, P, h]: for every prefix slot p, attention pooling over slots ``j <= p`` that
        hold a real token (``j < seen``): a [P, P] causal masked softmax; empty sets give zeros."""
        p = prefix.shape[1]
        scores = self.key(prefix) @ self.query / math.sqrt(prefix.shape[-1])  # (B, P)
        j = torch.arange(p, device=prefix.device)
        allowed = (j[None, :] <= j[:, None])[None] & (j[None, :] < seen[:, None])[:, None, :]  # (B, P, P)
        scores = scores[:, None, :].masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, -1) * allowed
        return weights @ prefix

    def _chunks(self, g: Tensor, pos: Tensor, mask: Tensor, state: RoutingState, pooled: Tensor,
                slot_vectors: Tensor, prefix_vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Chunk vectors [B, T, D] and the new ``chunk_sum``, ``ema``. Chunks are indexed relative to
        the state's current chunk ``k0 = seen // C``: ``K = (C - 1 + T) // C + 1`` relative chunks
        cover every chunk these T tokens can reach, and the EMA over them is one [K, K] matrix."""
        c, p = self.config.chunk_size, self.config.prefix_len
        batch, length, h = g.shape
        k = (c - 1 + length) // c + 1
        k0 = state.seen // c  # (B,)
        rel = (pos // c - k0[:, None]).clamp(0, k - 1)  # (B, T)
        sums = torch.cat([state.chunk_sum[:, None], g.new_zeros(batch, k - 1, h)], 1)
        sums = sums.scatter_add(1, rel[..., None].expand_as(g), g * mask[..., None])  # (B, K, h)
        # Chunk k >= 1 is reached only once chunk k-1 is complete: its mean is its sum / C.
        absolute = k0[:, None] + torch.arange(1, k, device=g.device)  # (B, K-1)
        summary = pooled.gather(1, (absolute * c - 1).clamp_max(p - 1)[..., None].expand(-1, -1, h))
        raw = self.heads["chunk"](torch.cat([sums[:, :-1] / c, summary], -1))  # (B, K-1, D)
        first = torch.where((k0 == 0)[:, None], slot_vectors[:, min(c, p) - 1], state.ema)  # (B, D): c_k0
        smoothed = torch.einsum("ji,bid->bjd", ema_matrix(k, self.config.beta, g.device, g.dtype),
                                torch.cat([first[:, None], raw], 1))  # (B, K, D)
        width = smoothed.shape[-1]
        vectors = torch.where((pos < c)[..., None], prefix_vectors,
                              smoothed.gather(1, rel[..., None].expand(-1, -1, width)))
        current = ((state.seen + mask.long().sum(1)) // c - k0)[:, None]  # (B, 1): relative chunk of the next token
        chunk_sum = sums.gather(1, current[..., None].expand(-1, -1, h))[:, 0]
        ema = smoothed.gather(1, current[..., None].expand(-1, -1, width))[:, 0]
        return vectors, chunk_sum, ema

    def _codes(self, vector: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Effective code, clamped dynamic code ([B, T, S, r]) and uncertainty ([B, T, 1]) of vectors
        [B, T, S r + 1]."""
        code = vector[..., :-1].unflatten(-1, (self.num_slots, self.config.rank))
        norm = torch.linalg.vector_norm(code, dim=-1, keepdim=True)
        code = code * (self.config.max_norm / norm.clamp_min(self.config.max_norm))
        u = torch.sigmoid(vector[..., -1:] / temperature)
        s = self.config.scaling
        effective = torch.addcmul(s * self.c_static, s * u[..., None], code - self.c_static)  # s (u c + (1-u) c_st)
        return effective, code, u

    def level_terms(self, context: RoutingContext):
        """Per level: (dynamic code, effective code) of the slots at that level [B, T, S_l, r],
        the uncertainty [B, T, 1] and the real-token mask [B, T, 1] (float)."""
        mask = context.mask[..., None].to(self.c_static.dtype)
        for level in self.levels:
            slots = self.slots_of(level)
            yield (context.dynamic[level].index_select(2, slots), context.codes[level].index_select(2, slots),
                   context.uncertainty[level], mask)

    def statistics(self, context: RoutingContext) -> Tensor:
        """The :data:`STATS` sums over real tokens and slots of one forward, as one tensor."""
        totals = []
        for dynamic, effective, u, mask in self.level_terms(context):
            slots, rank = dynamic.shape[2], dynamic.shape[3]
            norm = torch.linalg.vector_norm(dynamic, dim=-1)  # (B, T, S_l)
            real = mask.sum()
            totals.append(torch.stack([
                real * slots, (norm * mask).sum(), (norm.square() * mask).sum(),
                ((effective.abs() > 0.01).sum(-1) * mask).sum(), real * slots * rank,
                (u * mask).sum() * slots, (binary_entropy(u) * mask).sum() * slots,
            ]))
        return torch.stack(totals).sum(0)

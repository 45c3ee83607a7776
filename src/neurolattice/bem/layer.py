"""The BEM layer: a frozen linear map plus a low-rank delta modulated by a per-token code.

.. math::

    y = W x + b + ((x V) \\odot c) U^\\top, \\qquad \\Delta W = U \\operatorname{diag}(c) V^\\top

with ``V`` [in, r] (initialised like PEFT's ``lora_A``: Kaiming-uniform, a = sqrt(5)), ``U``
[out, r] (zeros, so an attached model starts as the base model) and ``c`` [B, T, r] the
effective code of the layer's slot, already scaled by ``s = alpha / r`` (see ``controller.py``).
With ``c = s 1`` the layer is PEFT's LoRA with ``lora_A = V^T`` and ``lora_B = U``.

The code comes from the routing context that the model's controller computed once for the whole
forward (``controller.last``); the layer never runs the controller.

Shapes: ``x`` [B, T, in] -> ``y`` [B, T, out].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .controller import BEMController
from .kernels import add_adapter_


def features_of(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` (weight [out, in]) or transformers' ``Conv1D`` (weight
    [in, out]); anything else is a one-line ``ValueError``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    raise ValueError(f"BEM wraps nn.Linear or transformers' Conv1D, got {type(layer).__name__}")


class BEMLinear(nn.Module):
    """A routed low-rank adapter around ``base_layer`` (see the module docstring).

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to wrap (left as it is).
        slot: this layer's index in the controller's codes ([B, T, S, r] -> [B, T, r]).
        level: the routing level whose codes it reads (``token``, ``chunk`` or ``prefix``).
        rank: r.
        controller: the model's :class:`BEMController` (held by reference, not as a submodule).
        sparse_threshold: > 0 skips tokens whose code entries are all below it (exact; host sync).
    """

    def __init__(self, base_layer: nn.Module, slot: int, level: str, rank: int, controller: BEMController,
                 sparse_threshold: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = features_of(base_layer)
        self.base_layer = base_layer
        self.slot, self.level, self.rank = slot, level, rank
        self.sparse_threshold = sparse_threshold
        weight = base_layer.weight
        lora_a = torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        self.V = nn.Parameter(lora_a.T.contiguous())  # (in, r)
        self.U = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        object.__setattr__(self, "controller", controller)  # a reference: not a submodule of every layer

    def forward(self, x: Tensor) -> Tensor:
        context = self.controller.last
        if context is None:
            raise ValueError("BEM layer called with no routing context: call the whole model, not one layer")
        codes = context.codes[self.level][..., self.slot, :]  # (B, T, r)
        if codes.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"BEM layer input is [{', '.join(map(str, x.shape))}] but the routing context is for "
                             f"[B, T] = {list(codes.shape[:-1])}: call the whole model, not one layer")
        y = self.base_layer(x)
        add_adapter_(y.view(-1, self.out_features), x.reshape(-1, self.in_features), self.V, self.U,
                     codes.reshape(-1, self.rank).to(x.dtype), self.sparse_threshold)
        return y

    def delta_weight(self, code: Tensor) -> Tensor:
        """``U diag(code) V^T`` [out, in] for a constant code [r]."""
        return (self.U * code.to(self.U.dtype)) @ self.V.T

    def merged(self, code: Tensor) -> nn.Module:
        """The base layer with the delta of the constant ``code`` [r] folded into its weight."""
        with torch.no_grad():
            delta = self.delta_weight(code)
            self.base_layer.weight += delta if isinstance(self.base_layer, nn.Linear) else delta.T
        return self.base_layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"level={self.level!r}, slot={self.slot}")

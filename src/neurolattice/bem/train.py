"""Training BEM with the shared trainer: end-to-end on the LM loss, and expert imitation.

End-to-end (:class:`BEMTask`): the base model is frozen; the adapters (U, V) and the
controller train on

.. math::
    L = \\mathrm{CE} + \\lambda_n \\, \\overline{\\lVert c \\rVert^2} + \\lambda_H \\, \\overline{H(u)},

the mean next-token cross-entropy plus the code-norm and gate-entropy regularisers of the
forward's routing (:func:`neurolattice.bem.regularizers`, weights ``code_norm_weight`` and
``entropy_weight`` of the :class:`~neurolattice.bem.BEMConfig`), with AdamW, the controller at
``controller_lr_scale`` times the adapters' learning rate.

Expert imitation (:func:`stack_experts`, :func:`imitation_loss`): given ``E`` static LoRAs of
rank ``r`` trained on separate domains, BEM of rank ``E r`` holds them side by side
(``V = [A_1^T ... A_E^T]``, ``U = [B_1 ... B_E]``), and the controller learns to output, for a
row of domain ``e``, the code that switches expert ``e`` on (its block at the LoRA's scaling,
the rest zero): an MSE on the codes, no LM forward needed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neurolattice.config import Bound, Config
from neurolattice.lm.data import ByteTokenizer
from neurolattice.lm.model import causal_lm
from neurolattice.lm.task import NextTokenTask, heldout_loss

from .attach import adapter_state_dict, attach, load_adapter_state_dict, regularizers
from .config import BEMConfig
from .data import DomainData
from .layer import BEMLinear


@dataclass
class TaskConfig(Config):
    """The BEM-specific knobs of training."""

    controller_lr_scale: float = field(
        default=3.0,
        metadata={"help": "controller learning rate, as a multiple of train.lr (the adapters')",
                  "bound": Bound(float, gt=0)},
    )
    eval_batch_size: int = field(
        default=32, metadata={"help": "rows per forward when evaluating", "bound": Bound(int, gt=0)}
    )


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's parameter names, shapes and bytes: a checkpoint of
    adapters records it, and loading onto a different base model is refused."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class BEMModel(nn.Module):
    """A causal LM with BEM attached and its base frozen, for the trainer.

    Calls go to the LM (``forward``, ``generate``). Its ``state_dict`` is the whole model's, as
    any module's; a checkpoint (:func:`neurolattice.train.checkpoint.checkpoint_tensors`) takes
    :meth:`checkpoint_state_dict`, the BEM tensors only
    (:func:`~neurolattice.bem.adapter_state_dict`): the adapters and the controller, not a copy
    of the base model.
    """

    def __init__(self, lm: nn.Module, config: BEMConfig) -> None:
        super().__init__()
        lm.requires_grad_(False)
        self.lm = attach(lm, config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.lm.generate(*args, **kwargs)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: BEM's (names relative to the LM)."""
        return adapter_state_dict(self.lm)

    def load_checkpoint_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's BEM tensors in (one-line ``ValueError`` if they do not fit)."""
        load_adapter_state_dict(self.lm, tensors)


class BEMTask(NextTokenTask):
    """Next-token prediction on the two-domain mix (:mod:`neurolattice.bem.data`), the LM's loss
    (:class:`~neurolattice.lm.task.NextTokenTask`, activation checkpointing included) plus the
    routing regularisers when the model has BEM attached (a PEFT LoRA trains on the plain LM
    loss). :meth:`evaluate` gives held-out ``loss`` (nats per token) and ``bpb`` per domain."""

    def __init__(self, data: DomainData, bem: BEMConfig | None = None, cfg: TaskConfig | None = None) -> None:
        self.data, self.bem, self.cfg = data, bem, cfg or TaskConfig()
        self.train_data = data.train
        self.byte_lengths = ByteTokenizer().byte_lengths()

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 grad_checkpointing: bool = False) -> torch.Tensor:
        loss = super().loss_sum(model, batch, grad_checkpointing)
        lm = causal_lm(model)
        if self.bem is not None and hasattr(lm, "bem_controller"):
            reg = regularizers(lm)  # means over the batch's tokens: weigh them by its targets
            loss = loss + self.count_targets(batch) * (self.bem.code_norm_weight * reg["code_norm"]
                                                       + self.bem.entropy_weight * reg["entropy"])
        return loss

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        prefix = "lm.bem_controller." if isinstance(model, BEMModel) else "bem_controller."
        return {prefix: self.cfg.controller_lr_scale}

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, float]:
        """``{domain}_loss``, ``{domain}_bpb`` per domain and ``bpb``, their mean (``progress``: a
        bar over each domain's batches)."""
        out = {}
        for domain in self.data.domains:
            for key, value in heldout_loss(model, self.data.heldout[domain], self.byte_lengths,
                                           self.cfg.eval_batch_size, progress=progress and domain).items():
                out[f"{domain}_{key}"] = value
        out["bpb"] = sum(out[f"{d}_bpb"] for d in self.data.domains) / len(self.data.domains)
        return out


def stack_experts(model: nn.Module, experts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
                  expert_scaling: float) -> torch.Tensor:
    """Load ``E`` static LoRAs into the BEM layers of ``model`` side by side; return the
    target code of each expert, ``[E, S, r]`` (block ``e`` at ``expert_scaling``, the rest 0).

    ``experts[e][name] = (A [r_e, in], B [out, r_e])`` for the attached module ``name`` (as in
    ``model.named_modules()``), PEFT's ``lora_A`` / ``lora_B`` weights; BEM's rank must be
    ``E * r_e``. Every attached module needs every expert's pair.
    """
    layers = {name: m for name, m in causal_lm(model).named_modules() if isinstance(m, BEMLinear)}
    n_experts = len(experts)
    rank = next(iter(layers.values())).rank
    if rank % n_experts:
        raise ValueError(f"BEM rank {rank} is not a multiple of the {n_experts} experts")
    r_e = rank // n_experts
    with torch.no_grad():
        for name, layer in layers.items():
            for e, expert in enumerate(experts):
                if name not in expert:
                    raise ValueError(f"expert {e} has no LoRA for the attached module {name!r}")
                a, b = expert[name]
                if a.shape[0] != r_e:
                    raise ValueError(f"expert {e}'s LoRA for {name!r} has rank {a.shape[0]}, expected {r_e}")
                layer.V[:, e * r_e:(e + 1) * r_e] = a.T
                layer.U[:, e * r_e:(e + 1) * r_e] = b
    n_slots = len(layers)
    target = torch.zeros(n_experts, n_slots, rank)
    for e in range(n_experts):
        target[e, :, e * r_e:(e + 1) * r_e] = expert_scaling
    return target


def imitation_loss(model: nn.Module, inputs: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the effective codes the controller gives the real
    tokens of ``inputs`` ``[B, T]`` and ``target`` ``[B, S, r]`` (each row's expert code), each
    slot at its own level. Only the controller runs (on the input embeddings), not the LM."""
    lm = causal_lm(model)
    controller = lm.bem_controller
    if controller.config.route_layer is not None:
        raise ValueError("expert imitation routes from the input embeddings: route_layer must be none")
    context, _ = controller.route(lm.get_input_embeddings()(inputs), mask)
    weights = mask.to(target.dtype)[..., None, None]  # [B, T, 1, 1]
    squared, count = 0.0, 0.0
    for level, codes in context.codes.items():
        slots = controller.slots_of(level)
        diff = codes.index_select(2, slots) - target.index_select(1, slots)[:, None]  # [B, T, S_l, r]
        squared = squared + (diff.square() * weights).sum()
        count = count + weights.sum() * diff[0, 0].numel()
    return squared / count.clamp_min(1)

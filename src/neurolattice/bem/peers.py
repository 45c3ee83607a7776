"""PEFT's adapters, BEM's peers in the study and the benchmark: a static LoRA and X-LoRA."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def static_lora(base: nn.Module, rank: int, alpha: float, targets: list[str], random_b: bool = False) -> nn.Module:
    """A copy of ``base`` with PEFT's LoRA (rank ``rank``, ``lora_alpha`` ``alpha``, no
    dropout) on the modules named ``targets``; ``random_b``: B is random instead of zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        init_lora_weights=not random_b)
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(copy.deepcopy(base), config)


def x_lora(base: nn.Module, adapter_dirs: dict[str, str]) -> nn.Module:
    """A copy of ``base`` with PEFT's X-LoRA over the saved LoRAs ``{name: directory}``."""
    from peft import XLoraConfig, get_peft_model

    model = copy.deepcopy(base)
    model.config.use_cache = False  # X-LoRA's scaling pass asks for it
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=adapter_dirs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def lora_weights(peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name in the base model: (A [r, in], B [out, r])}`` of a PEFT LoRA."""
    out = {}
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = (module.lora_A["default"].weight.detach().clone(),
                                                          module.lora_B["default"].weight.detach().clone())
    return out

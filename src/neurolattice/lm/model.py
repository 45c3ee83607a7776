"""The language model: a Hugging Face ``LlamaForCausalLM`` built from an :class:`LMConfig`.

Built from a config alone (nothing downloads) and saved with ``save_pretrained``
(safetensors), so ``AutoModelForCausalLM.from_pretrained(run_dir)`` and the BEM adapters load
it like any Hub model. The input embedding and the output head are tied by default, as in
GPT-2 and nanoGPT; ``tie_embeddings=False`` unties them.

FLOPs per token follow the PaLM appendix B / nanoGPT ``estimate_mfu`` convention: ``6 N`` for
the forward and backward matmuls of the ``N`` parameters a token multiplies by, plus
``12 L d T`` for the attention scores and weighted values at context ``T`` (counted as if the
mask were full, as that convention does).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache

from .config import LMConfig
from .data import ByteTokenizer


def llama_config(cfg: LMConfig) -> LlamaConfig:
    """The ``LlamaConfig`` of ``cfg``: no biases, no dropout, one KV head per query head."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.eod_id, eos_token_id=cfg.eod_id, pad_token_id=None,
    )


def build_model(cfg: LMConfig) -> LlamaForCausalLM:
    """A freshly initialised model (seed the global RNG first for a reproducible init)."""
    return LlamaForCausalLM(llama_config(cfg))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total``: distinct parameters (a tied table once); ``embedding``: the input table
    ``V x d``; ``matmul``: the ``N`` a token multiplies by, ``total - embedding`` plus the
    ``V x d`` output head (which, untied, is already in ``total - embedding``)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    return {"total": total, "embedding": embedding, "matmul": total - embedding + (head.numel() if tied else 0)}


def flops_per_token(model: nn.Module, seq_len: int | None = None) -> int:
    """Training FLOPs per token, ``6 N + 12 L d T`` (see the module docstring), at context
    ``T = seq_len`` (default: the model's maximum positions)."""
    c = model.config
    context = c.max_position_embeddings if seq_len is None else seq_len
    return 6 * count_parameters(model)["matmul"] + 12 * c.num_hidden_layers * c.hidden_size * context


def continue_prompt(model: nn.Module, eod: int, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                    greedy: bool = False, seed: int = 0, tokenizer=None) -> str:
    """``prompt`` and its continuation by ``model.generate`` (``tokenizer``'s tokens, bytes by
    default, after an end-of-document ``eod``, KV cache): at most ``max_new_tokens`` tokens, the
    most likely each step (``greedy``) or one sampled at ``temperature`` from the RNG seeded with
    ``seed``."""
    tokenizer = tokenizer or ByteTokenizer()
    ids = torch.cat([torch.tensor([eod]), tokenizer.encode(prompt)])[None]  # (1, T)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=eod,
                             pad_token_id=eod, max_new_tokens=max_new_tokens, **sampling)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:])


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside its wrappers (DDP, BEM's ``BEMModel``, a PEFT model): the
    first ``PreTrainedModel`` among ``model.modules()``."""
    found = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if found is None:
        raise ValueError(f"{type(model).__name__} holds no Hugging Face PreTrainedModel")
    return found


# The KV cache moved between transformers releases: ``past_key_values`` up to 5.23, ``cache`` from
# 5.24 (which still accepts the old name, with a warning). These find it by its type instead.

def cache_keyword(model: nn.Module) -> str:
    """The keyword under which the causal LM inside ``model`` takes its KV cache."""
    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"


def find_cache(values: Iterable[Any] | Mapping[str, Any]) -> Cache | None:
    """The first KV cache among ``values`` (a forward's arguments, a model output's fields, or a
    tuple output), None if there is none."""
    values = values.values() if isinstance(values, Mapping) else values
    return next((value for value in values if isinstance(value, Cache)), None)

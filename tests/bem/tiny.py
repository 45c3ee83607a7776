"""Tiny random causal LMs and left-padded batches for the BEM tests."""

import contextlib

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from neurolattice.bem.layer import BEMLinear
from neurolattice.lm.config import LMConfig
from neurolattice.lm.model import build_model

VOCAB = 64


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def lm_system(seed: int = 0):
    """The LM the project trains itself (a LlamaForCausalLM with the byte vocabulary)."""
    torch.manual_seed(seed)
    return build_model(LMConfig(d_model=32, n_layers=2, n_heads=4, ffn_size=48, seq_len=128)).eval()


MODELS = {"llama": llama, "gpt2": gpt2, "lm": lm_system}


def batch(lengths: list[int], total: int, vocab: int = VOCAB, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, total] (pad id 0) and attention mask with ``lengths[b]`` real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def randomize_adapters(model, seed: int = 2, std: float = 0.3):
    """Non-zero ``U`` (zero at attach) so that the adapters change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BEMLinear):
                module.U.copy_(torch.randn(module.U.shape, generator=gen) * std)
    return model


def confidence_zero(model):
    """Uncertainty u = 0 everywhere: every head's logit output is -1e4 (sigmoid underflows to 0)."""
    with torch.no_grad():
        for head in model.bem_controller.heads.values():
            head.mlp[-1].weight[-1].zero_()
            head.mlp[-1].bias[-1] = -1e4
    return model


def logit_terms(model, keys: int, rank: int = 0, codes: int = 0) -> int:
    """``terms`` of :func:`tests.bounds.float32_bound` for a logit of these tiny LMs: the lengths of
    the float32 sums chained on its longest path. Per decoder layer: the attention's norm (LayerNorm:
    mean, then variance, 2H; RMSNorm: H), input projection (H), scores (head_dim), softmax sum and
    weighted sum over ``keys``, output projection (H); the MLP's norm, input projection (H) and
    output projection (its intermediate size); then the final norm and the head (H). Adapters of
    rank ``rank`` lengthen the four projections on that path by ``rank`` each; ``codes`` is the
    chain of the codes (:func:`routing_terms`; 0 when they are exact), which reaches the first
    adapter alongside the first norm's."""
    config = model.config
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    norm = 2 * hidden if config.model_type == "gpt2" else hidden
    layer = 2 * norm + 3 * hidden + hidden // config.num_attention_heads + 2 * keys + inner + 4 * rank
    return config.num_hidden_layers * layer + max(codes - norm, 0) + norm + hidden


def routing_terms(model, length: int) -> int:
    """The chain of float32 sums before a BEM code of ``model``, its longest level: the controller's
    projection (the embedding width) and LayerNorm (2h); token: the head (h, h); prefix: the
    pooling (key h, score h, softmax sum and weighted sum over P), then the head (h, h); chunk: the
    longer of the prefix pooling and a chunk's sum (C), the chunk head (2h, h) and the EMA across
    the chunks of ``length`` positions; then the per-slot norm clamp (r)."""
    config = model.bem_config
    h, pooling = config.hidden, 2 * config.hidden + 2 * config.prefix_len
    per_level = {"token": 2 * h, "prefix": pooling + 2 * h,
                 "chunk": max(pooling, config.chunk_size) + 3 * h + length // config.chunk_size + 1}
    start = model.get_input_embeddings().embedding_dim + 2 * h
    return start + max(per_level[level] for level in model.bem_controller.levels) + config.rank


@contextlib.contextmanager
def one_thread():
    """Run tiny models on one intra-op thread: a second one only adds contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

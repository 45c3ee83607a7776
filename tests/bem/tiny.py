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


@contextlib.contextmanager
def one_thread():
    """Run tiny models on one intra-op thread: a second one only adds contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

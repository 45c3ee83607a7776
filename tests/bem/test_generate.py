"""Generation with the KV cache equals generation by full recomputation, at every routing level.

Chunks of C = 4 and a prefix of P = 8 tokens: decoding crosses chunk boundaries and the prefix
end. U is random (zero at attach) so that the adapters change the tokens.
"""

import pytest
import torch

from neurolattice.bem import BEMConfig, attach
from neurolattice.bem.controller import routed_state
from neurolattice.lm.model import find_cache

from ..bounds import float32_bound
from .tiny import MODELS, batch, logit_terms, one_thread, randomize_adapters, routing_terms


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


NEW = 64


def recompute(model, ids, mask, steps):
    """Greedy decoding that calls the model on the whole sequence at each step, without a cache."""
    step_logits = []
    for _ in range(steps):
        with torch.no_grad():
            positions = (mask.cumsum(1) - 1).clamp_min(0)  # as generate derives them from the mask
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        step_logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids, torch.stack(step_logits)


@pytest.mark.parametrize("level", ["token", "chunk", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_equals_recomputation(arch, level):
    model = randomize_adapters(attach(MODELS[arch](), BEMConfig(rank=4, hidden=16, chunk_size=4, prefix_len=8,
                                                                level=level)))
    base = MODELS[arch]()
    ids, mask = batch([11, 6], 11)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 11 + NEW)
    # routing saw every position generate fed (the last token is never fed back), past the prefix
    # and across many chunks, and the state kept with the cache generate returns is that one
    assert model.bem_controller.state.seen.tolist() == [11 + NEW - 1, 6 + NEW - 1]
    assert routed_state(find_cache(out), model.bem_controller) is model.bem_controller.state
    expected, expected_logits = recompute(model, ids, mask, NEW)
    assert torch.equal(out.sequences, expected)
    # float32: cached keys and routing state vs all recomputed, the same sums in other orders; terms: the
    # sums chained on a logit's path, codes and both layers, over <= 75 keys (see logit_terms).
    keys = out.sequences.shape[1]
    terms = logit_terms(model, keys, rank=4, codes=routing_terms(model, keys))
    assert (torch.stack(out.logits) - expected_logits).abs().max().item() <= float32_bound(expected_logits,
                                                                                            terms=terms)
    with torch.no_grad():  # the adapters matter: the base model would have picked other tokens
        plain = base(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)).logits.argmax(-1)
    assert not torch.equal(plain[:, 10:-1], out.sequences[:, 11:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search_with_the_cache_equals_beam_search_without(arch):
    """Beam search reorders the cache between steps; the routing state follows it."""
    model = randomize_adapters(attach(MODELS[arch](), BEMConfig(rank=4, hidden=16, chunk_size=4, prefix_len=8,
                                                                level="chunk")), std=1.0)
    ids, mask = batch([9, 5], 9)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, num_beams=3, num_return_sequences=3,
                  do_sample=False, pad_token_id=0, length_penalty=0.0, output_scores=True,
                  return_dict_in_generate=True)
    cached, recomputed = model.generate(**kwargs), model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    # float32: a score sums 16 log-probs, each a logit's chain (see logit_terms) plus the log-softmax's sum
    # over the vocabulary; each errs relative to its own size, and those sizes add up to |score|.
    keys = cached.sequences.shape[1]
    terms = (logit_terms(model, keys, rank=4, codes=routing_terms(model, keys)) + model.config.vocab_size
             + kwargs["max_new_tokens"])
    bound = float32_bound(recomputed.sequences_scores, terms=terms)
    assert (cached.sequences_scores - recomputed.sequences_scores).abs().max().item() <= bound

"""attach / detach / merge on Hugging Face models: identity, PEFT equivalence, hooks, errors."""

import copy
import os
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

import neurolattice.bem
from neurolattice.bem import (
    BEMConfig,
    adapter_state_dict,
    attach,
    bem_parameters,
    detach,
    load_adapter_state_dict,
    merge,
    regularizers,
    routing,
    telemetry,
)
from neurolattice.bem.layer import BEMLinear
from neurolattice.lm.model import cache_keyword, find_cache

from ..bounds import float32_bound
from ..errors import one_line_error
from .tiny import MODELS, batch, confidence_zero, gpt2, llama, logit_terms, one_thread, randomize_adapters


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


SMALL = dict(rank=4, hidden=16, chunk_size=4, prefix_len=8)


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


CACHE_KEYWORD = cache_keyword(llama())  # the KV cache's argument name moved in transformers 5.24


def cached(cache):
    return {CACHE_KEYWORD: cache, "use_cache": True}


def inputs_for(model):
    return batch([12, 7], 12, vocab=model.config.vocab_size)


@pytest.mark.parametrize("level", ["token", "chunk", "prefix"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_attached_model_equals_base(arch, level):
    model = MODELS[arch]()
    ids, mask = inputs_for(model)
    base = logits(model, ids, mask)
    attach(model, BEMConfig(level=level, **SMALL))
    assert torch.equal(logits(model, ids, mask), base)  # U = 0: every adapter adds an exact +0.0
    randomize_adapters(model)
    assert (logits(model, ids, mask) - base).abs().max().item() > 1e-3  # the adapters are live


def test_route_layer_attaches_after_it_and_routes_from_its_output():
    model = llama()
    ids, mask = inputs_for(model)
    base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    attach(model, BEMConfig(route_layer=0, **SMALL))
    names = [n for n, m in model.named_modules() if isinstance(m, BEMLinear)]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    seen = []
    route = model.bem_controller.route
    model.bem_controller.route = lambda f, m, s: seen.append(f) or route(f, m, s)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.logits, base.logits)  # U = 0: the base model's forward, exactly
    assert len(seen) == 1 and torch.equal(seen[0], base.hidden_states[1])


def levels_by_suffix(model):
    return {n.rsplit(".", 1)[-1] if "c_proj" not in n else n.rsplit(".", 2)[-2] + ".c_proj": m.level
            for n, m in model.named_modules() if isinstance(m, BEMLinear)}


def test_default_tables():
    model = attach(llama(), BEMConfig(**SMALL))
    assert levels_by_suffix(model) == {"q_proj": "token", "k_proj": "chunk", "v_proj": "chunk", "o_proj": "token",
                                       "gate_proj": "token", "up_proj": "token", "down_proj": "token"}
    assert model.bem_controller.num_slots == 2 * 7
    model = attach(gpt2(), BEMConfig(**SMALL))
    assert levels_by_suffix(model) == {"c_attn": "chunk", "attn.c_proj": "token", "mlp.c_proj": "token",
                                       "c_fc": "token"}
    assert model.bem_controller.num_slots == 2 * 4
    model = attach(gpt2(), BEMConfig(level="prefix", **SMALL))
    assert set(levels_by_suffix(model).values()) == {"prefix"}
    model = attach(llama(), BEMConfig(targets={"q_proj": "token", "mlp.up_proj": "prefix"}, **SMALL))
    assert levels_by_suffix(model) == {"q_proj": "token", "up_proj": "prefix"}
    assert [m.slot for m in model.modules() if isinstance(m, BEMLinear)] == list(range(4))


def test_unknown_model_type_falls_back_to_the_names_it_has():
    model = gpt2()
    model.config.model_type = "my-gpt"
    attach(model, BEMConfig(**SMALL))
    assert set(levels_by_suffix(model)) == {"c_attn", "attn.c_proj", "mlp.c_proj", "c_fc"}


def peft_twin(model, bem_model, fan_in_fan_out):
    """A PEFT LoRA of ``model`` on the same modules, holding the BEM model's U and V."""
    layers = {n: m for n, m in bem_model.named_modules() if isinstance(m, BEMLinear)}
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    config = LoraConfig(r=4, lora_alpha=12, target_modules=suffixes, lora_dropout=0.0, init_lora_weights=False,
                        fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, layer in layers.items():
            lora = peft_model.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.copy_(layer.V.T)
            lora.lora_B["default"].weight.copy_(layer.U)
    return peft_model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_confidence_equals_peft_lora(arch):
    model = MODELS[arch]()
    ids, mask = inputs_for(model)
    bem_model = attach(copy.deepcopy(model), BEMConfig(alpha=12.0, **SMALL))
    randomize_adapters(bem_model)
    confidence_zero(bem_model)
    reference = peft_twin(model, bem_model, fan_in_fan_out=arch == "gpt2")
    expected = logits(reference, ids, mask)
    # float32: u = 0 makes every code exactly s = 3, and BEM's ((x V) s) U^T rounds otherwise than PEFT's
    # ((x V) U^T) s; terms: the sums chained on a logit's path through both layers (see logit_terms).
    bound = float32_bound(expected, terms=logit_terms(model, ids.shape[1], rank=SMALL["rank"]))
    assert (logits(bem_model, ids, mask) - expected).abs().max().item() <= bound
    for u in routing(bem_model).uncertainty.values():
        assert (u == 0).all()
    with torch.no_grad():
        bem_model.bem_controller.c_static.mul_(1.5)  # the fallback code is what PEFT's scaling is
    assert (logits(bem_model, ids, mask) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_folds_the_static_code(arch):
    model = attach(MODELS[arch](), BEMConfig(**SMALL)).double()  # float64: merging is exact up to rounding
    randomize_adapters(model)
    confidence_zero(model)
    with torch.no_grad():
        model.bem_controller.c_static.normal_()
    ids, mask = inputs_for(model)
    expected = logits(model, ids, mask)
    merged = merge(copy.deepcopy(model))
    assert not any(isinstance(m, BEMLinear) for m in merged.modules()) and not hasattr(merged, "bem_controller")
    assert (logits(merged, ids, mask) - expected).abs().max().item() <= 1e-10
    code = torch.randn(model.bem_controller.num_slots, 4, dtype=torch.float64)
    with torch.no_grad():
        model.bem_controller.c_static.copy_(code / model.bem_config.scaling)
    assert (logits(merge(copy.deepcopy(model), code), ids, mask) - logits(model, ids, mask)).abs().max() <= 1e-10
    with pytest.raises(ValueError, match=r"merge code must be \[S, r\]"):
        merge(model, code[:, :2])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_detach_restores_the_model(arch):
    model = MODELS[arch]()
    ids, mask = inputs_for(model)
    base = logits(model, ids, mask)
    keys = set(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    randomize_adapters(attach(model, BEMConfig(**SMALL)))
    detach(model)
    assert {n: type(m) for n, m in model.named_modules()} == types and set(model.state_dict()) == keys
    assert not hasattr(model, "bem_config") and not model.base_model._forward_pre_hooks
    assert torch.equal(logits(model, ids, mask), base)
    attach(model, BEMConfig(**SMALL))  # attachable again


def count_routes(model):
    calls = []
    route = model.bem_controller.route
    model.bem_controller.route = lambda *args: calls.append(1) or route(*args)
    return calls


def test_controller_runs_once_per_forward():
    model = attach(llama(), BEMConfig(**SMALL))
    calls = count_routes(model)
    ids, mask = inputs_for(model)
    logits(model, ids, mask)
    assert len(calls) == 1
    forwards = []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(calls) == 1 + len(forwards) == 1 + 5


BEM_DIR = os.path.dirname(neurolattice.bem.__file__)
SYNCS = ["item", "tolist", "cpu", "__bool__", "__int__", "__float__", "nonzero"]


def forbid_host_sync(monkeypatch):
    """Make the host-syncing tensor methods raise when called from BEM's own code."""
    def guard(name, original):
        def patched(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(BEM_DIR):
                raise AssertionError(f"host sync: {name} called from {caller}")
            return original(*args, **kwargs)
        return patched

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", guard("torch.nonzero", torch.nonzero))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_makes_no_host_sync(arch, monkeypatch):
    model = randomize_adapters(attach(MODELS[arch](), BEMConfig(level="token", **SMALL)))
    ids, mask = inputs_for(model)
    cache = DynamicCache()
    forbid_host_sync(monkeypatch)
    with pytest.raises(AssertionError, match="host sync"):  # the guard works
        exec(compile("torch.ones(1).item()", os.path.join(BEM_DIR, "probe.py"), "exec"), {"torch": torch})
    out = model(input_ids=ids, attention_mask=mask, **cached(cache))
    step = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=step, **cached(cache))
    regularizers(model)["code_norm"].backward()


def test_sparse_application_syncs_and_is_caught(monkeypatch):
    model = attach(llama(), BEMConfig(sparse_threshold=0.1, **SMALL))
    ids, mask = inputs_for(model)
    forbid_host_sync(monkeypatch)
    with pytest.raises(AssertionError, match="host sync"):
        logits(model, ids, mask)


def test_inputs_embeds_route_like_input_ids():
    model = randomize_adapters(attach(llama(), BEMConfig(**SMALL)))
    ids, mask = inputs_for(model)
    calls = count_routes(model)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert len(calls) == 1
    assert torch.equal(from_embeds, logits(model, ids, mask))  # the same embeddings, the same forward


def test_parameters_state_dict_and_device_moves_include_the_controller():
    model = attach(llama(), BEMConfig(**SMALL))
    groups = bem_parameters(model)
    assert len(groups["adapters"]) == 2 * 14
    assert {id(p) for p in groups["controller"]} == {id(p) for p in model.bem_controller.parameters()}
    ids_all = {id(p) for p in model.parameters()}
    assert all(id(p) in ids_all for p in groups["controller"] + groups["adapters"])
    assert any(k.startswith("bem_controller.") for k in model.state_dict())
    model.double()
    assert model.bem_controller.c_static.dtype == torch.float64
    ids, mask = inputs_for(model)
    logits(model, ids, mask)


def test_adapter_state_dict_round_trip_and_errors():
    source = randomize_adapters(attach(llama(), BEMConfig(**SMALL)))
    with torch.no_grad():
        source.bem_controller.c_static.normal_()
    tensors = {k: v.clone() for k, v in adapter_state_dict(source).items()}
    assert all(k.startswith("bem_controller.") or k.endswith((".U", ".V")) for k in tensors)
    assert "model.layers.0.self_attn.q_proj.U" in tensors
    target = attach(llama(), BEMConfig(**SMALL))
    load_adapter_state_dict(target, tensors)
    ids, mask = inputs_for(source)
    assert torch.equal(logits(target, ids, mask), logits(source, ids, mask))
    missing = dict(tensors)
    missing.pop("model.layers.0.self_attn.q_proj.U")
    with one_line_error("missing"):
        load_adapter_state_dict(target, missing)
    bad = {**tensors, "model.layers.0.self_attn.q_proj.V": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"q_proj.V must be \[32, 4\], got \[3, 3\]"):
        load_adapter_state_dict(target, bad)


def test_regularizers_and_telemetry_match_direct_computation():
    model = attach(llama(), BEMConfig(**SMALL))
    ids, mask = inputs_for(model)
    model(input_ids=ids, attention_mask=mask)
    context = routing(model)
    real = mask.bool()
    norms_sq, entropies, norms, active, entries, us = [], [], [], 0, 0, []
    levels = model.bem_controller.slot_levels
    for slot, level in enumerate(levels):
        dynamic = context.dynamic[level][:, :, slot][real]  # (N, r)
        u = context.uncertainty[level][real][:, 0]
        norms_sq.append(dynamic.square().sum(-1))
        norms.append(dynamic.norm(dim=-1))
        entropies.append(-(u * u.log() + (1 - u) * (1 - u).log()))
        us.append(u)
        effective = context.codes[level][:, :, slot][real]
        active += (effective.abs() > 0.01).sum().item()
        entries += effective.numel()
    reg = regularizers(model)
    assert reg["code_norm"].requires_grad and reg["entropy"].requires_grad
    # float32 means, summed in another order: terms = the n values summed (a squared norm or a norm
    # also sums r squares first), scale = the largest of them.
    norms_sq, entropies, norms, us = (torch.cat(v) for v in (norms_sq, entropies, norms, us))
    n, r = len(norms), SMALL["rank"]
    assert abs(reg["code_norm"].item() - norms_sq.mean().item()) <= float32_bound(norms_sq, terms=n + r)
    assert abs(reg["entropy"].item() - entropies.mean().item()) <= float32_bound(entropies, terms=n)
    stats = telemetry(model)
    assert abs(stats["code_norm_mean"] - norms.mean().item()) <= float32_bound(norms, terms=n + r)
    # the variance mean(x^2) - mean^2 errs by the n + r chain on x^2, and on mean^2 by twice the mean's
    # (scale x^2: 3 (n + r) terms); sqrt divides that by sqrt(var) + sqrt(var') >= the reference std.
    std = norms.std(unbiased=False).item()
    assert abs(stats["code_norm_std"] - std) <= float32_bound(norms.square(), terms=3 * (n + r)) / std
    assert stats["active_share"] == active / entries  # integer counts: exact in float32
    assert abs(stats["uncertainty_mean"] - us.mean().item()) <= float32_bound(us, terms=n)
    assert abs(stats["routing_entropy"] - entropies.mean().item()) <= float32_bound(entropies, terms=n)
    assert stats["level_usage_token"] == 10 / 14 and stats["level_usage_chunk"] == 4 / 14
    assert telemetry(model)["code_norm_mean"] != telemetry(model)["code_norm_mean"]  # read resets: NaN


def test_errors_are_one_line():
    with one_line_error("no module of LlamaForCausalLM"):
        attach(llama(), BEMConfig(targets={"nope": "token"}))
    with one_line_error("already attached"):
        attach(attach(llama(), BEMConfig()), BEMConfig())
    with one_line_error("rank must be a positive integer, got 0"):
        BEMConfig(rank=0)
    with one_line_error("level must be one of"):
        BEMConfig(level="layer")
    with one_line_error(r"beta must be a number in \[0, 1\)"):
        BEMConfig(beta=1.0)
    with one_line_error("max_norm must be"):
        BEMConfig(max_norm=-1)
    with one_line_error("sparse_threshold must be"):
        BEMConfig(sparse_threshold=float("nan"))
    with one_line_error("k_proj.*not allowed"):
        BEMConfig(targets={"k_proj": "token"})
    with one_line_error("c_attn.*not allowed"):
        BEMConfig(targets={"attn.c_attn": "token"})
    with one_line_error("targets"):
        BEMConfig(targets={"q_proj": "sequence"})
    with one_line_error("route_layer"):
        BEMConfig(route_layer=-1)
    with one_line_error(r"unknown BEMConfig key\(s\) \[.rnak.\]"):
        BEMConfig.from_dict({"rank": 4, "rnak": 4})
    with one_line_error("route_layer must be < 1"):
        attach(llama(), BEMConfig(route_layer=1))
    with one_line_error("embed_tokens.*Embedding"):
        attach(llama(), BEMConfig(targets={"embed_tokens": "prefix"}))
    with one_line_error("config must be a BEMConfig"):
        attach(llama(), {"rank": 4})
    with one_line_error("no BEM attached"):
        detach(llama())


def test_cache_that_the_controller_did_not_route_is_refused():
    model = attach(llama(), BEMConfig(**SMALL))
    ids, mask = inputs_for(model)
    step = torch.cat([mask, mask[:, :1]], 1)
    foreign = DynamicCache()  # filled by the same weights without BEM
    llama()(input_ids=ids, attention_mask=mask, **cached(foreign))
    with one_line_error("KV cache holds 12 positions that this BEM controller did not route"):
        model(input_ids=ids[:, :1], attention_mask=step, **cached(foreign))
    other = DynamicCache()  # routed by another controller (a copy of this model)
    copy.deepcopy(model)(input_ids=ids, attention_mask=mask, **cached(other))
    with one_line_error("KV cache holds 12 positions that this BEM controller did not route"):
        model(input_ids=ids[:, :1], attention_mask=step, **cached(other))
    cropped = DynamicCache()
    model(input_ids=ids, attention_mask=mask, **cached(cropped))
    cropped.crop(-4)  # drop the last 4 positions
    with one_line_error("KV cache holds 8 positions but BEM routing of this cache has seen 12"):
        model(input_ids=ids[:, :1], attention_mask=step[:, :9], **cached(cropped))


def test_routing_state_stays_with_its_cache():
    """Forwards of other sequences in between (with no cache or another one) do not disturb the
    continuation of a cache: its routing state is kept with it."""
    model = randomize_adapters(attach(llama(), BEMConfig(level="chunk", **SMALL)))
    ids, mask = inputs_for(model)
    step = torch.cat([mask, mask[:, :1]], 1)
    token = ids[:, -1:]

    def continuation(interleave, cache=None):
        with torch.no_grad():  # a cache passed in, or (None) the one the model makes and returns
            out = model(input_ids=ids, attention_mask=mask, **cached(cache))
        interleave()
        return logits(model, token, step, **cached(find_cache(out)))

    alone = continuation(lambda: None, DynamicCache())
    assert model.bem_controller.state.length == 13
    interleaved = continuation(lambda: (logits(model, ids[:, :3], mask[:, :3]),
                                        logits(model, ids[:, 5:], mask[:, 5:], **cached(DynamicCache()))))
    assert torch.equal(alone, interleaved)
    recomputed = logits(model, torch.cat([ids, token], 1), step)[:, -1:]
    # float32: the cached and the recomputed logit are the same sums in other orders (attention over
    # <= 13 keys, matmuls over <= 48 terms); bound: eps32 x terms x the logits' magnitude.
    assert (alone - recomputed).abs().max().item() <= float32_bound(recomputed, terms=48)


def test_deep_copy_routes_with_its_own_controller():
    model = randomize_adapters(attach(llama(), BEMConfig(**SMALL)))
    ids, mask = inputs_for(model)
    expected = logits(model, ids, mask)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, ids, mask), expected)
    assert twin.bem_controller.last is not model.bem_controller.last
    with torch.no_grad():
        twin.bem_controller.c_static.mul_(2)
    assert not torch.equal(logits(twin, ids, mask), expected)
    detach(twin)
    assert torch.equal(logits(model, ids, mask), expected)  # the original keeps its hooks and codes


def test_training_step_reaches_every_bem_parameter_also_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = randomize_adapters(attach(llama(), BEMConfig(level="token", **SMALL)))
        if checkpointing:  # transformers 5 renamed it
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        ids, mask = inputs_for(model)
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        reg = regularizers(model)
        (out.loss + reg["code_norm"] + reg["entropy"]).backward()
        groups = bem_parameters(model)
        missing = [i for i, p in enumerate(groups["controller"] + groups["adapters"]) if p.grad is None]
        assert not missing
        grads.append(torch.cat([p.grad.flatten() for p in groups["controller"] + groups["adapters"]]))
    # float32: the recomputed layers run the same ops, but autograd may sum a gradient's contributions
    # in another order; bound: eps32 x (2 rows x 12 positions summed) x |grad|.
    assert (grads[0] - grads[1]).abs().max().item() <= float32_bound(grads[0], terms=ids.numel())


def test_calling_the_base_model_directly_routes_too():
    model = randomize_adapters(attach(llama(), BEMConfig(**SMALL)))
    ids, mask = inputs_for(model)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        logits(model, ids[:1, :5], mask[:1, :5])  # a different last routing context
        body = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(body, full)

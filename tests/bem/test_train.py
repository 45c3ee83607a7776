"""BEM training: the task's loss and learning rates, the frozen base, adapter-only state dicts,
and the expert stacking of imitation, against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from neurolattice.bem import BEMConfig
from neurolattice.bem.attach import regularizers
from neurolattice.bem.data import DomainData
from neurolattice.bem.layer import BEMLinear
from neurolattice.bem.peers import lora_weights, static_lora
from neurolattice.bem.train import BEMModel, BEMTask, TaskConfig, base_fingerprint, imitation_loss, stack_experts
from neurolattice.lm.data import PackedDataset
from neurolattice.train import TrainConfig, Trainer

from ..bounds import float32_bound
from .tiny import lm_system

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_data(rows: int = 8, seq: int = 16) -> DomainData:
    torch.manual_seed(1)
    data = torch.randint(0, 257, (rows, seq + 1))
    data[1, -5:] = -100  # padding: targets that do not count
    domain = torch.arange(rows) % 2
    return DomainData(PackedDataset(data), domain, {"python": PackedDataset(data[:2]),
                                                    "prose": PackedDataset(data[2:4])})


def randomize(model: BEMModel) -> None:
    """Non-zero U (zero at attach) so the adapters change the output."""
    torch.manual_seed(2)
    for _, m in model.lm.named_modules():
        if isinstance(m, BEMLinear):
            m.U.data.normal_(0, 0.1)


def test_loss_is_cross_entropy_plus_weighted_regularizers():
    data = tiny_data()
    bem = BEMConfig(rank=4, level="chunk", chunk_size=4, prefix_len=8, code_norm_weight=0.3, entropy_weight=0.2)
    model = BEMModel(lm_system(), bem)
    randomize(model)
    task = BEMTask(data, bem)
    batch = data.train[torch.arange(4)]
    loss = task.loss_sum(model, batch)
    logits = model(input_ids=batch[0], use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), ignore_index=-100, reduction="sum")
    reg = regularizers(model.lm)
    n = (batch[1] != -100).sum()
    assert n == 4 * 16 - 5
    assert torch.equal(loss, ce + n * (0.3 * reg["code_norm"] + 0.2 * reg["entropy"]))  # the same ops, recomputed
    assert reg["code_norm"] > 0 and reg["entropy"] > 0


def test_attached_model_at_step_zero_has_the_base_loss():
    data = tiny_data()
    base = lm_system()
    bem = BEMConfig(rank=4, code_norm_weight=0.0, entropy_weight=0.0)
    batch = data.train[torch.arange(4)]
    want = BEMTask(data).loss_sum(copy.deepcopy(base), batch)
    # U = 0: every adapter adds an exact +0.0; the regularisers' weights 0 add an exact 0.0
    assert torch.equal(BEMTask(data, bem).loss_sum(BEMModel(base, bem), batch), want)


def saved_for_backward(fn):
    """``fn()`` and the bytes of the tensors autograd keeps for its backward: the activation
    memory that sets a training step's peak, counted exactly (activation checkpointing keeps its
    layers' tensors under its own hooks, so they are not counted here: it recomputes them)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, total


def test_grad_checkpointing_lowers_activation_memory_and_keeps_loss_and_gradients():
    data = tiny_data()
    bem = BEMConfig(rank=4, level="chunk", chunk_size=4, prefix_len=8)
    model = BEMModel(lm_system(), bem).train()
    randomize(model)
    task, batch = BEMTask(data, bem), data.train[torch.arange(4)]
    results = {}
    for on in (False, True):
        loss, saved = saved_for_backward(lambda on=on: task.loss_sum(model, batch, grad_checkpointing=on))
        model.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[on] = loss.detach(), saved, grads
    assert model.lm.is_activation_checkpointing if hasattr(model.lm, "is_activation_checkpointing") \
        else model.lm.is_gradient_checkpointing
    (loss_off, saved_off, grads_off), (loss_on, saved_on, grads_on) = results[False], results[True]
    assert torch.equal(loss_on, loss_off)  # the same forward, recomputed
    assert saved_on < 0.7 * saved_off, (saved_on, saved_off)  # the decoder layers keep nothing
    # float32: the recomputed layers run the same ops, but autograd may sum a gradient's
    # contributions in another order; bound: eps32 x (64 rows x 16 positions summed) x |grad|.
    assert (grads_on - grads_off).abs().max().item() <= float32_bound(grads_off, terms=4 * 16)


def test_training_moves_only_adapters_and_controller_at_their_learning_rates():
    data = tiny_data()
    bem = BEMConfig(rank=4)
    model = BEMModel(lm_system(), bem)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    task = BEMTask(data, bem, TaskConfig(controller_lr_scale=5.0))
    trainer = Trainer(model, task, TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1))
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    controller = list(model.lm.bem_controller.parameters())
    adapters = [p for _, m in model.lm.named_modules() if isinstance(m, BEMLinear) for p in (m.U, m.V)]
    assert set(lrs) == {id(p) for p in controller + adapters}  # the base is not trained
    assert {lrs[id(p)] for p in controller} == {5e-2} and {lrs[id(p)] for p in adapters} == {1e-2}
    for _ in range(3):
        trainer.train_step()
    after = model.lm.state_dict()
    bem_names = {k for k in after if ".U" in k[-2:] or ".V" in k[-2:] or k.startswith("bem_controller.")}
    for name, value in after.items():
        if name not in bem_names:
            assert torch.equal(value, before[name]), name
    assert all(not torch.equal(after[k], before[k]) for k in bem_names if k.endswith(".U"))


def test_checkpoint_state_dict_is_the_bem_tensors_and_round_trips():
    data = tiny_data()
    model = BEMModel(lm_system(), BEMConfig(rank=4, level="prefix", prefix_len=4))
    randomize(model)
    sd = model.checkpoint_state_dict()
    assert sd.keys() == {k for k in model.lm.state_dict() if k.startswith("bem_controller.")
                         or k.endswith((".U", ".V"))}
    assert set(model.state_dict()) == {f"lm.{k}" for k in model.lm.state_dict()}  # a module's, whole
    other = BEMModel(lm_system(), BEMConfig(rank=4, level="prefix", prefix_len=4))
    other.load_checkpoint_state_dict({k: v.clone() for k, v in sd.items()})
    x = data.train[torch.arange(2)][0]
    torch.testing.assert_close(other(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="U"):
        other.load_checkpoint_state_dict({k: v for k, v in sd.items() if not k.endswith(".U")})


def test_fingerprint_tells_base_models_apart():
    assert base_fingerprint(lm_system(0)) == base_fingerprint(lm_system(0))
    assert base_fingerprint(lm_system(0)) != base_fingerprint(lm_system(1))


def test_stacked_experts_reproduce_each_lora_with_its_target_code():
    base = lm_system()
    experts = []
    for e in range(2):
        torch.manual_seed(10 + e)
        experts.append(lora_weights(static_lora(base, 2, 4, TARGETS, random_b=True)))
    model = BEMModel(copy.deepcopy(base), BEMConfig(rank=4, alpha=8))
    target = stack_experts(model, experts, expert_scaling=2.0)  # lora_alpha / r
    assert target.shape == (2, model.lm.bem_controller.num_slots, 4)
    layers = [(n, m) for n, m in model.lm.named_modules() if isinstance(m, BEMLinear)]
    for e in range(2):
        for name, layer in layers:
            a, b = experts[e][name]
            want = 2.0 * b @ a
            # float32: another matmul (rank 4 with codes 2 and 0, vs rank 2) may round the rank-r sum
            # otherwise; scale: the delta
            bound = float32_bound(want, terms=layer.rank)
            assert (layer.delta_weight(target[e, layer.slot]) - want).abs().max().item() <= bound
    # and imitation's loss is zero exactly when the controller outputs the target codes
    controller = model.lm.bem_controller
    x = torch.randint(0, 257, (2, 6))
    with torch.no_grad():
        for head in controller.heads.values():
            last = head.mlp[-1]
            last.weight.zero_()
            last.bias.zero_()
            last.bias[-1] = -1e4  # confidence u = 0: the static code
        controller.c_static.copy_(target[0] / model.lm.bem_config.scaling)
    assert imitation_loss(model, x, torch.ones_like(x), target[[0, 0]]) < 1e-12
    assert imitation_loss(model, x, torch.ones_like(x), target[[0, 1]]) > 0.1

"""Attach BEM to a Hugging Face causal LM, and everything done to an attached model.

``attach`` wraps the target modules in :class:`BEMLinear`, adds the controller as
``model.bem_controller`` and installs three hooks that run it once per forward:

1. a forward pre-hook on the base model, ``model.base_model`` (:meth:`BEMController.before_forward`),
   which arms routing with the mask and the routing state of the KV cache passed in;
2. a forward hook on the input embedding, or on decoder layer ``route_layer``
   (:meth:`BEMController.route_from`), which routes from that module's output;
3. a forward hook on the base model (:meth:`BEMController.after_forward`), which keeps the new
   routing state with the KV cache the model returns.

The routing context (``model.bem_controller.last``) is then read by every BEM layer. The hooks
are bound methods of the controller, so a deep copy of an attached model routes with its own
controller. Their handles are kept in ``model.bem_controller.hooks`` and :func:`detach` removes
the hooks with them. A handle holds its module's hook dicts by weak reference, but it is copied
through its state, the dicts themselves: in a deep copy of the model that state resolves (by
``deepcopy``'s memo) to the copy's dicts, so the copy's handles remove the copy's hooks only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import MODEL_TYPES, TABLES, BEMConfig
from .controller import STATS, BEMController, RoutingContext, binary_entropy
from .layer import BEMLinear, features_of


def target_levels(model: nn.Module, config: BEMConfig) -> dict[str, str]:
    """Module-name suffix -> level: ``config.targets``, or the default table of the model's
    architecture (by ``model.config.model_type``, else whichever table's names the model has)."""
    if config.targets is not None:
        return dict(config.targets)
    family = MODEL_TYPES.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        family = next((f for f, table in TABLES.items() if names & set(table)), None)
    if family is None:
        raise ValueError(f"no BEM target table fits {type(model).__name__}: it has none of the module names "
                         f"{sorted({n for t in TABLES.values() for n in t})}; pass BEMConfig(targets=...)")
    return {suffix: config.level_of(suffix) for suffix in TABLES[family]}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``nn.ModuleList`` of the model's decoder layers (the list whose length is
    ``num_hidden_layers``)."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"found no list of {count} decoder layers in {type(model).__name__}")


def attach(model: nn.Module, config: BEMConfig) -> nn.Module:
    """Wrap the target modules of ``model`` in place with routed adapters and return it.

    Every matching ``nn.Linear`` / ``Conv1D`` gets one code slot, in model order. Adds
    ``model.bem_controller`` (so ``.to()``, ``.parameters()`` and ``state_dict()`` include it) and
    ``model.bem_config``; freezes nothing. ``U`` starts at zero: the model's outputs are unchanged.
    """
    if not isinstance(config, BEMConfig):
        raise ValueError(f"config must be a BEMConfig, got {type(config).__name__}")
    if hasattr(model, "bem_controller"):
        raise ValueError("BEM is already attached to this model: detach(model) first")
    levels = target_levels(model, config)
    after, list_name = -1, ""
    if config.route_layer is not None:
        list_name, layers = decoder_layers(model)
        if config.route_layer >= len(layers) - 1:
            raise ValueError(f"route_layer must be < {len(layers) - 1} (the last decoder layer leaves nothing to "
                             f"adapt after it), got {config.route_layer}")
        after = config.route_layer
    matches = []
    for name, module in model.named_modules():
        suffix = next((s for s in levels if name == s or name.endswith("." + s)), None)
        if suffix is None or (after >= 0 and _layer_index(name, list_name) <= after):
            continue
        try:
            features_of(module)
        except ValueError as err:
            raise ValueError(f"module {name} matches target {suffix!r}: {err}") from None
        matches.append((name, levels[suffix]))
    if not matches:
        raise ValueError(f"no module of {type(model).__name__} matches the BEM targets {sorted(levels)}"
                         + (f" after decoder layer {after}" if after >= 0 else ""))
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight
    controller = BEMController(config, embeddings.embedding_dim, [level for _, level in matches])
    controller.to(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
    for slot, (name, level) in enumerate(matches):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, BEMLinear(getattr(owner, child), slot, level, config.rank, controller,
                                        config.sparse_threshold))
    model.bem_controller = controller
    model.bem_config = config
    source = embeddings if config.route_layer is None else decoder_layers(model)[1][config.route_layer]
    # The pre-hook sits on the base model (LlamaModel, GPT2Model): the causal-LM head passes it the
    # mask and cache, and a direct call of the base model routes too.
    body = getattr(model, "base_model", model)
    controller.forward_args = tuple(inspect.signature(body.forward).parameters)
    controller.hooks = [body.register_forward_pre_hook(controller.before_forward, with_kwargs=True),
                        body.register_forward_hook(controller.after_forward),
                        source.register_forward_hook(controller.route_from)]
    return model


def _layer_index(name: str, list_name: str) -> int:
    """The decoder-layer index in a module name (``model.layers.3.mlp.up_proj`` -> 3), -1 if none."""
    head = list_name + "."
    return int(name[len(head):].split(".", 1)[0]) if name.startswith(head) else -1


def _controller(model: nn.Module) -> BEMController:
    controller = getattr(model, "bem_controller", None)
    if not isinstance(controller, BEMController):
        raise ValueError(f"{type(model).__name__} has no BEM attached: call attach(model, config) first")
    return controller


def bem_layers(model: nn.Module) -> list[tuple[str, BEMLinear]]:
    """The BEM layers of ``model`` with their names, in slot order."""
    _controller(model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BEMLinear)]


def _unwrap(model: nn.Module, replacement: Callable[[BEMLinear], nn.Module]) -> nn.Module:
    """Replace every BEM layer by ``replacement(layer)``, remove the hooks, controller and config."""
    controller = _controller(model)
    for name, layer in bem_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement(layer))
    for handle in controller.hooks:
        handle.remove()
    del model.bem_controller
    del model.bem_config
    return model


def detach(model: nn.Module) -> nn.Module:
    """Restore the original modules (their weights untouched) and remove everything BEM added."""
    return _unwrap(model, lambda layer: layer.base_layer)


def merge(model: nn.Module, code: Tensor | None = None) -> nn.Module:
    """Fold the delta ``U diag(code_slot) V^T`` of a constant code into every wrapped weight, then
    detach. ``code`` [S, r] is an effective code (scaling included); None: the static fallback
    ``s * c_static``, i.e. the model with uncertainty zero everywhere."""
    controller = _controller(model)
    shape = (controller.num_slots, controller.config.rank)
    if code is None:
        code = controller.config.scaling * controller.c_static.detach()
    elif tuple(code.shape) != shape:
        raise ValueError(f"merge code must be [S, r] = {list(shape)}, got {list(code.shape)}")
    return _unwrap(model, lambda layer: layer.merged(code[layer.slot]))


def bem_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{"controller": [...], "adapters": [U, V of every BEM layer]}`` (for separate learning rates)."""
    controller = _controller(model)
    adapters = [p for _, layer in bem_layers(model) for p in (layer.U, layer.V)]
    return {"controller": list(controller.parameters()), "adapters": adapters}


def routing(model: nn.Module) -> RoutingContext:
    """The last forward's routing context: effective codes per level [B, T, S, r] (with grad),
    uncertainty per level [B, T, 1], mask [B, T]."""
    context = _controller(model).last
    if context is None:
        raise ValueError("no routing yet: run a forward of the model first")
    return context


def regularizers(model: nn.Module) -> dict[str, Tensor]:
    """From the last forward, with grad: ``code_norm``, the mean over real tokens and slots of
    ``||c_dyn||^2``; ``entropy``, the mean binary entropy of the uncertainty ``u`` over real
    tokens and slots."""
    controller = _controller(model)
    context = routing(model)
    norm_sq = entropy = count = 0.0
    for dynamic, _, u, mask in controller.level_terms(context):
        slots = dynamic.shape[2]
        norm_sq = norm_sq + (dynamic.square().sum(-1) * mask).sum()
        entropy = entropy + (binary_entropy(u) * mask).sum() * slots
        count = count + mask.sum() * slots
    count = count.clamp_min(1)
    return {"code_norm": norm_sq / count, "entropy": entropy / count}


def telemetry(model: nn.Module) -> dict[str, float]:
    """Routing statistics over the real tokens of the forwards since the last call (reading them
    synchronises with the device and resets them; NaN when no forward ran): ``code_norm_mean``,
    ``code_norm_std`` (norm of the dynamic code per slot), ``active_share`` (share of effective
    code entries with |c| > 0.01), ``uncertainty_mean`` (mean u), ``routing_entropy`` (mean binary
    entropy of u, in nats: 0 when every module is sure whether to route or fall back, log 2 at
    u = 1/2), ``level_usage_<level>`` (share of modules at each level)."""
    controller = _controller(model)
    levels = controller.slot_levels
    usage = {f"level_usage_{level}": levels.count(level) / len(levels) for level in controller.levels}
    running, controller.running = controller.running, None
    if running is None:
        return {"code_norm_mean": math.nan, "code_norm_std": math.nan, "active_share": math.nan,
                "uncertainty_mean": math.nan, "routing_entropy": math.nan, **usage}
    sums = dict(zip(STATS, running.tolist()))
    n = max(sums["slot_tokens"], 1.0)
    mean = sums["norm"] / n
    return {
        "code_norm_mean": mean,
        "code_norm_std": math.sqrt(max(sums["norm_sq"] / n - mean * mean, 0.0)),
        "active_share": sums["active"] / max(sums["entries"], 1.0),
        "uncertainty_mean": sums["uncertainty"] / n,
        "routing_entropy": sums["routing_entropy"] / n,
        **usage,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the BEM tensors: ``bem_controller.*`` and ``<module name>.U`` / ``.V`` of every layer."""
    controller = _controller(model)
    tensors = {f"bem_controller.{k}": v for k, v in controller.state_dict().items()}
    for name, layer in bem_layers(model):
        tensors[f"{name}.U"] = layer.U.detach()
        tensors[f"{name}.V"] = layer.V.detach()
    return tensors


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """Copy BEM tensors saved by :func:`adapter_state_dict` into the attached ``model``; missing,
    unexpected or misshaped tensors are a one-line ``ValueError`` (nothing is copied then)."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"BEM adapter tensors do not fit this model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(f"BEM adapter tensor {key} must be {list(value.shape)}, got {list(tensors[key].shape)}")
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])
    return model

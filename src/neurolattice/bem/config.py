"""Configuration of BEM, routed low-rank adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from neurolattice.config import Bound, Config

LEVELS = ("token", "chunk", "prefix")

# Projections whose output goes into the KV cache (a fused QKV counts as one): they may not use
# token codes, or a cached key or value would depend on the code of the token that wrote it only.
KV_NAMES = frozenset({"k_proj", "v_proj", "c_attn", "qkv_proj", "query_key_value", "W_pack", "Wqkv"})

# Default targets per architecture family: module-name suffixes, in model order.
TABLES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
# ``model.config.model_type`` -> table; other types use whichever table's names the model has.
MODEL_TYPES = {"llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama", "gpt2": "gpt2"}


def is_kv_name(suffix: str) -> bool:
    """Whether the module-name suffix (``"k_proj"``, ``"attn.c_attn"``) names a K/V-type projection."""
    return suffix.rsplit(".", 1)[-1] in KV_NAMES


@dataclass
class BEMConfig(Config):
    """Which modules get a routed adapter, at which routing level, and the controller's sizes.

    A BEM module computes ``y = W x + b + ((x V) * c) U^T`` with ``c`` the effective code of its
    slot, ``c = s (u c_dyn + (1 - u) c_static)`` and ``s = alpha / rank`` (see ``layer.py`` and
    ``controller.py``).
    """

    rank: int = field(
        default=8, metadata={"help": "adapter rank r (size of every code slot)", "bound": Bound(int, gt=0)}
    )
    level: str = field(
        default="token",
        metadata={"help": f"routing level of Q/O/MLP modules, one of {LEVELS}; K/V-type modules get "
                          "'chunk' when this is 'token', else this level", "bound": Bound(choices=LEVELS)},
    )
    alpha: float = field(
        default=16.0,
        metadata={"help": "LoRA alpha: the codes are scaled by s = alpha / rank", "bound": Bound(float, gt=0)},
    )
    targets: dict[str, str] | None = field(
        default=None,
        metadata={"help": "module-name suffix -> level (e.g. {'q_proj': 'token', 'v_proj': 'chunk'}); "
                          "none: the architecture's default table at `level`"},
    )
    prefix_len: int = field(
        default=128, metadata={"help": "P: tokens pooled into the prefix summary", "bound": Bound(int, gt=0)}
    )
    chunk_size: int = field(
        default=32, metadata={"help": "C: tokens per chunk of the chunk level", "bound": Bound(int, gt=0)}
    )
    beta: float = field(
        default=0.9,
        metadata={"help": "EMA factor across chunks, c_k = beta c_k-1 + (1-beta) raw_k",
                  "bound": Bound(float, ge=0, lt=1, says="a number in [0, 1)")},
    )
    max_norm: float = field(
        default=3.0, metadata={"help": "per-slot norm clamp of the dynamic code", "bound": Bound(float, gt=0)}
    )
    hidden: int = field(default=64, metadata={"help": "controller width", "bound": Bound(int, gt=0)})
    route_layer: int | None = field(
        default=None,
        metadata={"help": "none: route from the input embeddings; l: from the hidden state after decoder "
                          "layer l, attaching only modules of layers > l", "bound": Bound(int, ge=0, optional=True)},
    )
    sparse_threshold: float = field(
        default=0.0,
        metadata={"help": "skip tokens whose code entries are all below this (exact; syncs the host; 0 = off)",
                  "bound": Bound(float, ge=0)},
    )
    entropy_weight: float = field(
        default=1e-3, metadata={"help": "weight of the uncertainty-entropy regulariser", "bound": Bound(float, ge=0)}
    )
    code_norm_weight: float = field(
        default=1e-3, metadata={"help": "weight of the code-norm regulariser", "bound": Bound(float, ge=0)}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None:
            if not isinstance(self.targets, dict) or not self.targets:
                raise ValueError(f"targets must be a non-empty dict of module-name suffix -> level, "
                                 f"got {self.targets!r}")
            for suffix, level in self.targets.items():
                if not isinstance(suffix, str) or not suffix:
                    raise ValueError(f"targets keys must be module-name suffixes, got {suffix!r}")
                if level not in LEVELS:
                    raise ValueError(f"targets[{suffix!r}] must be one of {LEVELS}, got {level!r}")
                if level == "token" and is_kv_name(suffix):
                    raise ValueError(f"targets[{suffix!r}] = 'token' is not allowed: K/V-type projections feed "
                                     "the KV cache and must use 'chunk' or 'prefix' codes")

    @property
    def scaling(self) -> float:
        """``s = alpha / rank``, folded into the codes."""
        return self.alpha / self.rank

    def level_of(self, suffix: str) -> str:
        """The default level of a module with this name suffix: ``level``, or ``chunk`` for a
        K/V-type module when ``level`` is ``token``."""
        return "chunk" if self.level == "token" and is_kv_name(suffix) else self.level

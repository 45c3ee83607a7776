"""BEM: routed low-rank adapters for any Hugging Face causal LM (spec: shared/spec/bem.md).

``attach(model, BEMConfig(rank=8, level="token"))`` wraps the model's projections in place with
adapters whose codes a small controller computes once per forward, by token, chunk or prefix.
"""

from .attach import (
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
from .config import BEMConfig

__all__ = [
    "BEMConfig", "attach", "detach", "merge", "bem_parameters", "regularizers", "telemetry", "routing",
    "adapter_state_dict", "load_adapter_state_dict",
]

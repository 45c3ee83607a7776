"""BEM: routed low-rank adapters for any Hugging Face causal LM.

``attach(model, BEMConfig(rank=8, level="token"))`` wraps the model's projections in place with
adapters whose codes a small controller computes once per forward, by token, chunk or prefix.

Laid out as every system is: ``config.py`` (:class:`BEMConfig`), the model modules
``controller.py``, ``layer.py`` (with ``kernels/``) and ``attach.py``, ``reference.py`` (the
per-token oracle), the task ``train.py`` (with its data, ``data.py``, and the PEFT peers,
``peers.py``), ``experiment.py`` (a run's base, configs, loading a saved run), ``commands.py``,
``study.py`` (``neurolattice bem experiment``) and ``bench.py``.
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

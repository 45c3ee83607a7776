"""The suite's float32 tolerance: a bound that follows from float32 rounding and the size of the values.

Exactness is proven in float64 (bounds like 1e-10 there); a float32 comparison only checks that two
evaluations of one formula, rounding in different orders (another summation order, blocking, a fused
kernel, another CPU's vector width), agree as closely as float32 allows. Such a bound must not be a
number raised until one machine passes: it is computed from the rounding unit and the data.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23, twice the unit roundoff u of float32


def float32_bound(*values: torch.Tensor | float, terms: int) -> float:
    """``terms * EPS32 * scale``: the most two float32 evaluations of one formula may differ by.

    Each rounded operation errs by at most u = EPS32 / 2 relative to its result. An output that is,
    at its deepest, a chain of ``terms`` accumulated roundings (the length of the longest sum, times
    the depth of the layers it passes) whose partial results stay within ``scale`` errs by at most
    ``terms * u * scale`` in each evaluation (the worst-case bound of recursive summation, Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 4.2), so two evaluations
    differ by at most ``terms * EPS32 * scale``. ``scale`` is the largest magnitude among
    ``values``: pass the output and any intermediate larger than it.
    """
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    scale = max(float(torch.as_tensor(v).detach().abs().max()) for v in values)
    return terms * EPS32 * scale

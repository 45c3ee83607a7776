"""The lattice model's task: supervised learning on a :class:`~neurolattice.data.Dataset`
(digits or the user's ``.npz``, :mod:`neurolattice.data`) and its held-out figures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm import tqdm

from neurolattice.data import Dataset, score
from neurolattice.train import Task

from .model import LatticeModel

SCALE_LIMIT = 10.0      # the root mean square of a standardised feature is 1


def scale_warning(data: Dataset) -> str | None:
    """One line saying that ``data``'s features are not standardised, if some feature's root mean
    square over the training split is above :data:`SCALE_LIMIT`; else None. The lattice model
    reads ``x`` as given (its encoder is one linear map), so the user standardises it."""
    rms = float(data.x_train.flatten(1).square().mean(0).sqrt().max())
    if rms <= SCALE_LIMIT:
        return None
    return (f"warning: the features of {data.name} are not standardised (a feature's root mean square over the "
            f"training split is {rms:.4g}, above {SCALE_LIMIT:g}) and the lattice model reads them as given: "
            f"standardise x in the .npz (docs/lattice.md, \"Your data\"); the scikit-learn baselines scale their own")


@torch.no_grad()
def predict(model: LatticeModel, x: torch.Tensor, steps: int | None = None, batch_size: int = 256,
            progress: str | bool = False) -> torch.Tensor:
    """Model outputs for ``x`` in batches, on the model's device, returned on the CPU.
    ``progress``: the description of a bar over the batches (False: no bar)."""
    device = next(model.parameters()).device
    starts = tqdm(range(0, len(x), batch_size), desc=progress or None, unit="batch", dynamic_ncols=True,
                  disable=not progress)
    return torch.cat([model(x[i:i + batch_size].to(device), steps=steps).cpu() for i in starts])


def held_out(model: LatticeModel, data: Dataset, steps: int | None = None,
             progress: str | bool = False) -> dict[str, float]:
    """:func:`~neurolattice.data.score` of ``model`` (run for ``steps``, default its own ``T``)
    on ``data``'s test split (``progress``: see :func:`predict`)."""
    return score(predict(model, data.x_test, steps=steps, progress=progress), data.y_test, data.task)


class LatticeTask(Task):
    """Supervised learning on a :class:`Dataset` for the shared trainer: cross-entropy for
    classification, squared error for regression; a target is a sample (classification) or
    one regressed value."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.train_data = TensorDataset(data.x_train, data.y_train)

    def count_targets(self, batch) -> int:
        return batch[1].numel()

    def loss_sum(self, model, batch, grad_checkpointing: bool = False) -> torch.Tensor:
        x, y = batch
        out = model(x, grad_checkpointing=grad_checkpointing)
        if self.data.task == "classification":
            return F.cross_entropy(out, y, reduction="sum")
        return F.mse_loss(out, y, reduction="sum")

    def evaluate(self, model) -> dict[str, float]:
        metrics = held_out(model, self.data)
        return {k: v for k, v in metrics.items() if k != "ci95"}


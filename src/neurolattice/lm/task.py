"""Language modelling as a :class:`~neurolattice.train.Task` of the shared trainer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from neurolattice.train import Task

from .config import LMConfig
from .data import IGNORE, LMData, PackedDataset
from .model import causal_lm


class NextTokenTask(Task):
    """Next-token prediction on packed rows; a target is a label that is not :data:`IGNORE`.

    A batch is ``(inputs [B, T], labels [B, T])``, int64, ``labels[b, t]`` the token after
    ``inputs[b, t]``. :meth:`loss_sum` is the summed cross-entropy in nats, so the trainer's
    division by the step's target count makes micro-batches of any sizes weigh right; it turns
    the model's activation checkpointing on or off as the trainer asks. Subclasses give the
    data (``train_data``) and :meth:`evaluate`.
    """

    def count_targets(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (batch[1] != IGNORE).sum()

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 grad_checkpointing: bool = False) -> torch.Tensor:
        inputs, labels = batch
        _set_checkpointing(causal_lm(model), grad_checkpointing)
        logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


class LMTask(NextTokenTask):
    """Language modelling on :class:`LMData` (see :class:`NextTokenTask` for batches and loss).

    :meth:`evaluate` scores the held-out rows in bits per byte,

    .. math::
        \\mathrm{bpb} = \\frac{\\sum_{\\text{targets}} -\\ln p(\\text{target})}{\\ln 2 \\cdot \\text{bytes}},

    where the sum runs over every held-out target, end-of-document tokens included (predicting
    where a document ends is part of the model's job), and ``bytes`` counts the bytes of text
    the targets stand for (end-of-document stands for none): the cost of marking document ends
    is charged to the documents' bytes. It also returns ``loss``, the mean nats per target.
    """

    def __init__(self, data: LMData, cfg: LMConfig, eval_batch_size: int = 32) -> None:
        if data.seq_len > cfg.seq_len:
            raise ValueError(f"seq_len {data.seq_len} of the data exceeds the model's maximum positions "
                             f"{cfg.seq_len} (LMConfig.seq_len)")
        if data.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {data.tokenizer.vocab_size} ids but the model's "
                             f"vocab_size is {cfg.vocab_size}")
        if data.tokenizer.eod_id != cfg.eod_id:
            raise ValueError(f"the tokenizer's end-of-document id is {data.tokenizer.eod_id} but the model's "
                             f"eod_id is {cfg.eod_id}")
        self.data, self.eval_batch_size = data, eval_batch_size
        self.train_data = data.train
        self.tokenizer = data.tokenizer.to_transformers()   # saved with every checkpoint
        self.byte_lengths = data.tokenizer.byte_lengths()

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, float]:
        """``heldout_loss`` of the held-out rows (``progress``: a bar over their batches)."""
        return heldout_loss(model, self.data.heldout, self.byte_lengths, self.eval_batch_size,
                            progress=progress and "held-out")


def heldout_loss(model: nn.Module, rows: PackedDataset, byte_lengths: torch.Tensor,
                 batch_size: int = 32, progress: str | bool = False) -> dict[str, float]:
    """``{"loss": nats per target, "bpb": bits per byte}`` of ``model`` on the packed ``rows``
    (see :class:`LMTask`; ``byte_lengths[id]`` is the bytes of text token ``id`` stands for);
    ``{}`` for no rows. One host sync, at the end. ``progress``: the description of a bar over
    the batches (False: no bar)."""
    if len(rows) == 0:
        return {}
    device = next(model.parameters()).device
    byte_lengths = byte_lengths.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    targets = torch.zeros((), dtype=torch.long, device=device)
    nbytes = torch.zeros((), dtype=torch.long, device=device)
    for start in tqdm(range(0, len(rows), batch_size), desc=progress or None, unit="batch", dynamic_ncols=True,
                      disable=not progress):
        inputs, labels = (t.to(device) for t in rows[start:start + batch_size])
        logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                reduction="sum").double()
        valid = labels[labels != IGNORE]
        targets += len(valid)
        nbytes += byte_lengths[valid].sum()
    nats, targets, nbytes = nats.item(), targets.item(), nbytes.item()
    return {"loss": nats / max(targets, 1), "bpb": nats / (math.log(2) * max(nbytes, 1))}


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn a Hugging Face model's activation checkpointing on or off (transformers 5 calls it
    "activation checkpointing", 4 "gradient checkpointing")."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "is_activation_checkpointing"):
        if model.is_activation_checkpointing != on:
            if on:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing != on:
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()

"""A ``torchrun`` worker for test_ddp.py: trains a tiny float64 token model with the shared
trainer and saves its parameters (float64: see test_ddp.SPLIT_BOUND). Run without torchrun it is
a plain single process::

    python -m torch.distributed.run --nproc_per_node 2 tests/train/ddp_worker.py '<jobs as JSON>'

Each job is ``{"out": dir, "until": step or null, "resume": bool, "dropout": p, "lm": bool,
"bpe": bool, "kill_after": k}``: a fresh model (``lm``: the LM system's Llama, shrunk; ``bpe``: the
same on the LM system's own source files, tokenized by a BPE every rank trains for itself) and
:class:`Trainer`
(checkpoints and ``metrics.jsonl`` in ``out``), resumed from ``out`` if asked, fitted to
``until`` (``fit`` saves when it stops). With ``kill_after`` it checkpoints every step and
every rank SIGKILLs itself in step ``k + 1``, after the optimizer update and before the save.
Rank 0 then writes to ``out/result.pt`` the parameters, the steps it ran
and how many backward passes all-reduced the gradients (counted by a DDP communication hook).
Every rank checks first that its parameters equal rank 0's bit for bit, which is what DDP's
synchronised steps promise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from neurolattice.train import Task, TrainConfig, Trainer, distributed

VOCAB, SEQ, SAMPLES = 7, 6, 12
# 8 samples a step in micro-batches of 2: 1 rank x 4 micro-batches, 2 x 2 or 4 x 1
CONFIG = TrainConfig(steps=3, batch_size=8, micro_batch_size=2, warmup_steps=1, lr=0.05, log_every=1)


class Tokens(Task):
    """Next-token prediction with ragged lengths: batch = (tokens [B, T], labels [B, T]) with
    -100 after each sample's length, so micro-batches and ranks hold unequal target counts.
    12 samples in steps of 8: the second step crosses an epoch boundary."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(VOCAB, (SAMPLES, SEQ), generator=g)
        labels = tokens.roll(-1, dims=1)
        lengths = torch.randint(0, SEQ + 1, (SAMPLES,), generator=g)
        labels[torch.arange(SEQ) >= lengths[:, None]] = -100
        self.train_data = TensorDataset(tokens, labels)

    def count_targets(self, batch):
        return (batch[1] != -100).sum()

    def loss_sum(self, model, batch, grad_checkpointing=False):
        logits = model(batch[0])  # (B, T, VOCAB)
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), reduction="sum")


class TinyLM(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.emb(tokens).cumsum(1))))  # (B, T, VOCAB)


class LMTokens(Tokens):
    """The same data for a Hugging Face causal LM (logits in ``.logits``)."""

    def loss_sum(self, model, batch, grad_checkpointing=False):
        logits = model(input_ids=batch[0]).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), reduction="sum")


class BPETokens(LMTokens):
    """The LM system's sources (``src/neurolattice/lm``) tokenized by a BPE of :data:`BPE_VOCAB`
    ids trained on them, the first :data:`SAMPLES` packed rows of ``SEQ`` tokens."""

    def __init__(self) -> None:
        from neurolattice.lm import load_lm_data

        folder = Path(__file__).resolve().parents[2] / "src" / "neurolattice" / "lm"
        data = load_lm_data(folder, seq_len=SEQ, heldout_fraction=0.2, tokenizer="bpe", bpe_vocab_size=BPE_VOCAB)
        self.train_data = TensorDataset(*data.train[torch.arange(SAMPLES)])


BPE_VOCAB = 300


def model(dropout: float = 0.0) -> TinyLM:
    torch.manual_seed(1)
    return TinyLM(dropout).double()


def lm_model(**vocab) -> nn.Module:
    """The LM system's model (``neurolattice.lm``), shrunk to one small layer; ``vocab``:
    ``vocab_size`` and ``eod_id`` for another tokenizer than the bytes."""
    from neurolattice.lm import LMConfig, build_model

    torch.manual_seed(1)
    return build_model(LMConfig.preset("tiny", d_model=16, n_layers=1, n_heads=2, ffn_size=32, seq_len=SEQ,
                                       **vocab)).double()


def run(job: dict) -> None:
    out = Path(job["out"])
    if job.get("bpe"):
        trainer = Trainer(lm_model(vocab_size=BPE_VOCAB, eod_id=0), BPETokens(), CONFIG, out_dir=out)
    elif job.get("lm"):
        trainer = Trainer(lm_model(), LMTokens(), CONFIG, out_dir=out)
    else:
        trainer = Trainer(model(job.get("dropout", 0.0)), Tokens(), CONFIG, out_dir=out)
    if job.get("kill_after") is not None:
        trainer.cfg = dataclasses.replace(CONFIG, checkpoint_every=1)
        train_step = trainer.train_step

        def killed_in_step(k=job["kill_after"]):
            out = train_step()
            if trainer.step == k + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        trainer.train_step = killed_in_step
    if job.get("resume"):
        trainer.resume()
    start, reduced = trainer.step, []
    if isinstance(trainer.ddp_model, DistributedDataParallel):
        def counting_allreduce(state, bucket):
            reduced.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.ddp_model.register_comm_hook(None, counting_allreduce)
    trainer.fit(until=job.get("until"), progress=False)
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    first = distributed.all_gather_object(params)[0]
    for name, value in params.items():
        if not torch.equal(value, first[name]):
            raise AssertionError(f"rank {distributed.rank()}: '{name}' differs from rank 0's "
                                 f"by {(value - first[name]).abs().max().item():.3g}")
    if distributed.is_main():
        torch.save({"params": params, "steps": trainer.step - start, "synced_backwards": reduced.count(0)},
                   out / "result.pt")


def main(jobs: list[dict]) -> None:
    with distributed.init_from_env("cpu"):
        for job in jobs:
            run(job)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
    distributed.exit_process(0)

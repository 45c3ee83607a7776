"""The shared trainer: exact micro-batch accumulation, AdamW with warmup + cosine, clipping,
resumable data order, periodic evaluation, metrics (``metrics.jsonl`` and TensorBoard event
files in the run directory) and atomic checkpoints.

Every gradient-trained system (the lattice model, the LM, BEM adapters) plugs in through a
:class:`Task`; the loop below is the only training loop in the library.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from neurolattice.config import Bound, Config
from neurolattice.io import RunError, atomic_write_text

from . import distributed
from .checkpoint import load_checkpoint, read_trainer_state, save_checkpoint

PRECISIONS = ("fp32", "bf16")
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig(Config):
    """How to train: the optimizer step, its schedule, and the cadence of logs, evals and saves."""

    steps: int = field(
        default=1000, metadata={"help": "optimizer steps of the run (sets the schedule)", "bound": Bound(int, ge=1)}
    )
    batch_size: int = field(
        default=64,
        metadata={"help": "samples per optimizer step, over all micro-batches and ranks", "bound": Bound(int, ge=1)},
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "samples per forward/backward (default: a rank's whole share)",
                  "bound": Bound(int, ge=1, optional=True)},
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of AdamW", "bound": Bound(float, ge=0)})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay of matrices (dim >= 2)", "bound": Bound(float, ge=0)}
    )
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW (beta1, beta2)"})
    warmup_steps: int = field(
        default=100, metadata={"help": "steps of linear warmup from lr/warmup to lr", "bound": Bound(int, ge=0)}
    )
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "final lr of the cosine, as a fraction of lr", "bound": Bound(float, ge=0, le=1)}
    )
    grad_clip: float = field(
        default=1.0, metadata={"help": "max global gradient norm (0: no clipping)", "bound": Bound(float, ge=0)}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the data order and of the RNGs (plus rank)", "bound": Bound(int, ge=0)}
    )
    eval_every: int = field(
        default=0, metadata={"help": "evaluate every N steps and at the end (0: end)", "bound": Bound(int, ge=0)}
    )
    checkpoint_every: int = field(
        default=0,
        metadata={"help": "save every N steps and when training stops (0: when it stops)", "bound": Bound(int, ge=0)},
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "newest checkpoints kept on disk", "bound": Bound(int, ge=1)}
    )
    log_every: int = field(
        default=10, metadata={"help": "log loss, lr and throughput every N steps", "bound": Bound(int, ge=1)}
    )
    grad_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in backward (passed to the task's loss)", "bound": Bound(bool)},
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "'fp32', or 'bf16' autocast of the forward", "bound": Bound(choices=PRECISIONS)},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        mbs = self.micro_batch_size
        if mbs is not None and self.batch_size % mbs:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {mbs}")
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


# Fields that only set the cadence of side effects: a resumed run may change them freely.
RESUME_MAY_CHANGE = ("eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "grad_checkpointing")


class Task(abc.ABC):
    """What a system supplies to the trainer.

    ``train_data`` is anything with ``len()`` whose ``[indices]`` (a LongTensor) returns a batch,
    e.g. a ``torch.utils.data.TensorDataset``; batches are tuples, lists, dicts or tensors, on the
    CPU, moved to the model's device by the trainer. A *target* is one term of the loss: a sample
    in classification, a non-ignored token in language modelling::

        class Digits(Task):          # batch = (x [B, F], y [B])
            def count_targets(self, batch): return len(batch[1])
            def loss_sum(self, model, batch, grad_checkpointing=False):
                return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        class LM(Task):              # batch = (tokens [B, T], labels [B, T], -100 = ignored)
            def count_targets(self, batch): return (batch[1] != -100).sum()
            def loss_sum(self, model, batch, grad_checkpointing=False):
                logits = model(batch[0])
                return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), reduction="sum")
    """

    train_data: Any
    # saved into every checkpoint directory beside the model (anything with ``save_pretrained``,
    # e.g. a transformers tokenizer), or None
    tokenizer: Any = None

    @abc.abstractmethod
    def count_targets(self, batch: Any) -> int | torch.Tensor:
        """Number of targets in ``batch`` (cheap: from its labels, no model)."""

    @abc.abstractmethod
    def loss_sum(self, model: nn.Module, batch: Any, grad_checkpointing: bool = False) -> torch.Tensor:
        """SUM (not mean) of the per-target losses of ``batch``: a scalar with a graph. On several
        ranks ``model`` is the DDP wrapper: call it (its forward prepares the gradient sync); the
        module itself is ``model.module``."""

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers by parameter name prefix (``{"bem_controller.": 3.0}``): a
        trainable parameter gets the scale of the longest prefix of its name that is listed, else
        1. The default: every parameter at the config's ``lr``."""
        return {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; the model is in eval mode, under ``torch.no_grad()``. Called on
        every rank (a task may shard the work and all-reduce); rank 0 logs the result."""
        return {}


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSampler:
    """An endless, resumable stream of sample indices.

    Epoch ``e`` is a permutation of ``range(n)`` from a ``torch.Generator`` seeded by
    ``(seed, e)`` (mixed by numpy's ``SeedSequence``), so the whole stream follows from the
    seed and the position is just ``(epoch, offset)``. A draw that crosses the end of an epoch
    continues into the next.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.seed, self.epoch, self.offset = n, seed, 0, 0
        self._perm = (-1, torch.empty(0, dtype=torch.long))

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            mixed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(mixed)))
        return self._perm[1]

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            part = self.permutation(self.epoch)[self.offset:self.offset + k]
            parts.append(part)
            k -= len(part)
            self.offset += len(part)
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return torch.cat(parts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): ``(step+1)/warmup`` during
    warmup, then a cosine from 1 down to ``min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, lr_scales: dict[str, float], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices (dim >= 2) decay, vectors do not; each at its ``lr_scales`` lr."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = max((k for k in lr_scales if name.startswith(k)), key=len, default=None)
            groups.setdefault((p.dim() >= 2, lr_scales.get(prefix, 1.0)), []).append(p)
    return [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Trains ``model`` on ``task`` as ``cfg`` says; checkpoints and metrics go to ``out_dir``.

    One optimizer step draws ``batch_size`` samples, gives rank ``r`` of ``W`` the ``r``-th of
    ``W`` equal slices, and splits each slice into micro-batches ``b_1..b_M``. With ``l(b)`` the
    summed per-target loss of ``b`` (:meth:`Task.loss_sum`) and ``N`` the number of targets of
    the whole step over all ranks, the step minimises

    .. math::
        L = \\frac{1}{N} \\sum_{r=1}^{W} \\sum_{m=1}^{M} l(b_{r,m}),

    the mean loss per target, whatever the split: each micro-batch backpropagates
    ``W * l(b) / N`` (DDP averages the ``W`` ranks' gradients, hence the ``W``), so one batch of
    ``4n`` and four micro-batches of ``n`` give the same gradient, even when padding leaves the
    micro-batches with different numbers of targets. ``N`` is counted from the labels before any
    forward pass (:meth:`Task.count_targets`, all-reduced over ranks); a step without targets
    counts ``N = 1`` and has zero gradient.

    On several ranks (``torchrun``, the process group from :func:`distributed.init_from_env`)
    every rank makes the same calls; the sampler's global order is the same on all of them, rank
    0 alone writes checkpoints and metrics, and a checkpoint resumes on any number of ranks that
    divides ``batch_size`` (see :meth:`resume` for the RNG states).

    Args:
        model: the module to train, on its device; wrapped in DDP when there are several ranks.
            A model split over the ranks instead of replicated (a sharded lattice,
            :class:`~neurolattice.lattice.shard.ShardedLatticeModel`) says so with an attribute
            ``model_parallel_world``, the number of ranks it spans: it must span them all; every
            rank then runs the whole batch (``W = 1`` above), there is no DDP, and the parameters'
            gradients (each rank's holds its part of the model's) are summed over the ranks in one
            all-reduce after the last micro-batch.
            Seed its initialisation yourself (:func:`seed_everything`); the trainer re-seeds the
            global RNGs with ``cfg.seed + rank`` for the randomness of training (dropout...).
        task: the data, the loss and the evaluation.
        cfg: the :class:`TrainConfig`.
        out_dir: where checkpoints and ``metrics.jsonl`` go (rank 0 writes); None: nowhere.
        model_config: the system's config dict (model and task), saved in ``run_config.json`` under
            ``"model"`` and checked when resuming.
        name: what the progress bar calls the run (``train`` by default).

    Every logged record goes to ``out_dir/metrics.jsonl`` (one JSON object per line) and, as
    scalars at its ``step``, to TensorBoard event files in ``out_dir``
    (``tensorboard --logdir RUN``); a resumed run drops what was logged after its checkpoint
    from both.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        cfg: TrainConfig,
        out_dir: str | os.PathLike | None = None,
        model_config: dict[str, Any] | None = None,
        name: str = "train",
    ) -> None:
        self.model, self.task, self.cfg = model, task, cfg
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.model_config = dict(model_config or {})
        self.name = name
        self._events: Any = None  # the TensorBoard writer, opened at the first log
        self.device = next(model.parameters()).device
        parts = getattr(model, "model_parallel_world", 1)
        if parts not in (1, distributed.world_size()):
            raise ValueError(f"the model is split over {parts} of the {distributed.world_size()} ranks: data "
                             "parallelism over copies of a split model is not supported; split it over every rank")
        self.model_parallel = parts > 1
        # the ranks that split the batch: all of them, or none for a model split over them
        self._data_rank, self._data_world = (0, 1) if self.model_parallel else (distributed.rank(),
                                                                                  distributed.world_size())
        world = self._data_world
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} ranks")
        self.rank_batch = cfg.batch_size // world
        self.micro_batch = cfg.micro_batch_size or self.rank_batch
        if self.rank_batch % self.micro_batch:
            raise ValueError(f"a rank's share of the batch ({cfg.batch_size} / {world} ranks = "
                             f"{self.rank_batch}) is not a multiple of micro_batch_size {self.micro_batch}")
        seed_everything(cfg.seed + distributed.rank())
        self.ddp_model = model if self.model_parallel else distributed.wrap(model)
        self.optimizer = torch.optim.AdamW(_param_groups(model, task.lr_scales(model), cfg), lr=cfg.lr,
                                           betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.sampler = EpochSampler(len(task.train_data), cfg.seed)
        self.step = 0
        self._saved_step = -1
        self._resumed_from: int | None = None
        self._reset_sums()

    def config(self) -> dict[str, Any]:
        return {"model": self.model_config, "train": self.cfg.to_dict()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step (see the class docstring). Gradients stay in ``.grad`` until the
        next step. Returns ``loss_sum`` (this rank's), ``targets`` (``N``, all ranks) and
        ``grad_norm`` (before clipping), as tensors: no host sync, no extra collective."""
        cfg, world = self.cfg, self._data_world
        idx = self.sampler.take(cfg.batch_size)
        idx = idx[self._data_rank * self.rank_batch:][:self.rank_batch]
        batches = [self.task.train_data[i] for i in idx.split(self.micro_batch)]
        local = sum(torch.as_tensor(self.task.count_targets(b)) for b in batches)
        # The step's global target count N: the one place where the ranks' counts meet.
        targets = self._data_sum(local.to(self.device, torch.long))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for m, batch in enumerate(batches):
            last = m == len(batches) - 1  # DDP all-reduces the gradients in this backward only
            with contextlib.nullcontext() if last else distributed.no_sync(self.ddp_model):
                with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
                    l = self.task.loss_sum(self.ddp_model, _to_device(batch, self.device),
                                           grad_checkpointing=cfg.grad_checkpointing)
                (l * world / targets.clamp(min=1)).backward()
            loss_sum += l.detach().float()
        if self.model_parallel:
            distributed.sum_gradients(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss_sum": loss_sum, "targets": targets, "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            return self.task.evaluate(self.model)
        finally:
            self.model.train()

    def fit(self, until: int | None = None, progress: bool = True,
            deadline: float | None = None) -> dict[str, float]:
        """Train up to step ``until`` (default: ``cfg.steps``), logging, evaluating and saving on
        the way, and save when stopping. The logged ``loss`` is the mean per target since the
        previous log (a resumed run carries on the sums of the steps since then, so it logs what
        the uninterrupted run logs). With ``deadline`` (a ``time.monotonic()`` time) training
        also stops, and saves, at the first logging step past it; rank 0's clock decides for
        every rank, in one all-reduce per logging step.

        Ctrl-C (SIGINT, in the main thread) lets the current step finish, saves, and raises
        :class:`Interrupted` (a :class:`~neurolattice.io.RunError` naming the checkpoint); a
        second Ctrl-C interrupts at once. Returns the last logged record."""
        cfg = self.cfg
        end = cfg.steps if until is None else min(until, cfg.steps)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (progress and distributed.is_main()))
        clock, last = time.perf_counter(), {}
        with deferred_interrupt() as interrupted, contextlib.closing(bar), self._events_closed():
            while self.step < end:
                lr = self.optimizer.param_groups[0]["lr"]
                out = self.train_step()
                self._loss_sum += out["loss_sum"]
                self._targets += out["targets"]
                self._since += 1
                bar.update()
                step, record = self.step, {"step": self.step}
                if step % cfg.log_every == 0 or step == end:
                    seconds = time.perf_counter() - clock
                    n = self._targets.item()
                    record |= {"loss": self._data_sum(self._loss_sum).item() / max(n, 1), "lr": lr,
                               "grad_norm": out["grad_norm"].item(),
                               "samples_per_s": self._since * cfg.batch_size / seconds,
                               "targets_per_s": n / seconds}
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                    samples_s=f"{record['samples_per_s']:.1f}",
                                    targets_s=f"{record['targets_per_s']:.1f}")
                    self._reset_sums()
                    clock = time.perf_counter()
                    if deadline is not None and self._past(deadline):
                        end = step
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    record |= {f"eval_{k}": v for k, v in self.evaluate().items()}
                if len(record) > 1:
                    self._log(record)
                    last = record
                stop = self._any(interrupted())
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end or stop:
                    self.save()
                if stop:
                    raise Interrupted(self.step, cfg.steps, self._checkpoint_path())
        return last

    def _reset_sums(self) -> None:
        """Start the sums of the next logging interval (this rank's loss, all ranks' targets)."""
        self._loss_sum = torch.zeros((), device=self.device)
        self._targets = torch.zeros((), dtype=torch.long, device=self.device)
        self._since = 0

    def _data_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks that split the batch (they hold shares of it)."""
        return value if self._data_world == 1 else distributed.all_reduce_sum(value)

    def _any(self, flag: bool) -> bool:
        """``flag`` of any rank (one all-reduce per call on several ranks, none alone): every rank
        decides the same, e.g. to stop where rank 0's clock or a rank's Ctrl-C says."""
        if distributed.world_size() == 1:
            return flag
        return bool(distributed.all_reduce_sum(torch.tensor(int(flag), device=self.device)).item())

    def _checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / f"step-{self.step:08d}"

    @contextlib.contextmanager
    def _events_closed(self) -> Iterator[None]:
        """Close the TensorBoard writer (if a log opened it) when training stops, however."""
        try:
            yield
        finally:
            if self._events is not None:
                self._events.close()
                self._events = None

    def _past(self, deadline: float) -> bool:
        return self._any(distributed.is_main() and time.monotonic() >= deadline)

    def _log(self, record: dict[str, float]) -> None:
        if self.out_dir is not None and distributed.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._events is None:
                from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: ~2 s

                # purge_step: a resumed run's readers drop the events logged after its checkpoint
                self._events = SummaryWriter(str(self.out_dir), purge_step=self._resumed_from)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._events.add_scalar(key, value, record["step"])
            self._events.flush()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides the weights: the step, optimizer, schedule, data
        position, every rank's RNG state (in rank order) and the sums of the logging interval
        under way (``log``: the loss summed over all ranks, the targets, the steps)."""
        log = {"loss_sum": self._data_sum(self._loss_sum).item(), "targets": self._targets.item(),
               "since": self._since}
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "data": self.sampler.state_dict(),
                "rng": distributed.all_gather_object(_rng_state()), "log": log}

    def save(self) -> Path | None:
        """Checkpoint the current step into ``out_dir``: every rank calls it, rank 0 writes."""
        if self.out_dir is None or self._saved_step == self.step:
            return None
        state = self.state_dict()
        path = None
        if distributed.is_main():
            path = save_checkpoint(self.out_dir, self.step, self.model, self.config(), state,
                                   keep=self.cfg.keep_checkpoints, tokenizer=self.task.tokenizer)
        distributed.barrier()
        self._saved_step = self.step
        return path

    def resume(self, path: str | os.PathLike | None = None) -> int:
        """Continue from the checkpoint at ``path`` (default: ``out_dir``'s latest): weights,
        optimizer, schedule, data position and RNG states, so the run goes on exactly as if it
        had never stopped. The saved configs must match this run's, except the fields in
        :data:`RESUME_MAY_CHANGE`. Each rank takes back its own RNG state; a rank the checkpoint
        has none for (a resume on more ranks) keeps the fresh ``seed + rank``. Returns the step."""
        path = self.out_dir if path is None else path
        if path is None:
            raise ValueError("resume needs a checkpoint path or an out_dir")
        state = read_trainer_state(path)  # read everything before changing anything
        load_checkpoint(path, self.model, self.config(), ignore={f"train.{k}" for k in RESUME_MAY_CHANGE})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["data"])
        if distributed.rank() < len(state["rng"]):
            _set_rng_state(state["rng"][distributed.rank()])
        self.step = self._saved_step = state["step"]
        self._resumed_from = self.step + 1
        self._reset_sums()
        log = state.get("log")  # absent in checkpoints written before it was saved
        if log is not None:
            if self._data_rank == 0:  # the ranks' sums are all-reduced at the next log: one holds them
                self._loss_sum.fill_(log["loss_sum"])
            self._targets.fill_(log["targets"])
            self._since = log["since"]
        metrics = None if self.out_dir is None else self.out_dir / METRICS
        if metrics is not None and metrics.exists() and distributed.is_main():
            # drop what the stopped run logged after this checkpoint (and a line cut by a crash)
            kept = [line for line in metrics.read_text().splitlines() if _logged_step(line) <= self.step]
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        return self.step


class Interrupted(RunError):
    """Training stopped by Ctrl-C, after saving: ``step`` of ``steps``, the ``checkpoint`` saved
    (None without an ``out_dir``). Exits the command line with status 130."""

    def __init__(self, step: int, steps: int, checkpoint: Path | None) -> None:
        where = f"saved {checkpoint}; run the same command with --resume to continue" if checkpoint \
            else "nothing saved (no run folder)"
        super().__init__(f"interrupted at step {step} of {steps}: {where}", status=130)
        self.step, self.checkpoint = step, checkpoint


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """While inside, the first Ctrl-C only sets a flag (yielded as a function that reads it), so
    the step under way finishes and the trainer saves; a second one raises KeyboardInterrupt at
    once. Outside the main thread (where signals cannot be handled) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf

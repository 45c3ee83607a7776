"""The shared trainer on two tiny systems: a classifier (targets = samples) and a token model
with -100 padding (targets = non-ignored tokens, so micro-batches carry unequal counts)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neurolattice.train import EpochSampler, Task, TrainConfig, Trainer, lr_factor
from neurolattice.train.trainer import Interrupted

VOCAB, SEQ = 7, 6


class Classify(Task):
    """3-way classification of 6-dim vectors; batch = (x [B, 6], y [B])."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        self.train_data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())

    @staticmethod
    def model(seed: int, dropout: float = 0.0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)).double()

    def count_targets(self, batch):
        return len(batch[1])

    def loss_sum(self, model, batch, grad_checkpointing=False):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    def evaluate(self, model):
        x, y = self.train_data.tensors
        return {"accuracy": (model(x).argmax(-1) == y).double().mean().item()}


class Tokens(Task):
    """Next-token prediction with ragged lengths; batch = (tokens [B, T], labels [B, T], -100 pads)."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(VOCAB, (n, SEQ), generator=g)
        labels = tokens.roll(-1, dims=1)
        lengths = torch.randint(0, SEQ + 1, (n,), generator=g)
        labels[torch.arange(SEQ) >= lengths[:, None]] = -100
        self.train_data = TensorDataset(tokens, labels)

    @staticmethod
    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyLM().double()

    def count_targets(self, batch):
        return (batch[1] != -100).sum()

    def loss_sum(self, model, batch, grad_checkpointing=False):
        logits = model(batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), reduction="sum")


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens).cumsum(1)))  # (B, T, VOCAB)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def one_step(task: Task, model: nn.Module, **cfg) -> Trainer:
    trainer = Trainer(model, task, TrainConfig(steps=5, warmup_steps=1, lr=0.05, **cfg))
    trainer.train_step()
    return trainer


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
@pytest.mark.parametrize("system", [Classify, Tokens])
def test_micro_batches_equal_one_batch(system, grad_clip):
    task = system()
    whole = one_step(task, system.model(1), batch_size=16, grad_clip=grad_clip)
    micro = one_step(task, system.model(1), batch_size=16, micro_batch_size=4, grad_clip=grad_clip)
    assert max_diff(whole.model, micro.model) <= 1e-6
    assert max_diff(whole.model, system.model(1)) > 1e-3  # the step moved the parameters


def test_accumulated_gradient_is_the_mean_over_all_targets():
    """Against an independent computation: the mean token loss of the whole batch at once.
    The micro-batches' target counts differ, so a mean of per-micro-batch means would not do."""
    task = Tokens()
    trainer = one_step(task, Tokens.model(1), batch_size=16, micro_batch_size=4, grad_clip=0.0)
    tokens, labels = task.train_data.tensors
    counts = [(labels[i] != -100).sum().item() for i in EpochSampler(16, 0).take(16).split(4)]
    assert len(set(counts)) > 1

    def grads(loss_of):
        model = Tokens.model(1)
        loss_of(model).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def mean_loss(model, t, l):
        return F.cross_entropy(model(t).flatten(0, 1), l.flatten())

    want = grads(lambda m: mean_loss(m, tokens, labels))
    got = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    assert (got - want).abs().max() <= 1e-10
    order = EpochSampler(16, 0).take(16).split(4)
    naive = grads(lambda m: sum(mean_loss(m, tokens[i], labels[i]) for i in order) / 4)
    assert (naive - want).abs().max() > 1e-4


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    """Dropout (RNG), epochs that end mid-step (data position), warmup + cosine (schedule) and
    AdamW moments all have to come back for the two runs to agree."""
    cfg = TrainConfig(steps=7, batch_size=4, micro_batch_size=2, warmup_steps=2, lr=0.05,
                      checkpoint_every=3, log_every=1)
    task = Classify(n=10)
    full = Trainer(Classify.model(1, dropout=0.3), task, cfg, out_dir=tmp_path / "full")
    full.fit(progress=False)

    crashing = Classify(n=10)
    calls = 0

    def loss_sum(model, batch, grad_checkpointing=False):
        nonlocal calls
        calls += 1
        if calls == 9:  # first micro-batch of step 5: the checkpoint of step 3 is the newest
            raise KeyboardInterrupt
        return Classify.loss_sum(crashing, model, batch)

    crashing.loss_sum = loss_sum
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(Classify.model(1, dropout=0.3), crashing, cfg, out_dir=run).fit(progress=False)
    assert (run / "latest").read_text() == "step-00000003"

    resumed = Trainer(Classify.model(2, dropout=0.3), task, cfg, out_dir=run)
    assert resumed.resume() == 3
    assert max_diff(resumed.model, full.model) > 1e-3
    resumed.fit(progress=False)
    assert max_diff(resumed.model, full.model) <= 1e-6
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 8))
    # TensorBoard's reader drops what the crashed run logged after step 3 (steps 4, before the
    # crash at step 5), so it sees each step once, with the losses of metrics.jsonl
    assert tensorboard_scalars(run, "loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in lines]


def tensorboard_scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every ``tag`` scalar the event files in ``run_dir`` hold (float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_metrics_log_has_loss_lr_throughput_and_eval(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=2, lr=0.05, eval_every=3, log_every=2)
    record = Trainer(Classify.model(0), Classify(), cfg, out_dir=tmp_path).fit(progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3, 4, 6]
    assert set(lines[0]) == {"step", "loss", "lr", "grad_norm", "samples_per_s", "targets_per_s"}
    assert set(lines[1]) == {"step", "eval_accuracy"}
    assert lines[0]["lr"] == pytest.approx(0.05)  # step 2 ran at the end of warmup
    assert record == lines[-1] and "eval_accuracy" in record and record["loss"] > 0
    # the event files hold the same records (as float32: rel 1e-6 is ~8 of its ulps)
    for tag in ("loss", "eval_accuracy"):
        assert tensorboard_scalars(tmp_path, tag) == [(r["step"], pytest.approx(r[tag], rel=1e-6))
                                                      for r in lines if tag in r]


def test_deadline_stops_at_the_next_logging_step_with_a_checkpoint(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, log_every=2)
    trainer = Trainer(Classify.model(0), Classify(), cfg, out_dir=tmp_path)
    record = trainer.fit(progress=False, deadline=time.monotonic())
    assert trainer.step == record["step"] == 2
    assert (tmp_path / "latest").read_text() == "step-00000002"


def test_resume_checks_the_config(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1)
    Trainer(Classify.model(0), Classify(), cfg, out_dir=tmp_path, model_config={"hidden": 16}).fit(
        until=2, progress=False
    )
    changed = TrainConfig(steps=4, batch_size=4, warmup_steps=1, log_every=1, eval_every=2)
    assert Trainer(Classify.model(0), Classify(), changed, out_dir=tmp_path,
                   model_config={"hidden": 16}).resume() == 2
    other = Trainer(Classify.model(0), Classify(), TrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=0.5),
                    out_dir=tmp_path, model_config={"hidden": 16})
    with pytest.raises(ValueError, match=r"^config field 'train.lr' is 0.001 in checkpoint .* but 0.5 in"):
        other.resume()
    model = Classify.model(0)
    bigger = Trainer(model, Classify(), cfg, out_dir=tmp_path, model_config={"hidden": 32})
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^config field 'model.hidden' is 16 in .* but 32 in this run$"):
        bigger.resume()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    assert bigger.step == 0


def test_sampler_epochs_are_permutations_and_resume():
    sampler = EpochSampler(5, seed=3)
    stream = sampler.take(12)
    assert sorted(stream[:5].tolist()) == sorted(stream[5:10].tolist()) == list(range(5))
    assert not torch.equal(stream[:5], stream[5:10])
    resumed = EpochSampler(5, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert sampler.state_dict() == {"epoch": 2, "offset": 2}
    assert torch.equal(resumed.take(7), sampler.take(7))
    assert not torch.equal(EpochSampler(5, seed=4).take(12), stream)


def test_lr_schedule_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(steps=10, warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(11)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[7] == pytest.approx(0.55) and factors[10] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"batch_size": 10, "micro_batch_size": 4}, "batch_size 10 is not a multiple of micro_batch_size 4"),
        ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ({"min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\], got 2.0"),
        ({"precision": "fp16"}, "precision must be one of .*, got 'fp16'"),
        ({"grad_checkpointing": 1}, "grad_checkpointing must be true or false, got 1"),
    ],
)
def test_config_rejects_bad_values_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        TrainConfig(**kwargs)


def test_config_round_trips_through_json():
    cfg = TrainConfig(steps=7, betas=(0.8, 0.9), micro_batch_size=2, batch_size=8)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig key"):
        TrainConfig.from_dict({"stepz": 3})



def test_grad_checkpointing_and_precision_reach_the_forward():
    seen = []

    class Spy(Classify):
        def loss_sum(self, model, batch, grad_checkpointing=False):
            seen.append((grad_checkpointing, torch.is_autocast_enabled("cpu")))
            return super().loss_sum(model, (batch[0].float(), batch[1]))

        def evaluate(self, model):
            return {}

    cfg = TrainConfig(steps=1, batch_size=8, micro_batch_size=4, grad_checkpointing=True, precision="bf16")
    Trainer(nn.Linear(6, 3), Spy(), cfg).fit(progress=False)
    assert seen == [(True, True), (True, True)]


def test_resume_between_logs_logs_what_the_uninterrupted_run_logs(tmp_path):
    """Logs every 2 steps, a checkpoint at step 3, a crash in step 5: the resumed run's log of
    step 4 sums steps 3 and 4, as the uninterrupted run's does (the partial sums of step 3 are
    in the checkpoint; without them it would log step 4 alone)."""
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, lr=0.05, log_every=2, checkpoint_every=3)
    Trainer(Classify.model(1), Classify(), cfg, out_dir=tmp_path / "full").fit(progress=False)
    crashing, calls = Classify(), 0

    def loss_sum(model, batch, grad_checkpointing=False):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise SystemExit("killed")  # anything but Ctrl-C: no save on the way out
        return Classify.loss_sum(crashing, model, batch)

    crashing.loss_sum = loss_sum
    with pytest.raises(SystemExit):
        Trainer(Classify.model(1), crashing, cfg, out_dir=tmp_path / "run").fit(progress=False)
    resumed = Trainer(Classify.model(1), Classify(), cfg, out_dir=tmp_path / "run")
    assert resumed.resume() == 3
    resumed.fit(progress=False)

    def losses(run):
        lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in lines if "loss" in r]

    assert losses(tmp_path / "run") == losses(tmp_path / "full")  # float64 model: bit-equal sums
    assert [s for s, _ in losses(tmp_path / "run")] == [2, 4, 6]


def test_ctrl_c_finishes_the_step_saves_and_resumes_to_the_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, micro_batch_size=2, warmup_steps=1, lr=0.05, log_every=2,
                      checkpoint_every=100)
    full = Trainer(Classify.model(1), Classify(), cfg, out_dir=tmp_path / "full")
    full.fit(progress=False)

    task, calls = Classify(), 0

    def loss_sum(model, batch, grad_checkpointing=False):
        nonlocal calls
        calls += 1
        if calls == 7:  # first micro-batch of step 4: the step still finishes
            os.kill(os.getpid(), signal.SIGINT)
        return Classify.loss_sum(task, model, batch)

    task.loss_sum = loss_sum
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match=r"^interrupted at step 4 of 6: saved .*step-00000004; run the same "
                                          r"command with --resume to continue$") as info:
        Trainer(Classify.model(1), task, cfg, out_dir=run).fit(progress=False)
    assert info.value.status == 130 and (run / "latest").read_text() == "step-00000004"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = Trainer(Classify.model(2), Classify(), cfg, out_dir=run)
    assert resumed.resume() == 4
    resumed.fit(progress=False)
    assert max_diff(resumed.model, full.model) == 0

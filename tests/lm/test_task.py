"""LMTask with the shared trainer: exact accumulation over uneven micro-batches, bits per byte."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neurolattice.lm import IGNORE, LMConfig, LMTask, build_model, load_lm_data, pack
from neurolattice.lm.data import ByteTokenizer, LMData, PackedDataset
from neurolattice.train import TrainConfig, Trainer

from ..errors import one_line_error

CFG = LMConfig(d_model=32, n_layers=2, n_heads=2, ffn_size=48, seq_len=16)
SEQ = 8


def ragged_data() -> LMData:
    """Four rows of [SEQ + 1] with 8, 3, 8 and 1 targets: two packs, each ending in a short,
    padded row (the short last document)."""
    rows = torch.cat([pack(["hello, wörld", "ok"], SEQ, pad=True), pack(["naïve café", ""], SEQ, pad=True)])
    return LMData(PackedDataset(rows), PackedDataset(rows), ["a"], ["b"], ByteTokenizer())


def model64(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(CFG).double()


def one_step(data: LMData, micro_batch_size: int):
    model = model64()
    cfg = TrainConfig(steps=3, batch_size=4, micro_batch_size=micro_batch_size, lr=1e-2, warmup_steps=0,
                      grad_clip=0.0)
    Trainer(model, LMTask(data, CFG), cfg).train_step()
    return model


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_uneven_micro_batches_give_the_one_batch_gradient():
    data = ragged_data()
    counts = (data.train.rows[:, 1:] != IGNORE).sum(1).tolist()
    assert len(data.train) == 4 and len(set(counts)) > 1, counts

    # Independent reference: the mean token loss of one batch holding every row.
    ref = model64()
    inputs, labels = data.train[torch.arange(4)]
    logits = ref(input_ids=inputs).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE).backward()
    # The mean of per-row means weighs rows wrongly: the test would see that.
    wrong = model64()
    sum(F.cross_entropy(wrong(input_ids=x[None]).logits[0], y) / 4 for x, y in zip(inputs, labels)).backward()
    assert (grads(wrong) - grads(ref)).abs().max() > 1e-4

    models = {m: one_step(data, m) for m in (4, 2, 1)}
    for m, model in models.items():
        assert (grads(model) - grads(ref)).abs().max() < 1e-10, m
        for p, q in zip(model.parameters(), models[4].parameters(), strict=True):
            assert (p - q).abs().max() < 1e-6, m


def test_bits_per_byte_of_a_uniform_model(tmp_path):
    texts = ["print('héllo')\n", "x = 1\n", "def f():\n    return 2\n", "# ünïcödé\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"f{i}.py").write_text(text)
    data = load_lm_data(tmp_path, seq_len=8, heldout_fraction=0.5, seed=1)
    model = build_model(LMConfig(**{**CFG.to_dict(), "tie_embeddings": False})).double()
    torch.nn.init.zeros_(model.lm_head.weight)  # logits 0: uniform over the 257 ids
    held = [(tmp_path / f).read_bytes() for f in data.heldout_files]
    nbytes = sum(map(len, held)) - 1                  # the stream's first byte is never a target
    targets = nbytes + len(held)                       # plus one end-of-document per file
    with torch.no_grad():
        metrics = LMTask(data, CFG, eval_batch_size=1).evaluate(model.eval())
    assert metrics["loss"] == pytest.approx(math.log(257), rel=1e-12)
    assert metrics["bpb"] == pytest.approx(math.log2(257) * targets / nbytes, rel=1e-12)


def test_training_lowers_heldout_bpb():
    torch.manual_seed(0)
    data = load_lm_data(seq_len=32, max_bytes=30_000, heldout_fraction=0.1)
    cfg = LMConfig(**{**CFG.to_dict(), "seq_len": 32})
    trainer = Trainer(build_model(cfg), LMTask(data, cfg, eval_batch_size=128),
                      TrainConfig(steps=20, batch_size=32, lr=1e-2, warmup_steps=2))
    before = trainer.evaluate()["bpb"]
    after = trainer.fit(progress=False)["eval_bpb"]
    assert before > 7.5 and after < before - 2, (before, after)


def test_grad_checkpointing_gives_the_same_gradient():
    data = ragged_data()
    task, batch = LMTask(data, CFG), data.train[torch.arange(4)]
    models = [model64(), model64()]
    for model, ckpt in zip(models, (False, True)):
        model.train()
        task.loss_sum(model, batch, grad_checkpointing=ckpt).backward()
    assert getattr(models[1], "is_activation_checkpointing", None) or models[1].is_gradient_checkpointing
    assert (grads(models[0]) - grads(models[1])).abs().max() < 1e-12


def test_seq_len_beyond_max_positions(tmp_path):
    data = ragged_data()
    with one_line_error("exceeds the model's maximum positions"):
        LMTask(data, LMConfig(**{**CFG.to_dict(), "seq_len": SEQ - 1}))
    with pytest.raises(ValueError, match="vocab_size"):
        LMTask(data, LMConfig(**{**CFG.to_dict(), "vocab_size": 200, "eod_id": 199}))

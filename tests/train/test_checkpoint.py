"""Checkpoints: a save that dies anywhere leaves the previous one loadable, and every mismatch or
damage is a one-line ValueError naming the tensor, field or file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from neurolattice.train import (
    check_state_dict,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from neurolattice.train import checkpoint as ckpt_module

from ..errors import one_line_error


class Net(nn.Module):
    def __init__(self, hidden: int = 16, extra: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.local = nn.ModuleDict({"fc1": nn.Linear(2 * hidden, hidden), "fc2": nn.Linear(hidden, 3)})
        if extra:
            self.local.register_parameter("scale", nn.Parameter(torch.ones(3)))


def save(root: Path, step: int, model: nn.Module, hidden: int = 16, **kwargs) -> Path:
    config = {"model": {"hidden": hidden}, "train": {"lr": 0.1}}
    return save_checkpoint(root, step, model, config, {"step": step}, **kwargs)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Every step of a save that touches the disk: the two writers (which leave half a file behind
# before failing), the renames, and the hard links of a re-save.
FAULTS = [(ckpt_module, "save_file"), (torch, "save"), (os, "replace"), (os, "link")]


def failing_save(monkeypatch, crash_at: int, *args) -> int:
    """Run save(*args) with the ``crash_at``-th disk operation failing; return the count of
    operations reached (all of them when it did not crash)."""
    calls = 0

    def wrap(real, writer):
        def fake(*a, **k):
            nonlocal calls
            calls += 1
            if calls != crash_at:
                return real(*a, **k)
            if writer:
                real(*a, **k)
                Path(a[1]).write_bytes(Path(a[1]).read_bytes()[:50])
            raise OSError("disk full")
        return fake

    with monkeypatch.context() as m:
        for owner, name in FAULTS:
            m.setattr(owner, name, wrap(getattr(owner, name), name in ("save_file", "save")))
        save(*args)
    return calls


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
def test_a_save_interrupted_anywhere_keeps_a_loadable_checkpoint(tmp_path, monkeypatch, resave):
    old, new = Net(seed=0), Net(seed=1)
    run = tmp_path / "run"
    save(run, 2, old)
    step = 2 if resave else 3
    shutil.copytree(run, tmp_path / "probe")
    total = failing_save(monkeypatch, 0, tmp_path / "probe", step, new)
    assert total >= (9 if resave else 5)
    for crash_at in range(1, total + 1):
        with pytest.raises(OSError, match="disk full"):
            failing_save(monkeypatch, crash_at, run, step, new)
        loaded = Net(seed=2)
        load_checkpoint(run, loaded, {"model": {"hidden": 16}})
        got = weights(loaded)
        assert read_trainer_state(run) == {"step": 2}
        if resave:  # 'latest' may name the complete new copy; the next save clears the rest
            assert same(got, weights(old)) or same(got, weights(new)), crash_at
        else:
            assert same(got, weights(old)), crash_at
            assert not [p for p in run.iterdir() if ".tmp-" in p.name], crash_at
    save(run, step, new)
    loaded = Net(seed=2)
    load_checkpoint(run, loaded)
    assert same(weights(loaded), weights(new))
    assert sorted(p.name for p in run.iterdir()) == sorted({"latest", "step-00000002", f"step-{step:08d}"})


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in range(1, 5):
        save(tmp_path, step, Net(), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000004"


def load_error(path: Path, model: nn.Module, config=None) -> str:
    before = weights(model)
    with one_line_error() as err:
        load_checkpoint(path, model, config)
    assert same(weights(model), before)  # a failed load changes nothing
    return str(err.value)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    path = save(tmp_path, 1, Net())
    assert load_error(tmp_path, Net(extra=True)) == (
        f"tensor 'local.scale' of the model is missing from checkpoint {path / 'model.safetensors'}"
    )
    save(tmp_path, 2, Net(extra=True))
    assert load_error(tmp_path, Net()).startswith("tensor 'local.scale' in checkpoint ")
    assert load_error(tmp_path, Net()).endswith("does not exist in the model")
    path = save(tmp_path, 3, Net(hidden=32))
    assert load_error(tmp_path, Net()) == (
        f"tensor 'local.fc1.weight' has shape [32, 64] in checkpoint {path / 'model.safetensors'} "
        "but [16, 32] in the model"
    )


def test_check_state_dict_counts_the_other_mismatches():
    expected = Net().state_dict()
    with pytest.raises(ValueError, match=r"^tensor 'local.fc1.bias' of the model is missing from x \(and 3"):
        check_state_dict(expected, {}, "x")
    found = {**expected, "local.fc1.weight": torch.zeros(32, 64)}
    with pytest.raises(ValueError, match=r"^tensor 'local.fc1.weight' has shape \[32, 64\] in x but \[16,"):
        check_state_dict(expected, found, "x")
    check_state_dict(expected, Net(seed=3).state_dict(), "x")


def test_a_different_config_names_the_field(tmp_path):
    path = save(tmp_path, 1, Net(), hidden=16)
    assert load_error(tmp_path, Net(), {"model": {"hidden": 32}}) == (
        f"config field 'model.hidden' is 16 in checkpoint {path} but 32 in this run"
    )
    assert load_error(tmp_path, Net(), {"model": {"hidden": 16, "depth": 2}}) == (
        f"config field 'model.depth' is absent in checkpoint {path} but 2 in this run"
    )
    assert load_error(tmp_path, Net(), {"model": {"hidden": 16}, "train": {}}) == (
        f"config field 'train.lr' is 0.1 in checkpoint {path} but absent in this run"
    )
    load_checkpoint(tmp_path, Net(), {"model": {"hidden": 16}})  # the model section only


@pytest.mark.parametrize("name", ["model.safetensors", "run_config.json", "trainer_state.pt"])
def test_corrupt_and_missing_files_are_named(tmp_path, name):
    path = save(tmp_path, 1, Net())
    file = path / name
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    pattern = rf"^checkpoint file {file} is corrupt: .+"
    if name == "trainer_state.pt":
        with pytest.raises(ValueError, match=pattern):
            read_trainer_state(tmp_path)
    else:
        message = load_error(tmp_path, Net(), {"model": {"hidden": 16}})
        assert message.startswith(f"checkpoint file {file} is corrupt: ")
    file.unlink()
    with pytest.raises(ValueError, match=rf"^checkpoint file {file} is missing$"):
        read_trainer_state(tmp_path) if name == "trainer_state.pt" else load_checkpoint(tmp_path, Net())


def test_no_checkpoint_at_all(tmp_path):
    assert load_error(tmp_path, Net()) == (
        f"no checkpoint at {tmp_path}: it has neither a 'latest' pointer nor a model.safetensors"
    )


def test_hf_model_is_a_save_pretrained_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from neurolattice.lm import LMConfig, build_model
    from neurolattice.train import read_config

    cfg = LMConfig(d_model=16, n_layers=1, n_heads=2, ffn_size=32, seq_len=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    path = save(tmp_path, 3, model)
    assert {"config.json", "model.safetensors", "run_config.json", "trainer_state.pt"} <= {
        p.name for p in path.iterdir()}
    assert read_config(tmp_path) == {"model": {"hidden": 16}, "train": {"lr": 0.1}}
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    hf = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.manual_seed(1)
    fresh = build_model(cfg)
    load_checkpoint(tmp_path, fresh, {"model": {"hidden": 16}})  # the tied head is restored
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight

"""Checkpoints: a save killed or failing anywhere leaves only complete checkpoints behind (and
hidden leftovers that ``repair_run`` clears), a failed write is a one-line RunError naming the
last good checkpoint, and every mismatch or damage on reading is a one-line ValueError naming
the tensor, field, file or pointer."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from neurolattice.io import RunError
from neurolattice.train import (
    check_state_dict,
    load_checkpoint,
    read_config,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from neurolattice.train import checkpoint as ckpt_module
from neurolattice.train.checkpoint import repair_run

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


class Killed(BaseException):
    """The process dies: the filesystem call that raised it, and every later one, never run."""


# The filesystem primitives of checkpoint.py: every change a save or a repair makes to the disk
# goes through one of these, so wrapping them reaches every step. The calls that change a disk
# are refused outside them (``faulty`` checks), so a new one the list misses fails the test.
PRIMITIVES = ("_mkdir", "_mkdtemp", "_write", "_fsync", "_rename", "_remove", "_unlink")
DISK_CHANGES = [(os, name) for name in ("replace", "rename", "link", "unlink", "remove", "rmdir", "mkdir")] + [
    (shutil, "rmtree"), (shutil, "copytree"), (shutil, "move")]


def faulty(monkeypatch, at: int, kill: bool, action) -> int:
    """Run ``action()`` with its ``at``-th filesystem call (0: none) dying (``kill``: that call
    and all later ones raise :class:`Killed`, no cleanup runs) or failing once with an
    ``OSError``. A write killed or failed leaves half its file behind first. Returns the count of
    calls reached."""
    calls, inside = 0, 0

    def wrap(name, real):
        def fake(*args):
            nonlocal calls, inside
            calls += 1
            inside += 1
            try:
                if not at or calls < at or (calls > at and not kill):
                    return real(*args)
                if calls == at and name == "_write":
                    path, write = args
                    write(path)
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise Killed if kill else OSError(errno.EIO, os.strerror(errno.EIO))
            finally:
                inside -= 1
        return fake

    def refuse(real):
        def outside(*args, **kwargs):
            assert inside, f"{real.__name__}{args} is not one of checkpoint.py's primitives"
            return real(*args, **kwargs)
        return outside

    def opened(file, mode="r", *args, **kwargs):
        assert inside or set(mode) <= set("rbt"), f"open({file!r}, {mode!r}) outside the primitives"
        return real_open(file, mode, *args, **kwargs)

    real_open = builtins.open
    with monkeypatch.context() as m:
        for owner, name in DISK_CHANGES:
            m.setattr(owner, name, refuse(getattr(owner, name)))
        m.setattr(builtins, "open", opened)
        m.setattr(io, "open", opened)  # what pathlib calls
        for name in PRIMITIVES:
            m.setattr(ckpt_module, name, wrap(name, getattr(ckpt_module, name)))
        action()
    return calls


# name: (the saves before, the save interrupted, the steps it may remove): a first save, a save
# that prunes, and a re-save of the step 'latest' names, of the only step, and of an older step.
SCENARIOS = {
    "first": ([], (1, 0), ()),
    "prune": ([(1, 0), (2, 1)], (3, 2), (1,)),
    "resave-latest": ([(1, 0), (2, 1)], (2, 2), ()),
    "resave-only": ([(1, 0)], (1, 1), ()),
    "resave-older": ([(1, 0), (2, 1)], (1, 2), ()),
}
KILL_POINTS = {"first": 15, "prune": 18, "resave-latest": 21, "resave-only": 18, "resave-older": 17}


def check_run(run: Path, saved: dict[int, list[dict[str, torch.Tensor]]]) -> None:
    """The invariant: every visible step directory is complete and loads to what a save wrote at
    its step (``saved``: the weights each step may hold), and ``latest``, where it exists,
    names one of them."""
    for path in run.glob("step-*"):
        step = int(path.name[5:])
        loaded = Net(seed=9)
        load_checkpoint(path, loaded, {"model": {"hidden": 16}})
        assert any(same(weights(loaded), w) for w in saved[step]), path
        assert read_trainer_state(path) == {"step": step}
    if (run / "latest").exists():
        assert resolve_checkpoint(run).parent == run  # a visible step directory, checked above


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "failed"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_save_interrupted_anywhere_leaves_only_complete_checkpoints(tmp_path, monkeypatch, scenario, kill):
    """Each filesystem call of a save, in turn, kills the process (no cleanup runs) or fails once:
    15 kill points in a first save, 18 in one that prunes (keep=2, third save), 21 in a re-save
    of the step 'latest' names, 18 in a re-save of the only step, 17 in a re-save of an older
    step: 89 in all. After each, every visible step directory is complete and loads bit-exactly
    to what was saved at its step, and 'latest', if present, names one; ``repair_run`` then
    leaves no hidden leftover, a 'latest' and every checkpoint the save did not mean to remove.
    A failed save is a one-line RunError, and one that failed before its directory was in place
    leaves the run exactly as it was."""
    before, (step, seed), removable = SCENARIOS[scenario]
    nets = [Net(seed=s) for s in range(3)]
    saved: dict[int, list[dict[str, torch.Tensor]]] = {}
    for s, n in [*before, (step, seed)]:
        saved.setdefault(s, []).append(weights(nets[n]))

    def prepare(run: Path) -> None:
        for s, n in before:
            save(run, s, nets[n], keep=2)

    def interrupted(run: Path):
        return lambda: save(run, step, nets[seed], keep=2)

    run = tmp_path / "probe"
    prepare(run)
    total = faulty(monkeypatch, 0, kill, interrupted(run))
    assert total == KILL_POINTS[scenario]
    for at in range(1, total + 1):
        run = tmp_path / f"{at}"
        prepare(run)
        listing = entries(run)
        pointer = latest_text(run)
        with pytest.raises(Killed if kill else RunError) as err:
            faulty(monkeypatch, at, kill, interrupted(run))
        check_run(run, saved)
        if not kill:
            assert "\n" not in str(err.value)
            new = run / f"step-{step:08d}"
            if not (new.exists() and same(load_weights(new), saved[step][-1])):
                assert entries(run) == listing, at
                assert latest_text(run) == pointer, at
        message = repair_run(run)
        assert message is None or "\n" not in message
        check_run(run, saved)
        names = set(entries(run))
        assert not [n for n in names if n.startswith((".step-", ".latest."))], (at, names)
        assert {f"step-{s:08d}" for s, _ in before if s not in removable} <= names, (at, names)
        assert ("latest" in names) == any(n.startswith("step-") for n in names), (at, names)
        assert repair_run(run) is None
    save(run, step, nets[seed], keep=2)  # the next save after a repair works as ever
    assert same(load_weights(run), saved[step][-1])
    kept = sorted({s for s, _ in before} | {step})[-2:]
    assert entries(run) == ["latest", *(f"step-{s:08d}" for s in kept)]


def entries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir()) if run.exists() else []


def latest_text(run: Path) -> str | None:
    return (run / "latest").read_text() if (run / "latest").exists() else None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    loaded = Net(seed=9)
    load_checkpoint(path, loaded)
    return weights(loaded)


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


@pytest.mark.parametrize("text, problem", [
    ("", "is empty"),
    ("\n", "is empty"),
    ("../other/step-00000001", "names '../other/step-00000001', not a step directory of {run}"),
    ("{other}/step-00000001", "names '{other}/step-00000001', not a step directory of {run}"),
    ("step-00000001/../../other/step-00000001", "names 'step-00000001/../../other/step-00000001', "
     "not a step directory of {run}"),
    (".step-00000001.tmp-abc", "names '.step-00000001.tmp-abc', not a step directory of {run}"),
    ("step-1", "names 'step-1', not a step directory of {run}"),
    ("\x00\xff garbage\nmore", "names '\\x00\ufffd garbage\\nmore', not a step directory of {run}"),
    ("x" * 300, "names '" + "x" * 200 + "...', not a step directory of {run}"),
    ("step-00000007", "names 'step-00000007', which is missing from {run}"),
], ids=["empty", "newline", "parent", "absolute", "dots", "hidden", "short", "garbage", "long", "missing"])
def test_latest_names_a_step_directory_of_its_own_run(tmp_path, text, problem):
    run, other = tmp_path / "run", tmp_path / "other"
    save(other, 1, Net())
    path = save(run, 1, Net())
    (run / "latest").write_bytes(text.format(other=other).encode("latin-1"))
    message = f"{run / 'latest'} {problem.format(run=run, other=other)}"
    for read in (resolve_checkpoint, read_config, read_trainer_state, lambda p: load_checkpoint(p, Net())):
        with one_line_error() as err:
            read(run)
        assert str(err.value) == message
    assert resolve_checkpoint(path) == path  # a step directory is read as it is
    shown = message.split("'")[1] if "'" in message else ""  # as the error quotes it
    assert repair_run(run) == f"repaired {run}: pointed latest at step-00000001 (it read '{shown}')"
    assert resolve_checkpoint(run) == path


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_before_the_model_is_touched(tmp_path, bad):
    net = Net()
    with torch.no_grad():
        net.local.fc2.weight[1, 2] = bad
    path = save(tmp_path, 1, net)
    assert load_error(tmp_path, Net()) == (
        f"checkpoint {path / 'model.safetensors'}: tensor 'local.fc2.weight' has NaN or inf values")


def test_integer_tensors_are_not_checked_for_finite_values(tmp_path):
    net = Net()
    net.register_buffer("seen", torch.tensor([2**62, -1], dtype=torch.int64))
    save(tmp_path, 1, net)
    fresh = Net(seed=1)
    fresh.register_buffer("seen", torch.zeros(2, dtype=torch.int64))
    load_checkpoint(tmp_path, fresh)
    assert same(weights(fresh), weights(net))


def enospc(obj, path):
    Path(path).write_bytes(b"\0" * 100)  # what the writer got onto the disk before it filled
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_short_write(obj, path):
    Path(path).write_bytes(b"PK\3\4")
    raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 1472 vs 1368")


def safetensors_full(obj, path):
    raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                       'message: "No space left on device" })')


@pytest.mark.parametrize("owner, name, writer", [
    (ckpt_module, "save_file", enospc),
    (ckpt_module, "save_file", safetensors_full),
    (torch, "save", torch_short_write),
], ids=["errno", "safetensors-words", "torch-words"])
def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, owner, name, writer):
    run = tmp_path / "run"
    monkeypatch.setattr(owner, name, writer)
    with one_line_error(error=RunError) as err:
        save(run, 1, Net())
    assert str(err.value) == (f"the disk holding {run} is full: checkpoint {run / 'step-00000001'} "
                              "was not saved; the run has no good checkpoint")
    assert entries(run) == []
    monkeypatch.undo()
    first = save(run, 1, Net())
    monkeypatch.setattr(owner, name, writer)
    for step in (2, 1):  # a new step, and a re-save of the one 'latest' names
        with one_line_error(error=RunError) as err:
            save(run, step, Net(seed=1))
        assert str(err.value) == (f"the disk holding {run} is full: checkpoint {run / f'step-{step:08d}'} "
                                  f"was not saved; the last good checkpoint is {first}")
        assert entries(run) == ["latest", "step-00000001"]
        assert same(load_weights(run), weights(Net()))


def test_a_read_only_folder_is_one_line_naming_the_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = save(run, 1, Net())
    run.chmod(0o555)
    real_mkdir = os.mkdir

    def refused(path, *args, **kwargs):  # what the OS says to anyone but root, which modes do not bind
        if Path(path).parent == run:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused)
    try:
        with one_line_error(error=RunError) as err:
            save(run, 2, Net())
    finally:
        run.chmod(0o755)
    assert str(err.value) == (f"cannot write checkpoint {run / 'step-00000002'}: Permission denied; "
                              f"the last good checkpoint is {first}")
    monkeypatch.undo()

    def unwritable(obj, path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(torch, "save", unwritable)
    with one_line_error(error=RunError) as err:
        save(run, 2, Net())
    assert str(err.value) == (f"cannot write checkpoint {run / 'step-00000002' / 'trainer_state.pt'}: "
                              f"Permission denied; the last good checkpoint is {first}")
    assert entries(run) == ["latest", "step-00000001"]


def test_repair_run_says_in_one_line_what_it_repaired(tmp_path):
    run = tmp_path / "run"
    assert repair_run(run) is None  # no folder
    for step in (1, 2, 3):
        save(run, step, Net(seed=step))
    assert repair_run(run) is None  # nothing to repair
    (run / "step-00000002").rename(run / ".step-00000002.old-1a2b3c4d")  # a re-save killed mid-way
    (run / "step-00000003" / "trainer_state.pt").unlink()  # half-deleted by an older version
    shutil.copytree(run / "step-00000001", run / ".step-00000004.tmp-x_9")  # a save killed while writing
    (run / ".latest.k2j4l5.tmp").write_text("step-0000")
    (run / "latest").write_text(".step-00000004.tmp-x_9")
    assert repair_run(run) == (
        f"repaired {run}: put back step-00000002, which an interrupted re-save had moved away; "
        "pointed latest at step-00000002 (it read '.step-00000004.tmp-x_9'); removed the incomplete "
        "step-00000003; removed 2 hidden leftovers of interrupted saves")
    assert entries(run) == ["latest", "step-00000001", "step-00000002"]
    assert same(load_weights(run), weights(Net(seed=2)))
    (run / "step-00000001" / "model.safetensors").unlink()
    (run / "step-00000002" / "run_config.json").unlink()
    assert repair_run(run) == (f"repaired {run}: removed latest (it read 'step-00000002'; no complete "
                               "checkpoint is left); removed the incomplete step-00000001, step-00000002")
    assert entries(run) == []


@pytest.mark.parametrize("system", ["lattice", "neurograph"])
def test_runs_saved_before_need_no_repair(tmp_path, system):
    """Runs without a trainer state (evaluation only) are complete with weights and config."""
    run = shutil.copytree(Path(__file__).parents[1] / "fixtures" / system, tmp_path / system)
    assert repair_run(run) is None
    assert entries(run) == entries(Path(__file__).parents[1] / "fixtures" / system)

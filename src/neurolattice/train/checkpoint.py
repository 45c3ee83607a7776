"""Checkpoints: versioned step directories behind an atomically updated ``latest`` pointer.

Layout of a run directory (the model's tensors are :func:`checkpoint_tensors`)::

    out/
      latest                  text: the name of the newest complete checkpoint, e.g. "step-00000400"
      step-00000400/
        model.safetensors     the model's state dict (safetensors.torch)
        run_config.json       {"model": <the system's config dict>, "train": <TrainConfig dict>}
        trainer_state.pt      optimizer, scheduler, RNG states, data position, step (torch.save)

A model with ``save_pretrained`` (a ``transformers.PreTrainedModel``) writes its weights with
it instead: ``model.safetensors`` (tied weights such as ``lm_head.weight`` stored once), the HF
``config.json`` and ``generation_config.json``, so ``AutoModelForCausalLM.from_pretrained``
loads a step directory as it is; :func:`load_checkpoint` restores the tied names left out.

Atomic at every instant. A save writes its files into a hidden ``.step-N.tmp-*`` directory,
fsyncs each file and the directory, and renames it to ``step-N`` in one step; only then does
``latest`` move to it (written beside it, fsynced, renamed over the old pointer). So a visible
``step-N`` directory is complete or absent, and ``latest`` names a complete visible one or is
absent. Nothing visible is rebuilt or deleted in place:

- a re-save of a step that exists renames the old directory to a hidden ``.step-N.old-*``,
  renames the new one in, points ``latest`` at it, then deletes the old. If ``latest`` named
  that step it first moves back to the newest other complete checkpoint (or is removed when
  there is none), so it never names the instant in which ``step-N`` is absent; a failed
  rename puts the old directory and ``latest`` back;
- pruning (``keep``) renames a directory to a hidden ``.step-N.del-*`` before deleting it.

A killed save leaves only hidden leftovers. :func:`repair_run`, which start-up calls under the
run's lock, clears them: a ``.old`` directory whose ``step-N`` never came back is renamed back
(it was complete when moved away), every other leftover is deleted, and ``latest`` is pointed at
the newest complete checkpoint when it names none. A step directory is *complete* when it holds
its weights and ``run_config.json``, and ``trainer_state.pt`` too where any step directory of the
run has one (runs written for evaluation only, such as the test fixtures, have none). Presence is
enough: each file was whole before its directory became visible.

Every mutating filesystem call of a save goes through the handful of ``_`` primitives below
(``_mkdir``, ``_mkdtemp``, ``_write``, ``_fsync``, ``_rename``, ``_remove``, ``_unlink``), which is
where the tests kill a save to check the above at each step.

A full disk is a one-line :class:`~neurolattice.io.RunError` that names the last good checkpoint,
the temporary directory gone. The rule: an ``OSError`` with errno ``ENOSPC`` or ``EDQUOT``, or a
writer's error whose text says so in its own words: "No space left" (the OS's words, which
safetensors repeats), or torch's short write ("unexpected pos", "file write failed"). Any other
``OSError`` (a read-only folder, say) is a one-line ``RunError`` naming the file.

Reading follows ``latest`` only to a step directory of the same run: its text must be
``step-`` and eight or more digits (what a save writes), never empty, a path or ``..``. Loading
checks names, shapes, finite values and config fields and fails with a one-line ``ValueError``
that names what does not match, before the model is touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neurolattice.io import RunError

LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "run_config.json"
STATE = "trainer_state.pt"
STEP = re.compile(r"step-[0-9]{8,}")
# what a killed save or repair leaves: a step directory being written, replaced or pruned, or a
# pointer being written (the .tmp- folders and .latest. files of older versions included)
LEFTOVER = re.compile(r"\.(step-[0-9]{8,})\.(tmp|old|del)-\w+|\.latest\.\w+\.tmp")
DISK_FULL_WORDS = ("No space left", "unexpected pos", "file write failed")

T = TypeVar("T")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    config: Mapping[str, Any],
    trainer_state: Mapping[str, Any] | None = None,
    keep: int | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``root/step-<step>/`` and point ``root/latest`` at it; keep the newest ``keep``.
    A ``tokenizer`` (anything with ``save_pretrained``) is saved into the same directory.

    ``config`` must be JSON-ready (see :meth:`neurolattice.config.Config.to_dict`). Returns the
    checkpoint directory. A save that fails (a full disk, a read-only folder) is a one-line
    :class:`~neurolattice.io.RunError`; one that fails before its directory is in place leaves
    the run as it was.
    """
    root = Path(root)
    name = f"step-{step:08d}"
    writes: list[tuple[str, Callable[[Path], None]]] = []  # (file, writer), "" is the folder
    if hasattr(model, "save_pretrained"):  # a transformers PreTrainedModel
        writes.append(("", lambda p: model.save_pretrained(p, safe_serialization=True)))
    else:
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in checkpoint_tensors(model).items()}
        writes.append((WEIGHTS, lambda p: save_file(tensors, p)))
    if tokenizer is not None:
        writes.append(("", lambda p: tokenizer.save_pretrained(p)))
    text = json.dumps(dict(config), indent=2) + "\n"
    writes.append((CONFIG, lambda p: p.write_text(text)))
    if trainer_state is not None:
        writes.append((STATE, lambda p: torch.save(dict(trainer_state), p)))
    tmp, file = None, ""
    try:
        _mkdir(root)
        tmp = _mkdtemp(root, name)
        for file, write in writes:
            _write(tmp / file, write)
        file = ""
        _fsync(tmp)
        _publish(root, name, tmp)
    except BaseException as err:
        if tmp is not None and tmp.exists():
            _remove(tmp)
        if isinstance(err, OSError) or (isinstance(err, Exception) and _disk_full(err)):
            raise RunError(_write_failure(err, root, name, file)) from err
        raise
    _prune(root, keep, name)
    return root / name


def _publish(root: Path, name: str, tmp: Path) -> None:
    """Rename the complete ``tmp`` to ``root/name`` and point ``latest`` at it. An existing
    ``root/name`` is renamed away first and deleted last; a failed rename puts it back."""
    final, old, named = root / name, None, False
    try:
        if final.is_dir():
            named = _pointer(root) == name
            if named:  # 'latest' must not name the instant in which final is absent
                others = [p for p in _complete(_step_dirs(root)) if p.name != name]
                if others:
                    _point(root, others[-1].name)
                else:
                    _unlink(root / LATEST)
            hidden = _hidden(root, name, "old")
            _rename(final, hidden)
            old = hidden
        _rename(tmp, final)
    except BaseException:
        if old is not None:
            _rename(old, final)
        if named:
            _point(root, name)
        raise
    _fsync(root)
    _point(root, name)
    if old is not None:
        _remove(old)


def _prune(root: Path, keep: int | None, latest: str) -> None:
    """Remove all but the newest ``keep`` step directories (never ``latest``): each is renamed to
    a hidden name first, so none is ever seen half-deleted. A failure is a one-line ``RunError``."""
    if keep is None:
        return
    trash = []
    try:
        for path in _step_dirs(root)[:-keep]:
            if path.name != latest:
                trash.append(_hidden(root, path.name, "del"))
                _rename(path, trash[-1])
        _discard(root, trash)
    except OSError as err:
        raise RunError(f"checkpoint {root / latest} is saved, but removing an older one failed: {err}") from err


def _discard(root: Path, hidden: list[Path]) -> None:
    """Delete the folders ``hidden`` that were just renamed away, once the renames are durable."""
    if hidden:
        _fsync(root)
    for path in hidden:
        _remove(path)


def _point(root: Path, name: str) -> None:
    """Make ``root/latest`` read ``name``: written beside it, fsynced, renamed over it."""
    tmp = root / f".{LATEST}.{secrets.token_hex(4)}.tmp"
    try:
        _write(tmp, lambda p: p.write_text(name))
        _rename(tmp, root / LATEST)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync(root)


def _hidden(root: Path, name: str, role: str) -> Path:
    """A fresh hidden name in ``root`` for step directory ``name`` in ``role`` ("old", "del")."""
    return root / f".{name}.{role}-{secrets.token_hex(4)}"


# The filesystem primitives: every change a save or a repair makes to the disk is one of these.

def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _mkdtemp(root: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(path)``, then fsync what it wrote: the file, or each file of the folder ``path``."""
    write(path)
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        _fsync(file)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    shutil.rmtree(path)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _disk_full(err: Exception) -> bool:
    """Whether ``err``, raised while writing, says the disk is full (the rule in the module docstring)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(words in str(err) for words in DISK_FULL_WORDS)


def _write_failure(err: Exception, root: Path, name: str, file: str) -> str:
    """The one line of a failed save of ``root/name`` (while writing its ``file``; "" for the
    folder as a whole): what failed, and the checkpoint a resume would load."""
    good = _last_good(root)
    left = f"the last good checkpoint is {good}" if good else "the run has no good checkpoint"
    if _disk_full(err):
        return f"the disk holding {root} is full: checkpoint {root / name} was not saved; {left}"
    reason = (err.strerror if isinstance(err, OSError) else None) or _first_line(err)
    return f"cannot write checkpoint {root / name / file}: {reason}; {left}"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _step_dirs(root: Path) -> list[Path]:
    """The visible step directories of ``root``, oldest first."""
    found = [p for p in root.iterdir() if STEP.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _complete(steps: list[Path]) -> list[Path]:
    """Those of one run's ``steps`` that hold a whole checkpoint (see the module docstring)."""
    files = (WEIGHTS, CONFIG, STATE) if any((p / STATE).is_file() for p in steps) else (WEIGHTS, CONFIG)
    return [p for p in steps if all((p / f).is_file() for f in files)]


def _pointer(root: Path) -> str | None:
    """The text of ``root/latest``, stripped; None when there is no pointer."""
    pointer = root / LATEST
    return pointer.read_bytes().decode(errors="replace").strip() if pointer.is_file() else None


def _latest(root: Path) -> Path | None:
    """The step directory ``root/latest`` names (None: no pointer). A one-line ``ValueError``
    unless it names an existing step directory of ``root`` itself."""
    name = _pointer(root)
    if name is None:
        return None
    if not name:
        raise ValueError(f"{root / LATEST} is empty")
    if not STEP.fullmatch(name):
        raise ValueError(f"{root / LATEST} names {_short(name)!r}, not a step directory of {root}")
    if not (root / name).is_dir():
        raise ValueError(f"{root / LATEST} names {name!r}, which is missing from {root}")
    return root / name


def _short(text: str) -> str:
    """``text`` cut to 200 characters, for a message (a damaged pointer may hold anything)."""
    return text if len(text) <= 200 else text[:200] + "..."


def _last_good(root: Path) -> Path | None:
    """The checkpoint a resume of ``root`` loads once repaired: the one ``latest`` names if that
    is complete, else the newest complete one; None if there is none."""
    try:
        latest = _latest(root)
    except ValueError:
        latest = None
    complete = _complete(_step_dirs(root))
    return latest if latest in complete else (complete[-1] if complete else None)


def repair_run(root: str | os.PathLike) -> str | None:
    """Undo what a killed save left in the run folder ``root``; call it under the run's lock
    (:class:`~neurolattice.io.FolderLock`) before resuming or writing. In order: a step
    directory a re-save moved away and never replaced is renamed back; ``latest``, unless it
    names a complete checkpoint already, is pointed at the newest complete one (or removed if
    there is none); incomplete step directories and every other leftover are deleted.
    Returns one line saying what was repaired, or None if nothing needed it."""
    root = Path(root)
    if not root.is_dir():
        return None
    done, leftovers = [], []
    for path in sorted(root.iterdir()):
        match = LEFTOVER.fullmatch(path.name)
        if match and match[2] == "old" and not (root / match[1]).exists():
            _rename(path, root / match[1])
            done.append(f"put back {match[1]}, which an interrupted re-save had moved away")
        elif match:
            leftovers.append(path)
    before, good = _pointer(root), _last_good(root)
    if good is None and before is not None:
        _unlink(root / LATEST)
        done.append(f"removed {LATEST} (it read {_short(before)!r}; no complete checkpoint is left)")
    elif good is not None and before != good.name:
        was = "was missing" if before is None else f"read {_short(before)!r}"
        done.append(f"pointed {LATEST} at {good.name} (it {was})")
        _point(root, good.name)
    steps = _step_dirs(root)
    incomplete = [p for p in steps if p not in _complete(steps)]
    if incomplete:
        done.append("removed the incomplete " + ", ".join(p.name for p in incomplete))
    if leftovers:
        done.append(f"removed {len(leftovers)} hidden leftover{'s' if len(leftovers) > 1 else ''} "
                    "of interrupted saves")
    trash = []
    for path in incomplete:
        trash.append(_hidden(root, path.name, "del"))
        _rename(path, trash[-1])
    _discard(root, trash)
    for path in leftovers:
        if path.is_dir():
            _remove(path)
        else:
            _unlink(path)
    return f"repaired {root}: " + "; ".join(done) if done else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a run directory (follow ``latest``) or a step directory."""
    path = Path(path)
    latest = _latest(path)
    if latest is not None:
        return latest
    if (path / WEIGHTS).exists():
        return path
    raise ValueError(f"no checkpoint at {path}: it has neither a '{LATEST}' pointer nor a {WEIGHTS}")


def _read(path: Path, read: Callable[[Path], T]) -> T:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing")
    try:
        return read(path)
    except Exception as e:  # any parse failure of a file we wrote means it was damaged
        raise ValueError(f"checkpoint file {path} is corrupt: {_first_line(e)}") from e


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``run_config.json`` dict of the checkpoint at ``path`` (run or step directory)."""
    return _read(resolve_checkpoint(path) / CONFIG, _load_json)


def read_run_config(path: str | os.PathLike, system: str, parse: Callable[[dict[str, Any]], T]) -> tuple[Path, T]:
    """The first half of loading a saved run, the same in every system: resolve ``path`` (run or
    step directory) to its checkpoint, read its ``run_config.json`` and ``parse`` it into the
    system's configs (with ``Config.from_dict(..., saved=True)``: no key left to a default). A
    missing checkpoint, a corrupt file, or a config without the keys, types or values ``parse``
    reads is a one-line ``ValueError`` (``... is not a lattice model checkpoint (...)``).
    Building the model and :func:`load_checkpoint` are the system's second half; the result is a
    :class:`SavedRun`."""
    ckpt = resolve_checkpoint(path)
    saved = read_config(ckpt)
    try:
        return ckpt, parse(saved)
    except KeyError as err:
        reason = f"its {CONFIG} lacks {err}"
    except (TypeError, AttributeError) as err:
        reason = f"its {CONFIG} has a value of the wrong type ({err})"
    except ValueError as err:
        reason = f"its {CONFIG}: {err}"
    raise ValueError(f"{ckpt} is not {system} checkpoint ({reason})")


@dataclass
class SavedRun:
    """A saved run, loaded: the checkpoint it came from and its model (eval mode, on the CPU).
    Each system's ``load_run`` returns a subclass with its configs and data beside them."""

    checkpoint: Path
    model: nn.Module

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (``trainer_state.pt``) of the checkpoint at ``path``, on the CPU."""
    return _read(resolve_checkpoint(path) / STATE, _load_state)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _load_state(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: Mapping[str, Any] | None = None,
    ignore: Collection[str] = (),
) -> dict[str, Any]:
    """Load the weights of the checkpoint at ``path`` into ``model``; return its config dict.

    When ``config`` is given its sections must equal the saved ``run_config.json``'s (see
    :func:`check_config`) except for the dotted field names in ``ignore`` (e.g.
    ``"train.log_every"``). Weights with a NaN or an inf (floating-point tensors; integer ones
    are exempt) are refused. Every check runs before the model is touched, so a failed load
    leaves it as it was.
    """
    ckpt = resolve_checkpoint(path)
    saved = _read(ckpt / CONFIG, _load_json)
    if config is not None:
        check_config(config, saved, f"checkpoint {ckpt}", ignore)
    tensors = _read(ckpt / WEIGHTS, load_file)
    _check_finite(tensors, f"checkpoint {ckpt / WEIGHTS}")
    if hasattr(model, "load_checkpoint_state_dict"):
        check_state_dict(checkpoint_tensors(model), tensors, f"checkpoint {ckpt / WEIGHTS}")
        model.load_checkpoint_state_dict(tensors)
    else:
        tensors = _with_tied(model, tensors)
        check_state_dict(model.state_dict(), tensors, f"checkpoint {ckpt / WEIGHTS}")
        model.load_state_dict(tensors)
    return saved


def _check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """A one-line ``ValueError`` naming the first floating-point tensor with a NaN or an inf."""
    for name, value in tensors.items():
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            raise ValueError(f"{source}: tensor '{name}' has NaN or inf values")


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` holds: ``model.checkpoint_state_dict()`` where the model
    defines it (with ``load_checkpoint_state_dict`` to take it back: a model that saves only
    part of itself, e.g. adapters on a frozen base, as PEFT saves its adapters), else its
    whole ``state_dict()``."""
    return model.checkpoint_state_dict() if hasattr(model, "checkpoint_state_dict") else model.state_dict()


def _with_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` plus the names of ``model`` that share storage with a name in it (tied
    weights, which ``save_pretrained`` stores once)."""
    aliases: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, value in model.state_dict().items():
        if value.numel():
            aliases.setdefault((value.data_ptr(), tuple(value.shape)), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in tensors]
        for name in names if present else ():
            tensors.setdefault(name, tensors[present[0]])
    return tensors


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise a one-line ``ValueError`` unless ``found`` has exactly the names and shapes of
    ``expected`` (a model's ``state_dict()``); ``source`` names where ``found`` came from."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing:
        raise ValueError(f"tensor '{missing[0]}' of the model is missing from {source}"
                         + _more(missing))
    if unexpected:
        raise ValueError(f"tensor '{unexpected[0]}' in {source} does not exist in the model"
                         + _more(unexpected))
    for name, want in expected.items():
        got = found[name]
        if got.shape != want.shape:
            raise ValueError(f"tensor '{name}' has shape {list(got.shape)} in {source} "
                             f"but {list(want.shape)} in the model")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


_ABSENT = object()


def check_config(
    expected: Mapping[str, Any], found: Mapping[str, Any], source: str, ignore: Collection[str] = ()
) -> None:
    """Raise a one-line ``ValueError`` naming the first dotted field (``model.state_size``) in
    which the saved config ``found`` differs from ``expected``, except those in ``ignore``. Only
    the sections (top-level keys) of ``expected`` are compared: ``{"model": ...}`` checks the
    model and not the training run."""
    want = _flatten(json.loads(json.dumps(expected)))  # as JSON would store it: tuples -> lists
    got = _flatten({k: found[k] for k in expected if k in found})
    for key in sorted(want.keys() | got.keys()):
        a, b = got.get(key, _ABSENT), want.get(key, _ABSENT)
        if key not in ignore and a != b:
            raise ValueError(f"config field '{key}' is {_show(a)} in {source} but {_show(b)} in this run")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)

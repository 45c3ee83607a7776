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

A checkpoint is written whole into a hidden temporary directory (each file of ours through
:func:`neurolattice.io.atomic_write`), renamed into place, and only then does ``latest`` move
to it. ``latest`` names a complete directory at every instant, so a save that dies at any point
leaves the previous checkpoint loadable. Loading checks names, shapes and config fields and
fails with a one-line ``ValueError`` that names what does not match.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neurolattice.io import atomic_write, atomic_write_json, atomic_write_text

LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "run_config.json"
STATE = "trainer_state.pt"

T = TypeVar("T")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    config: Mapping[str, Any],
    trainer_state: Mapping[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``root/step-<step>/`` and point ``root/latest`` at it; keep the newest ``keep``.

    ``config`` must be JSON-ready (see :meth:`neurolattice.config.Config.to_dict`). Returns the
    checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        if hasattr(model, "save_pretrained"):  # a transformers PreTrainedModel
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in checkpoint_tensors(model).items()}
            atomic_write(tmp / WEIGHTS, lambda p: save_file(tensors, p))
        atomic_write_json(tmp / CONFIG, dict(config))
        if trainer_state is not None:
            atomic_write(tmp / STATE, lambda p: torch.save(dict(trainer_state), p))
        if not final.exists():
            os.replace(tmp, final)
        else:  # this step was saved before: 'latest' names the complete new copy while the old goes
            atomic_write_text(root / LATEST, tmp.name)
            shutil.rmtree(final)
            shutil.copytree(tmp, final, copy_function=os.link)
        atomic_write_text(root / LATEST, name)
    except BaseException:
        if tmp.exists() and _latest_name(root) != tmp.name:
            shutil.rmtree(tmp)
        raise
    _prune(root, keep)
    return final


def _latest_name(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _prune(root: Path, keep: int | None) -> None:
    """Remove temporaries of interrupted saves and all but the newest ``keep`` checkpoints."""
    latest = _latest_name(root)
    stale = [p for p in root.glob(".step-*.tmp-*") if p.name != latest]
    if keep is not None:
        stale += [p for p in sorted(root.glob("step-*"))[:-keep] if p.name != latest]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a run directory (follow ``latest``) or a step directory."""
    path = Path(path)
    latest = _latest_name(path)
    if latest is not None:
        return path / latest
    if (path / WEIGHTS).exists():
        return path
    raise ValueError(f"no checkpoint at {path}: it has neither a '{LATEST}' pointer nor a {WEIGHTS}")


def _read(path: Path, read: Callable[[Path], T]) -> T:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing")
    try:
        return read(path)
    except Exception as e:  # any parse failure of a file we wrote means it was damaged
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"checkpoint file {path} is corrupt: {reason}") from e


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
    ``"train.log_every"``). Every check runs before the model is touched, so a failed load
    leaves it as it was.
    """
    ckpt = resolve_checkpoint(path)
    saved = _read(ckpt / CONFIG, _load_json)
    if config is not None:
        check_config(config, saved, f"checkpoint {ckpt}", ignore)
    tensors = _read(ckpt / WEIGHTS, load_file)
    if hasattr(model, "load_checkpoint_state_dict"):
        check_state_dict(checkpoint_tensors(model), tensors, f"checkpoint {ckpt / WEIGHTS}")
        model.load_checkpoint_state_dict(tensors)
    else:
        tensors = _with_tied(model, tensors)
        check_state_dict(model.state_dict(), tensors, f"checkpoint {ckpt / WEIGHTS}")
        model.load_state_dict(tensors)
    return saved


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

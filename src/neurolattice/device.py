"""Where a command computes: the ``--device`` and ``--threads`` options every ``train``, ``eval``,
``show`` and ``bench`` takes, checked in one place and said in one line.

``--device`` is ``auto`` (CUDA when ``torch.cuda.is_available()``, else the CPU), ``cpu``, ``cuda``
or ``cuda:N``; ``--threads N`` sets ``torch.set_num_threads(N)`` (torch's default otherwise:
one per core). Under ``torchrun`` a CUDA run gives rank ``r`` GPU ``LOCAL_RANK`` (see
:func:`neurolattice.train.distributed.init_from_env`).
"""

from __future__ import annotations

import argparse

import torch

from neurolattice.bench.harness import cpu_model


def add_device_arguments(parser: argparse.ArgumentParser, default: str = "auto", threads: bool = True) -> None:
    """``--device`` (default ``default``) and, unless ``threads`` is False, ``--threads``."""
    parser.add_argument("--device", default=default,
                        help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: %(default)s)")
    if threads:
        parser.add_argument("--threads", type=int, metavar="N",
                            help="torch threads on the CPU (default: torch's, one per core)")


def check_device(name: str) -> torch.device:
    """The torch device ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) stands for; a one-line
    ``ValueError`` if it is none of these or is a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_threads(threads: int | None) -> None:
    """One-line ``ValueError`` unless ``threads`` is None or >= 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


def check_arguments(args: argparse.Namespace) -> torch.device:
    """:func:`check_device` and :func:`check_threads` of ``args``; returns the device."""
    check_threads(args.threads)
    return check_device(args.device)


def setup(args: argparse.Namespace) -> torch.device:
    """Check ``--device`` and ``--threads``, apply ``--threads`` (and make ``cuda:N`` the current
    GPU) and return the device."""
    device = check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def use(args: argparse.Namespace) -> torch.device:
    """:func:`setup`, then print where the command computes (one line); returns the device."""
    device = setup(args)
    print(f"device: {describe(device)}", flush=True)
    return device


def describe(device: torch.device) -> str:
    """``cpu (AMD EPYC 9B14, 2 threads)`` or ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"

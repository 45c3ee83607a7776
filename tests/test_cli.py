"""What every system's command line shares: ``--device`` and ``--threads`` on each command that
trains, evaluates, plots or generates, checked before anything is loaded, in one line."""

from __future__ import annotations

import pytest

from neurolattice.cli import SYSTEMS, build_parser

from .errors import cli_error

# every command but the benchmarks (which have their own --device with default cpu) and the BEM study
ON_A_MODEL = [(system, command) for system, (_, commands) in SYSTEMS.items() for command in commands
              if not command.startswith("bench") and command != "experiment"]


def required(system: str, command: str, tmp_path) -> list[str]:
    """The positional CKPT of commands on a saved run (nothing there: the device is checked first),
    BEM's --base and a free --out for training."""
    argv = [str(tmp_path / "no-run")] if command not in ("train",) else ["--out", str(tmp_path / "out")]
    if system == "bem" and command == "train":
        argv += ["--base", str(tmp_path / "no-base")]
    if command in ("sample", "generate"):
        argv += ["--prompt", "x"]
    return argv


@pytest.mark.parametrize(("system", "command"), ON_A_MODEL)
def test_every_command_on_a_model_takes_device_and_threads(system, command, tmp_path):
    argv = [system, command, *required(system, command, tmp_path)]
    defaults = build_parser(system).parse_args(argv)
    assert (defaults.device, defaults.threads) == ("auto", None)
    args = build_parser(system).parse_args([*argv, "--device", "cpu", "--threads", "2"])
    assert (args.device, args.threads) == ("cpu", 2)


@pytest.mark.parametrize(("system", "command"), ON_A_MODEL)
def test_a_bad_device_or_thread_count_is_one_line(system, command, tmp_path, capsys):
    argv = [system, command, *required(system, command, tmp_path)]
    assert "--device must be a torch device such as cpu or cuda" in cli_error(capsys, argv + ["--device", "tpu9"])
    assert "--device must be auto, cpu, cuda or cuda:N" in cli_error(capsys, argv + ["--device", "meta"])
    assert "--threads must be >= 1" in cli_error(capsys, argv + ["--threads", "0"])

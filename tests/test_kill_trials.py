"""``kill -9`` at a random moment of ``train``, then ``--resume`` (repeated until the run ends):
the final weights are byte-identical to an uninterrupted run's, for every trained system.

Slow (``make test-all``): ``KILL_TRIALS`` trials per system (default 20), each a real process
killed with SIGKILL at a time drawn uniformly over the uninterrupted run's wall time (seeded, so
a failure can be replayed), then resumed in fresh processes. One thread per process
(``OMP_NUM_THREADS=1``), so the arithmetic is the same in every process. Run with ``-s`` to see
the summary line per system.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRIALS = int(os.environ.get("KILL_TRIALS", "20"))
SOURCES = Path(__file__).parents[1] / "src" / "neurolattice"
TINY_LM = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_size=64", "model.seq_len=64",
           "data.seq_len=32", "data.tokenizer=byte", "train.batch_size=4", "train.warmup_steps=1"]

pytestmark = pytest.mark.slow


def command(system: str, out: Path, fixtures: dict[str, Path]) -> list[str]:
    """A tiny ``train`` of ``system`` into ``out`` that checkpoints every step (NeuroGraph: every
    epoch, and on the way out of Ctrl-C; a kill -9 loses the epoch under way)."""
    cli = [sys.executable, "-m", "neurolattice.cli", system, "train", "--out", str(out), "--device", "cpu"]
    if system == "lattice":
        return [*cli, "lattice.dims=[8, 8, 1]", "lattice.state_size=4", "model.steps=1", "train.steps=12",
                "train.batch_size=16", "train.checkpoint_every=1", "train.log_every=5", "train.eval_every=0"]
    if system == "lm":
        return [*cli, "--data", str(fixtures["text"]), *TINY_LM, "train.steps=12", "train.checkpoint_every=1",
                "train.log_every=5", "train.eval_every=0"]
    if system == "bem":
        return [*cli, "--base", str(fixtures["base"]), "data.seq_len=32", "data.train_bytes=6000",
                "data.heldout_bytes=1500", "bem.rank=2", "bem.chunk_size=4", "bem.prefix_len=8", "train.steps=12",
                "train.batch_size=4", "train.checkpoint_every=1", "train.log_every=5", "train.eval_every=0"]
    if system == "neurograph":
        return [*cli, "neurograph.n=150", "neurograph.n_input=40", "neurograph.epochs=2", "neurograph.restarts=2",
                "neurograph.probe_epochs=1", "neurograph.batch_size=128"]
    raise ValueError(system)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def finish(argv: list[str], out: Path) -> None:
    """Run ``argv`` (with ``--resume`` once ``out`` holds a run) until it ends with status 0."""
    for _ in range(3):
        resume = ["--resume"] if (out / "latest").exists() else []
        done = subprocess.run([*argv, *resume], env=ENV, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "already holds a run" not in done.stderr and "holds no run" not in done.stderr:
            raise AssertionError(done.stderr[-2000:])
    raise AssertionError(f"{argv} did not finish")


def final_weights(out: Path) -> dict[str, bytes]:
    """The weight files of the run's last checkpoint (and of its T = 0 baseline's, if any)."""
    runs = [out, out / "T0"] if (out / "T0").exists() else [out]
    return {str(run.relative_to(out)): (run / (run / "latest").read_text().strip() / "model.safetensors").read_bytes()
            for run in runs}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("kill")
    text = tmp / "text"
    text.mkdir()
    for source in ("config.py", "model.py", "task.py"):
        shutil.copy(SOURCES / "lm" / source, text / source)
    base = tmp / "base"
    subprocess.run([sys.executable, "-m", "neurolattice.cli", "lm", "train", "--data", str(text), "--out", str(base),
                    *TINY_LM, "train.steps=1"], env=ENV, check=True, capture_output=True)
    return {"text": text, "base": base}


@pytest.mark.parametrize("system", ["lattice", "lm", "bem", "neurograph"])
def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(system, fixtures, tmp_path):
    straight = tmp_path / "straight"
    start = time.monotonic()
    finish(command(system, straight, fixtures), straight)
    wall = time.monotonic() - start
    want = final_weights(straight)
    rng = random.Random(f"{system}-kill")
    killed_at = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        argv = command(system, out, fixtures)
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0, wall)
        try:
            proc.wait(timeout=delay)  # it may end before the kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at.append(delay)
        finish(argv, out)
        assert final_weights(out) == want, f"trial {trial}: killed after {delay:.2f} s"
        shutil.rmtree(out)
    print(f"\n{system}: {TRIALS} trials, {len(killed_at)} killed (at {min(killed_at, default=0):.1f}-"
          f"{max(killed_at, default=0):.1f} s of a {wall:.1f} s run), all resumed to byte-identical final weights")

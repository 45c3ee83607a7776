"""The trainer's data parallelism in real ``torchrun`` launches (gloo, CPU, float64).

The same global batch of 8 samples a step, in micro-batches of 2, on 1 rank x 4 micro-batches,
2 x 2 and 4 x 1 must give the same parameters after 3 steps; a 2-rank run stopped after step 1
and resumed in a fresh launch, on 1, 2 or 4 ranks, must end where the uninterrupted run ends.
The token task pads with -100, so ranks and micro-batches hold unequal target counts: only the
loss normalised by the step's global target count agrees across the splits. The launches are
shared by the tests through one module fixture: 3 launches, 8 ranks, about 25 s on 2 cores,
nearly all of it the ranks importing torch and torch._dynamo (which DDP pulls in).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from neurolattice.train import distributed

from .ddp_worker import BPE_VOCAB, CONFIG, SEQ, lm_model, main, model

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, jobs: list[dict] | dict, killed: bool = False, worker: Path = WORKER) -> None:
    """Run ``worker``'s ``jobs`` (JSON, its one argument) under ``torchrun`` on ``nproc`` CPU ranks;
    fail with its output if it fails, or, with ``killed``, unless it fails (its workers killed themselves)."""
    torchrun(nproc, [str(worker), json.dumps(jobs)], killed)


def torchrun(nproc: int, argv: list[str], killed: bool = False) -> str:
    """``torchrun ... ARGV`` (a script and its arguments, or ``-m module ...``) on ``nproc`` CPU
    ranks, one torch thread each; its output (stdout and stderr), or a test failure showing it if
    it fails (with ``killed``: unless it fails)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own group: a hung launch dies whole
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun x{nproc} did not finish in {TIMEOUT_S} s; its output:\n{output[-12000:]}")
    if (proc.returncode != 0) != killed:
        pytest.fail(f"torchrun x{nproc} exited with {proc.returncode}; its output:\n{output[-12000:]}")
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run of the tests below, one directory each, named ``<ranks>x<micro-batches>[-...]``."""
    root = tmp_path_factory.mktemp("ddp")

    def job(name: str, **kw) -> dict:
        return {"out": str(root / name), **kw}

    launch(2, [job("2x2"), job("2x2-stop", until=1),
               job("2x2-dropout", dropout=0.3), job("2x2-dropout-stop", until=1, dropout=0.3),
               job("lm-2x2", lm=True), job("bpe-2x2", bpe=True)])
    for name in ("1x4-resume", "2x2-resume", "4x1-resume"):
        shutil.copytree(root / "2x2-stop", root / name)
    shutil.copytree(root / "2x2-dropout-stop", root / "2x2-dropout-resume")
    launch(4, [job("4x1"), job("4x1-resume", resume=True), job("lm-4x1", lm=True), job("bpe-4x1", bpe=True)])
    launch(2, [job("2x2-resume", resume=True), job("2x2-dropout-resume", resume=True, dropout=0.3)])
    launch(2, [job("2x2-killed", kill_after=1)], killed=True)
    launch(2, [job("2x2-killed", resume=True)])
    main([job("1x4"), job("1x4-resume", resume=True), job("lm-1x4", lm=True),
          job("bpe-1x4", bpe=True)])  # here: no process group
    return root


def result(runs: Path, name: str) -> dict:
    return torch.load(runs / name / "result.pt")


def params(runs: Path, name: str) -> dict[str, torch.Tensor]:
    return result(runs, name)["params"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Splits of a step sum its gradient in other orders. In float64 a gradient entry (|g| <= 1 after
# clipping to norm 1) errs by at most terms * eps64, terms = the step's 8 x 6 targets summed plus
# the longest sum inside the models (the LM's 257-way softmax, then two 32-wide layers). AdamW's
# update lr * m / (sqrt(v) + eps) moves by at most lr / eps times that (eps = 1e-8 bounds the
# division where g ~ 0; in float32 the same ratio makes a gradient's last-bit flip an lr-sized
# step, hence float64 here), and each step adds its own. Over the run's steps:
TERMS = CONFIG.batch_size * SEQ + 257 + 2 * 32
SPLIT_BOUND = CONFIG.steps * CONFIG.lr * TERMS * torch.finfo(torch.float64).eps / 1e-8
# the BPE model's softmax runs over BPE_VOCAB ids instead of 257: that many more terms
BPE_BOUND = CONFIG.steps * CONFIG.lr * (BPE_VOCAB - 257) * torch.finfo(torch.float64).eps / 1e-8


def test_ranks_times_micro_batches_do_not_change_the_result(runs):
    """1 x 4, 2 x 2 and 4 x 1 after 3 steps: DDP's gradient average over ranks, sync on the
    last micro-batch only, and the global target count of the step."""
    one = params(runs, "1x4")
    assert one["emb.weight"].dtype == torch.float64
    assert max_diff(one, model().state_dict()) > 1e-2  # the steps moved the parameters
    for name in ("2x2", "4x1"):
        assert max_diff(params(runs, name), one) <= SPLIT_BOUND, name


def test_the_lm_gives_the_same_parameters_on_any_split(runs):
    """The same for the LM system's model (a Hugging Face Llama, float64)."""
    one = params(runs, "lm-1x4")
    assert max_diff(one, lm_model().state_dict()) > 1e-3  # the steps moved the parameters
    for name in ("lm-2x2", "lm-4x1"):
        assert max_diff(params(runs, name), one) <= SPLIT_BOUND, name


def test_the_lm_on_bpe_tokens_gives_the_same_parameters_on_any_split(runs):
    """The same on real text tokenized by a BPE that every rank trained for itself (any rank
    whose tokenizer differed would hold other batches, and the parameters would part)."""
    one = params(runs, "bpe-1x4")
    assert one["model.embed_tokens.weight"].shape[0] == BPE_VOCAB
    assert max_diff(one, lm_model(vocab_size=BPE_VOCAB, eod_id=0).state_dict()) > 1e-3
    for name in ("bpe-2x2", "bpe-4x1"):
        assert max_diff(params(runs, name), one) <= SPLIT_BOUND + BPE_BOUND, name


@pytest.mark.parametrize("name", ["2x2", "4x1", "2x2-resume", "4x1-resume"])
def test_gradients_are_all_reduced_on_the_last_micro_batch_of_a_step_only(runs, name):
    """One all-reducing backward per step, out of the 2 (2 x 2) or 1 (4 x 1) of each rank."""
    run = result(runs, name)
    assert run["steps"] == (2 if "resume" in name else 3)
    assert run["synced_backwards"] == run["steps"]
    assert result(runs, "1x4")["synced_backwards"] == 0  # one process: no DDP at all


def test_a_killed_run_resumed_in_a_fresh_launch_ends_as_the_uninterrupted_one(runs):
    """2 ranks SIGKILLed during step 2 (after step 1's checkpoint, before step 2's): the
    relaunch resumes from step 1 and ends exactly where the uninterrupted run ends."""
    assert result(runs, "2x2-killed")["steps"] == 2          # the relaunch ran steps 2 and 3
    # the same steps on the same 2 ranks (a 2-term all-reduce rounds alike in either order): exact
    assert max_diff(params(runs, "2x2-killed"), params(runs, "2x2")) == 0


@pytest.mark.parametrize("name", ["1x4-resume", "2x2-resume", "4x1-resume", "2x2-dropout-resume"])
def test_a_stopped_run_resumed_in_a_fresh_launch_ends_as_the_uninterrupted_one(runs, name):
    """Stopped after step 1 of 3 on 2 ranks, resumed on 1, 2 or 4: the optimizer moments, the
    schedule and the data position come back; with dropout (same 2 ranks) each rank's RNG too."""
    full = "2x2-dropout" if "dropout" in name else "2x2"
    if name.startswith("2x2"):  # the same steps on the same 2 ranks (a 2-term all-reduce rounds alike): exact
        assert max_diff(params(runs, name), params(runs, full)) == 0
    else:
        assert max_diff(params(runs, name), params(runs, full)) <= SPLIT_BOUND
    assert max_diff(params(runs, f"{full}-stop"), params(runs, full)) > 1e-3
    # rank 0 alone logs: each step once, the stopped run's step 1 then the resumed 2 and 3
    steps = [json.loads(line)["step"] for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (runs / name / "latest").read_text() == "step-00000003"


def test_dropout_runs_differ(runs):
    """The dropout runs above are a real test of the RNG states: dropout changes the result."""
    assert max_diff(params(runs, "2x2-dropout"), params(runs, "2x2")) > 1e-3


def test_init_from_env_does_nothing_in_a_plain_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.init_from_env("cpu") as device:
        assert device == torch.device("cpu")
        assert not dist.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    with pytest.raises(ValueError, match=r"^device must be 'cuda', 'cpu' or None, got 'tpu'$"):
        with distributed.init_from_env("tpu"):
            pass

"""Bench harness: timing calls, isolated runs, machine header (no timing assertions)."""

import pytest

from neurolattice.bench.harness import available_memory_bytes, machine_info, run_isolated, time_ms


def counter():
    calls = []
    return calls, lambda: calls.append(None)


def test_time_ms_does_warmup_then_repeats():
    calls, fn = counter()
    assert time_ms(fn, warmup=2, repeats=3) >= 0
    assert len(calls) == 5


def test_time_ms_budget_stops_after_one_timed_call():
    calls, fn = counter()
    time_ms(fn, warmup=1, repeats=10, budget_s=0.0)
    assert len(calls) == 2


def test_time_ms_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_ms(lambda: None, repeats=0)


def test_run_isolated_returns_the_result_and_peak_memory():
    result = run_isolated("json:loads", {"s": '{"answer": 42}'})
    assert result["answer"] == 42
    assert isinstance(result["peak_mem_bytes"], int) and result["peak_mem_bytes"] >= 0


def test_run_isolated_reports_the_workers_error():
    with pytest.raises(RuntimeError, match="json:loads failed .*JSONDecodeError"):
        run_isolated("json:loads", {"s": "not json"})


def test_machine_info_and_memory():
    info = machine_info("cpu")
    assert info["torch_threads"] >= 1 and info["device"].startswith("cpu")
    available = available_memory_bytes("cpu")
    assert available is None or available > 0

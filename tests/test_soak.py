"""The soak benchmark's 2-minute version: a gateway at a fixed request rate keeps its memory flat
(benchmarks/bench_soak.py; the 30-minute run and its curve are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("bench_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_verdict_reads_the_trend_of_the_last_third():
    rise = _soak_module().slope_rise
    assert rise([(0, 100.0), (10, 100.0), (20, 100.0)]) == 0.0
    assert rise([(0, 100.0), (10, 105.0), (20, 110.0)]) == pytest.approx(10.0)
    assert rise([(0, 100.0), (10, 130.0), (20, 100.0)]) == pytest.approx(0.0)  # a spike that comes back is no trend


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="the soak reads /proc (Linux)")
def test_two_minutes_at_four_requests_a_second_keep_the_memory_flat():
    run = subprocess.run([sys.executable, str(SCRIPT), "--minutes", "2", "--rate", "4", "--sample-s", "10"],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert sum(line.startswith("t ") for line in lines) >= 12  # a sample every 10 s
    summary = next(line for line in lines if " requests at 4/s over 2 min: " in line)
    assert int(summary.split()[0]) >= 400 and summary.endswith(f"{{'200': {summary.split()[0]}}}"), summary  # all answered
    assert lines[-1] == "verdict: flat", run.stdout[-2000:]

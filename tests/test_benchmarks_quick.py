"""Benchmarks run in their quick mode, so that none can rot unnoticed (figures are not checked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'


def test_threads_benchmark_quick_mode():
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    run = subprocess.run([sys.executable, str(BENCH / 'bench_threads.py'), '--quick', '--json'], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    (row,) = result['rows']
    assert row['machine'] == 'quiet' and row['ours_steps_per_s'] > 0 and row['baseline_steps_per_s'] > 0

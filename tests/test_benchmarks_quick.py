"""Every benchmark runs in its quick mode, so that none can rot unnoticed (figures are not checked).

The scripts are found by globbing ``benchmarks/bench_*.py``: a new benchmark is tested as soon as it
exists, and must offer ``--quick`` (tiny sizes, a few seconds, the same code path and the same table
shape as the full run).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'
SCRIPTS = sorted(BENCH.glob('bench_*.py'))
# A markdown table: a header row, then a separator row of dashes (with optional alignment colons).
TABLE = re.compile(r'^\|.*\|\s*\n\|(\s*:?-{3,}:?\s*\|)+\s*$', re.MULTILINE)


def run_quick(script, *extra):
    # OMP_NUM_THREADS from the test environment would change the thread benchmark's question.
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    env.setdefault('PYTHONWARNINGS', 'ignore')
    return subprocess.run([sys.executable, str(script), '--quick', *extra], capture_output=True, text=True,
                          timeout=600, env=env, cwd=BENCH.parent)


def test_benchmarks_are_found():
    names = {s.name for s in SCRIPTS}
    assert {'bench_interpolation.py', 'bench_loader.py', 'bench_training.py'} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_quick_mode_prints_a_markdown_table(script):
    run = run_quick(script)
    assert run.returncode == 0, f'{script.name} --quick failed:\n{run.stderr[-3000:]}'
    assert TABLE.search(run.stdout), f'{script.name} --quick printed no markdown table:\n{run.stdout[-2000:]}'


"""benchmarks/gpu_check.sh, on a machine without a GPU: it must not rot before the day a GPU is at hand.

What can be checked here: the script parses; without CUDA it stops at once with a clear message
and exit 2 (not a traceback, not a pass); every test that skips itself without CUDA carries the
`cuda` marker the script selects; the benchmark options it passes are ones the scripts offer.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.sh'


def test_it_parses():
    subprocess.run(['bash', '-n', str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA device is here: the script would run')
def test_without_cuda_it_stops_at_once_with_a_clear_message():
    out = subprocess.run(['bash', str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'PYTHON': sys.executable})
    assert out.returncode == 2
    assert 'no CUDA device' in out.stderr and 'Traceback' not in out.stderr + out.stdout


def skips_without_cuda(decorator):
    "Whether a decorator node is ``pytest.mark.skipif(not torch.cuda.is_available(), ...)`` or a name bound to one."
    return 'skipif(not torch.cuda.is_available()' in ast.unparse(decorator)


def test_every_test_that_needs_cuda_is_marked_cuda():
    unmarked, marked = [], 0
    for path in sorted((ROOT / 'tests').glob('test_*.py')):
        tree = ast.parse(path.read_text())
        aliases = {target.id for node in tree.body if isinstance(node, ast.Assign) and skips_without_cuda(node.value)
                   for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith('test_'):
                continue
            texts = [ast.unparse(d) for d in node.decorator_list]
            needs = any(skips_without_cuda(d) or t in aliases for d, t in zip(node.decorator_list, texts))
            if needs:
                marked += 1
                if 'pytest.mark.cuda' not in texts:
                    unmarked.append(f'{path.name}::{node.name}')
    assert not unmarked, f'not marked cuda (gpu_check.sh would not run them): {unmarked}'
    assert marked >= 5


def test_the_options_it_passes_are_offered():
    for script in ('bench_interpolation.py', 'bench_loader.py', 'bench_training.py'):
        assert f'benchmarks/{script}' in SCRIPT.read_text()
        help_text = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), '--help'], capture_output=True,
                                   text=True, check=True, timeout=120).stdout
        assert '--quick' in help_text, script
    # A CUDA run asked for where there is none: a one-line refusal, not a crash.
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_training.py'), '--device', 'cuda',
                              '--quick'], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and 'CUDA is not available' in out.stderr

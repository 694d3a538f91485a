"""benchmarks/bench_builder.py runs in its quick mode (so it cannot rot unnoticed); figures are not checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_builder.py'


@pytest.mark.slow
def test_builder_benchmark_quick_mode():
    run = subprocess.run([sys.executable, str(BENCH), '--quick', '--json'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result['volume_shape'] == [16, 16, 16, 8]
    assert [r['mode'] for r in result['rows']] == ['imports', 'builder', 'former']
    assert all(r['peak_rss_mb'] > 0 for r in result['rows'])

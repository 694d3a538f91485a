"""The README's quick tour runs as written (on the demo data, one epoch instead of eight)."""
import re
import subprocess
import sys
from pathlib import Path

from dwiml_nb.data import make_demo_dataset

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_quick_tour_runs(tmp_path):
    tour = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)[0]
    assert "MultiSubjectDataset('demo/phantom.hdf5')" in tour and 'max_epochs=8' in tour
    make_demo_dataset(tmp_path / 'demo', which='phantom', progress=False)
    script = tmp_path / 'tour.py'
    script.write_text(tour.replace('max_epochs=8', 'max_epochs=1'))
    run = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / 'experiments' / 'run1' / 'best_model' / 'model_state.pt').exists()

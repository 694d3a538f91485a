"""The README's "Tracking with a trained model" pipeline, run as written (the scripts as subprocesses):
the dipy demo, `dwiml_train_model` for 8 epochs, `dwiml_track_from_model` with 300 seeds in `wm_mask`,
stopped by it, streamlines under 80 mm dropped, on the validation subject, `dwiml_score_tractogram`, and the overlay picture. Its scores
are what the README reports; the run takes about 1.5 minutes on 2 CPU cores.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FIRST_LINE = '# The dipy demo'

# The floors this pipeline must keep, under the figures the README gives (Dice 0.693, valid ratio 0.855;
# 0.898, 0.833 and 0.819 with other seeds). Issue #14: Dice >= 0.5 and valid ratio >= 0.8; the floors sit slightly
# under the figures: what a regression of the model, the tracker (e.g. the backward halves' context) or the
# scoring breaks.
MIN_DICE = 0.6
MIN_VALID_RATIO = 0.8


def readme_tracking_block():
    "The README's bash block that runs the tracking pipeline (the one starting with `FIRST_LINE`)."
    found = [m.group(1) for m in re.finditer(r'^```bash\n(.*?)^```', (REPO / 'README.md').read_text(), re.S | re.M)
             if m.group(1).lstrip().startswith(FIRST_LINE)]
    assert len(found) == 1, f'README: {len(found)} bash blocks start with {FIRST_LINE!r}'
    return found[0]


@pytest.mark.slow
def test_the_readme_tracking_pipeline_reaches_its_scores(tmp_path):
    env = {**os.environ, 'PATH': f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(['bash', '-euo', 'pipefail', '-c', readme_tracking_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f'exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
    scores = json.loads((tmp_path / 'scores.json').read_text())
    assert scores['nb_reference_streamlines'] == 150 and scores['nb_streamlines'] > 150    # 173 of 300 are 80 mm or longer
    assert scores['dice'] >= MIN_DICE, scores
    assert scores['valid_ratio'] >= MIN_VALID_RATIO, scores
    assert set(scores['bundles']) == {'AF_L', 'CC_ForcepsMajor', 'CST_R'}
    assert (tmp_path / 'tracking.png').stat().st_size > 10_000
    assert 'valid_ratio' in done.stdout                     # the scores table was printed

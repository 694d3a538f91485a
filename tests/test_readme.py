"""Every command and snippet of the README runs as written, in README order, in a fresh folder laid
out like a checkout (settings.ini, nbs/train_model.ipynb, .venv), as a user who copies them would.

The only changes made to what the README says are options that shorten training (fewer epochs or
batches per epoch); each is listed where it is applied. A README block that no step below runs
fails `test_every_readme_block_is_run`, so a new snippet cannot go untested.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
VENV_BIN = Path(sys.executable).parent


def blocks():
    "The README's fenced blocks, as (language, text)."
    return [(m.group(1), m.group(2)) for m in re.finditer(r'^```(\w*)\n(.*?)^```', README.read_text(), re.S | re.M)]


def block(lang, first_words):
    "The one README block of `lang` that starts with `first_words`."
    found = [text for l, text in blocks() if l == lang and text.lstrip().startswith(first_words)]
    assert len(found) == 1, f'README: {len(found)} {lang} blocks start with {first_words!r}'
    return found[0]


# (language, first words) of every block, and how it is exercised.
STEPS = {
    ('bash', 'bash tools/run.sh demo'): 'test_the_two_readme_commands',
    ('', 'validation angular error: untrained model'): 'test_the_two_readme_commands',   # what demo prints
    ('python', 'from dwiml_nb.dataset import MultiSubjectDataset\nfrom dwiml_nb.sampler'): 'test_quick_tour_trains_and_resumes',
    ('json', '{"input"'): 'test_building_and_loading_an_hdf5_dataset',
    ('bash', 'dwiml_create_hdf5_dataset my_db/'): 'test_building_and_loading_an_hdf5_dataset',
    ('', '{"format_version": 1'): 'test_building_and_loading_an_hdf5_dataset',   # the --json schema
    ('python', 'from dwiml_nb.dataset import MultiSubjectDataset\nds = '): 'test_building_and_loading_an_hdf5_dataset',
    ('python', 'from torch.utils.data import DataLoader'): 'test_building_and_loading_an_hdf5_dataset',
    ('bash', 'dwiml_make_demo_dataset demo/'): 'test_demo_data_command',
    ('', '<experiments_path>/<experiment_name>/'): None,   # a folder layout, not code
    ('bash', 'dwiml_train_model experiments run2'): 'test_script_training_and_resume',
    ('bash', '.venv/bin/papermill nbs/train_model.ipynb runs/train.ipynb'): 'test_notebook_with_papermill',
    ('bash', 'dwiml_visualize_batch '): 'test_visualize_batch_and_logs',
    ('bash', 'dwiml_visualize_logs '): 'test_visualize_batch_and_logs',
    ('python', 'from dwiml_nb.trackers import'): 'test_quick_tour_trains_and_resumes',
    ('bash', 'torchrun --standalone'): 'test_torchrun_command',
    ('', '$ dwiml_create_hdf5_dataset db/'): 'test_the_error_shown_is_the_real_one',
    ('bash', '# The dipy demo'): 'tests/test_tracking_demo.py',   # runs that block itself (slow)
}


def test_every_readme_block_is_run():
    for lang, text in blocks():
        steps = [step for (l, start), step in STEPS.items() if l == lang and text.lstrip().startswith(start)]
        assert steps, f'README block run by no test:\n{text[:300]}'


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
    "A folder laid out like the repository, as far as the README's commands look."
    root = tmp_path_factory.mktemp('checkout')
    shutil.copy(REPO / 'settings.ini', root / 'settings.ini')
    (root / 'nbs').mkdir()
    shutil.copy(REPO / 'nbs' / 'train_model.ipynb', root / 'nbs' / 'train_model.ipynb')
    (root / '.venv').symlink_to(Path(sys.prefix))
    return root


def run(cmd, cwd, timeout=900, env=None, check=True):
    "A shell command as a user types it, with the venv's scripts on the PATH."
    full_env = {**os.environ, 'PATH': f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    done = subprocess.run(['bash', '-euo', 'pipefail', '-c', cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check:
        assert done.returncode == 0, f'{cmd}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
    return done


def shorter(text, *replacements):
    "The README text with `(old, new)` replacements that only shorten training; each must apply."
    for old, new in replacements:
        assert old in text, f'{old!r} is no longer in the README block'
        text = text.replace(old, new)
    return text


@pytest.fixture(scope='module')
def demo_done(checkout):
    "`bash tools/run.sh demo` (the main job), on 2 epochs, with its data and runs in the checkout folder."
    commands = block('bash', 'bash tools/run.sh demo')
    assert commands.splitlines()[0].split('#')[0].strip() == 'bash tools/run.sh demo'
    # `bash tools/run.sh test` is the command running this test: not run again from here.
    assert commands.splitlines()[1].split('#')[0].strip() == 'bash tools/run.sh test'
    done = run(f'bash {REPO}/tools/run.sh demo -p max_epochs 2', checkout,
               env={'DWIML_DEMO_DIR': str(checkout / 'demo'), 'DWIML_RUNS_DIR': str(checkout / 'runs')})
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_two_readme_commands(demo_done, checkout):
    # The epochs stream to the terminal while papermill runs the notebook.
    assert 'INFO dwiml_nb.trainer: epoch 0: train loss' in demo_done
    assert 'INFO dwiml_nb.trainer: epoch 1: train loss' in demo_done
    shown = block('', 'validation angular error: untrained model').strip()
    # The README shows the 8-epoch figures; this run has 2 epochs: the same line, other numbers.
    pattern = ''.join(r'[\d.]+' if re.fullmatch(r'[\d.]+', part) else re.escape(part)
                      for part in re.split(r'(\d+(?:\.\d+)?)', shown))
    assert re.search(pattern, demo_done), (shown, demo_done[-2000:])
    assert (checkout / 'runs' / 'experiments' / 'demo' / 'best_model' / 'model_state.pt').exists()


@pytest.mark.slow
def test_quick_tour_trains_and_resumes(demo_done, checkout):
    tour = shorter(block('python', 'from dwiml_nb.dataset import MultiSubjectDataset\nfrom dwiml_nb.sampler'),
                   ('max_epochs=8', 'max_epochs=1'), ('new_max_epochs=12', 'new_max_epochs=2'))
    trackers = shorter(block('python', 'from dwiml_nb.trackers import'), ('max_epochs=2', 'max_epochs=1'))
    (checkout / 'tour.py').write_text(tour + '\n' + trackers)
    run(f'{sys.executable} tour.py', checkout)
    epochs = (checkout / 'experiments' / 'run1' / 'logs' / 'epochs.csv').read_text().strip().splitlines()
    assert len(epochs) == 1 + 2   # header, the first run's epoch, the resumed one
    assert list((checkout / 'experiments' / 'exp1' / 'tensorboard').glob('events.out.tfevents.*'))


def make_readme_database(checkout):
    "A database folder for the README's config: dwi/, t1, wm_mask and tractograms of the demo phantom."
    demo_db = checkout / 'demo' / 'phantom'
    db = checkout / 'my_db'
    shutil.rmtree(db, ignore_errors=True)
    for subj_dir in sorted(p for p in demo_db.iterdir() if p.is_dir()):
        out = db / subj_dir.name
        (out / 'dwi').mkdir(parents=True)
        shutil.copy(subj_dir / 'input.nii.gz', out / 'dwi' / 'dwi.nii.gz')
        shutil.copy(subj_dir / 'wm_mask.nii.gz', out / 't1.nii.gz')
        shutil.copy(subj_dir / 'wm_mask.nii.gz', out / 'wm_mask.nii.gz')
        shutil.copytree(subj_dir / 'tractograms', out / 'tractograms')
    for name, out in (('training', 'train'), ('validation', 'valid'), ('testing', 'test')):
        shutil.copy(demo_db / f'{name}.txt', checkout / f'{out}.txt')
    return db


@pytest.mark.slow
def test_building_and_loading_an_hdf5_dataset(demo_done, checkout):
    make_readme_database(checkout)
    (checkout / 'config.json').write_text(block('json', '{"input"'))
    done = run(block('bash', 'dwiml_create_hdf5_dataset my_db/'), checkout)
    description = json.loads(done.stdout)
    assert description['format_version'] == 1 and description['step_size'] == 0.5
    schema = block('', '{"format_version": 1')
    depth, top_keys = 0, []
    for m in re.finditer(r'"(\w+)": |[{}\[\]]', schema):
        if m.group(1) is None:
            depth += 1 if m.group(0) in '{[' else -1
        elif depth == 1:
            top_keys.append(m.group(1))
    assert 'subjects' in top_keys and 'totals' in top_keys
    assert set(top_keys) <= set(description), set(top_keys) - set(description)
    # dwi (32 features) + t1 (1), standardized per file
    assert {g['nb_features'] for s in description['subjects'].values() for g in s['groups'].values()
            if g['type'] == 'volume'} == {33}
    loading = block('python', 'from dwiml_nb.dataset import MultiSubjectDataset\nds = ')
    sampling = block('python', 'from torch.utils.data import DataLoader')
    (checkout / 'loading.py').write_text(loading + sampling.replace('    ...', '    assert batch.inputs.shape[1] == 33 * 7')
                                         + "\nprint('batches ok', lengths_mm.shape, tuple(dwi.shape))\n")
    assert 'batches ok' in run(f'{sys.executable} loading.py', checkout).stdout


@pytest.mark.slow
def test_demo_data_command(demo_done, checkout):
    run(block('bash', 'dwiml_make_demo_dataset demo/'), checkout)
    for name in ('phantom', 'dipy'):
        assert (checkout / 'demo' / f'{name}.hdf5').is_file()


SHORT_EPOCHS = ' --max_batches_per_epoch_training 3 --max_batches_per_epoch_validation 2'


@pytest.mark.slow
def test_script_training_and_resume(demo_done, checkout):
    commands = block('bash', 'dwiml_train_model experiments run2').strip().splitlines()
    for command in commands:   # both commands, each with epochs cut to 3 batches
        run(command + (SHORT_EPOCHS if command.startswith('dwiml_train_model') else ''), checkout)
    epochs = (checkout / 'experiments' / 'run2' / 'logs' / 'epochs.csv').read_text().strip().splitlines()
    assert len(epochs) == 1 + 6


@pytest.mark.slow
def test_notebook_with_papermill(demo_done, checkout):
    for command in block('bash', '.venv/bin/papermill nbs/train_model.ipynb runs/train.ipynb').strip().splitlines():
        run(command + ' -p max_batches_per_epoch 2 -p progress False', checkout)
    # Relative paths are the checkout's: the demo it found, the experiments folder it wrote.
    epochs = (checkout / 'experiments' / 'train_model' / 'logs' / 'epochs.csv').read_text().strip().splitlines()
    assert len(epochs) == 1 + 12
    assert not (checkout / 'nbs' / 'demo').exists() and not (checkout / 'nbs' / 'experiments').exists()


@pytest.mark.slow
def test_visualize_batch_and_logs(demo_done, checkout):
    # The blocks below read run1 and run2; under pytest-xdist the tests that write them may have run
    # in another worker (another checkout), or only one of them in this one.
    if not (checkout / 'experiments' / 'run1').exists():
        test_quick_tour_trains_and_resumes(demo_done, checkout)
    if not (checkout / 'experiments' / 'run2').exists():
        test_script_training_and_resume(demo_done, checkout)
    run(block('bash', 'dwiml_visualize_batch '), checkout)
    assert (checkout / 'batch.png').stat().st_size > 10_000
    run(block('bash', 'dwiml_visualize_logs '), checkout)
    assert (checkout / 'curves.png').stat().st_size > 10_000
    assert 'plotly' in (checkout / 'curves.html').read_text()[:200_000].lower()


@pytest.mark.slow
def test_torchrun_command(demo_done, checkout):
    command = block('bash', 'torchrun --standalone').replace('\\\n', ' ')
    run(command.strip() + SHORT_EPOCHS, checkout)
    assert (checkout / 'experiments' / 'ddp_run' / 'results.json').exists()


def test_the_error_shown_is_the_real_one(demo_done, checkout):
    shown = block('', '$ dwiml_create_hdf5_dataset db/').strip().splitlines()
    command, message = shown[0][2:], shown[1]
    db = make_readme_database(checkout)
    shutil.rmtree(checkout / 'db', ignore_errors=True)
    db.rename(checkout / 'db')
    (checkout / 'config.json').write_text(block('json', '{"input"'))
    (checkout / 'db' / 'sub-07' / 't1.nii.gz').unlink()
    done = run(command, checkout, check=False)
    assert done.returncode == 2 and not (checkout / 'out.hdf5').exists()
    assert done.stderr.strip() == message

"""The training notebook (papermill, a real Jupyter kernel), its script twin, and a user's own trainer."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from dwiml_nb.data import make_demo_dataset
from dwiml_nb.trainer import experiment_paths

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    return make_demo_dataset(out, which='phantom', nb_subjects=4, progress=False).hdf5_files['phantom']


def _papermill(out_nb, cwd, **params):
    import papermill as pm
    return pm.execute_notebook(str(REPO / 'nbs' / 'train_model.ipynb'), str(out_nb), parameters=params,
                               kernel_name='python3', cwd=str(cwd), progress_bar=False)


@pytest.mark.slow
def test_training_notebook_runs_then_resumes_the_same_experiment(tmp_path, phantom):
    common = dict(hdf5_file=str(phantom), experiments_path=str(tmp_path / 'exp'), experiment_name='nb',
                  batch_size=30, max_batches_per_epoch=3, num_workers=0, seed=7)
    _papermill(tmp_path / 'first.ipynb', tmp_path, max_epochs=1, **common)
    paths = experiment_paths(tmp_path / 'exp', 'nb')
    assert len(pd.read_csv(paths['root'] / 'logs' / 'epochs.csv')) == 1
    first_weights = torch.load(paths['last_model'], weights_only=True)

    _papermill(tmp_path / 'resumed.ipynb', tmp_path, max_epochs=2, resume=True, **common)
    epochs = pd.read_csv(paths['root'] / 'logs' / 'epochs.csv')
    assert epochs['epoch'].tolist() == [0, 1]
    resumed_weights = torch.load(paths['last_model'], weights_only=True)
    assert any(not torch.equal(first_weights[k], resumed_weights[k]) for k in first_weights)
    results = json.loads((paths['root'] / 'results.json').read_text())
    assert results['epochs_trained'] == 2
    # The executed notebook kept its parameters cell and shows the resume path was taken.
    executed = json.loads((tmp_path / 'resumed.ipynb').read_text())
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in executed['cells'])


@pytest.mark.slow
def test_training_notebook_refuses_to_overwrite_an_experiment(tmp_path, phantom):
    import papermill as pm
    common = dict(hdf5_file=str(phantom), experiments_path=str(tmp_path / 'exp'), experiment_name='nb',
                  batch_size=30, max_batches_per_epoch=1, max_epochs=1)
    _papermill(tmp_path / 'first.ipynb', tmp_path, **common)
    with pytest.raises(pm.PapermillExecutionError, match='exists'):
        _papermill(tmp_path / 'again.ipynb', tmp_path, **common)


@pytest.mark.slow
def test_train_script_then_resume_script(tmp_path, phantom):
    exp = tmp_path / 'exp'
    run = subprocess.run([BIN / 'dwiml_train_model', exp, 'cli', phantom, 'input', 'streamlines',
                          '--max_epochs', '1', '--batch_size', '30', '--max_batches_per_epoch_training', '2',
                          '--max_batches_per_epoch_validation', '1', '--no_progress', '--device', 'cpu'],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert 'validation angular error' in run.stdout
    run = subprocess.run([BIN / 'dwiml_resume_training_from_checkpoint', exp, 'cli', '--new_max_epochs', '2',
                          '--no_progress'], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert pd.read_csv(exp / 'cli' / 'logs' / 'epochs.csv')['epoch'].tolist() == [0, 1]


@pytest.mark.parametrize('script', ['dwiml_train_model', 'dwiml_resume_training_from_checkpoint',
                                    'dwiml_create_hdf5_dataset', 'dwiml_describe_hdf5', 'dwiml_make_demo_dataset'])
@pytest.mark.slow
def test_every_script_has_help(script):
    run = subprocess.run([BIN / script, '--help'], capture_output=True, text=True)
    assert run.returncode == 0 and 'usage' in run.stdout.lower(), run.stderr


def test_train_script_bad_input_is_one_line(tmp_path):
    run = subprocess.run([BIN / 'dwiml_train_model', tmp_path, 'x', tmp_path / 'missing.hdf5', 'input',
                          'streamlines'], capture_output=True, text=True)
    assert run.returncode == 2
    assert 'missing.hdf5' in run.stderr and 'Traceback' not in run.stderr


def test_a_user_subclasses_the_trainer_in_ten_lines(tmp_path, phantom):
    script = tmp_path / 'my_training.py'
    script.write_text(textwrap.dedent(f'''
        import torch
        from dwiml_nb.trainer import DWIMLAbstractTrainer
        from dwiml_nb.dataset import MultiSubjectDataset
        from dwiml_nb.sampler import BatchStreamlinesSamplerOneInput

        class MeanFeatureTrainer(DWIMLAbstractTrainer):
            def compute_batch_loss(self, data, is_training):
                return ((self.model(data.inputs.to(self.device)) - 1.) ** 2).mean()

        ds = MultiSubjectDataset({str(phantom)!r}).load_data(progress=False)
        s = lambda subset: BatchStreamlinesSamplerOneInput(subset, 'streamlines', 'input', batch_size=20,
                                                            max_batches_per_epoch=2)
        trainer = MeanFeatureTrainer(torch.nn.Linear(32, 1), {str(tmp_path)!r}, 'mine', s(ds.training_set),
                                     s(ds.validation_set), max_epochs=2, progress=False)
        print(len(trainer.train_and_validate()))
    '''))
    run = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith('2')
    assert (tmp_path / 'mine' / 'best_model' / 'model_state.pt').exists()
